"""Tests for drdd_jax.restore: folder restoring with a stand-in model."""

import os

import numpy as np
import pytest
from PIL import Image

from drdd_jax import restore


def _invert(image):
  assert image.dtype == np.uint8 and image.shape[-1] == 3
  return 255 - image


@pytest.fixture
def folder(tmp_path):
  rng = np.random.default_rng(0)
  src = tmp_path / 'in'
  src.mkdir()
  rgb = lambda h, w: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  Image.fromarray(rgb(37, 51)).save(src / 'a.png')
  Image.fromarray(rgb(20, 30)).save(src / 'b.JPG')
  Image.fromarray(rgb(9, 13)[..., 0], 'L').save(src / 'gray.png')
  Image.fromarray(rng.integers(0, 256, (12, 8, 4), dtype=np.uint8),
                  'RGBA').save(src / 'alpha.webp')
  Image.fromarray(rng.integers(0, 65536, (10, 14), dtype=np.uint16)).save(
      src / 'deep.tif')
  (src / 'bad.png').write_bytes(rng.bytes(500))
  (src / 'notes.txt').write_text('not an image')
  return src


def test_restore_folder_skips_corrupt_file(folder, tmp_path):
  out = tmp_path / 'out' / 'nested'
  failed = restore.restore_folder(str(folder), str(out), _invert,
                                  progress=False)
  assert [name for name, _ in failed] == ['bad.png']
  good = ['a.png', 'alpha.webp', 'b.JPG', 'deep.tif', 'gray.png']
  assert sorted(os.listdir(out)) == good  # no temp files left behind
  for name in good:
    with Image.open(folder / name) as src, Image.open(out / name) as dst:
      assert dst.size == src.size and dst.mode == 'RGB'
  with Image.open(out / 'b.JPG') as dst:
    assert dst.format == 'JPEG'
  a_in = np.asarray(Image.open(folder / 'a.png'))
  np.testing.assert_array_equal(np.asarray(Image.open(out / 'a.png')),
                                255 - a_in)


def test_conversions_to_rgb_uint8(folder):
  deep = np.asarray(Image.open(folder / 'deep.tif'))
  got = restore.load_rgb_uint8(str(folder / 'deep.tif'))
  assert got.dtype == np.uint8 and got.shape == deep.shape + (3,)
  np.testing.assert_array_equal(got[..., 1], np.round(deep / 257.0))
  gray = restore.load_rgb_uint8(str(folder / 'gray.png'))
  assert gray.shape == (9, 13, 3) and np.all(gray[..., 0] == gray[..., 2])
  assert restore.load_rgb_uint8(str(folder / 'alpha.webp')).shape == (12, 8, 3)


def test_failing_model_is_reported_and_others_continue(folder, tmp_path):
  def flaky(image):
    if image.shape[:2] == (20, 30):
      raise RuntimeError('out of memory')
    return image

  failed = dict(restore.restore_folder(str(folder), str(tmp_path / 'o'),
                                       flaky, progress=False))
  assert set(failed) == {'bad.png', 'b.JPG'}
  assert 'out of memory' in failed['b.JPG']
  assert len(os.listdir(tmp_path / 'o')) == 4


def test_same_input_and_output_folder_is_refused(folder):
  with pytest.raises(ValueError):
    restore.restore_folder(str(folder), str(folder), _invert, progress=False)


def test_restore_image_fn_roundtrips_and_tiles():
  image = np.random.default_rng(1).integers(0, 256, (70, 90, 3), np.uint8)
  shapes = []

  def sampler(x):
    shapes.append(x.shape)
    assert x.dtype == np.float32 and x.min() >= -1 and x.max() <= 1
    return x

  restore_image = restore.restore_image_fn(sampler, tile=32, overlap=8,
                                           batch=4)
  np.testing.assert_array_equal(restore_image(image), image)
  assert set(shapes) == {(4, 32, 32, 3)}
  negate = restore.restore_image_fn(lambda x: -x, tile=128, overlap=8, batch=1)
  np.testing.assert_array_equal(negate(image), 255 - image)
