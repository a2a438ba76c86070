"""The train step on the tiny config (CPU, 8 fake devices): the same update
on 1 and 8 devices, with FSDP, in microbatches and K steps per dispatch, and
`train.apply_gradients` against optax."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import configs.aio5 as aio5
from conftest import tiny_config
from drdd_jax import data as data_lib
from drdd_jax import train


def _one_step(config, devices):
  mesh = train.make_mesh(config.mesh, devices)
  model, tx = train.create_model(config), train.make_optimizer(config)
  state, shardings = train.create_train_state(config, model, tx, mesh)
  step = train.jit_train_step(
      train.make_train_step(config, model, train.make_schedule(config)),
      shardings, mesh, leading=0)
  b = config.training.batch_size
  it = data_lib.create_train_iterator(config.data, b, b, shard_index=0,
                                      shard_count=1)
  batch = train.global_batch(next(it), mesh)
  state, metrics = step(state, batch, jax.random.key(0))
  return jax.device_get(state.params), jax.device_get(metrics)


@pytest.mark.slow
def test_eight_devices_match_one(cache):
  assert jax.device_count() == 8
  # (The tiny config's optim.eps=1e-3 keeps this comparison well conditioned.)
  config = tiny_config(cache)
  params1, m1 = _one_step(config, jax.devices()[:1])
  params8, m8 = _one_step(config, jax.devices())
  # A ('data', 'fsdp') mesh: the batch over both axes, parameters over fsdp,
  # and the blocks recomputed in the backward pass.
  config.mesh.axes, config.mesh.shape = ('data', 'fsdp'), (2, 4)
  config.model.remat = True
  params_fsdp, m_fsdp = _one_step(config, jax.devices())
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  for params, m in ((params8, m8), (params_fsdp, m_fsdp)):
    np.testing.assert_allclose(m['loss'], m1['loss'], rtol=1e-5)
    jax.tree.map(close, params, params1)


@pytest.mark.slow
def test_microbatches_match_one_pass(cache):
  # Same maths, a slice of the batch at a time, the slices' rows spread over
  # 4 devices. (The one-pass step is test_eight_devices_match_one's program.)
  config = tiny_config(cache)
  params1, m1 = _one_step(config, jax.devices()[:1])
  config.training.microbatches = 2
  params, m = _one_step(config, jax.devices()[:4])
  for key in ('loss', 'loss_noise', 'loss_residual', 'grad_norm'):
    np.testing.assert_allclose(m[key], m1[key], rtol=1e-5)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  jax.tree.map(close, params, params1)


@pytest.mark.slow
def test_steps_per_dispatch_equal_single_steps(cache):
  """K steps in one dispatch (a `lax.scan`) equal K single steps."""
  config = tiny_config(cache)
  mesh = train.make_mesh(config.mesh, jax.devices()[:1])
  model, tx = train.create_model(config), train.make_optimizer(config)
  sched = train.make_schedule(config)
  b = config.training.batch_size
  it = data_lib.create_train_iterator(config.data, b, b, shard_index=0,
                                      shard_count=1)
  batches = [next(it), next(it)]
  stacked = jax.tree.map(lambda *x: np.stack(x), *batches)
  rng = jax.random.key(0)
  runs = []
  for k, feed in ((1, batches), (2, [stacked])):
    config.training.steps_per_dispatch = k
    state, shardings = train.create_train_state(config, model, tx, mesh)
    step = train.jit_train_step(train.make_train_step(config, model, sched),
                                shardings, mesh, leading=int(k > 1))
    for batch in feed:
      state, metrics = step(state, train.global_batch(batch, mesh, int(k > 1)),
                            rng)
    runs.append(jax.device_get(state))
  single, multi = runs
  assert int(multi.step) == 2
  close = lambda a, c: np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-7)
  jax.tree.map(close, multi.params, single.params)
  jax.tree.map(close, multi.ema_params, single.ema_params)


def test_accumulate_gradients_averages_over_slices():
  grad_fn = jax.value_and_grad(lambda w, x: jnp.mean((x * w) ** 2))
  x = jnp.arange(12.0)
  whole = grad_fn(2.0, x)
  for m in (1, 2, 3, 4):
    np.testing.assert_allclose(
        train.accumulate_gradients(grad_fn, 2.0, (x,), m), whole, rtol=1e-6)


def test_slices_keep_one_slice_of_activations():
  """Two slices, one after another: well under the one-pass temporaries."""
  def loss(w, x):
    for layer in w:
      x = jnp.tanh(x @ layer)
    return jnp.mean(x ** 2)

  grad_fn = jax.value_and_grad(loss)
  w, x = jnp.full((6, 256, 256), 0.01), jnp.ones((64, 512, 256))

  def temporaries(m):
    f = jax.jit(lambda w, x: train.accumulate_gradients(grad_fn, w, (x,), m))
    return f.lower(w, x).compile().memory_analysis().temp_size_in_bytes

  assert temporaries(2) < 0.7 * temporaries(1)



def test_fsdp_axis_shards_parameters_and_batch():
  config = aio5.get_config('tiny')
  config.mesh.axes, config.mesh.shape = ('data', 'fsdp'), (2, -1)
  mesh = train.make_mesh(config.mesh)
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 4}
  kernel = jax.ShapeDtypeStruct((3, 3, 16, 32), jnp.float32)
  assert train.param_sharding(mesh, kernel).spec == P(None, None, None, 'fsdp')
  odd = jax.ShapeDtypeStruct((3,), jnp.float32)
  assert train.param_sharding(mesh, odd).spec == P()
  assert train.batch_sharding(mesh).spec == P(('data', 'fsdp'))


def test_global_norm_is_optax_tree_norm():
  rs = np.random.RandomState(3)
  tree = {'a': jnp.asarray(rs.randn(3, 3, 8, 16), jnp.float32),
          'b': [jnp.asarray(rs.randn(7) * 100, jnp.float32),
                jnp.asarray(rs.randn(2, 5), jnp.bfloat16)]}
  got = jax.jit(train.global_norm)(tree)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, optax.tree.norm(tree), rtol=1e-6)
  assert not np.isfinite(train.global_norm({'a': jnp.array([1.0, jnp.inf])}))


@pytest.mark.parametrize('schedule, grad_clip, warmup, eps', [
    ('cosine', 1.0, 2, 1e-8), ('constant', 0.0, 0, 1e-3),
    ('constant', 5.0, 3, 0.1)])
def test_apply_gradients_is_optax_adam_and_the_ema(schedule, grad_clip, warmup,
                                                    eps):
  config = aio5.get_config('tiny')
  config.optim.update(schedule=schedule, grad_clip=grad_clip, eps=eps,
                      warmup_steps=warmup, ema_every=2, ema_decay=0.9)
  config.training.num_steps = 10
  rs = np.random.RandomState(0)
  params = {'a': {'kernel': jnp.asarray(rs.randn(3, 4), jnp.float32)},
            'b': jnp.asarray(rs.randn(5), jnp.float32)}
  tx = train.make_optimizer(config)
  state = train.TrainState(step=jnp.int32(0), params=params,
                           ema_params=jax.tree.map(jnp.copy, params),
                           opt_state=tx.init(params),
                           nonfinite_step=jnp.int32(-1))
  ref = state
  step = jax.jit(lambda s, g, n, ok: train.apply_gradients(config, s, g, n, ok))
  for i in range(5):
    # Norms 0.1 to 10: clipped and unclipped steps when grad_clip > 0.
    grads = jax.tree.map(
        lambda p: jnp.asarray(rs.randn(*p.shape) * 10.0**(i / 2 - 1),
                              jnp.float32), params)
    norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
    state = step(state, grads, norm, jnp.bool_(True))
    updates, opt_state = tx.update(grads, ref.opt_state, ref.params)
    new = optax.apply_updates(ref.params, updates)
    decay = config.optim.ema_decay if (i + 1) % 2 == 0 else 1.0
    ref = ref.replace(step=ref.step + 1, params=new, opt_state=opt_state,
                      ema_params=jax.tree.map(
                          lambda e, p: decay * e + (1 - decay) * p,
                          ref.ema_params, new))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=2e-6, atol=1e-7), state, ref)
    assert jax.tree.structure(state) == jax.tree.structure(ref)
  # A skipped step: only `step` and `nonfinite_step` move, whatever the values.
  bad = jax.tree.map(lambda g: g * jnp.nan, grads)
  skipped = step(state, bad, jnp.float32(jnp.nan), jnp.bool_(False))
  assert int(skipped.step) == 6 and int(skipped.nonfinite_step) == 5
  jax.tree.map(np.testing.assert_array_equal,
               skipped.replace(step=state.step, nonfinite_step=-1), state)
  again = step(skipped, bad, jnp.float32(jnp.nan), jnp.bool_(False))
  assert int(again.nonfinite_step) == 5  # The first bad step is kept.
