"""Restoring images larger than one network tile.

Large test images (GoPro's 1280x720, full-size photos) are split into
overlapping square tiles, restored a fixed-size batch at a time so the
sampler compiles once, and blended back with a smooth window so tile borders
leave no seams.
"""

from collections.abc import Callable

import numpy as np

Array = np.ndarray


def _starts(length: int, tile: int, stride: int) -> list[int]:
  """Tile offsets along one axis; the last tile is aligned to the border."""
  starts = list(range(0, length - tile, stride))
  return starts + [length - tile]


def _window_1d(tile: int, overlap: int) -> Array:
  """Raised-cosine ramps over `overlap` pixels at each end, flat inside.

  Pixel centres sit half a pixel into the ramp, so the weight is never zero
  (every pixel keeps a defined normalised value) and two tiles overlapping by
  exactly `overlap` sum to one there.
  """
  if overlap == 0:
    return np.ones(tile)
  k = np.arange(tile) + 0.5
  ramp = np.clip(np.minimum(k, tile - k) / overlap, 0.0, 1.0)
  return np.sin(0.5 * np.pi * ramp) ** 2


def _pad_to(image: Array, tile: int) -> Array:
  """Pads a side shorter than `tile` by mirroring, so square tiles fit."""
  h, w = image.shape[:2]
  pad = ((0, max(tile - h, 0)), (0, max(tile - w, 0)), (0, 0))
  return np.pad(image, pad, mode='symmetric')


def restore_tiled(fn: Callable[[Array], Array], image: Array, tile: int,
                  overlap: int, batch: int) -> Array:
  """Applies an image-to-image `fn` tile by tile with seamless blending.

  Args:
    fn: float32 [n, h, w, 3] -> [n, h, w, 3] in [-1, 1]. Called once on the
      whole image ([1, H, W, 3]) when it fits a tile; otherwise always on
      [batch, tile, tile, 3], the final batch padded with repeats of its last
      tile so `fn` sees one shape.
    image: float32 [H, W, 3] in [-1, 1].
    tile: tile side in pixels.
    overlap: pixels shared by neighbouring tiles (0 <= overlap < tile).
    batch: tiles per `fn` call.

  Returns:
    float32 [H, W, 3].
  """
  if not 0 <= overlap < tile:
    raise ValueError(f'need 0 <= overlap < tile, got {overlap=} {tile=}')
  if batch < 1:
    raise ValueError(f'need batch >= 1, got {batch=}')
  image = np.asarray(image, np.float32)
  h, w = image.shape[:2]
  if h <= tile and w <= tile:
    return np.asarray(fn(image[None]), np.float32)[0]

  padded = _pad_to(image, tile)
  ph, pw = padded.shape[:2]
  stride = tile - overlap
  corners = [(y, x) for y in _starts(ph, tile, stride)
             for x in _starts(pw, tile, stride)]
  window = np.outer(_window_1d(tile, overlap), _window_1d(tile, overlap))
  window = window[..., None]
  # float64 accumulators: the blend of a pointwise fn must reproduce the
  # untiled result to rounding, whatever the number of overlapping tiles.
  acc = np.zeros(padded.shape, np.float64)
  norm = np.zeros((ph, pw, 1), np.float64)
  for i in range(0, len(corners), batch):
    chunk = corners[i:i + batch]
    tiles = [padded[y:y + tile, x:x + tile] for y, x in chunk]
    tiles += [tiles[-1]] * (batch - len(tiles))
    out = np.asarray(fn(np.stack(tiles)), np.float32)
    for (y, x), t in zip(chunk, out):
      acc[y:y + tile, x:x + tile] += window * t
      norm[y:y + tile, x:x + tile] += window
  return (acc / norm)[:h, :w].astype(np.float32)
