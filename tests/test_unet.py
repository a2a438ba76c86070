"""UNet shapes, shared vs separate networks, and the phase embedding."""
import functools
import re

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


def _lax_conv(x, w, padding='SAME'):
  return jax.lax.conv_general_dilated(
      x, w, (1, 1), padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@pytest.mark.parametrize('pixels,in_channels', [((6, 10), 16), ((64, 64), 512)])
def test_fast_layers_equal_the_reference_layers(pixels, in_channels):
  """GroupNorm and WSConv are written for XLA:CPU: the reference maths,
  values and gradients. The second size takes the split sums of
  `unet.sum_rows` (4096 pixels); on CPU the weight standardization's sums
  are products with a ones vector, its gradient `_standardize_rows_bwd`."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.key(0), (2, *pixels, 16)) * 3 + 1
  rng = jax.random.key(1)

  def close(a, b):  # float32 sums in another order: relative to the scale
    np.testing.assert_allclose(a, b, atol=3e-5 * float(jnp.abs(b).max()))

  def check(ours, ref, *args):
    want = ref(*args)
    close(ours(*args), want)
    # A linear loss: the gradients compare the backward passes alone.
    r = jax.random.normal(rng, want.shape)
    loss = lambda f: lambda *a: jnp.sum(f(*a) * r)
    argnums = tuple(range(len(args)))
    jax.tree.map(close, jax.grad(loss(ours), argnums)(*args),
                 jax.grad(loss(ref), argnums)(*args))

  ours, ref = unet.GroupNorm(4), nn.GroupNorm(4, epsilon=1e-5)
  p = ref.init(rng, x)
  p = jax.tree.map(lambda v: v + jax.random.normal(rng, v.shape), p)
  assert jax.tree.structure(ours.init(rng, x)) == jax.tree.structure(p)
  check(ours.apply, ref.apply, p, x)
  # The convolution's bias and the time embedding's FiLM folded in.
  shift = jax.random.normal(jax.random.key(2), (16,)) * 2
  film = jax.random.normal(jax.random.key(3), (2, 2, 1, 1, 16))
  check(lambda p, x, shift, film: ours.apply(p, x, shift, film),
        lambda p, x, shift, film: ref.apply(p, x + shift) * (film[0] + 1)
        + film[1], p, x, shift, film)

  x = jnp.tile(x, (1, 1, 1, in_channels // 16))
  conv = unet.WSConv(8)
  p = conv.init(rng, x)
  p = jax.tree.map(lambda v: v + jax.random.normal(rng, v.shape), p)

  def reference(p, x):
    w, bias = p['params']['kernel'], p['params']['bias']
    w_std = (w - w.mean((0, 1, 2))) / jnp.sqrt(w.var((0, 1, 2)) + 1e-5)
    return _lax_conv(x, w_std) + bias

  check(conv.apply, reference, p, x)


def test_materialize_is_exact_and_keeps_the_factors_out_of_the_loop():
  """`unet.materialize` returns its inputs bit for bit (values and
  gradients), and on CPU the [b, 1, 1, c] factors reach the full-size loop
  as computed arrays: no fusion of the compiled GroupNorm recomputes the
  group -> channel broadcast per pixel."""
  rs = np.random.RandomState(0)
  a = jnp.asarray(rs.randn(3, 1, 1, 40) * 1e3, jnp.float32)
  b = jnp.asarray(rs.randn(3, 1, 1, 40) * 1e-30, jnp.float32)
  for got, want in zip(jax.jit(unet.materialize)(a, b), (a, b)):
    np.testing.assert_array_equal(got, want)
  g = jax.grad(lambda a: jnp.sum(unet.materialize(a)[0] * a))(a)
  np.testing.assert_array_equal(g, 2 * a)
  if jax.default_backend() != 'cpu':
    return
  gn = unet.GroupNorm(4)
  x = jnp.ones((2, 8, 8, 16))
  p = gn.init(jax.random.key(0), x)
  hlo = jax.jit(gn.apply).lower(p, x).compile().as_text()
  entry = hlo[hlo.index('\nENTRY'):]
  loop = next(line for line in entry.splitlines()
              if '= f32[2,8,8,16]' in line and ' fusion(' in line)
  called = re.search(r'calls=(%[\w.\-]+)', loop).group(1)
  body = hlo[hlo.index('\n' + called + ' '):]
  body = body[:body.index('\n}')]
  # Arithmetic on per-(example, channel or group) values inside the loop
  # would be computed again for every pixel.
  small = [line for line in body.splitlines()
           if re.search(r'= f32\[2,(1,1,)?(4|16)\]', line)
           and re.search(r' (multiply|add|subtract|rsqrt)\(', line)]
  assert not small, body


@pytest.mark.parametrize('k,padding,batch', [
    (1, None, 2), (3, None, 2), (7, None, 2), (3, None, 1),
    (2, ((1, 1), (1, 1)), 2)])
def test_conv_gradient_is_jaxs_and_stays_on_eigen_inside_loops(
    k, padding, batch):
  """`unet.conv`'s own gradient equals jax's. Inside a `lax.scan`, XLA:CPU
  compiles all of its convolutions in the layout it hands to Eigen, and
  leaves some of jax's gradient convolutions in others (generic loops, 6-30x
  slower). If that second assertion fails, XLA:CPU now rearranges loop
  bodies too and `unet.conv` could use jax's gradient again. The 2x2
  kernel is `upsample_conv`'s; batch 1 and the 2x2 kernel take the weight
  gradient with the input padded first."""
  x = jax.random.normal(jax.random.key(0), (batch, 6, 10, 5))
  w = jax.random.normal(jax.random.key(1), (k, k, 5, 4))
  lax_conv = functools.partial(_lax_conv, padding=padding or 'SAME')
  r = jax.random.normal(jax.random.key(2), lax_conv(x, w).shape)
  loss = lambda conv: lambda x, w: jnp.sum(conv(x, w) * r)
  unet_conv = functools.partial(unet.conv, padding=padding)
  np.testing.assert_allclose(unet_conv(x, w), lax_conv(x, w), rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5),
               jax.grad(loss(unet_conv), (0, 1))(x, w),
               jax.grad(loss(lax_conv), (0, 1))(x, w))

  def layouts_in_a_loop(conv):
    grad = jax.grad(loss(conv), (0, 1))

    def step(total, x):
      dx, dw = grad(x, w)
      return total + dw, dx

    f = lambda w, xs: jax.lax.scan(step, jnp.zeros_like(w), xs)
    hlo = jax.jit(f).lower(w, jnp.stack([x, x])).compile().as_text()
    return set(re.findall(r'convolution\(.*dim_labels=([^,\s]+)', hlo))

  assert layouts_in_a_loop(unet_conv) == {'b01f_01io->b01f'}
  assert layouts_in_a_loop(lax_conv) - {'b01f_01io->b01f'}


def test_upsample_conv_is_the_convolution_of_the_upsampled_input():
  """Values and gradients, against upsampling by `jnp.repeat` first."""
  x = jax.random.normal(jax.random.key(0), (2, 3, 5, 6))
  w = jax.random.normal(jax.random.key(1), (3, 3, 6, 4))
  r = jax.random.normal(jax.random.key(2), (2, 6, 10, 4))
  reference = lambda x, w: _lax_conv(
      jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2), w)
  np.testing.assert_allclose(unet.upsample_conv(x, w), reference(x, w),
                             atol=1e-5)
  loss = lambda conv: lambda x, w: jnp.sum(conv(x, w) * r)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4),
               jax.grad(loss(unet.upsample_conv), (0, 1))(x, w),
               jax.grad(loss(reference), (0, 1))(x, w))


def test_linear_attention_equals_per_head_reference():
  """The fused linear attention == the per-head einsum formulation."""
  attn = unet.LinearAttention(heads=2, head_dim=4)
  x = jax.random.normal(jax.random.key(0), (2, 5, 7, 6)) * 2
  p = attn.init(jax.random.key(1), x)['params']

  def reference(x):
    ln = lambda v: (v - v.mean(-1, keepdims=True)) / jnp.sqrt(
        v.var(-1, keepdims=True) + 1e-5)
    qkv = (ln(x) * p['LayerNorm_0']['scale']) @ p['Conv_0']['kernel'][0, 0]
    q, k, v = qkv.reshape(2, -1, 3, 2, 4).transpose(2, 0, 1, 3, 4)
    q = jax.nn.softmax(q, axis=-1) * 4**-0.5
    k = jax.nn.softmax(k, axis=1)
    context = jnp.einsum('bnhd,bnhe->bhde', k, v)
    out = jnp.einsum('bhde,bnhd->bnhe', context, q).reshape(x.shape[:-1] + (8,))
    out = out @ p['Conv_1']['kernel'][0, 0] + p['Conv_1']['bias']
    return x + ln(out) * p['LayerNorm_1']['scale']

  p = jax.tree.map(lambda v: v + 0.3 * jax.random.normal(jax.random.key(2), v.shape), p)
  got = attn.apply({'params': p}, x)
  np.testing.assert_allclose(got, reference(x), atol=1e-4)
  loss = lambda f: lambda x: jnp.sum(jnp.sin(f(x)))
  np.testing.assert_allclose(
      jax.grad(loss(lambda x: attn.apply({'params': p}, x)))(x),
      jax.grad(loss(reference))(x), atol=1e-4)


@pytest.mark.parametrize('dtype,precision', [(jnp.bfloat16, None),
                                             (jnp.float32, jnp.bfloat16)])
def test_linear_attention_in_bfloat16_stays_close_to_float32(dtype, precision):
  """bf16 compute or bf16 qk projection: parameter gradients within 2 %.

  The folded products (context Wv, context Wo) are summed in float32; made
  in bfloat16 at full resolution and projected, the output bias's gradient
  was 5.5 % off under bf16 compute.
  """
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 64))
  exact = unet.LinearAttention(heads=4, head_dim=32)
  p = exact.init(jax.random.key(1), x)['params']
  p = jax.tree.map(
      lambda v: v + 0.3 * jax.random.normal(jax.random.key(2), v.shape), p)
  grad = lambda attn: jax.grad(lambda p: jnp.sum(jnp.sin(attn.apply(
      {'params': p}, x).astype(jnp.float32))))(p)
  errors = jax.tree.map(
      lambda g, w: float(jnp.linalg.norm(g.astype(jnp.float32) - w)
                         / jnp.linalg.norm(w)),
      grad(unet.LinearAttention(4, 32, dtype, precision)), grad(exact))
  assert max(jax.tree.leaves(errors)) < 0.02, errors


def test_remat_keeps_parameter_names(tiny):
  """Checkpoints do not depend on model.remat."""
  shapes = {}
  for remat in (False, True):
    with tiny.unlocked():
      tiny.model.remat = remat
    model = unet.create_model(tiny.model)
    shapes[remat] = jax.eval_shape(
        lambda m=model: unet.init_params(m, jax.random.key(0)))
  assert jax.tree.structure(shapes[False]) == jax.tree.structure(shapes[True])


def test_remat_computes_the_same_gradients_with_fewer_temporaries(tiny):
  """model.remat: same loss and gradients, and XLA keeps less for backward.

  `nn.remat` fails the memory check on XLA:CPU (0.97 of the temporaries):
  its recomputation was scheduled at the start of the backward pass.
  """
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  t = jnp.full((2,), 10.0)
  params = jax.jit(lambda k: unet.init_params(
      unet.create_model(tiny.model), k))(jax.random.key(0))
  got = {}
  for remat in (False, True):
    with tiny.unlocked():
      tiny.model.remat = remat
    model = unet.create_model(tiny.model)
    loss = lambda p, m=model: jnp.mean(jnp.square(
        m.apply({'params': p}, x, jnp.flip(x, 1), t, 1)))
    compiled = jax.jit(jax.value_and_grad(loss)).lower(params).compile()
    got[remat] = (compiled(params),
                  compiled.memory_analysis().temp_size_in_bytes)
  (plain, plain_temp), (remat, remat_temp) = got[False], got[True]
  np.testing.assert_allclose(remat[0], plain[0], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(remat[1]), jax.tree.leaves(plain[1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert remat_temp < 0.7 * plain_temp, (remat_temp, plain_temp)
