"""Image files in, RGB uint8 out: reading, converting, encoding, hashing.

Datasets store each image as bytes: the source file itself when it is already
an 8-bit RGB PNG/JPEG (small on disk, decodes to exactly the pixels checked
at build time), else the raw pixels as `.npy` (synthesised inputs, converted
or resized images). Raw costs nothing to decode, which is what the training
pipeline does for every crop; PNG would cost 3-5x more time and, for the
noisy inputs that dominate this case, saves almost no space.
"""
import hashlib
import io
import os
import threading

from absl import logging
import numpy as np
from PIL import Image

from drdd_jax.data.options import DataError

_NPY_MAGIC = b'\x93NUMPY'
EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp',
              '.ppm', '.pgm')
# Modes that PIL converts to RGB without guessing a value range.
_TO_RGB = {'L': 'grayscale', 'LA': 'grayscale+alpha', 'RGBA': 'RGBA',
           'P': 'palette', 'PA': 'palette+alpha', '1': '1-bit',
           'CMYK': 'CMYK', 'YCbCr': 'YCbCr', 'RGBX': 'RGBX', 'RGBa': 'RGBa',
           'La': 'grayscale+alpha', 'LAB': 'LAB', 'HSV': 'HSV'}


def is_image(path: str) -> bool:
  return os.path.splitext(path)[1].lower() in EXTENSIONS


def list_images(folder: str, recursive: bool = False) -> list[str]:
  """Image files in `folder` (sorted); other non-hidden files are logged."""
  if recursive:
    paths = [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs]
  else:
    paths = [os.path.join(folder, f) for f in os.listdir(folder)]
    paths = [p for p in paths if os.path.isfile(p)]
  paths = [p for p in paths if not os.path.basename(p).startswith('.')]
  others = sorted(p for p in paths if not is_image(p))
  if others:
    logging.info('%s: ignoring %d non-image file(s): %s', folder, len(others),
                 ', '.join(os.path.relpath(p, folder) for p in others[:5]))
  images = sorted(p for p in paths if is_image(p))
  if not images:
    raise DataError(f'{folder}: no image files ({", ".join(EXTENSIONS)})')
  return images


def load(path: str, max_size: int = 0) -> tuple[np.ndarray, bytes]:
  """Reads an image file as RGB uint8, converting what can be converted.

  Args:
    path: the file.
    max_size: if > 0, the longer side is resized (Lanczos) to at most this.

  Returns:
    `(pixels, data)`: uint8 [H, W, 3] and the bytes to store (the file itself
    when nothing changed and it is an 8-bit RGB PNG/JPEG, else `encode`).

  Raises:
    DataError: naming the file, when it cannot be read or converted.
  """
  try:
    with open(path, 'rb') as f:
      raw = f.read()
    image = Image.open(io.BytesIO(raw))
    frames = getattr(image, 'n_frames', 1)
    if frames > 1:
      raise DataError(f'{path}: has {frames} frames; store one image per file')
    # PIL silently keeps the high byte of 16-bit RGB (and forgets the tile
    # once loaded): note it here to say so.
    sixteen = any(';16' in str(t.args) for t in (image.tile or ()))
    image.load()
  except DataError:
    raise
  except Exception as e:  # PIL raises many types for broken files.
    raise DataError(f'{path}: cannot read image ({type(e).__name__}: {e})'
                    ) from e
  pixels, why = _to_rgb8(image, path, sixteen)
  keep = not why and image.format in ('PNG', 'JPEG')
  if max_size and max(pixels.shape[:2]) > max_size:
    pixels, keep = resize(pixels, max_size), False
  if why:
    logging.warning('%s: converted %s to 8-bit RGB', path, why)
  return pixels, raw if keep else encode(pixels)


def _to_rgb8(image: Image.Image, path: str,
             sixteen: bool) -> tuple[np.ndarray, str]:
  """Returns uint8 RGB pixels and what was converted ('' if nothing)."""
  mode = image.mode
  if mode == 'RGB':
    return np.asarray(image), '16-bit RGB' if sixteen else ''
  if mode in _TO_RGB:
    return np.asarray(image.convert('RGB')), _TO_RGB[mode]
  if mode.startswith('I'):  # I, I;16, I;16B, ...: integer grayscale.
    x = np.asarray(image).astype(np.int64)
    if x.min() < 0 or x.max() > 65535:
      raise DataError(f'{path}: {mode} image with values outside 0..65535; '
                      'convert it to 8-bit RGB')
    x = ((x * 255 + 32767) // 65535).astype(np.uint8)
    return np.repeat(x[..., None], 3, axis=-1), f'16-bit grayscale ({mode})'
  raise DataError(f'{path}: image mode {mode} has no agreed 8-bit RGB form; '
                  'convert it to 8-bit RGB')


def resize(pixels: np.ndarray, max_size: int) -> np.ndarray:
  """Resizes so that the longer side is `max_size` (aspect kept)."""
  h, w = pixels.shape[:2]
  scale = max_size / max(h, w)
  size = (max(1, round(w * scale)), max(1, round(h * scale)))
  return np.asarray(Image.fromarray(pixels).resize(size, Image.LANCZOS))


def encode(pixels: np.ndarray) -> bytes:
  """`.npy` bytes of a uint8 array (lossless, deterministic)."""
  out = io.BytesIO()
  np.lib.format.write_array(out, np.ascontiguousarray(pixels),
                            allow_pickle=False)
  return out.getvalue()


# numpy reads `.npy` headers with `ast.literal_eval`, and CPython 3.11's AST
# construction is not thread-safe: grain's threads decoding at once failed with
# "SystemError: AST constructor recursion depth mismatch" (CPython gh-106905).
_NPY_LOCK = threading.Lock()


def decode(data: bytes) -> np.ndarray:
  """uint8 [H, W, 3] from bytes that `load` or `encode` returned (thread-safe)."""
  if data[:6] == _NPY_MAGIC:
    with _NPY_LOCK:
      return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
  return np.asarray(Image.open(io.BytesIO(data)).convert('RGB'))



def digest(pixels: np.ndarray) -> str:
  """A short content hash, equal for equal pixels (pool de-duplication)."""
  h = hashlib.sha1(str(pixels.shape).encode())
  h.update(np.ascontiguousarray(pixels).tobytes())
  return h.hexdigest()[:16]
