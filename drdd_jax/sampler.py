"""Reverse processes as `lax.scan` loops: DRDD's two phases and RDDM's one.

DRDD first removes the residual (`n_res` steps), then the noise (`n_noise`
steps). The per-step coefficients are computed on the host in float64 from
the static time grid, so each phase is one scan over a small coefficient table
and the whole sampler compiles into one XLA program per input shape.
"""
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from drdd_jax import schedules
from drdd_jax import unet

# model_fn(x_t, cond, t_input, phase) -> prediction (params already bound).
DenoiseFn = Callable[..., jax.Array]


def _residual_table(sched, n):
  """Rows (time input, a_t - a_s) for the residual phase; a_s = 0 when s < 0."""
  a = sched.a.astype(np.float64)
  rows = [(t, a[t] - (a[s] if s >= 0 else 0.0))
          for t, s in schedules.time_grid(n, sched.num_timesteps)]
  t_in = schedules.residual_time_input(np.array([a[t] for t, _ in rows]),
                                       sched.num_timesteps)
  return np.stack([t_in, [c for _, c in rows]], 1).astype(np.float32)


def _noise_table(sched, n, eta):
  """Rows (time input, b_t, c_eps, c_z): x <- x - c_eps eps_hat + c_z z'."""
  b = sched.b.astype(np.float64)
  rows = []
  for t, s in schedules.time_grid(n, sched.num_timesteps):
    b_t, b_s = b[t], (b[s] if s >= 0 else 0.0)
    v = eta * (b_t**2 - b_s**2) * b_s**2 / b_t**2
    rows.append((schedules.noise_time_input(b_t, sched.sigma_h,
                                            sched.num_timesteps),
                 b_t, b_t - np.sqrt(b_s**2 - v), np.sqrt(v)))
  return np.array(rows, np.float32)


def _scan(step, x, table, rng, return_trajectory):
  """Runs `step(x, (row, key)) -> x` over the table's rows."""
  def body(x, row_key):
    x = step(x, row_key)
    return x, (x if return_trajectory else None)

  keys = jax.random.split(rng, len(table))
  return jax.lax.scan(body, x, (jnp.asarray(table), keys))


def drdd_sample(denoise_fn: DenoiseFn, y, rng, sched: schedules.Schedule, *,
                n_res: int = 2, n_noise: int = 2, eta: float = 0.0,
                noise_condition: str = 'null', return_trajectory: bool = False):
  """Restores `y` with DRDD's reverse process.

  Args:
    denoise_fn: `denoise_fn(x, cond, t_input, phase)`.
    y: degraded images, [B, H, W, 3] in [-1, 1].
    rng: PRNG key; the output is a deterministic function of it.
    sched: the schedule.
    n_res: residual-phase steps.
    n_noise: noise-phase steps.
    eta: stochasticity of the noise phase (0 = deterministic DDIM-like).
    noise_condition: 'null' (zeros) or 'input' (y), as in training.
    return_trajectory: also return the state after every step.

  Returns:
    `x0_hat` clipped to [-1, 1], and the trajectory [n_res + n_noise, B, H, W,
    3] (unclipped states after each step) or None.
  """
  y = jnp.asarray(y, jnp.float32)
  k_init, k_res, k_noise = jax.random.split(rng, 3)
  batch = y.shape[0]
  x = y + sched.sigma_h * jax.random.normal(k_init, y.shape, y.dtype)

  def residual_step(x, row_key):
    (t_in, coef), _ = row_key
    r_hat = denoise_fn(x, y, jnp.full((batch,), t_in), schedules.RESIDUAL)
    return x - coef * r_hat

  cond = jnp.zeros_like(y) if noise_condition == 'null' else y

  def noise_step(x, row_key):
    (t_in, _, c_eps, c_z), key = row_key
    eps_hat = denoise_fn(x, cond, jnp.full((batch,), t_in), schedules.NOISE)
    x = x - c_eps * eps_hat
    if eta:
      x = x + c_z * jax.random.normal(key, x.shape, x.dtype)
    return x

  x, traj_res = _scan(residual_step, x, _residual_table(sched, n_res), k_res,
                      return_trajectory)
  x, traj_noise = _scan(noise_step, x, _noise_table(sched, n_noise, eta),
                        k_noise, return_trajectory)
  traj = (jnp.concatenate([traj_res, traj_noise]) if return_trajectory
          else None)
  return jnp.clip(x, -1.0, 1.0), traj


def rddm_sample(denoise_fn: DenoiseFn, y, rng, sched: schedules.Schedule, *,
                n_steps: int = 4, return_trajectory: bool = False):
  """The coupled baseline's DDIM sampler, from `y + b_{T-1} z`.

  `denoise_fn(x, y, t, None)` returns concat(r_hat, eps_hat) on channels.
  """
  y = jnp.asarray(y, jnp.float32)
  k_init, k_steps = jax.random.split(rng)
  batch = y.shape[0]
  x = y + sched.b[-1] * jax.random.normal(k_init, y.shape, y.dtype)
  a, b = sched.a.astype(np.float64), sched.b.astype(np.float64)
  table = np.array([(t, a[t] - (a[s] if s >= 0 else 0.0),
                     b[t] - (b[s] if s >= 0 else 0.0))
                    for t, s in schedules.time_grid(n_steps, sched.num_timesteps)],
                   np.float32)

  def step(x, row_key):
    (t, c_r, c_eps), _ = row_key
    pred = denoise_fn(x, y, jnp.full((batch,), t), None)
    return x - c_r * pred[..., :3] - c_eps * pred[..., 3:]

  x, traj = _scan(step, x, table, k_steps, return_trajectory)
  return jnp.clip(x, -1.0, 1.0), traj


def make_sampler(model, sched: schedules.Schedule, diffusion_config,
                 sampling_config, *, return_trajectory: bool = False):
  """A jitted `sample(params, y, rng) -> (x0_hat, trajectory)` for a config.

  It compiles once per input shape; the RDDM baseline runs
  `n_res + n_noise` coupled steps so both methods get the same budget.
  """
  cfg, scfg = diffusion_config, sampling_config

  def sample(params, y, rng):
    def denoise_fn(x, cond, t, phase):
      return model.apply({'params': params}, x, cond, t, phase)

    if cfg.method == 'rddm':
      return rddm_sample(denoise_fn, y, rng, sched,
                         n_steps=scfg.n_res + scfg.n_noise,
                         return_trajectory=return_trajectory)
    return drdd_sample(denoise_fn, y, rng, sched, n_res=scfg.n_res,
                       n_noise=scfg.n_noise, eta=scfg.eta,
                       noise_condition=cfg.noise_condition,
                       return_trajectory=return_trajectory)

  return jax.jit(sample, compiler_options=unet.compiler_options())
