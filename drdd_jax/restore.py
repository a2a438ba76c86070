"""Restoring a folder of images with any image-to-image function.

Model-free on purpose: `restore_folder` handles files (reading, converting to
RGB uint8, atomic writes, per-file failures, progress) and takes the model as
a `restore_image` callable, which `restore_image_fn` builds from a batched
sampler via `tiling.restore_tiled`.
"""

from collections.abc import Callable
import os
import sys

from absl import logging
import numpy as np
from PIL import Image

from drdd_jax import tiling

Array = np.ndarray

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp')

# Output format per extension, and options that keep what the format allows.
_FORMATS = {
    '.png': ('PNG', {}),
    '.jpg': ('JPEG', {'quality': 95, 'subsampling': 0}),
    '.jpeg': ('JPEG', {'quality': 95, 'subsampling': 0}),
    '.bmp': ('BMP', {}),
    '.tif': ('TIFF', {}),
    '.tiff': ('TIFF', {}),
    '.webp': ('WEBP', {'lossless': True}),
}


def list_images(folder: str) -> list[str]:
  """Sorted file names in `folder` with an image extension (any case)."""
  return sorted(
      name for name in os.listdir(folder)
      if name.lower().endswith(IMAGE_EXTENSIONS)
      and os.path.isfile(os.path.join(folder, name)))


def _to_uint8(a: Array, peak: float) -> Array:
  return np.round(np.clip(a.astype(np.float64) * (255.0 / peak), 0, 255)
                  ).astype(np.uint8)


def load_rgb_uint8(path: str) -> Array:
  """Reads an image as RGB uint8 [H, W, 3], logging any conversion.

  Grayscale is repeated to three channels, alpha is dropped, palettes are
  expanded and 16-bit / integer / float data are rescaled to 8 bits. The
  pixel grid is kept as stored (EXIF orientation is not applied), so the
  output matches the input's size.

  Args:
    path: image file.

  Returns:
    uint8 [H, W, 3].

  Raises:
    OSError, ValueError: unreadable or corrupt file.
  """
  name = os.path.basename(path)
  with Image.open(path) as img:
    img.load()
    mode = img.mode
    if mode == 'RGB':
      return np.asarray(img, np.uint8).copy()
    if mode.startswith('I;16') or mode in ('I', 'F'):
      a = np.asarray(img)
      if mode == 'F':
        peak = 1.0 if a.max() <= 1.0 else 255.0
      else:
        peak = 65535.0 if mode.startswith('I;16') or a.max() > 255 else 255.0
      rgb = np.repeat(_to_uint8(a, peak)[..., None], 3, axis=-1)
    else:
      rgb = np.asarray(img.convert('RGBA' if 'A' in mode or mode == 'P'
                                   else 'RGB'), np.uint8)[..., :3].copy()
  logging.info('%s: converted %s to RGB uint8.', name, mode)
  return rgb


def _write_atomic(image: Array, path: str) -> None:
  """Writes via a temporary file in the same folder, then renames."""
  fmt, options = _FORMATS[os.path.splitext(path)[1].lower()]
  folder, name = os.path.split(path)
  # A hidden name in the same folder: os.replace is then atomic, and plain
  # open() keeps the user's umask (mkstemp would force mode 0600).
  tmp = os.path.join(folder, f'.{name}.{os.getpid()}.tmp')
  try:
    with open(tmp, 'wb') as f:
      Image.fromarray(image, 'RGB').save(f, format=fmt, **options)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


class _Progress:
  """tqdm when available, else a single rewritten stderr line."""

  def __init__(self, total: int, enabled: bool):
    self._bar, self._done, self._total = None, 0, total
    self._enabled = enabled
    if enabled:
      try:
        import tqdm  # pylint: disable=g-import-not-at-top
        self._bar = tqdm.tqdm(total=total, unit='img', desc='restore')
      except ImportError:
        pass

  def update(self) -> None:
    self._done += 1
    if self._bar is not None:
      self._bar.update()
    elif self._enabled:
      sys.stderr.write(f'\rrestore {self._done}/{self._total}')
      sys.stderr.flush()

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    elif self._enabled:
      sys.stderr.write('\n')


def restore_folder(input_dir: str, output_dir: str,
                   restore_image: Callable[[Array], Array], *,
                   progress: bool = True) -> list[tuple[str, str]]:
  """Restores every image in `input_dir` into `output_dir`, same names.

  A file that cannot be read, restored or written is logged and skipped; the
  others go on. Outputs keep the input's size and file name (a JPEG stays a
  JPEG, written at quality 95) and appear only once completely written.

  Args:
    input_dir: folder of images (not searched recursively).
    output_dir: created if missing; must differ from `input_dir`.
    restore_image: uint8 [H, W, 3] -> uint8 [H, W, 3].
    progress: show a progress bar on stderr.

  Returns:
    (file name, reason) for each file that failed, in name order.
  """
  if os.path.realpath(input_dir) == os.path.realpath(output_dir):
    raise ValueError('output_dir must differ from input_dir')
  os.makedirs(output_dir, exist_ok=True)
  names = list_images(input_dir)
  logging.info('Restoring %d images from %s to %s.', len(names), input_dir,
               output_dir)
  failed = []
  bar = _Progress(len(names), progress)
  try:
    for name in names:
      try:
        image = load_rgb_uint8(os.path.join(input_dir, name))
        out = np.asarray(restore_image(image))
        if out.shape != image.shape or out.dtype != np.uint8:
          raise ValueError(f'restore_image returned {out.dtype} {out.shape} '
                           f'for uint8 {image.shape}')
        _write_atomic(out, os.path.join(output_dir, name))
      except Exception as e:  # pylint: disable=broad-except
        # One bad file must not cost the rest of the folder.
        reason = f'{type(e).__name__}: {e}'
        logging.error('Failed to restore %s: %s', name, reason)
        failed.append((name, reason))
      bar.update()
  finally:
    bar.close()
  return failed


def restore_image_fn(sample_fn: Callable[[Array], Array], tile: int,
                     overlap: int, batch: int) -> Callable[[Array], Array]:
  """Turns a batched float sampler into a uint8 `restore_image`.

  Args:
    sample_fn: float32 [n, h, w, 3] in [-1, 1] -> same shape; any randomness
      (keys) is the caller's to close over.
    tile: tile side for `tiling.restore_tiled`.
    overlap: tile overlap in pixels.
    batch: tiles per `sample_fn` call.

  Returns:
    uint8 [H, W, 3] -> uint8 [H, W, 3].
  """

  def restore_image(image: Array) -> Array:
    x = np.asarray(image, np.float32) / 127.5 - 1.0
    y = tiling.restore_tiled(sample_fn, x, tile, overlap, batch)
    return np.round(np.clip((y + 1.0) * 127.5, 0, 255)).astype(np.uint8)

  return restore_image
