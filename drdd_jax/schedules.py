"""Diffusion coefficients and the sampler's time grid (spec: `Schedules`).

Everything here is computed in float64 on the host and stored as float32, so
the numbers are identical on every backend and every call.
"""
import dataclasses

import numpy as np

NOISE, RESIDUAL = 0, 1  # Phase ids: the network's phase embedding index.


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
  """The coefficients of both forward processes.

  Attributes:
    a: residual coefficients `a_t = 1 - sqrt(abar_t)`, float32 [T].
    b: noise coefficients `b_t = sigma_h * sqrt(1 - abar_t)`, float32 [T].
    sigma_h: the harmonizing noise level.
  """
  a: np.ndarray
  b: np.ndarray
  sigma_h: float

  @property
  def num_timesteps(self) -> int:
    return len(self.a)


def make_schedule(num_timesteps: int = 1000, sigma_h: float = 1.0,
                  beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
  """Builds the linear-beta schedule of the spec.

  Args:
    num_timesteps: T.
    sigma_h: harmonizing noise level; scales `b_t`.
    beta_start: beta_0.
    beta_end: beta_{T-1}.

  Returns:
    The `Schedule`.
  """
  if num_timesteps < 2:
    raise ValueError(f'diffusion.num_timesteps must be >= 2, got {num_timesteps}.')
  if not sigma_h > 0:
    raise ValueError(f'diffusion.sigma_h must be > 0, got {sigma_h}.')
  betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
  abar = np.cumprod(1.0 - betas)
  a = 1.0 - np.sqrt(abar)
  b = sigma_h * np.sqrt(1.0 - abar)
  return Schedule(a=a.astype(np.float32), b=b.astype(np.float32),
                  sigma_h=float(sigma_h))


def time_grid(num_steps: int, num_timesteps: int = 1000) -> np.ndarray:
  """The sampler's (t, s) pairs, int64 [num_steps, 2]; the last s is -1.

  `ts = int(linspace(-1, T-1, N+1))` reversed, taken as consecutive pairs.

  Args:
    num_steps: N, the number of sampler steps of one phase.
    num_timesteps: T.
  """
  if num_steps < 1:
    raise ValueError(f'The number of sampler steps must be >= 1, got {num_steps}.')
  ts = np.linspace(-1, num_timesteps - 1, num_steps + 1).astype(np.int64)[::-1]
  return np.stack([ts[:-1], ts[1:]], axis=1)


def residual_time_input(a_t, num_timesteps: int):
  """The network's continuous time input for the residual objective."""
  return a_t * num_timesteps


def noise_time_input(b_t, sigma_h: float, num_timesteps: int):
  """The network's continuous time input for the noise objective."""
  return (b_t / sigma_h) * num_timesteps
