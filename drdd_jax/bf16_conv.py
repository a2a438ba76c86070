"""bfloat16 convolutions on CPUs with AVX512-BF16 (an XLA FFI library).

XLA:CPU computes bfloat16 convolutions in float32, no faster than float32
convolutions. `csrc/bf16_conv.cc` computes them with the CPU's bfloat16 dot
product instruction (VDPBF16PS: twice the arithmetic of a float32 FMA), as
XLA FFI custom calls: the convolution (bfloat16 out, float32 accumulation)
and its weight gradient (float32 out). `pip install` builds it as
`drdd_jax/_bf16_conv*.so` where a C++ compiler is found; `unet.conv` uses it
for bfloat16 convolutions when `enabled()`.
"""
import contextlib
import ctypes
import functools
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np

_DISABLED = []  # `disabled()` contexts entered
_TARGETS = {'drdd_bf16_conv': 'DrddBf16Conv',
            'drdd_bf16_conv_wgrad': 'DrddBf16ConvWeightGrad'}


@functools.cache
def _library():
  """The built library with its FFI targets registered, or None."""
  found = glob.glob(os.path.join(os.path.dirname(__file__), '_bf16_conv*.so'))
  if not found:
    return None
  lib = ctypes.CDLL(found[0])
  if not lib.DrddBf16ConvSupported():
    return None
  for name, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)),
                                platform='cpu')
  return lib


def available() -> bool:
  """Whether the library is built and this CPU has AVX512-BF16."""
  return _library() is not None


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


def _pads(padding):
  (top, bottom), (left, right) = padding
  return dict(pad_top=np.int64(top), pad_bottom=np.int64(bottom),
              pad_left=np.int64(left), pad_right=np.int64(right))


def conv(x, w, padding):
  """Stride-1 NHWC convolution of bfloat16 `x` [B, H, W, I] with `w`
  [kh, kw, I, O], zero `padding` ((top, bottom), (left, right)); bfloat16
  out, accumulated in float32."""
  _library()
  (top, bottom), (left, right) = padding
  b, h, wd, _ = x.shape
  kh, kw, _, o = w.shape
  out = jax.ShapeDtypeStruct(
      (b, h + top + bottom - kh + 1, wd + left + right - kw + 1, o),
      jnp.bfloat16)
  return jax.ffi.ffi_call('drdd_bf16_conv', out)(
      x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), **_pads(padding))


def conv_weight_gradient(x, g, kernel_size, padding):
  """The gradient of `conv(x, w, padding)` for `w` [kh, kw, I, O], given
  the output's cotangent `g`; float32."""
  _library()
  kh, kw = kernel_size
  out = jax.ShapeDtypeStruct((kh, kw, x.shape[-1], g.shape[-1]), jnp.float32)
  return jax.ffi.ffi_call('drdd_bf16_conv_wgrad', out)(
      x.astype(jnp.bfloat16), g.astype(jnp.bfloat16), **_pads(padding))
