"""bf16_conv's kernels against XLA's convolutions, alone and in the network.

The kernels run where the library is built and the CPU has AVX512-BF16
(convolutions on AMX tiles where it also has AMX, and on AVX512-BF16 ones
with DRDD_JAX_AMX=0: both are tested);
elsewhere `available()` is False, those tests skip, and `unet.conv`'s
bfloat16 convolutions are XLA's (tested here against the kernels, and
everywhere on their own).
"""
import flax.linen as nn
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
# 2x2 phase kernels of unet.upsample_conv, odd output widths. The weight
# gradient splits the first six over dw; the last two over the pixels (>= 2
# blocks of >= 128 pixel pairs per thread of the 8-device test process's
# pool), in uneven blocks, with two column blocks and an odd width in the
# last one.
SHAPES = [
    ((2, 9, 11, 6), (3, 3, 6, 5), ((1, 1), (1, 1))),
    ((1, 8, 8, 64), (7, 7, 64, 64), ((3, 3), (3, 3))),
    ((3, 5, 7, 33), (1, 1, 33, 70), ((0, 0), (0, 0))),
    ((2, 6, 6, 16), (2, 2, 16, 130), ((1, 1), (1, 1))),
    ((2, 7, 5, 8), (3, 3, 8, 17), ((0, 2), (1, 0))),
    ((1, 4, 3, 3), (3, 3, 3, 1), ((1, 1), (1, 1))),
    ((4, 24, 96, 5), (3, 3, 5, 7), ((1, 1), (1, 1))),
    ((6, 18, 65, 33), (1, 1, 33, 70), ((0, 0), (0, 0))),
    # Channel counts that are multiples of 32 (AMX where the CPU has it):
    # widths that are not multiples of 16, padding columns in the tiles,
    # a 3-channel output, a 1x1 on the input itself (32 pixels per image).
    ((2, 5, 13, 32), (3, 3, 32, 64), ((1, 1), (1, 1))),
    ((3, 7, 9, 96), (1, 1, 96, 32), ((0, 0), (0, 0))),
    ((2, 6, 10, 64), (3, 3, 64, 3), ((0, 2), (1, 0))),
    ((2, 8, 4, 32), (1, 1, 32, 96), ((0, 0), (0, 0))),
]


def _random(rng, shape, dtype=jnp.bfloat16, scale=1.0):
  return jnp.asarray(rng.standard_normal(shape) * scale, dtype)


def _rounded(a):
  """a rounded to bfloat16, as float32; its gradient passes unrounded."""
  a = a.astype(jnp.float32)
  return a + jax.lax.stop_gradient(a.astype(jnp.bfloat16).astype(a.dtype) - a)


def _reference(x, w, padding):
  """The float32 convolution of x and w rounded to bfloat16."""
  x, w = _rounded(x), _rounded(w)
  return jax.lax.conv_general_dilated(
      x, w, (1, 1), padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      precision=jax.lax.Precision.HIGHEST)


def _close(got, ref, rtol):
  """Elementwise within rtol, or within a small part of ref's scale (the
  float32 sums of the two programs run in different orders)."""
  np.testing.assert_allclose(np.asarray(got, np.float32), ref, rtol=rtol,
                             atol=1e-5 * float(jnp.abs(ref).max()))


def test_available_matches_the_cpu():
  flags = open('/proc/cpuinfo').read() if jax.default_backend() == 'cpu' else ''
  if bf16_conv.available():
    assert 'avx512_bf16' in flags
  with bf16_conv.disabled():
    assert not bf16_conv.enabled()


@needs_kernels
def test_amx_follows_the_cpu_and_the_environment(monkeypatch):
  """AMX tiles where the CPU (and Linux) has them, unless DRDD_JAX_AMX=0."""
  flags = open('/proc/cpuinfo').read().split()
  assert bf16_conv.amx() == ('amx_bf16' in flags and 'amx_tile' in flags)
  monkeypatch.setenv('DRDD_JAX_AMX', '0')
  assert not bf16_conv.amx()


def test_a_stale_build_falls_back_to_xla(monkeypatch):
  """A library built from older sources (a handler missing) is not used."""
  monkeypatch.setattr(bf16_conv.glob, 'glob', lambda _: ['libm.so.6'])
  with pytest.warns(UserWarning, match='older sources'):
    assert bf16_conv._library.__wrapped__() is None  # pylint: disable=protected-access


@needs_kernels
@pytest.mark.parametrize('dtypes', [('bfloat16', 'bfloat16'),
                                    ('float32', 'float32'),
                                    ('float32', 'bfloat16')])
@pytest.mark.parametrize('x_shape, w_shape, padding', SHAPES)
@pytest.mark.parametrize('amx', ['1', '0'])
def test_kernels_match_xla(monkeypatch, x_shape, w_shape, padding, dtypes,
                           amx):
  """Forward, input gradient (transpose_kernel) and weight gradient, for
  each (operand dtype, output dtype), on AMX tiles where the CPU has them
  and on AVX512-BF16 ones (DRDD_JAX_AMX=0)."""
  monkeypatch.setenv('DRDD_JAX_AMX', amx)
  rng = np.random.default_rng(0)
  dtype, out_dtype = dtypes
  x, w = _random(rng, x_shape, dtype), _random(rng, w_shape, dtype, 0.1)
  ref = _reference(x, w, padding)
  y = jax.jit(bf16_conv.conv, static_argnums=(2, 3, 4))(
      x, w, padding, False, out_dtype)
  assert y.dtype == out_dtype and y.shape == ref.shape
  # Exact products, float32 sums; a bfloat16 output is rounded once more.
  _close(y, ref, 2.0**-8 if out_dtype == 'bfloat16' else 1e-5)

  g = _random(rng, ref.shape, dtype)
  ref_dx, ref_dw = jax.vjp(lambda x, w: _reference(x, w, padding),
                           x.astype(jnp.float32), w.astype(jnp.float32))[1](
                               g.astype(jnp.bfloat16).astype(jnp.float32))
  kh, kw = w_shape[:2]
  (top, bottom), (left, right) = padding
  dx = jax.jit(bf16_conv.conv, static_argnums=(2, 3))(
      g, w, ((kh - 1 - top, kh - 1 - bottom), (kw - 1 - left, kw - 1 - right)),
      True)
  assert dx.dtype == dtype and dx.shape == x_shape
  _close(dx, ref_dx, 2.0**-8 if dtype == 'bfloat16' else 1e-5)
  dw = jax.jit(bf16_conv.conv_weight_gradient, static_argnums=(2, 3))(
      x, g, (kh, kw), padding)
  assert dw.dtype == jnp.float32 and dw.shape == w_shape
  _close(dw, ref_dw, 1e-5)


@needs_kernels
@pytest.mark.parametrize('x_shape, w_shape, padding', SHAPES[6:8] + [
    ((8, 64, 64, 64), (3, 3, 64, 64), ((1, 1), (1, 1)))])
def test_weight_gradient_is_deterministic(x_shape, w_shape, padding):
  """Split over the pixels, the weight gradient's partial sums are added in
  a fixed order: the same bits on every call (they varied from call to call
  when each thread summed the blocks it happened to take)."""
  rng = np.random.default_rng(4)
  y_shape = _reference(jnp.zeros(x_shape), jnp.zeros(w_shape), padding).shape
  x, g = _random(rng, x_shape), _random(rng, y_shape)
  wgrad = jax.jit(bf16_conv.conv_weight_gradient, static_argnums=(2, 3))
  first = np.asarray(wgrad(x, g, w_shape[:2], padding))
  for _ in range(10):
    np.testing.assert_array_equal(wgrad(x, g, w_shape[:2], padding), first)


def _grads(conv, x, w, g):
  return jax.vjp(conv, x, w)[1](g)


@pytest.mark.parametrize('kernels', [
    pytest.param(True, marks=needs_kernels), False])
@pytest.mark.parametrize('x_shape, w_shape, padding', SHAPES[:4])
def test_bfloat16_precision_inside_a_scan(monkeypatch, kernels, x_shape,
                                          w_shape, padding):
  """unet.conv(precision=bfloat16) of float32 operands: the convolution and
  the input gradient of the rounded operands rounded to bfloat16, the weight
  gradient in float32; on the kernels or on XLA's convolutions, inside a
  lax.scan as microbatches run it."""
  # The test process has 8 devices, where enabled() is False.
  monkeypatch.setattr(bf16_conv, 'enabled', lambda: kernels)
  rng = np.random.default_rng(1)
  x, w = _random(rng, x_shape, jnp.float32), _random(rng, w_shape,
                                                     jnp.float32, 0.1)
  g = _random(rng, _reference(x, w, padding).shape, jnp.float32)
  conv = lambda x, w: unet.conv(x, w, padding, jnp.bfloat16)

  def scanned(x, w):
    return jax.lax.scan(lambda c, _: (c, (conv(x, w), *_grads(conv, x, w, g))),
                        0, None, length=2)[1]

  y, dx, dw = jax.jit(scanned)(x, w)
  jaxpr = str(jax.make_jaxpr(scanned)(x, w))
  assert ('drdd_bf16_conv_wgrad' in jaxpr) == kernels
  ref_dx, ref_dw = _grads(lambda x, w: _reference(x, w, padding), x, w,
                          g.astype(jnp.bfloat16).astype(jnp.float32))
  for got, ref, rtol in ((y, _reference(x, w, padding), 2.0**-8),
                         (dx, ref_dx, 2.0**-8), (dw, ref_dw, 1e-5)):
    assert got.dtype == jnp.float32
    _close(got[1], ref, rtol)


@needs_kernels
def test_unet_conv_on_bfloat16_activations(monkeypatch):
  monkeypatch.setattr(bf16_conv, 'enabled', lambda: True)
  rng = np.random.default_rng(2)
  x_shape, w_shape, padding = SHAPES[1]
  x, w = _random(rng, x_shape), _random(rng, w_shape, jnp.float32, 0.1)
  g = _random(rng, x_shape)
  conv = lambda x, w: unet.conv(x, w, padding)
  assert 'drdd_bf16_conv' in str(jax.make_jaxpr(conv)(x, w))
  (dx, dw), (ref_dx, ref_dw) = (
      _grads(c, x, w, g) for c in (jax.jit(conv), jax.jit(
          lambda x, w: _reference(x, w, padding).astype(jnp.bfloat16))))
  assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
  _close(dx, ref_dx.astype(jnp.float32), 2.0**-7)
  _close(dw, ref_dw, 1e-5)


@needs_kernels
def test_network_with_bfloat16_convolutions(monkeypatch):
  """The tiny UNet's loss and gradient with its convolutions in bfloat16, on
  the kernels and on XLA's, against float32 convolutions. (The gradient of
  the kernels' program differs from float32's by 1.3 %, XLA's bfloat16
  program by 2.5 %: roundings, which the per-layer tests above pin down.)"""
  config = aio5.get_config('tiny')
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  t = jnp.array([10.0, 500.0])

  def loss_and_grad(precision, kernels):
    monkeypatch.setattr(bf16_conv, 'enabled', lambda: kernels)
    model = unet.create_model(config.model, conv_precision=precision)
    params = unet.init_params(model, jax.random.key(0))
    loss = lambda p: jnp.mean(jnp.square(
        model.apply({'params': p}, x, x, t, 1) - x))
    step = jax.jit(jax.value_and_grad(loss))
    assert ('drdd_bf16_conv' in step.lower(params).as_text()) == kernels
    value, grad = step(params)
    return value, jnp.concatenate([g.ravel() for g in jax.tree.leaves(grad)])

  ref_loss, ref_grad = loss_and_grad(None, False)
  for kernels in (True, False):
    got_loss, got_grad = loss_and_grad(jnp.bfloat16, kernels)
    np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-3)
    assert jnp.linalg.norm(got_grad - ref_grad) < 0.05 * jnp.linalg.norm(
        ref_grad)


def test_auto_conv_precision_follows_the_kernels(monkeypatch):
  config = aio5.get_config()
  assert config.training.conv_precision == 'auto'
  assert train.compute_dtype(config) == jnp.float32  # on CPU
  for enabled, precision in ((True, jnp.bfloat16), (False, None)):
    monkeypatch.setattr(bf16_conv, 'enabled', lambda e=enabled: e)
    assert train.conv_precision(config) == precision
  config.training.compute_dtype = 'bfloat16'  # bfloat16 convolutions anyway
  assert train.conv_precision(config) is None
  # The tests' config keeps exact float32 convolutions on every machine.
  assert train.conv_precision(aio5.get_config('tiny')) is None


def _attention_inputs(b, n, d, width, f, seed=5):
  rng = np.random.default_rng(seed)
  return (_random(rng, (b, n, 2 * width), scale=3.0),
          _random(rng, (b, n, d), jnp.float32),
          _random(rng, (b, width, f), jnp.float32),
          _random(rng, (f,), jnp.float32))


# (batch, pixels, D, width, F, head_dim): pixels not a multiple of the
# kernels' blocks of 64 and tiles of 6; aio5's top level; more than four
# 16-column vectors of D and F.
ATTENTION_SHAPES = [(2, 1001, 16, 32, 48, 16), (1, 4096, 64, 128, 64, 32),
                    (3, 257, 80, 64, 96, 32)]


@needs_kernels
@pytest.mark.parametrize('b, n, d, width, f, head_dim', ATTENTION_SHAPES)
def test_linear_attention_kernels_match_xla(b, n, d, width, f, head_dim):
  """The two softmax products against jnp's (float32, exact products), and
  the same bits on every call."""
  qk, h, ctx, bias = _attention_inputs(b, n, d, width, f)
  q, k = (a.astype(jnp.float32) for a in jnp.split(qk, 2, axis=-1))
  e = jnp.exp(k - k.max(axis=1, keepdims=True))
  ref = jnp.einsum('bnc,bnd->bcd', e, jnp.concatenate(
      [h, jnp.ones((b, n, 1))], -1), precision='highest')
  context = jax.jit(bf16_conv.linear_attention_context)
  got, m = context(qk, h)
  assert got.shape == (b, width, d + 1) and got.dtype == jnp.float32
  _close(got, ref, 1e-5)
  np.testing.assert_array_equal(m, k.max(axis=1))
  np.testing.assert_array_equal(context(qk, h)[0], got)

  p = jax.nn.softmax(q.reshape(b, n, -1, head_dim), -1).reshape(q.shape)
  ref = jnp.einsum('bnc,bcf->bnf', p * head_dim**-0.5, ctx,
                   precision='highest') + bias
  got = jax.jit(bf16_conv.linear_attention_output, static_argnums=3)(
      qk, ctx, bias, head_dim)
  assert got.shape == (b, n, f) and got.dtype == jnp.float32
  _close(got, ref, 1e-5)


@needs_kernels
def test_linear_attention_kernels_keep_nan():
  qk, h, ctx, bias = _attention_inputs(1, 100, 16, 32, 16)
  qk = qk.at[0, 7, 3].set(jnp.nan).at[0, 9, 40].set(jnp.nan)
  assert jnp.isnan(bf16_conv.linear_attention_context(qk, h)[0][0, 8]).all()
  out = bf16_conv.linear_attention_output(qk, ctx, bias, 16)
  assert jnp.isnan(out[0, 7]).all() and not jnp.isnan(out[0, 8]).any()


@needs_kernels
@pytest.mark.parametrize('b, n, d, heads', [(2, 1001, 64, 4), (3, 257, 80, 2)])
def test_linear_attention_on_the_kernels(monkeypatch, b, n, d, heads):
  """A float32 `unet.LinearAttention` with bfloat16 qk projection runs its
  softmax products and their gradients on the kernels: the output and the
  gradients within float32 roundings of XLA's ops (the bfloat16 gradient of
  qk within one rounding), the same bits on every call."""
  monkeypatch.setattr(bf16_conv, 'enabled', lambda: True)
  head_dim, width = 32, heads * 32
  qk, h, _, _ = _attention_inputs(b, n, d, width, d)
  rng = np.random.default_rng(6)
  args = (qk, h, _random(rng, (d, width), jnp.float32, 0.1),
          _random(rng, (width, d), jnp.float32, 0.1),
          _random(rng, (d,), jnp.float32))
  g = _random(rng, (b, n, d), jnp.float32)
  fused = lambda *a: unet._attend_on_kernels(*a, heads, head_dim)  # pylint: disable=protected-access
  plain = lambda *a: unet._attend(*a, heads, head_dim)  # pylint: disable=protected-access
  _close(jax.jit(fused)(*args), jax.jit(plain)(*args), 1e-5)
  vjp = lambda f: jax.jit(lambda *a: jax.vjp(f, *a)[1](g))
  grads = vjp(fused)(*args)
  for got, ref, rtol in zip(grads, vjp(plain)(*args),
                            (2.0**-7, 1e-5, 1e-5, 1e-5, 1e-5)):
    assert got.dtype == ref.dtype
    _close(got, ref.astype(jnp.float32), rtol)
  jax.tree.map(np.testing.assert_array_equal, vjp(fused)(*args), grads)

  x = _random(rng, (1, 16, 16, d), jnp.float32)
  for dtype, precision, kernels in ((jnp.float32, jnp.bfloat16, True),
                                    (jnp.float32, None, False),
                                    (jnp.bfloat16, None, False)):
    layer = unet.LinearAttention(heads, head_dim, dtype, precision)
    params = layer.init(jax.random.key(0), x)
    grad = jax.grad(lambda p: jnp.sum(layer.apply(p, x)))
    assert ('drdd_la_context_grad' in str(jax.make_jaxpr(grad)(params))
            ) == kernels


@needs_kernels
@pytest.mark.parametrize('b, n, c', [(2, 1023, 48), (3, 63, 80), (1, 4096, 64)])
@pytest.mark.parametrize('g_dtype', [jnp.float32, jnp.bfloat16])
def test_group_norm_silu_kernels_match_jnp(b, n, c, g_dtype):
  """The two passes of GroupNorm + SiLU's gradient against jnp's maths
  (float32), and the same bits on every call: pixels not a multiple of the
  blocks of 64, channels not a multiple of the kernel's 64-channel blocks."""
  rng = np.random.default_rng(7)
  x = _random(rng, (b, n, c), scale=3.0)
  g = _random(rng, (b, n, c), g_dtype)
  mul, add, u, v = (_random(rng, (b, c), jnp.float32) for _ in range(4))
  z = x.astype(jnp.float32) * mul[:, None] + add[:, None]
  s = jax.nn.sigmoid(z)
  gh = g.astype(jnp.float32) * s * (1 + z * (1 - s))
  sums = jax.jit(bf16_conv.group_norm_silu_sums)(x, g, mul, add)
  assert sums.shape == (b, 2, c) and sums.dtype == jnp.float32
  _close(sums, jnp.stack([gh.sum(1), (gh * x).sum(1)], 1), 1e-5)
  np.testing.assert_array_equal(
      jax.jit(bf16_conv.group_norm_silu_sums)(x, g, mul, add), sums)
  dx = jax.jit(bf16_conv.group_norm_silu_grad)(x, g, mul, add, u, v)
  assert dx.dtype == jnp.bfloat16
  _close(dx, gh * mul[:, None] + u[:, None] + v[:, None] * x, 2.0**-8)


@needs_kernels
@pytest.mark.parametrize('out_dtype, film', [(jnp.float32, True),
                                             (jnp.bfloat16, False)])
def test_group_norm_silu_on_the_kernels(monkeypatch, out_dtype, film):
  """`unet.GroupNorm(silu=True)` of a bfloat16 input takes its gradient
  from the kernels, within float32 roundings of flax's GroupNorm and SiLU
  (the bfloat16 gradient of x within one rounding); a float32 input keeps
  autodiff's."""
  monkeypatch.setattr(bf16_conv, 'enabled', lambda: True)
  rng = np.random.default_rng(8)
  b, c = 2, 96
  x = _random(rng, (b, 24, 20, c), scale=2.0)
  shift = _random(rng, (c,), jnp.float32)
  film = (tuple(_random(rng, (2, b, 1, 1, c), jnp.float32, 0.5))
          if film else None)
  g = _random(rng, x.shape, out_dtype)
  ours = unet.GroupNorm(8, dtype=out_dtype, silu=True)
  ref = nn.GroupNorm(8, epsilon=1e-5)
  params = jax.tree.map(lambda a: a + _random(rng, a.shape, jnp.float32),
                        ours.init(jax.random.key(0), x))

  def reference(p, x, shift, film):
    y = ref.apply(p, x.astype(jnp.float32) + shift)
    if film is not None:
      y = y * (film[0] + 1) + film[1]
    return nn.silu(y).astype(out_dtype)

  args = (params, x, shift, film)
  vjp = lambda f: jax.jit(lambda *a: jax.vjp(f, *a))
  (y, grad), (y_ref, grad_ref) = ((out, back(g)) for out, back in (
      vjp(ours.apply)(*args), vjp(reference)(*args)))
  assert y.dtype == out_dtype
  _close(y, y_ref, 2.0**-7 if out_dtype == jnp.bfloat16 else 1e-5)
  for got, want in zip(jax.tree.leaves(grad), jax.tree.leaves(grad_ref)):
    assert got.dtype == want.dtype
    _close(got, np.asarray(want, np.float32),
           2.0**-7 if got.dtype == jnp.bfloat16 else 1e-4)
  jax.tree.map(np.testing.assert_array_equal,
               vjp(ours.apply)(*args)[1](g), grad)
  for dtype, kernels in ((jnp.bfloat16, True), (jnp.float32, False)):
    loss = lambda p, x: jnp.sum(ours.apply(p, x).astype(jnp.float32))
    assert ('drdd_gn_silu_grad' in str(jax.make_jaxpr(jax.grad(
        loss, argnums=(0, 1)))(params, x.astype(dtype)))) == kernels
