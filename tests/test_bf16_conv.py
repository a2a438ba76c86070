"""bf16_conv's kernels against XLA's convolutions, alone and in the network.

They run where the library is built and the CPU has AVX512-BF16; elsewhere
`available()` is False and the rest of the suite covers XLA's path.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs.aio5 as aio5
from drdd_jax import bf16_conv, train, unet

needs_kernels = pytest.mark.skipif(
    not bf16_conv.available(),
    reason='drdd_jax._bf16_conv is not built or this CPU lacks AVX512-BF16')

# (x shape, kernel shape, padding): odd channel counts, output widths that
# are not multiples of 16 or 64, asymmetric and no padding, 1x1 to 7x7, the
# 2x2 phase kernels of unet.upsample_conv, odd output widths.
SHAPES = [
    ((2, 9, 11, 6), (3, 3, 6, 5), ((1, 1), (1, 1))),
    ((1, 8, 8, 64), (7, 7, 64, 64), ((3, 3), (3, 3))),
    ((3, 5, 7, 33), (1, 1, 33, 70), ((0, 0), (0, 0))),
    ((2, 6, 6, 16), (2, 2, 16, 130), ((1, 1), (1, 1))),
    ((2, 7, 5, 8), (3, 3, 8, 17), ((0, 2), (1, 0))),
    ((1, 4, 3, 3), (3, 3, 3, 1), ((1, 1), (1, 1))),
]


def _bf16(rng, shape, scale=1.0):
  return jnp.asarray(rng.standard_normal(shape) * scale, jnp.bfloat16)


def _reference(x, w, padding):
  """The float32 convolution of the same bf16 values."""
  return jax.lax.conv_general_dilated(
      x.astype(jnp.float32), w.astype(jnp.float32), (1, 1), padding,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      precision=jax.lax.Precision.HIGHEST)


def test_available_matches_the_cpu():
  flags = open('/proc/cpuinfo').read() if jax.default_backend() == 'cpu' else ''
  if bf16_conv.available():
    assert 'avx512_bf16' in flags
  with bf16_conv.disabled():
    assert not bf16_conv.enabled()


@needs_kernels
@pytest.mark.parametrize('x_shape, w_shape, padding', SHAPES)
def test_conv_and_weight_gradient_match_xla(x_shape, w_shape, padding):
  rng = np.random.default_rng(0)
  x, w = _bf16(rng, x_shape), _bf16(rng, w_shape, 0.1)
  ref = _reference(x, w, padding)
  y = jax.jit(bf16_conv.conv, static_argnums=2)(x, w, padding)
  assert y.dtype == jnp.bfloat16 and y.shape == ref.shape
  scale = float(jnp.abs(ref).max())
  # One bfloat16 rounding of the float32 sum.
  np.testing.assert_allclose(np.asarray(y, np.float32), ref,
                             rtol=2.0**-8, atol=1e-5 * scale)

  g = _bf16(rng, ref.shape)
  dw = jax.jit(bf16_conv.conv_weight_gradient, static_argnums=(2, 3))(
      x, g, w_shape[:2], padding)
  dw_ref = jax.grad(lambda w: jnp.vdot(_reference(x, w, padding),
                                       g.astype(jnp.float32)))(
                                           w.astype(jnp.float32))
  assert dw.dtype == jnp.float32 and dw.shape == w_shape
  np.testing.assert_allclose(dw, dw_ref, rtol=1e-5,
                             atol=1e-5 * float(jnp.abs(dw_ref).max()))


@needs_kernels
@pytest.mark.parametrize('x_shape, w_shape, padding', SHAPES[:4])
def test_unet_conv_gradients_on_the_kernels(monkeypatch, x_shape, w_shape,
                                            padding):
  """unet.conv in bfloat16: both gradients from the kernels, inside a scan."""
  monkeypatch.setattr(bf16_conv, 'enabled', lambda: True)  # 8 test devices
  rng = np.random.default_rng(1)
  x, w = _bf16(rng, x_shape), _bf16(rng, w_shape, 0.1)
  g = _bf16(rng, _reference(x, w, padding).shape)

  def grads(conv, x, w):
    return jax.vjp(lambda x, w: conv(x, w, padding), x, w)[1](
        g.astype(x.dtype))

  def scanned(x, w):  # twice in a lax.scan, as microbatches run it
    return jax.lax.scan(lambda c, _: (c, grads(unet.conv, x, w)), 0, None,
                        length=2)[1]

  dx, dw = jax.jit(scanned)(x, w)
  jaxpr = str(jax.make_jaxpr(scanned)(x, w))
  assert 'drdd_bf16_conv_wgrad' in jaxpr and 'conv_general_dilated' not in jaxpr
  dx_ref, dw_ref = grads(_reference, x.astype(jnp.float32),
                         w.astype(jnp.float32))
  for got, ref in ((dx, dx_ref), (dw, dw_ref)):
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got[1], np.float32), ref,
                               rtol=2.0**-7,
                               atol=1e-4 * float(jnp.abs(ref).max()))


@needs_kernels
def test_network_loss_and_gradient_as_with_xla_bf16(monkeypatch):
  """The tiny UNet in bfloat16: the kernels change only roundings."""
  config = aio5.get_config('tiny')
  config.training.compute_dtype = 'bfloat16'
  model = train.create_model(config)
  params = unet.init_params(model, jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  t = jnp.array([10.0, 500.0])

  def loss(p):
    out = model.apply({'params': p}, x, x, t, 1)
    return jnp.mean(jnp.square(out - x))

  with bf16_conv.disabled():
    ref_loss, ref_grad = jax.jit(jax.value_and_grad(loss))(params)
  monkeypatch.setattr(bf16_conv, 'enabled', lambda: True)
  step = jax.jit(jax.value_and_grad(loss))
  assert 'drdd_bf16_conv' in step.lower(params).as_text()
  got_loss, got_grad = step(params)
  np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-2)
  a, b = (jnp.concatenate([v.ravel() for v in jax.tree.leaves(g)])
          for g in (got_grad, ref_grad))
  cosine = jnp.vdot(a, b) / jnp.linalg.norm(a) / jnp.linalg.norm(b)
  assert cosine > 0.999


def test_auto_compute_dtype_follows_the_kernels(monkeypatch):
  config = aio5.get_config()
  assert config.training.compute_dtype == 'auto'
  for enabled, dtype in ((True, jnp.bfloat16), (False, jnp.float32)):
    monkeypatch.setattr(bf16_conv, 'enabled', lambda e=enabled: e)
    assert train.compute_dtype(config) == dtype
  # The tests' config stays float32 whatever the machine.
  assert train.compute_dtype(aio5.get_config('tiny')) == jnp.float32
