"""Synthetic degradations, one per task, as common practice makes them.

Each function maps a clean uint8 [H, W, 3] image and a seeded
`np.random.Generator` to its degraded uint8 version; the same seed gives the
same bytes. Sizes (streak length, blur extent) scale with the image so that
small CPU-sized photos degrade like full-size ones.
"""
import hashlib

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy import signal

NOISE_SIGMA = 25.0  # Gaussian noise std on the 0..255 scale (AiO5 denoise).


def _to_float(x: np.ndarray) -> np.ndarray:
  return x.astype(np.float32) / 255.0


def _to_uint8(x: np.ndarray) -> np.ndarray:
  return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def lowlight(clean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Darkening `k * x^gamma` plus Poisson-Gaussian sensor noise."""
  x = _to_float(clean)
  dark = rng.uniform(0.2, 0.5) * x ** rng.uniform(1.8, 3.0)
  shot, read = rng.uniform(0.002, 0.01), rng.uniform(0.003, 0.015)
  noise = (np.sqrt(shot * dark) * rng.standard_normal(x.shape) +
           read * rng.standard_normal(x.shape))
  return _to_uint8(dark + noise)


def _line_kernel(length: float, angle: float) -> np.ndarray:
  """A soft line through the kernel centre; `angle` in radians from vertical."""
  size = int(np.ceil(length)) | 1
  t = np.linspace(-(length - 1) / 2, (length - 1) / 2, 2 * size)
  c = size // 2
  k = np.zeros((size, size), np.float32)
  k[np.round(c + t * np.cos(angle)).astype(int),
    np.round(c + t * np.sin(angle)).astype(int)] = 1.0
  k = ndimage.gaussian_filter(k, 0.5)
  return k / k.max()


def derain(clean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Rain streaks: sparse drops smeared along one direction, screen-blended."""
  x = _to_float(clean)
  h, w = x.shape[:2]
  angle = np.deg2rad(rng.uniform(-25, 25))
  rain = np.zeros((h, w), np.float32)
  for _ in range(rng.integers(1, 3)):  # One or two layers (near/far).
    length = max(3.0, rng.uniform(0.04, 0.12) * min(h, w))
    # Drops per pixel from the area the streaks cover, so that small images
    # get as much rain as large ones.
    density = rng.uniform(0.03, 0.1) / length
    drops = (rng.random((h, w)) < density) * rng.uniform(0.6, 1.0, (h, w))
    kernel = _line_kernel(length, angle + np.deg2rad(rng.normal(0, 3)))
    streaks = signal.fftconvolve(drops, kernel, mode='same')
    rain += rng.uniform(0.35, 0.8) * np.clip(streaks, 0, 1)
  rain = np.clip(rain, 0, 1)[..., None]
  return _to_uint8(1 - (1 - x) * (1 - rain))


def denoise(clean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Additive white Gaussian noise, sigma = 25 / 255."""
  noisy = clean.astype(np.float32) + NOISE_SIGMA * rng.standard_normal(
      clean.shape)
  return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def _motion_kernel(length: float, rng: np.random.Generator) -> np.ndarray:
  """A camera-shake path: a random walk with momentum, scaled to `length`."""
  v = rng.standard_normal(2)
  path = [np.zeros(2)]
  for _ in range(63):
    v = 0.8 * v + 0.4 * rng.standard_normal(2)
    path.append(path[-1] + v)
  path = np.array(path) - np.mean(path, axis=0)
  path *= (length / 2) / max(np.abs(path).max(), 1e-6)
  size = int(np.ceil(length)) | 1
  k = np.zeros((size, size), np.float32)
  idx = np.clip(np.round(path + size // 2).astype(int), 0, size - 1)
  np.add.at(k, (idx[:, 0], idx[:, 1]), 1.0)
  return k / k.sum()


def _disk_kernel(radius: float) -> np.ndarray:
  """Defocus: a uniform disk."""
  r = int(np.ceil(radius))
  yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
  k = (yy ** 2 + xx ** 2 <= radius ** 2).astype(np.float32)
  return k / k.sum()


def deblur(clean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Motion blur (random shake path) or defocus blur (disk), at random."""
  x = _to_float(clean)
  side = min(x.shape[:2])
  if rng.random() < 0.5:
    kernel = _motion_kernel(max(3.0, rng.uniform(0.02, 0.06) * side), rng)
  else:
    kernel = _disk_kernel(max(1.0, rng.uniform(0.006, 0.02) * side))
  p = kernel.shape[0] // 2
  padded = np.pad(x, ((p, p), (p, p), (0, 0)), mode='reflect')
  blurred = signal.fftconvolve(padded, kernel[..., None], mode='valid',
                               axes=(0, 1))
  return _to_uint8(blurred)


def _smooth_field(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
  """Low-frequency noise in [0, 1]: a 4x4 grid upsampled bicubically."""
  grid = rng.standard_normal((4, 4)).astype(np.float32)
  field = np.asarray(Image.fromarray(grid).resize(
      (w, h), Image.BICUBIC))
  return (field - field.min()) / max(float(np.ptp(field)), 1e-6)


def dehaze(clean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Atmospheric scattering `I = J t + A (1 - t)`, `t = exp(-beta d)`.

  The depth `d` is smooth: farther towards the top of the frame (as in most
  outdoor photos) plus a low-frequency field, in [0.2, 1].
  """
  x = _to_float(clean)
  h, w = x.shape[:2]
  ramp = np.linspace(1.0, 0.0, h, dtype=np.float32)[:, None]
  depth = 0.7 * ramp + 0.3 * _smooth_field(h, w, rng)
  depth = 0.2 + 0.8 * (depth - depth.min()) / max(float(np.ptp(depth)), 1e-6)
  t = np.exp(-rng.uniform(1.0, 2.5) * depth)[..., None]
  airlight = rng.uniform(0.75, 1.0) + rng.uniform(-0.03, 0.03, 3)
  return _to_uint8(x * t + np.clip(airlight, 0, 1) * (1 - t))


SYNTHESIZE = {'lowlight': lowlight, 'derain': derain, 'denoise': denoise,
              'deblur': deblur, 'dehaze': dehaze}


def seed_of(*parts) -> int:
  """A 32-bit seed from names (stable across runs, unlike `hash`)."""
  text = '/'.join(str(p) for p in parts)
  return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def apply(task: str, clean: np.ndarray, seed: int) -> np.ndarray:
  """Degrades `clean` for `task` with a generator seeded by `seed`."""
  return SYNTHESIZE[task](clean, np.random.default_rng(seed))
