"""The denoising UNet shared by both DRDD objectives (NHWC, Flax linen).

The architecture follows the release's residual network: a 7x7 stem,
`len(channel_mults)` levels of weight-standardized ResNet blocks with
time-embedding scale/shift and linear attention, full attention in the middle,
pixel-unshuffle downsampling and nearest-neighbour upsampling.

Why linen rather than nnx: the train state, its EMA and its shardings are plain
pytrees of parameters that `jit`, `optax`, Orbax and `NamedSharding` consume
directly; there is no split/merge of module state on every step, and `apply`
is a pure function of `(params, inputs)`, which is what the jitted train step,
the `lax.scan` sampler and the oracle tests all want.
"""
import functools
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from drdd_jax import bf16_conv

# torch's default conv/linear init (kaiming_uniform with a=sqrt(5)).
_torch_init = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')
Dtype = Any


def conv(x, w, padding=None, precision=None, out_dtype=None):
  """Stride-1 convolution: [B, H, W, I] x [kh, kw, I, O] -> [B, H', W', O].

  Computed in `x`'s dtype (`w` is cast to it; bfloat16 products are summed
  in float32). `padding` is `((top, bottom), (left, right))` zeros, by
  default 'SAME' (odd kernels). With `precision=jnp.bfloat16` a float32
  convolution is computed in bfloat16: `x` and `w` rounded to bfloat16, the
  result returned in `out_dtype`, by default `x`'s dtype (the rest of a
  float32 network stays float32).

  On CPU the gradient is written out as two convolutions in the dimension
  order that XLA:CPU runs on Eigen. jax's own gradient convolutions use
  other orders, which XLA:CPU rearranges only in a program's top level, so
  inside a `lax.scan` (K train steps per dispatch, microbatches) they ran as
  generic loops, ~30x slower (`benchmarks/xla_cpu_loops.py`); so did an even
  kernel's weight gradient at the top level. The gradient is the same
  computation (tests/test_unet.py); the weight gradient of bfloat16
  operands is summed and returned in float32. bfloat16 convolutions and
  their gradients run on `bf16_conv`'s kernels where `bf16_conv.enabled()`.
  """
  kh, kw = w.shape[:2]
  if padding is None:
    if kh % 2 == 0 or kw % 2 == 0:
      raise ValueError(f"'SAME' needs odd kernel sizes, got {(kh, kw)}.")
    padding = ((kh // 2, kh // 2), (kw // 2, kw // 2))
  padding = tuple(tuple(p) for p in padding)
  if (precision is not None and jnp.dtype(precision) == jnp.bfloat16
      and x.dtype != jnp.bfloat16):
    return conv(x.astype(jnp.bfloat16), w, padding).astype(
        out_dtype or x.dtype)
  if jax.default_backend() == 'cpu':
    return _conv(x, w, padding,
                 x.dtype == jnp.bfloat16 and bf16_conv.enabled())
  return _lax_conv(x, w.astype(x.dtype), padding)


def _lax_conv(x, w, padding, out_dtype=None):
  return jax.lax.conv_general_dilated(
      x, w, (1, 1), padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      preferred_element_type=out_dtype)


# `kernels` (bf16_conv's, or XLA's convolutions) is static: traces with and
# without them never share a cache entry.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, w, padding, kernels):
  if kernels:
    return bf16_conv.conv(x, w, padding)
  return _lax_conv(x, w.astype(x.dtype), padding)


def _conv_fwd(x, w, padding, kernels):
  return _conv(x, w, padding, kernels), (x, w)


def _conv_bwd(padding, kernels, saved, g):
  x, w = saved
  kh, kw = w.shape[:2]
  (top, bottom), (left, right) = padding
  # dx: g convolved with the flipped kernel, its in/out channels swapped.
  dx_padding = ((kh - 1 - top, kh - 1 - bottom),
                (kw - 1 - left, kw - 1 - right))
  if kernels:
    dx = bf16_conv.conv(g, w, dx_padding, transpose_kernel=True)
    dw = bf16_conv.conv_weight_gradient(x, g, (kh, kw), padding)
    return dx, dw.astype(w.dtype)
  dx = _lax_conv(g, jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2).astype(g.dtype),
                 dx_padding)
  # dw[a, b, i, o] = sum over n, h, w of x[n, h + a - top, w + b - left, i]
  # * g[n, h, w, o]: x padded, as [I, H, W, N], convolved with g as an
  # [H', W', N, O] kernel gives dw as [I, kh, kw, O]. XLA:CPU rewrote that
  # convolution into another dimension order (generic loops) for a 2x2
  # kernel (50x slower) and ran it 3x slower at batch 1, unless x was padded
  # first; for odd kernels at larger batches the padded copy of x is left
  # out (it added 8 % to the aio5 train step's temporaries).
  same_odd = kh % 2 and kw % 2 and padding == ((kh // 2,) * 2, (kw // 2,) * 2)
  if x.shape[0] == 1 or not same_odd:
    x = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    padding = ((0, 0), (0, 0))
  dw = _lax_conv(x.transpose(3, 1, 2, 0), g.transpose(1, 2, 0, 3), padding,
                 jnp.float32)
  return dx, dw.transpose(1, 2, 0, 3).astype(w.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)

# Row p of _PHASE_TAPS[a] sums the 3x3 kernel's rows that read input row
# i - 1 + a + p for output row 2i + a of a nearest-neighbour 2x upsampling.
_PHASE_TAPS = np.array([[[1, 0, 0], [0, 1, 1]],
                        [[1, 1, 0], [0, 0, 1]]], np.float32)


def upsample_conv(x, w, precision=None):
  """`conv(x upsampled 2x by nearest neighbour, w, precision=precision)`
  for a 3x3 kernel `w`.

  Computed at the input's resolution: output pixel (2i + a, 2j + b) sees
  only input rows i - 1 + a, i + a and columns j - 1 + b, j + b, so each of
  the four phases (a, b) is a 2x2 convolution with the 3x3 kernel's taps
  summed (`_PHASE_TAPS`), all four in one convolution with 4x the output
  channels, then interleaved. The same function in 4/9 of the FLOPs,
  without the 4x upsampled input.

  Args:
    x: [B, H, W, I].
    w: [3, 3, I, O].
    precision: as for `conv`.

  Returns:
    [B, 2H, 2W, O].
  """
  b, h, wd, _ = x.shape
  out = w.shape[-1]
  taps = jnp.einsum('apr,bqs,rsio->pqiabo', _PHASE_TAPS, _PHASE_TAPS, w)
  y = conv(x, taps.reshape(2, 2, -1, 4 * out), ((1, 1), (1, 1)), precision)
  y = y.reshape(b, h + 1, wd + 1, 2, 2, out)
  # Phase (a, b) at input pixel (i, j) is y[i + a, j + b, a, b].
  rows = [jnp.stack([y[:, a:a + h, c:c + wd, a, c] for c in (0, 1)], axis=3)
          for a in (0, 1)]
  return jnp.stack(rows, axis=2).reshape(b, 2 * h, 2 * wd, out)


def _splits_sums(n: int) -> bool:
  """Whether `sum_rows` sums `n` rows in blocks of 32 (below: plainly)."""
  return n >= 4096 and n % 32 == 0 and jax.default_backend() == 'cpu'


def sum_rows(*xs):
  """`x.sum(axis=-2)` for each of the [..., n, c] arrays `xs` (one shape).

  XLA:CPU rewrites a sum over a long non-minor axis into a chain of
  `reduce-window`s, which ran 2-4x slower than summing blocks of 32 rows
  and then the block sums; the optimization barrier keeps XLA's simplifier
  from folding the two sums back into one (XLA:CPU drops barriers only
  later, before scheduling). Plain sums below 4096 rows, where the split
  was slower at some shapes, and off CPU (docs/performance.md).
  """
  n = xs[0].shape[-2]
  if not _splits_sums(n):
    return tuple(x.sum(axis=-2) for x in xs)
  parts = jax.lax.optimization_barrier(tuple(
      x.reshape(x.shape[:-2] + (n // 32, 32, x.shape[-1])).sum(axis=-2)
      for x in xs))
  return tuple(p.sum(axis=-2) for p in parts)


def materialize(*xs):
  """The [b, 1, 1, c] arrays `xs`, unchanged, computed apart from their users.

  XLA fuses a small elementwise computation into every full-size loop that
  reads it, and so recomputes it per pixel. On CPU each array goes through
  a matmul by the identity, which XLA:CPU never fuses into a loop (exact
  for finite values: one term times 1, the others times 0), so it is computed
  once; an optimization barrier does not do that there, since XLA:CPU
  removes barriers before it fuses. For GroupNorm's factors: the 256x256
  restore 1.2-1.3x faster (`benchmarks/ab.py --change=materialize`,
  docs/performance.md). Elsewhere an optimization barrier.
  """
  if jax.default_backend() != 'cpu':
    return jax.lax.optimization_barrier(xs)
  out = []
  for x in xs:
    b, c = x.shape[0], x.shape[-1]
    eye = jnp.eye(c, dtype=x.dtype)
    out.append(jnp.dot(x.reshape(b, c), eye,
                       precision=jax.lax.Precision.HIGHEST).reshape(x.shape))
  return tuple(out)


def standardize_kernel(w):
  """Weight standardization: each output channel of `w` [..., out] to mean 0,
  variance 1 over its other axes (plus 1e-5).

  On CPU over a [kh*kw*in, out] view with its own gradient
  (`_standardize_rows`), the column sums of both passes as products with a
  ones vector (`_row_means`): XLA:CPU sums a major axis as a chain of
  reduce-windows, several times slower, and so did autodiff's gradient.
  """
  rows = w.reshape(-1, w.shape[-1])
  if jax.default_backend() == 'cpu':
    return _standardize_rows(rows).reshape(w.shape)
  mean = rows.mean(axis=0)
  var = jnp.square(rows - mean).mean(axis=0)
  return ((rows - mean) * jax.lax.rsqrt(var + 1e-5)).reshape(w.shape)


def _row_means(*xs):
  """The means over axis 0 of the [n, c] arrays `xs`.

  Products with a ones vector, or `sum_rows`'s split sums where those apply
  (4096 rows or more), which were faster there.
  """
  n = xs[0].shape[0]
  if _splits_sums(n):
    return tuple(s / n for s in sum_rows(*xs))
  ones = jnp.full((n,), 1 / n, xs[0].dtype)
  return tuple(jnp.dot(ones, x, precision=jax.lax.Precision.HIGHEST)
               for x in xs)


@jax.custom_vjp
def _standardize_rows(rows):
  """[n, c] -> each column to mean 0 and variance 1 (plus 1e-5)."""
  return _standardize_rows_fwd(rows)[0]


def _standardize_rows_fwd(rows):
  mean, = _row_means(rows)
  centred = rows - mean
  inv_std = jax.lax.rsqrt(_row_means(jnp.square(centred))[0] + 1e-5)
  return centred * inv_std, (rows, mean, inv_std)


def _standardize_rows_bwd(residuals, g):
  rows, mean, inv_std = residuals
  y = (rows - mean) * inv_std
  g_mean, gy_mean = _row_means(g, g * y)
  return (inv_std * (g - g_mean - y * gy_mean),)


_standardize_rows.defvjp(_standardize_rows_fwd, _standardize_rows_bwd)


def wait_for(tree, signal):
  """`tree` unchanged in value, but computed from `signal` as far as XLA knows.

  Adds `0 * s` to the floating leaves of `tree`, where `s` sums the first
  element of each leaf of `signal`: whatever uses the result cannot run
  before all of `signal` exists. `lax.optimization_barrier` cannot order work
  on XLA:CPU, which removes the barriers before it schedules
  (docs/performance.md). A non-finite `s` makes the result non-finite; the
  train step skips such steps like any non-finite gradient.
  """
  s = sum(x.reshape(-1)[0].astype(jnp.float32)
          for x in jax.tree.leaves(signal))
  return jax.tree.map(
      lambda x: x + (0 * s).astype(x.dtype)
      if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def recompute_in_backward(block: nn.Module, *args):
  """`block(*args)`, recomputed in the backward pass once its cotangent exists.

  Only `block`'s inputs are kept for the backward pass; its gradient reruns
  it under `jax.vjp` on inputs that `wait_for` the incoming cotangent. With
  `nn.remat`, XLA:CPU ran every recomputation at the start of the backward
  pass, which saved nothing (docs/performance.md).
  """
  unbound = block.clone(parent=None)

  def forward(mdl, *inputs):
    return mdl(*inputs), (mdl.variables, inputs)

  def backward(saved, g):
    variables, inputs = saved
    return jax.vjp(unbound.apply, variables, *wait_for(inputs, g))[1](g)

  return nn.custom_vjp(lambda mdl, *inputs: mdl(*inputs), forward,
                       backward)(block, *args)


class Conv(nn.Module):
  """k x k 'SAME' convolution (stride 1) with `nn.Conv`'s parameters.

  With `upsample`, the convolution of the input upsampled 2x by nearest
  neighbour (3x3 kernels; `upsample_conv`). `precision` as for `conv`.
  """
  features: int
  kernel_size: int
  dtype: Dtype = jnp.float32
  use_bias: bool = True
  upsample: bool = False
  precision: Optional[Dtype] = None

  def prepare_kernel(self, w):
    return w

  @nn.compact
  def __call__(self, x, add_bias: bool = True):
    """The convolution; with `add_bias=False`, `(y, bias)` unsummed.

    A following `GroupNorm` takes the bias as its `shift` and folds it into
    its per-channel factors, so that `y + bias` is never materialized; `y`
    then stays in the dtype the convolution computes in (`precision`'s).
    """
    k = self.kernel_size
    w = self.param('kernel', _torch_init, (k, k, x.shape[-1], self.features))
    w = self.prepare_kernel(w)
    x = x.astype(self.dtype)
    if self.upsample:
      y = upsample_conv(x, w, self.precision)
    else:
      y = conv(x, w, precision=self.precision,
               out_dtype=None if add_bias else self.precision)
    if not self.use_bias:
      return y
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    return y + bias.astype(self.dtype) if add_bias else (y, bias)


class WSConv(Conv):
  """3x3 convolution with weight standardization (per output channel)."""
  kernel_size: int = 3

  def prepare_kernel(self, w):
    return standardize_kernel(w)


def _pixel_sums(x):
  """The per-channel sums of `x` [b, h, w, c] and of its square over the
  pixels (`sum_rows`): two [b, c] float32 arrays."""
  b, c = x.shape[0], x.shape[-1]
  xf = x.astype(jnp.float32).reshape(b, -1, c)
  return sum_rows(xf, jnp.square(xf))


def _factors_from_sums(sums, square_sums, n: int, params, num_groups: int,
                       epsilon: float):
  """`group_norm_factors` from `_pixel_sums`' output over n pixels;
  `params = (scale, bias, shift, film)`."""
  scale, bias, shift, film = params
  b, c = sums.shape
  per_group = c // num_groups
  if shift is not None:
    shift = shift.astype(jnp.float32)
    square_sums = square_sums + (2 * sums + n * shift) * shift
    sums = sums + n * shift

  def group_mean(v):  # [b, c] -> [b, groups, 1]
    return v.reshape(b, num_groups, per_group).sum(-1, keepdims=True) / (
        n * per_group)

  def per_channel(v):  # [b, groups, 1] -> [b, 1, 1, c]
    return jnp.broadcast_to(v, (b, num_groups, per_group)).reshape(b, 1, 1, c)

  mean = group_mean(sums)
  var = jnp.maximum(0.0, group_mean(square_sums) - jnp.square(mean))
  mul = per_channel(jax.lax.rsqrt(var + epsilon)) * scale
  centre = -per_channel(mean) if shift is None else shift - per_channel(mean)
  add = bias + centre * mul
  if film is None:
    return mul, add
  film_scale, film_shift = (v.astype(jnp.float32) for v in film)
  return mul * (film_scale + 1), add * (film_scale + 1) + film_shift


def group_norm_factors(x, scale, bias, num_groups: int, epsilon: float,
                       shift=None, film=None):
  """`mul`, `add` [b, 1, 1, c] with `x * mul + add == GroupNorm(x + shift)
  * (1 + film[0]) + film[1]`.

  `nn.GroupNorm`'s maths (variance E[v^2] - E[v]^2 clipped at 0) for
  `v = x + shift`, `shift` a per-channel [c] vector (a convolution's bias),
  or 0: the statistics of `v` come from the per-channel sums of `x`
  (`sum_rows`), then the sums over each group's channels. `film`: None, or
  `(scale, shift)`, each [b, 1, 1, c].
  """
  n = x.size // (x.shape[0] * x.shape[-1])
  return _factors_from_sums(*_pixel_sums(x), n, (scale, bias, shift, film),
                            num_groups, epsilon)


def _norm_silu_on_kernels(x) -> bool:
  """Whether `GroupNorm(silu=True)` of `x` takes its gradient from
  `bf16_conv`'s kernels (`_group_norm_silu`)."""
  return (x.dtype == jnp.bfloat16 and x.shape[-1] % 16 == 0
          and bf16_conv.enabled())


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _group_norm_silu(num_groups, epsilon, dtype, x, params):
  """`silu(GroupNorm(x))` in `dtype` for a bfloat16 `x`, its gradient from
  `bf16_conv.group_norm_silu_sums`/`_grad`; `params` as for
  `_factors_from_sums`."""
  return _group_norm_silu_fwd(num_groups, epsilon, dtype, x, params)[0]


def _group_norm_silu_fwd(num_groups, epsilon, dtype, x, params):
  sums = _pixel_sums(x)
  n = x.size // (x.shape[0] * x.shape[-1])
  mul, add = materialize(*_factors_from_sums(*sums, n, params, num_groups,
                                             epsilon))
  # Saved: x (bfloat16) and [b, c] arrays; no full-size float32 sigmoid.
  return nn.silu(x * mul + add).astype(dtype), (x, params, sums, mul, add)


def _group_norm_silu_bwd(num_groups, epsilon, dtype, saved, g):
  del dtype
  x, params, sums, mul, add = saved
  b, c = x.shape[0], x.shape[-1]
  n = x.size // (b * c)
  flat = lambda v: v.reshape(b, -1, c)
  factors = (flat(mul)[:, 0], flat(add)[:, 0])
  # The gradients of mul and add (the pixel sums), through the small graph
  # that made them from the statistics and the parameters; then dx, the
  # statistics' share (sums of x and x^2) included.
  pixel = bf16_conv.group_norm_silu_sums(flat(x), flat(g), *factors)
  d_factors = (pixel[:, 1].reshape(mul.shape), pixel[:, 0].reshape(add.shape))
  _, vjp = jax.vjp(
      lambda s, s2, p: _factors_from_sums(s, s2, n, p, num_groups, epsilon),
      *sums, params)
  d_sums, d_square_sums, d_params = vjp(d_factors)
  dx = bf16_conv.group_norm_silu_grad(flat(x), flat(g), *factors, d_sums,
                                      2 * d_square_sums)
  return dx.reshape(x.shape), d_params


_group_norm_silu.defvjp(_group_norm_silu_fwd, _group_norm_silu_bwd)


class GroupNorm(nn.Module):
  """`nn.GroupNorm` (same parameters and maths), in a form XLA:CPU runs faster.

  Per-channel sums over the pixels, then over each group's channels, and the
  normalization as one `x * mul + add` (`group_norm_factors`): on XLA:CPU,
  1.5-4.7x faster than `nn.GroupNorm` forward at the network's shapes in two
  runs of benchmarks/layers.py. The preceding convolution's bias (`shift`)
  and the time embedding's scale and shift (`film`) fold into `mul` and
  `add`: no full-size `x + shift`, and in the backward pass no sum of the
  gradient over the pixels for the bias apart from the normalization's own.

  With `silu`, followed by SiLU (computed in float32). For a bfloat16 `x`
  (a bfloat16 convolution's output) where `bf16_conv`'s kernels run, the
  gradient of both comes from those: two passes over the bfloat16 `x` and
  the cotangent, and only `x` kept for the backward pass.
  """
  num_groups: int
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  silu: bool = False

  @nn.compact
  def __call__(self, x, shift=None, film=None):
    """`GroupNorm(x + shift) * (1 + film[0]) + film[1]`, then SiLU if `silu`.

    Args:
      x: [b, h, w, c].
      shift: optional [c], added to `x` before the normalization.
      film: optional `(scale, shift)`, each [b, 1, 1, c], applied after it.

    Returns:
      An array like `x`, in `dtype`.
    """
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,))
    bias = self.param('bias', nn.initializers.zeros, (c,))
    if self.silu and _norm_silu_on_kernels(x):
      return _group_norm_silu(self.num_groups, self.epsilon, self.dtype, x,
                              (scale, bias, shift, film))
    mul, add = group_norm_factors(x, scale, bias, self.num_groups,
                                  self.epsilon, shift, film)
    # Computed once: fused into the elementwise loops, the factors and their
    # group->channel broadcast are recomputed per pixel.
    mul, add = materialize(mul, add)
    y = x * mul + add
    return (nn.silu(y) if self.silu else y).astype(self.dtype)


class ResBlock(nn.Module):
  """Two WSConv-GroupNorm-SiLU blocks; the time embedding scales and shifts."""
  features: int
  groups: int
  dtype: Dtype = jnp.float32
  precision: Optional[Dtype] = None  # of the convolutions, as for `conv`

  @nn.compact
  def __call__(self, x, temb):
    ss = nn.Dense(2 * self.features, dtype=self.dtype, kernel_init=_torch_init)(
        nn.silu(temb))
    film = jnp.split(ss[:, None, None, :], 2, axis=-1)
    ws_conv = functools.partial(WSConv, self.features, dtype=self.dtype,
                                precision=self.precision)
    # The first block's output in the next convolution's precision (it
    # rounds it to that anyway).
    norm = functools.partial(GroupNorm, self.groups, 1e-5, silu=True)
    h, bias = ws_conv()(x, add_bias=False)
    h = norm(dtype=self.precision or self.dtype)(h, bias, film)
    h, bias = ws_conv()(h, add_bias=False)
    h = norm(dtype=self.dtype)(h, bias)
    if x.shape[-1] != self.features:
      x = Conv(self.features, 1, self.dtype, precision=self.precision)(x)
    return h + x


def _qkv(x, width, dtype, precision):
  """Pre-normalized q, k, v of shape [B, H*W, width] (heads * head_dim)."""
  h = nn.LayerNorm(epsilon=1e-5, use_bias=False, dtype=dtype)(x)
  qkv = Conv(3 * width, 1, dtype, use_bias=False, precision=precision)(h)
  return jnp.split(qkv.reshape(x.shape[0], -1, 3 * width), 3, axis=-1)


class Projection(nn.Module):
  """A 1x1 `Conv`'s parameters (kernel [1, 1, in, out], bias), not applied.

  For a caller that folds the projection into its neighbouring matmuls;
  named like the `Conv` it stands for, so checkpoints do not change.
  """
  features: int
  use_bias: bool = True

  @nn.compact
  def __call__(self, in_features: int):
    """Returns `(kernel [in, out], bias or None)`."""
    w = self.param('kernel', _torch_init, (1, 1, in_features, self.features))
    bias = (self.param('bias', nn.initializers.zeros, (self.features,))
            if self.use_bias else None)
    return w[0, 0], bias


class LinearAttention(nn.Module):
  """Residual pre-norm linear attention: cost linear in the pixel count.

  With h = LayerNorm(x), per head: context = softmax_pixels(h Wk)^T (h Wv),
  out = softmax_channels(h Wq) context, and x + LayerNorm(out Wo + bo).
  Computed with the matmuls reassociated, so that no [pixels, width]
  activation is made beyond q and k:

  - all heads at once, with a block-diagonal context (no [batch, heads, ...]
    transposes); the softmax over the pixels is folded into the pixel-axis
    matmul, its normalizer being the product with a constant-one channel;
  - context = (softmax(k)^T h) Wv: v = h Wv is never formed (the pixel-axis
    matmul has `channels + 1` columns instead of `width + 1`);
  - out Wo = q (context Wo): the output projection is folded into the
    [width, width] context, one [pixels, width] x [width, channels] matmul.

  The maths is unchanged (tested against the per-head formulation); XLA:CPU
  ran the per-head einsums and the pixel-axis softmax several times slower
  than these matmuls, and the reassociation halves their FLOPs at the
  64-channel levels. The qk projection stays a 1x1 convolution (at
  `precision`); the folded products are computed in `dtype`.

  A float32 layer with bfloat16 qk projection runs the two softmax
  products and their gradients on `bf16_conv`'s float32 kernels where
  `bf16_conv.enabled()` (`_attend_on_kernels`, the same maths as
  `_attend` to float32 roundings).
  """
  heads: int
  head_dim: int
  dtype: Dtype = jnp.float32
  precision: Optional[Dtype] = None  # of the qk 1x1 convolution

  @nn.compact
  def __call__(self, x):
    b, c, width = x.shape[0], x.shape[-1], self.heads * self.head_dim
    h = nn.LayerNorm(epsilon=1e-5, use_bias=False, dtype=self.dtype)(x)
    w_qkv, _ = Projection(3 * width, use_bias=False, name='Conv_0')(c)
    w_qk, w_v = w_qkv[None, None, :, :2 * width], w_qkv[:, 2 * width:]
    kernels = (bf16_conv.enabled() and self.dtype == jnp.float32
               and self.precision is not None
               and jnp.dtype(self.precision) == jnp.bfloat16
               and self.head_dim % 16 == 0 and c % 16 == 0)
    if kernels:  # The same bfloat16 values, not cast to float32.
      qk = conv(h.astype(jnp.bfloat16), w_qk)
    else:
      qk = conv(h, w_qk, precision=self.precision)
    w_out, bias = Projection(c, name='Conv_1')(width)
    args = (qk.reshape(b, -1, 2 * width), h.reshape(b, -1, c), w_v, w_out,
            bias, self.heads, self.head_dim)
    out = (_attend_on_kernels(*args) if kernels
           else _attend(*args, dtype=self.dtype))
    out = out.reshape(x.shape)
    return x + nn.LayerNorm(epsilon=1e-5, use_bias=False, dtype=self.dtype)(out)


def _attend(qk, h, w_v, w_out, bias, heads, head_dim, dtype=jnp.float32):
  """`LinearAttention`'s attention of its normalized input h [B, N, C], from
  qk [B, N, 2 width] (queries, keys): out [B, N, C] before the last norm."""
  f32 = jnp.float32
  q, k = jnp.split(qk, 2, axis=-1)
  # Softmax statistics in float32 even under bf16 compute.
  q = jax.nn.softmax(q.astype(f32).reshape(q.shape[:2] + (heads, head_dim)),
                     axis=-1)
  q = q.reshape(k.shape) * head_dim**-0.5
  k = k.astype(f32)
  # Any per-channel shift leaves the softmax unchanged: no gradient.
  k = jnp.exp(k - jax.lax.stop_gradient(k.max(axis=1, keepdims=True)))
  h = jnp.concatenate([h, jnp.ones(h.shape[:-1] + (1,), h.dtype)], axis=-1)
  kh = jnp.einsum('bnc,bnd->bcd', k.astype(dtype), h,
                  preferred_element_type=f32)
  context = _context(kh, w_v, w_out, heads, head_dim)
  return jnp.einsum('bnc,bcf->bnf', q.astype(dtype),
                    context.astype(dtype)) + bias.astype(dtype)


def _context(kh, w_v, w_out, heads, head_dim):
  """The block-diagonal context folded with Wv and Wo, from kh [B, width,
  C + 1] (softmax(k)'s numerator times [h, 1]): [B, width, C]."""
  f32 = jnp.float32
  context = jnp.einsum('bcd,de->bce', kh[..., :-1] / kh[..., -1:],
                       w_v.astype(f32))
  head = np.arange(heads * head_dim) // head_dim
  context = context * (head[:, None] == head[None, :])
  return jnp.einsum('bce,ef->bcf', context, w_out.astype(f32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attend_on_kernels(qk, h, w_v, w_out, bias, heads, head_dim):
  """`_attend` in float32 of bfloat16 qk, its softmax products (and their
  gradients) on `bf16_conv`'s kernels."""
  return _attend_on_kernels_fwd(qk, h, w_v, w_out, bias, heads, head_dim)[0]


def _attend_on_kernels_fwd(qk, h, w_v, w_out, bias, heads, head_dim):
  kh, m = bf16_conv.linear_attention_context(qk, h)
  context = _context(kh, w_v, w_out, heads, head_dim)
  out = bf16_conv.linear_attention_output(qk, context, bias, head_dim)
  return out, (qk, h, m, kh, w_v, w_out)


def _attend_on_kernels_bwd(heads, head_dim, saved, g):
  qk, h, m, kh, w_v, w_out = saved
  context, context_vjp = jax.vjp(
      lambda *a: _context(*a, heads, head_dim), kh, w_v, w_out)
  dq, dcontext = bf16_conv.linear_attention_output_grad(qk, g, context,
                                                         head_dim)
  dkh, dw_v, dw_out = context_vjp(dcontext)
  dqk, dh = bf16_conv.linear_attention_context_grad(qk, h, m, dkh, dq)
  return dqk, dh, dw_v, dw_out, g.sum(axis=(0, 1))


_attend_on_kernels.defvjp(_attend_on_kernels_fwd, _attend_on_kernels_bwd)


class Attention(nn.Module):
  """Residual pre-norm full softmax attention (fused dot_product_attention)."""
  heads: int
  head_dim: int
  dtype: Dtype = jnp.float32
  precision: Optional[Dtype] = None  # of the 1x1 convolutions

  @nn.compact
  def __call__(self, x):
    heads = (x.shape[0], -1, self.heads, self.head_dim)
    q, k, v = (a.reshape(heads) for a in _qkv(
        x, self.heads * self.head_dim, self.dtype, self.precision))
    out = jax.nn.dot_product_attention(q, k, v)
    out = out.reshape(x.shape[:-1] + (-1,))
    return x + Conv(x.shape[-1], 1, self.dtype, precision=self.precision)(out)


def _pixel_unshuffle(x):
  b, h, w, c = x.shape
  x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // 2, w // 2, 4 * c)


def timestep_embedding(t, dim: int):
  """Sinusoidal embedding of continuous times t [B] -> [B, dim]."""
  half = dim // 2
  freqs = jnp.exp(-math.log(10000) / (half - 1) * jnp.arange(half))
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class UNet(nn.Module):
  """UNet: (x_t, condition, time[, phase]) -> prediction, any H x W.

  Attributes:
    out_channels: 3 (DRDD: one target per phase) or 6 (RDDM: r and eps).
    base_channels: width of the first level; the time MLP is 4x this.
    channel_mults: width multiplier of each level.
    num_res_blocks: ResNet blocks per level.
    groups: GroupNorm groups.
    attn_heads: attention heads.
    attn_head_dim: width of one head.
    num_phases: size of the learned phase embedding added to the time
      embedding (2 for a network shared by both objectives, 0 for none).
    dtype: compute dtype; parameters stay float32.
    conv_precision: None, or `jnp.bfloat16`: the convolutions of a float32
      network computed in bfloat16 (`conv`).
    remat: recompute each ResNet block and linear attention in the backward
      pass (`recompute_in_backward`) instead of keeping their activations.
  """
  out_channels: int = 3
  base_channels: int = 64
  channel_mults: Sequence[int] = (1, 2, 4, 8)
  num_res_blocks: int = 2
  groups: int = 8
  attn_heads: int = 4
  attn_head_dim: int = 32
  num_phases: int = 0
  dtype: Dtype = jnp.float32
  conv_precision: Optional[Dtype] = None
  remat: bool = False

  @property
  def size_multiple(self) -> int:
    """Inputs are reflect-padded to a multiple of this (2^downsamplings)."""
    return 2 ** (len(self.channel_mults) - 1)

  @nn.compact
  def __call__(self, x, cond, t, phase=None):
    """Applies the network.

    Args:
      x: the diffused image x_t, [B, H, W, 3].
      cond: the condition (degraded image or zeros), [B, H, W, 3].
      t: continuous time input, [B] or scalar.
      phase: phase id(s) (`schedules.NOISE`/`RESIDUAL`), [B] or scalar;
        required iff `num_phases > 0`.

    Returns:
      The prediction, float32 [B, H, W, out_channels].
    """
    dt = self.dtype
    batch, height, width, _ = x.shape
    m = self.size_multiple
    pad_h, pad_w = -height % m, -width % m
    h = jnp.concatenate([x, cond], axis=-1)
    if pad_h or pad_w:
      h = jnp.pad(h, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode='reflect')
    h = h.astype(dt)

    base = self.base_channels
    temb = timestep_embedding(jnp.broadcast_to(t, (batch,)), base)
    temb = nn.Dense(4 * base, dtype=dt, kernel_init=_torch_init)(temb)
    temb = nn.Dense(4 * base, dtype=dt, kernel_init=_torch_init)(nn.gelu(
        temb, approximate=False))
    if self.num_phases:
      if phase is None:
        raise ValueError('This network is shared by both objectives: pass phase.')
      phase = jnp.broadcast_to(jnp.asarray(phase, jnp.int32), (batch,))
      temb = temb + nn.Embed(self.num_phases, 4 * base, dtype=dt,
                             name='phase_embedding')(phase)

    def block(mdl):
      return (functools.partial(recompute_in_backward, mdl) if self.remat
              else mdl)

    p = self.conv_precision
    conv_layer = functools.partial(Conv, dtype=dt, precision=p)
    res = lambda features: block(ResBlock(features, self.groups, dt, p))
    # The linear attentions hold the largest activations (q, k, v and their
    # softmaxes at full resolution): rematerialized with the ResBlocks.
    lin_attn = lambda: block(LinearAttention(self.attn_heads,
                                             self.attn_head_dim, dt, p))
    dims = [base * mult for mult in self.channel_mults]
    in_out = list(zip([base] + dims[:-1], dims))

    h = conv_layer(base, 7)(h)
    stem = h
    skips = []
    for level, (d_in, d_out) in enumerate(in_out):
      for i in range(self.num_res_blocks):
        h = res(d_in)(h, temb)
        if i == self.num_res_blocks - 1:
          h = lin_attn()(h)
        skips.append(h)
      if level < len(in_out) - 1:
        h = conv_layer(d_out, 1)(_pixel_unshuffle(h))
      else:
        h = conv_layer(d_out, 3)(h)

    h = res(dims[-1])(h, temb)
    h = Attention(self.attn_heads, self.attn_head_dim, dt, p)(h)
    h = res(dims[-1])(h, temb)

    for level, (d_in, d_out) in reversed(list(enumerate(in_out))):
      for i in range(self.num_res_blocks):
        h = res(d_out)(jnp.concatenate([h, skips.pop()], axis=-1), temb)
      h = lin_attn()(h)
      h = conv_layer(d_in, 3, upsample=level > 0)(h)

    h = res(base)(jnp.concatenate([h, stem], axis=-1), temb)
    out = conv_layer(self.out_channels, 1)(h).astype(jnp.float32)
    return out[:, :height, :width]


class DRDDNet(nn.Module):
  """The DRDD denoiser: one UNet with a phase embedding, or two UNets.

  Attributes:
    unet: keyword arguments of `UNet` (widths, depth, dtype, ...).
    shared: one network for both objectives (True) or a noise network and a
      residual network (False, the release's layout).
  """
  unet: dict
  shared: bool = True

  def setup(self):
    if self.shared:
      self.net = UNet(num_phases=2, **self.unet)
    else:
      self.noise_net = UNet(**self.unet)
      self.residual_net = UNet(**self.unet)

  def __call__(self, x, cond, t, phase):
    """`UNet.__call__`; with separate networks `phase` must be a Python int."""
    if self.shared:
      return self.net(x, cond, t, phase)
    if not isinstance(phase, (int, np.integer)):
      raise TypeError('With model.shared=False, phase must be a Python int.')
    return (self.noise_net, self.residual_net)[phase](x, cond, t)

  def init_all(self, x, cond, t):
    """Touches every sub-network, so `init(..., method='init_all')` builds all."""
    out = self(x, cond, t, 0)
    # One call creates all of a shared network's parameters.
    return out if self.shared else self(x, cond, t, 1)


def create_model(model_config, method: str = 'drdd',
                 dtype: Dtype = jnp.float32,
                 conv_precision: Optional[Dtype] = None) -> nn.Module:
  """Builds the network of a config.

  Args:
    model_config: the config's `model` group.
    method: 'drdd' (phase-conditioned denoiser) or 'rddm' (coupled baseline:
      one UNet predicting r and eps, 6 output channels).
    dtype: compute dtype.
    conv_precision: None, or `jnp.bfloat16`: the convolutions of a float32
      network computed in bfloat16 (`conv`).

  Returns:
    A module called as `model(x, cond, t, phase)` ('rddm' ignores phase).
  """
  unet = dict(base_channels=model_config.base_channels,
              channel_mults=tuple(model_config.channel_mults),
              num_res_blocks=model_config.num_res_blocks,
              groups=model_config.groups,
              attn_heads=model_config.attn_heads,
              attn_head_dim=model_config.attn_head_dim,
              dtype=dtype, conv_precision=conv_precision,
              remat=model_config.remat)
  for name in ('base_channels', 'groups'):
    if unet[name] < 1:
      raise ValueError(f'model.{name} must be >= 1, got {unet[name]}.')
  for width in (model_config.base_channels * m for m in unet['channel_mults']):
    if width % model_config.groups:
      raise ValueError(f'model.groups={model_config.groups} must divide every '
                       f'level width, but not {width}.')
  if method == 'drdd':
    return DRDDNet(unet=unet, shared=model_config.shared)
  if method == 'rddm':
    return RDDMNet(unet=unet)
  raise ValueError(f"diffusion.method must be 'drdd' or 'rddm', got {method!r}.")


class RDDMNet(nn.Module):
  """The coupled baseline's network: predicts concat(r, eps)."""
  unet: dict

  @nn.compact
  def __call__(self, x, cond, t, phase=None):
    del phase
    return UNet(out_channels=6, **self.unet, name='net')(x, cond, t)

  def init_all(self, x, cond, t):
    return self(x, cond, t)


def compiler_options(backend: Optional[str] = None) -> Optional[dict]:
  """XLA options for compiling this network's training step on `backend`.

  On CPU, jaxlib 0.10's XLA hands convolutions to YNNPACK, which runs the
  weight-gradient convolutions (their window is the whole image) ~8x slower
  than XLA's Eigen convolutions; with this option only matmuls go to YNNPACK.
  The train step took 13.4 s -> 6.1 s at 64x64, batch 4+4 (docs/performance.md).
  `train.jit_train_step` and `sampler.make_sampler` pass it to `jax.jit`.
  """
  if (backend or jax.default_backend()) != 'cpu':
    return None
  return {'xla_cpu_experimental_ynn_fusion_type':
              'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'}


def init_params(model: nn.Module, rng, image_shape=(1, 32, 32, 3)):
  """Initializes all parameters of `create_model`'s module."""
  x = jnp.zeros(image_shape, jnp.float32)
  t = jnp.zeros(image_shape[:1], jnp.float32)
  return model.init(rng, x, x, t, method='init_all')['params']


def count_params(params) -> int:
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
