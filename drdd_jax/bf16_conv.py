"""bfloat16 convolutions on CPUs with AVX512-BF16 (an XLA FFI library).

XLA:CPU computes bfloat16 convolutions by converting them to float32: no
faster than float32 convolutions. `csrc/bf16_conv.cc` computes them with
the CPU's bfloat16 dot product instruction (VDPBF16PS: twice the arithmetic
of a float32 FMA), or where the CPU has AMX (Intel Sapphire Rapids and
later) its tile product (TDPBF16PS), as XLA FFI custom calls: the
convolution (also its input gradient) and its weight gradient, on float32
or bfloat16 operands rounded to bfloat16, with float32 sums. The same
library holds the linear attention's two softmax products and their
gradients in float32 (`csrc/linear_attention.cc`) and GroupNorm + SiLU's
gradient (`csrc/group_norm.cc`). `pip install` builds it as
`drdd_jax/_bf16_conv*.so`
where a C++ compiler is found; where `enabled()`, `unet.conv` runs its
bfloat16 convolutions on it, `unet.LinearAttention` its softmax products
and `unet.GroupNorm` its gradient. Every kernel sums in a fixed order: a
call returns the same bits every time.
"""
import contextlib
import ctypes
import functools
import glob
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np

_DISABLED = []  # `disabled()` contexts entered
_SYMBOLS = ('DrddBf16ConvSupported', 'DrddBf16ConvAmx')  # plain C functions
_TARGETS = {'drdd_bf16_conv': 'DrddBf16Conv',
            'drdd_bf16_conv_wgrad': 'DrddBf16ConvWeightGrad',
            'drdd_la_context': 'DrddLinearAttentionContext',
            'drdd_la_output': 'DrddLinearAttentionOutput',
            'drdd_la_context_grad': 'DrddLinearAttentionContextGrad',
            'drdd_la_output_grad': 'DrddLinearAttentionOutputGrad',
            'drdd_gn_silu_sums': 'DrddGroupNormSiluSums',
            'drdd_gn_silu_grad': 'DrddGroupNormSiluGrad'}


@functools.cache
def _library():
  """The built library with its FFI targets registered, or None."""
  found = glob.glob(os.path.join(os.path.dirname(__file__), '_bf16_conv*.so'))
  if not found:
    return None
  lib = ctypes.CDLL(found[0])
  missing = [s for s in (*_SYMBOLS, *_TARGETS.values())
             if not hasattr(lib, s)]
  if missing:  # Built from older sources: XLA's ops instead.
    warnings.warn(f'{found[0]} lacks {missing}: built from older sources '
                  '(`pip install -e .` rebuilds it); using XLA\'s ops.')
    return None
  if not lib.DrddBf16ConvSupported():
    return None
  for name, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)),
                                platform='cpu')
  return lib


def available() -> bool:
  """Whether the library is built and this CPU has AVX512-BF16."""
  return _library() is not None


def amx() -> bool:
  """Whether the convolutions run on AMX tiles (Intel Sapphire Rapids and
  later; those whose channel counts are multiples of 32, the others on
  AVX512-BF16). `DRDD_JAX_AMX=0` keeps them all on AVX512-BF16."""
  lib = _library()
  return bool(lib is not None and lib.DrddBf16ConvAmx())


def enabled() -> bool:
  """Whether `unet.conv` computes bfloat16 convolutions here.

  On one CPU device where the library is `available()`, outside
  `disabled()`: XLA's SPMD partitioner cannot split a custom call over
  devices (it gathers the whole batch onto each), so sharded programs keep
  XLA's convolutions. `DRDD_JAX_BF16_CONV=0` turns the kernels off.
  """
  return (not _DISABLED and os.environ.get('DRDD_JAX_BF16_CONV') != '0'
          and jax.default_backend() == 'cpu' and jax.device_count() == 1
          and available())


@contextlib.contextmanager
def disabled():
  """Programs traced inside use XLA's convolutions (e.g. to count FLOPs:
  XLA's cost analysis counts none for a custom call)."""
  _DISABLED.append(True)
  try:
    yield
  finally:
    _DISABLED.pop()


def _attrs(padding, **extra):
  (top, bottom), (left, right) = padding
  return dict(pad_top=np.int64(top), pad_bottom=np.int64(bottom),
              pad_left=np.int64(left), pad_right=np.int64(right),
              **{k: np.int64(v) for k, v in extra.items()})


def conv(x, w, padding, transpose_kernel: bool = False, out_dtype=None):
  """Stride-1 NHWC convolution, operands rounded to bfloat16, float32 sums.

  Args:
    x: [B, H, W, I], float32 or bfloat16.
    w: [kh, kw, I, O], float32 or bfloat16; with `transpose_kernel`, the
      kernel [kh, kw, O, I] of the convolution whose input gradient this is
      (used flipped, with I and O swapped).
    padding: ((top, bottom), (left, right)) zeros around x.
    out_dtype: float32 or bfloat16 (default: x's).

  Returns:
    [B, H + top + bottom - kh + 1, W + left + right - kw + 1, O].
  """
  _library()
  (top, bottom), (left, right) = padding
  b, h, wd, _ = x.shape
  kh, kw = w.shape[:2]
  o = w.shape[2 if transpose_kernel else 3]
  out = jax.ShapeDtypeStruct(
      (b, h + top + bottom - kh + 1, wd + left + right - kw + 1, o),
      out_dtype or x.dtype)
  return jax.ffi.ffi_call('drdd_bf16_conv', out)(
      x, w, **_attrs(padding, transpose_kernel=transpose_kernel))


def conv_weight_gradient(x, g, kernel_size, padding):
  """The gradient of `conv(x, w, padding)` for `w` [kh, kw, I, O], given
  the output's cotangent `g` (float32 or bfloat16); float32."""
  _library()
  kh, kw = kernel_size
  out = jax.ShapeDtypeStruct((kh, kw, x.shape[-1], g.shape[-1]), jnp.float32)
  return jax.ffi.ffi_call('drdd_bf16_conv_wgrad', out)(
      x, g, **_attrs(padding))


def linear_attention_context(qk, h):
  """The linear attention's pixel-axis product (`csrc/linear_attention.cc`).

  Args:
    qk: [B, N, 2W] bfloat16, the queries then the keys of N pixels.
    h: [B, N, D] float32, D a multiple of 16 (W too).

  Returns:
    kh [B, W, D + 1] float32: e^T h and, in the last column, e's column
    sums, with e = exp(k - m); and m [B, W], the keys' maxima over the
    pixels.
  """
  _library()
  b, _, w2 = qk.shape
  f32 = jnp.float32
  return jax.ffi.ffi_call('drdd_la_context', (
      jax.ShapeDtypeStruct((b, w2 // 2, h.shape[-1] + 1), f32),
      jax.ShapeDtypeStruct((b, w2 // 2), f32)))(qk, h)


def linear_attention_output(qk, context, bias, head_dim: int):
  """The linear attention's output product (`csrc/linear_attention.cc`).

  Args:
    qk: [B, N, 2W] bfloat16, the queries then the keys.
    context: [B, W, F] float32, F a multiple of 16.
    bias: [F] float32.
    head_dim: each head's channels of q (a multiple of 16).

  Returns:
    [B, N, F] float32: p context + bias, with p = the softmax of q over each
    head's channels times head_dim^-1/2.
  """
  _library()
  out = jax.ShapeDtypeStruct(qk.shape[:2] + context.shape[-1:], jnp.float32)
  return jax.ffi.ffi_call('drdd_la_output', out)(
      qk, context, bias, head_dim=np.int64(head_dim))


def linear_attention_output_grad(qk, g, context, head_dim: int):
  """`linear_attention_output`'s gradient for q and context, given the
  output's cotangent g [B, N, F] float32: (dq [B, N, W] bfloat16, dcontext
  [B, W, F] float32)."""
  _library()
  b, n, w2 = qk.shape
  return jax.ffi.ffi_call('drdd_la_output_grad', (
      jax.ShapeDtypeStruct((b, n, w2 // 2), jnp.bfloat16),
      jax.ShapeDtypeStruct(context.shape, jnp.float32)))(
          qk, g, context, head_dim=np.int64(head_dim))


def linear_attention_context_grad(qk, h, m, dkh, dq):
  """`linear_attention_context`'s gradient for k and h, given kh's cotangent
  dkh [B, W, D + 1] and the maxima m it returned: (dqk [B, N, 2W] bfloat16,
  dq [B, N, W] bfloat16 in its first half, and dh [B, N, D] float32)."""
  _library()
  return jax.ffi.ffi_call('drdd_la_context_grad', (
      jax.ShapeDtypeStruct(qk.shape, jnp.bfloat16),
      jax.ShapeDtypeStruct(h.shape, jnp.float32)))(qk, h, m, dkh, dq)


def group_norm_silu_sums(x, g, mul, add):
  """The pixel sums of the gradient of `silu(x * mul + add)`
  (`csrc/group_norm.cc`).

  Args:
    x: [B, N, C] bfloat16, C a multiple of 16.
    g: [B, N, C] float32 or bfloat16, the output's cotangent.
    mul, add: [B, C] float32.

  Returns:
    [B, 2, C] float32: the sums over the pixels of gh = g * silu'(x * mul +
    add) (add's gradient) and of gh * x (mul's).
  """
  _library()
  b, _, c = x.shape
  return jax.ffi.ffi_call('drdd_gn_silu_sums', jax.ShapeDtypeStruct(
      (b, 2, c), jnp.float32))(x, g, mul, add)


def group_norm_silu_grad(x, g, mul, add, u, v):
  """`gh * mul + u + v * x` in bfloat16, gh as for `group_norm_silu_sums`;
  u, v [B, C] float32 (`csrc/group_norm.cc`)."""
  _library()
  return jax.ffi.ffi_call('drdd_gn_silu_grad', jax.ShapeDtypeStruct(
      x.shape, jnp.bfloat16))(x, g, mul, add, u, v)
