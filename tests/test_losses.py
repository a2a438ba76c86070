"""Each loss equals a hand computation on a 2x4x4x3 example."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from drdd_jax import losses, schedules

SCHED = schedules.make_schedule(1000, sigma_h=1.3)


def toy_model(params, x, cond, t, phase):
  """A differentiable stand-in whose output depends on every input."""
  coupled = phase is None  # RDDM: predicts (r, eps) on 6 channels.
  phase = jnp.broadcast_to(jnp.asarray(0 if phase is None else phase,
                                       jnp.float32), t.shape)
  extra = (1e-3 * t + 0.2 * phase)[:, None, None, None]
  out = params['w'] * x + 0.1 * cond + extra
  return jnp.concatenate([out, -out], -1) if coupled else out


def np_model(x, cond, t, phase):
  return 0.7 * x + 0.1 * cond + (1e-3 * t + 0.2 * phase)[:, None, None, None]


@pytest.fixture
def batch():
  rng = np.random.default_rng(0)
  u = lambda: rng.uniform(-1, 1, (2, 4, 4, 3)).astype(np.float32)
  return dict(residual=dict(input=u(), target=u()), noise=dict(target=u()))


def _config(**kw):
  return ml_collections.ConfigDict(dict(
      method='drdd', w_noise=0.3, w_res=2.0, l2=0.0, noise_condition='null',
      **kw))


@pytest.mark.parametrize('shared', [True, False])
def test_drdd_losses_match_hand_computation(batch, shared):
  params = {'w': jnp.float32(0.7)}
  rng = jax.random.key(5)
  loss, m = losses.make_loss_fn(toy_model, SCHED, _config(), shared)(
      params, batch, rng)
  d = losses.draw_noise(rng, batch, 1000)
  a, b = SCHED.a.astype(np.float64), SCHED.b.astype(np.float64)

  x0, eps, t = batch['noise']['target'], d['noise']['eps'], d['noise']['t']
  x_t = x0 + b[t][:, None, None, None] * eps
  pred = np_model(x_t, 0 * x0, b[t] / 1.3 * 1000, np.zeros(2))
  l_noise = np.mean((pred - eps) ** 2)

  y, x0, eps, t = (batch['residual']['input'], batch['residual']['target'],
                   d['residual']['eps'], d['residual']['t'])
  x_t = x0 + b[999] * eps + a[t][:, None, None, None] * (y - x0)
  pred = np_model(x_t, y, a[t] * 1000, np.ones(2))
  l_res = np.mean((pred - (y - x0)) ** 2)

  np.testing.assert_allclose(m['loss_noise'], l_noise, rtol=1e-5)
  np.testing.assert_allclose(m['loss_residual'], l_res, rtol=1e-5)
  np.testing.assert_allclose(loss, 0.3 * l_noise + 2.0 * l_res, rtol=1e-5)


def test_l2_penalty_is_added(batch):
  params = {'w': jnp.float32(0.7)}
  rng = jax.random.key(5)
  base, _ = losses.make_loss_fn(toy_model, SCHED, _config())(params, batch, rng)
  cfg = _config()
  cfg.l2 = 0.5
  reg, _ = losses.make_loss_fn(toy_model, SCHED, cfg)(params, batch, rng)
  np.testing.assert_allclose(reg - base, 0.5 * 0.49, rtol=1e-5)


def test_rddm_loss_matches_hand_computation(batch):
  params = {'w': jnp.float32(0.7)}
  rng = jax.random.key(6)
  cfg = _config()
  cfg.method = 'rddm'
  loss, m = losses.make_loss_fn(toy_model, SCHED, cfg)(params, batch, rng)
  d = losses.draw_noise(rng, {'residual': batch['residual']}, 1000)['residual']
  a, b = SCHED.a.astype(np.float64), SCHED.b.astype(np.float64)
  y, x0, eps, t = (batch['residual']['input'], batch['residual']['target'],
                   d['eps'], d['t'])
  x_t = (x0 + a[t][:, None, None, None] * (y - x0)
         + b[t][:, None, None, None] * eps)
  out = np_model(x_t, y, t.astype(np.float64), np.zeros(2))
  l_res, l_noise = np.mean((out - (y - x0)) ** 2), np.mean((-out - eps) ** 2)
  np.testing.assert_allclose(m['loss_residual'], l_res, rtol=1e-5)
  np.testing.assert_allclose(m['loss_noise'], l_noise, rtol=1e-5)
  np.testing.assert_allclose(loss, 0.3 * l_noise + 2.0 * l_res, rtol=1e-5)


def test_noise_loss_ignores_degraded_input_under_null_condition(batch):
  params = {'w': jnp.float32(0.7)}
  rng = jax.random.key(7)
  draws = losses.draw_noise(rng, batch, 1000)

  def noise_loss(y, condition):
    b = dict(batch, residual=dict(batch['residual'], input=y))
    return losses.drdd_losses(toy_model, params, b, draws, SCHED,
                              noise_condition=condition)['noise']

  y = jnp.asarray(batch['residual']['input'])
  assert not np.any(jax.grad(noise_loss)(y, 'null'))
  # Sanity: with y as condition the gradient is not zero.
  assert np.any(jax.grad(noise_loss)(y, 'input'))
