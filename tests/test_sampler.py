"""The samplers recover x0 exactly from oracle networks; one compile per shape."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drdd_jax import sampler, schedules


def _pair(shape=(2, 8, 12, 3), seed=0):
  rng = np.random.default_rng(seed)
  x0 = rng.uniform(-1, 1, shape).astype(np.float32)
  y = np.clip(x0 + rng.normal(0, 0.3, shape), -1, 1).astype(np.float32)
  return jnp.asarray(x0), jnp.asarray(y)


def drdd_oracle(x0, y, sched):
  """Returns the true residual, and the true noise of the current state."""
  T = sched.num_timesteps

  def fn(x, cond, t_in, phase):
    if phase == schedules.RESIDUAL:
      return jnp.broadcast_to(y - x0, x.shape)
    b_t = (t_in * sched.sigma_h / T)[:, None, None, None]
    return (x - x0) / b_t

  return fn


@pytest.mark.parametrize('sigma_h', [0.8, 1.0, 1.3])
@pytest.mark.parametrize('n_res', [1, 2, 5, 10])
@pytest.mark.parametrize('n_noise', [1, 2, 5, 10])
def test_drdd_oracle_returns_x0(sigma_h, n_res, n_noise):
  sched = schedules.make_schedule(1000, sigma_h)
  x0, y = _pair()
  out, _ = sampler.drdd_sample(drdd_oracle(x0, y, sched), y,
                               jax.random.key(1), sched, n_res=n_res,
                               n_noise=n_noise, eta=0.0)
  np.testing.assert_allclose(out, x0, atol=1e-5)


@pytest.mark.parametrize('sigma_h', [0.8, 1.0, 1.3])
@pytest.mark.parametrize('n_steps', [1, 2, 5, 10])
def test_rddm_oracle_returns_x0(sigma_h, n_steps):
  sched = schedules.make_schedule(1000, sigma_h)
  x0, y = _pair()
  a, b = jnp.asarray(sched.a), jnp.asarray(sched.b)

  def oracle(x, cond, t, phase):
    t = t.astype(jnp.int32)[:, None, None, None]
    r = y - x0
    eps = (x - x0 - a[t] * r) / b[t]
    return jnp.concatenate([jnp.broadcast_to(r, x.shape), eps], -1)

  out, _ = sampler.rddm_sample(oracle, y, jax.random.key(2), sched,
                               n_steps=n_steps)
  np.testing.assert_allclose(out, x0, atol=1e-5)


def test_wrong_network_does_not_return_x0():
  # Guards the oracle test itself: a noise estimate off by 5% is visibly off.
  sched = schedules.make_schedule()
  x0, y = _pair()
  oracle = drdd_oracle(x0, y, sched)
  fn = lambda x, c, t, p: oracle(x, c, t, p) * (1.0 if p else 1.05)
  out, _ = sampler.drdd_sample(fn, y, jax.random.key(1), sched)
  assert np.abs(np.asarray(out) - np.asarray(x0)).max() > 1e-3


def test_trajectory_and_determinism():
  sched = schedules.make_schedule()
  x0, y = _pair()
  fn = drdd_oracle(x0, y, sched)
  run = jax.jit(lambda y, k: sampler.drdd_sample(
      fn, y, k, sched, n_res=2, n_noise=3, eta=0.5, return_trajectory=True))
  out1, traj = run(y, jax.random.key(3))
  out2, _ = run(y, jax.random.key(3))
  out3, _ = run(y, jax.random.key(4))
  assert traj.shape == (5,) + y.shape
  np.testing.assert_array_equal(out1, out2)
  assert not np.array_equal(out1, out3)  # eta > 0: the key matters.
  # The residual phase's last step (t=499, s=-1) removes a_499 * r.
  np.testing.assert_allclose(traj[1] - traj[0], -sched.a[499] * (y - x0),
                             atol=1e-5)
  np.testing.assert_allclose(traj[-1], x0, atol=1e-5)


def test_jitted_sampler_compiles_once_per_shape():
  import configs.aio5 as aio5
  from drdd_jax import unet
  config = aio5.get_config('tiny')
  model = unet.create_model(config.model)
  params = unet.init_params(model, jax.random.key(0))
  sched = schedules.make_schedule()
  traces = []
  real_apply = model.apply

  class Counting:
    def apply(self, *args, **kwargs):
      traces.append(1)
      return real_apply(*args, **kwargs)

  sample = sampler.make_sampler(Counting(), sched, config.diffusion,
                                config.sampling)
  y = jnp.zeros((1, 20, 28, 3))
  a, _ = sample(params, y, jax.random.key(0))
  n = len(traces)
  b, _ = sample(params, y, jax.random.key(1))
  assert len(traces) == n  # a new key does not retrace
  assert a.shape == y.shape and not np.array_equal(a, b)
  sample(params, jnp.zeros((1, 16, 16, 3)), jax.random.key(0))
  assert len(traces) > n  # a new shape does
