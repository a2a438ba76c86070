"""Tests for drdd_jax.tiling: exactness, one compiled shape, no seams."""

import numpy as np
import pytest

from drdd_jax import tiling


def _smooth_image(h, w):
  y, x = np.mgrid[0:h, 0:w].astype(np.float32)
  img = np.stack([np.sin(y / 37), np.cos(x / 23), np.sin((x + y) / 51)], -1)
  return (0.8 * img).astype(np.float32)


class _Recorder:
  """Wraps a fn and records the shapes it was called with."""

  def __init__(self, fn):
    self.fn, self.shapes = fn, []

  def __call__(self, x):
    self.shapes.append(x.shape)
    return self.fn(x, len(self.shapes) - 1)


def test_fits_one_tile_calls_fn_on_whole_image():
  img = _smooth_image(40, 57)
  # Not pointwise: the result depends on the whole input it sees.
  fn = _Recorder(lambda x, i: x - x.mean(axis=(1, 2), keepdims=True))
  out = tiling.restore_tiled(fn, img, tile=64, overlap=16, batch=4)
  assert fn.shapes == [(1, 40, 57, 3)]
  np.testing.assert_allclose(out, img - img.mean(axis=(0, 1)), atol=1e-6)


@pytest.mark.parametrize('shape', [(301, 517), (40, 200), (65, 64)])
def test_pointwise_fn_tiled_equals_untiled(shape):
  img = _smooth_image(*shape)
  fn = _Recorder(lambda x, i: x * 0.5)
  out = tiling.restore_tiled(fn, img, tile=64, overlap=16, batch=4)
  assert out.shape == img.shape and out.dtype == np.float32
  np.testing.assert_allclose(out, img * 0.5, rtol=0, atol=1e-6)
  assert set(fn.shapes) == {(4, 64, 64, 3)}  # one shape: one compilation


def _max_step(a):
  """Largest jump between neighbouring pixels, both directions."""
  return max(np.abs(np.diff(a, axis=0)).max(), np.abs(np.diff(a, axis=1)).max())


@pytest.mark.parametrize('name', ['constant_per_call', 'tile_local_gradient'])
def test_no_seams(name):
  img = _smooth_image(150, 190)
  ramp = np.linspace(0, 0.2, 48, dtype=np.float32)[None, :, None, None]
  fns = {
      # Each call (one tile) is shifted by its own offset in [0, 0.2).
      'constant_per_call': lambda x, i: x + 0.2 * ((i * 7) % 10) / 10,
      # Every tile gets the same ramp across its own rows: a jump at borders.
      'tile_local_gradient': lambda x, i: x + ramp,
  }
  blended = tiling.restore_tiled(_Recorder(fns[name]), img, tile=48,
                                 overlap=16, batch=1)
  hard = tiling.restore_tiled(_Recorder(fns[name]), img, tile=48, overlap=0,
                              batch=1)
  base_step = _max_step(img)
  # Without blending the tile borders jump by ~0.1-0.2 (the test has power)...
  assert _max_step(hard - img) > 0.1
  # ...with the raised-cosine blend every step stays small.
  assert _max_step(blended - img) < 0.03
  assert _max_step(blended) < base_step + 0.03


def test_rejects_bad_overlap():
  with pytest.raises(ValueError):
    tiling.restore_tiled(lambda x: x, np.zeros((100, 100, 3)), 32, 32, 1)
