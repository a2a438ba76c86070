"""Forward processes and training objectives of DRDD and the RDDM baseline.

Both methods share one interface: `loss_fn(params, batch, rng)` with
`batch = {'residual': {'input': y, 'target': x0}, 'noise': {'target': x0}}`
(float images in [-1, 1]) returning `(loss, metrics)`. The random draws (times
and Gaussian noise) come from `draw_noise`, so tests can recompute each loss
by hand from the same draws.
"""
from typing import Callable, Mapping

import jax
import jax.numpy as jnp

from drdd_jax import schedules

# model_fn(params, x_t, cond, t_input, phase) -> prediction
ModelFn = Callable[..., jax.Array]


def noise_forward(x0, t, eps, sched: schedules.Schedule):
  """Stage 1: `x_t = x0 + b_t eps`; returns (x_t, time input)."""
  b_t = jnp.asarray(sched.b)[t]
  x_t = x0 + b_t[:, None, None, None] * eps
  return x_t, schedules.noise_time_input(b_t, sched.sigma_h, sched.num_timesteps)


def residual_forward(x0, y, t, eps, sched: schedules.Schedule):
  """Stage 2: `x_t = x0 + b_{T-1} eps + a_t (y - x0)`; returns (x_t, time input)."""
  a_t = jnp.asarray(sched.a)[t]
  x_t = x0 + sched.b[-1] * eps + a_t[:, None, None, None] * (y - x0)
  return x_t, schedules.residual_time_input(a_t, sched.num_timesteps)


def coupled_forward(x0, y, t, eps, sched: schedules.Schedule):
  """RDDM: `x_t = x0 + a_t (y - x0) + b_t eps`; the time input is t itself."""
  a_t = jnp.asarray(sched.a)[t][:, None, None, None]
  b_t = jnp.asarray(sched.b)[t][:, None, None, None]
  return x0 + a_t * (y - x0) + b_t * eps, t.astype(jnp.float32)


def draw_noise(rng, batch: Mapping, num_timesteps: int) -> dict:
  """Draws the times and Gaussian noise of one step, keyed like `batch`."""
  draws = {}
  for i, (name, part) in enumerate(sorted(batch.items())):
    k_t, k_eps = jax.random.split(jax.random.fold_in(rng, i))
    x0 = part['target']
    draws[name] = dict(
        t=jax.random.randint(k_t, x0.shape[:1], 0, num_timesteps),
        eps=jax.random.normal(k_eps, x0.shape, x0.dtype))
  return draws


def _mse(a, b):
  return jnp.mean(jnp.square(a - b))


def l2_penalty(params):
  return sum(jnp.sum(jnp.square(p)) for p in jax.tree.leaves(params))


def drdd_losses(model_fn: ModelFn, params, batch, draws,
                sched: schedules.Schedule, *, noise_condition: str = 'null',
                shared: bool = True) -> dict:
  """The two DRDD objectives for given draws.

  Args:
    model_fn: `model_fn(params, x_t, cond, t_input, phase)`.
    params: network parameters.
    batch: `{'residual': {'input', 'target'}, 'noise': {'target'}}`.
    draws: `draw_noise(...)` for `{'noise': ..., 'residual': ...}`; with
      noise_condition='input', its 'noise' entry is drawn for the pairs.
    sched: the schedule.
    noise_condition: 'null' (zeros: the noise batch needs no pair) or
      'input' (the noise objective runs on the residual batch's pairs, with y
      as its condition).
    shared: the network is shared, so both objectives can run as one
      concatenated forward pass (same maths, one network call).

  Returns:
    `{'noise': L_noise, 'residual': L_res}`.
  """
  res, dr = batch['residual'], draws['residual']
  y, x0_res = res['input'], res['target']
  x_res, t_res = residual_forward(x0_res, y, dr['t'], dr['eps'], sched)

  dn = draws['noise']
  if noise_condition == 'null':
    x0_noise = batch['noise']['target']
    cond_noise = jnp.zeros_like(x0_noise)
  elif noise_condition == 'input':
    x0_noise, cond_noise = x0_res, y
  else:
    raise ValueError("diffusion.noise_condition must be 'null' or 'input', "
                     f'got {noise_condition!r}.')
  x_noise, t_noise = noise_forward(x0_noise, dn['t'], dn['eps'], sched)

  n = x_noise.shape[0]
  if shared and x_noise.shape[1:] == x_res.shape[1:]:
    phase = jnp.concatenate([jnp.full((n,), schedules.NOISE),
                             jnp.full((x_res.shape[0],), schedules.RESIDUAL)])
    pred = model_fn(params, jnp.concatenate([x_noise, x_res]),
                    jnp.concatenate([cond_noise, y]),
                    jnp.concatenate([t_noise, t_res]), phase)
    eps_hat, r_hat = pred[:n], pred[n:]
  else:
    eps_hat = model_fn(params, x_noise, cond_noise, t_noise, schedules.NOISE)
    r_hat = model_fn(params, x_res, y, t_res, schedules.RESIDUAL)
  return dict(noise=_mse(eps_hat, dn['eps']), residual=_mse(r_hat, y - x0_res))


def rddm_losses(model_fn: ModelFn, params, batch, draws,
                sched: schedules.Schedule) -> dict:
  """The coupled baseline: one network predicts r and eps from the pairs only."""
  res, dr = batch['residual'], draws['residual']
  y, x0 = res['input'], res['target']
  x_t, t_in = coupled_forward(x0, y, dr['t'], dr['eps'], sched)
  pred = model_fn(params, x_t, y, t_in, None)
  return dict(noise=_mse(pred[..., 3:], dr['eps']),
              residual=_mse(pred[..., :3], y - x0))


def make_draws_fn(sched: schedules.Schedule, diffusion_config):
  """Returns `draws_fn(batch, rng)`: the random draws of `make_loss_fn`'s loss."""
  cfg = diffusion_config

  def draws_fn(batch, rng):
    if cfg.method == 'rddm':
      return draw_noise(rng, {'residual': batch['residual']},
                        sched.num_timesteps)
    # With noise_condition='input' the noise objective draws for the pairs.
    noise_part = (batch['residual'] if cfg.noise_condition == 'input'
                  else batch['noise'])
    return draw_noise(rng, dict(noise=noise_part, residual=batch['residual']),
                      sched.num_timesteps)

  return draws_fn


def make_loss_fn(model_fn: ModelFn, sched: schedules.Schedule, diffusion_config,
                 shared: bool = True):
  """Returns `loss_fn(params, batch, rng, draws=None) -> (loss, metrics)`.

  `loss = w_noise * L_noise + w_res * L_res + l2 * ||params||^2`. The draws
  come from `rng` (`make_draws_fn`) unless given: the train step draws for the
  whole batch before it splits the batch into microbatches.
  """
  cfg = diffusion_config
  draws_fn = make_draws_fn(sched, diffusion_config)

  def loss_fn(params, batch, rng=None, draws=None):
    if draws is None:
      draws = draws_fn(batch, rng)
    if cfg.method == 'drdd':
      terms = drdd_losses(model_fn, params, batch, draws, sched,
                          noise_condition=cfg.noise_condition, shared=shared)
    elif cfg.method == 'rddm':
      terms = rddm_losses(model_fn, params, batch, draws, sched)
    else:
      raise ValueError(f"diffusion.method must be 'drdd' or 'rddm', got {cfg.method!r}.")
    loss = cfg.w_noise * terms['noise'] + cfg.w_res * terms['residual']
    if cfg.l2:
      loss = loss + cfg.l2 * l2_penalty(params)
    return loss, dict(loss=loss, loss_noise=terms['noise'],
                      loss_residual=terms['residual'])

  return loss_fn
