"""The train step and the sampler move no data to or from the host.

Once the state, the batch, the parameters and the rng key are on the devices,
repeated calls run under `jax.transfer_guard('disallow')`: any implicit
host<->device (or device<->device) copy inside the loop would raise.
"""
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import configs.aio5 as aio5
from drdd_jax import sampler, train


@pytest.fixture(scope='module')
def setup(batch=8, size=32):  # The tiny config's crop: its compiled step.
  config = aio5.get_config('tiny')
  config.training.batch_size = batch  # Divisible by the 8 test devices.
  mesh = train.make_mesh(config.mesh)
  model = train.create_model(config)
  tx = train.make_optimizer(config)
  sched = train.make_schedule(config)
  state, shardings = train.create_train_state(config, model, tx, mesh)
  rs = np.random.RandomState(0)
  images = lambda n: rs.randint(0, 256, (n, size, size, 3), dtype=np.uint8)
  nb = train.noise_batch_size(config)
  local = {'residual': {'input': images(batch), 'target': images(batch),
                        'task': np.zeros((batch,), np.int32)},
           'noise': {'target': images(nb)}}
  data = train.global_batch(local, mesh)
  replicated = NamedSharding(mesh, P())
  rng = jax.device_put(jax.random.key(0), replicated)
  return config, mesh, model, tx, sched, state, shardings, data, rng


def test_train_step_makes_no_transfers(setup):
  config, mesh, model, tx, sched, state, shardings, data, rng = setup
  step = train.jit_train_step(train.make_train_step(config, model, sched),
                              shardings, mesh, leading=0)
  # The state is donated: step a copy, so the fixture's stays valid.
  state, _ = step(jax.tree.map(lambda x: x.copy(), state), data, rng)
  with jax.transfer_guard('disallow'):
    for _ in range(2):
      state, metrics = step(state, data, rng)
    jax.block_until_ready((state, metrics))
  assert int(jax.device_get(state.step)) == 3
  assert np.isfinite(float(jax.device_get(metrics['loss'])))


def test_sampler_makes_no_transfers(setup):
  config, mesh, model, _, sched, state, _, _, rng = setup
  sample = sampler.make_sampler(model, sched, config.diffusion,
                                config.sampling)
  replicated = NamedSharding(mesh, P())
  y = jax.device_put(np.zeros((1, 24, 20, 3), np.float32), replicated)
  out, _ = sample(state.ema_params, y, rng)  # Compiles.
  with jax.transfer_guard('disallow'):
    again, _ = sample(state.ema_params, y, rng)
    jax.block_until_ready(again)
    with pytest.raises(Exception, match='[Dd]isallowed'):  # The guard is on.
      sample(state.ema_params, np.zeros(y.shape, np.float32), rng)
  assert again.shape == y.shape
  np.testing.assert_array_equal(jax.device_get(again), jax.device_get(out))
