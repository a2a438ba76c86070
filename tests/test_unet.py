"""UNet shapes, shared vs separate networks, and the phase embedding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs.aio5 as aio5
from drdd_jax import unet


@pytest.fixture
def tiny():
  return aio5.get_config('tiny')


@pytest.mark.parametrize('shape', [(2, 37, 53), (1, 32, 32), (1, 5, 7)])
def test_output_shape_equals_input_shape(tiny, shape):
  model = unet.create_model(tiny.model)
  params = unet.init_params(model, jax.random.key(0))
  x = jnp.ones(shape + (3,))
  out = model.apply({'params': params}, x, x, jnp.full(shape[:1], 10.0), 1)
  assert out.shape == x.shape and out.dtype == jnp.float32
  assert np.all(np.isfinite(out))


def test_shared_and_separate_parameter_counts(tiny):
  shared = unet.create_model(tiny.model)
  tiny.model.shared = False
  separate = unet.create_model(tiny.model)
  n_shared = unet.count_params(unet.init_params(shared, jax.random.key(0)))
  p_sep = unet.init_params(separate, jax.random.key(0))
  assert set(p_sep) == {'noise_net', 'residual_net'}
  one = unet.count_params(p_sep['noise_net'])
  # Shared = one UNet + a 2-row phase embedding of the time-embedding width.
  assert n_shared == one + 2 * 4 * tiny.model.base_channels
  assert unet.count_params(p_sep) == 2 * one


def test_default_architecture_size():
  # The release's residual UNet (base 64, mults 1,2,4,8) has ~35.7M params.
  model = unet.create_model(aio5.get_config().model)
  shapes = jax.eval_shape(lambda: unet.init_params(model, jax.random.key(0)))
  assert 35.5e6 < unet.count_params(shapes) < 36.0e6


def test_phase_embedding_changes_output(tiny):
  model = unet.create_model(tiny.model)
  params = unet.init_params(model, jax.random.key(0))
  # The embedding starts random, so the phases already differ at init.
  x = jax.random.normal(jax.random.key(1), (1, 16, 16, 3))
  t = jnp.array([100.0])
  out0 = model.apply({'params': params}, x, x, t, 0)
  out1 = model.apply({'params': params}, x, x, t, 1)
  assert np.abs(np.asarray(out0) - np.asarray(out1)).max() > 1e-4
  # Per-example phases give the same result as one phase per call.
  both = model.apply({'params': params}, jnp.concatenate([x, x]),
                     jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                     jnp.array([0, 1]))
  np.testing.assert_allclose(both[0], out0[0], atol=1e-5)
  np.testing.assert_allclose(both[1], out1[0], atol=1e-5)


def test_bad_model_config_names_the_field(tiny):
  tiny.model.groups = 5
  with pytest.raises(ValueError, match='model.groups'):
    unet.create_model(tiny.model)
