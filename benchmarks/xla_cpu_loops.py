"""Micro-benchmark: a convolution and its gradient inside `lax.scan` on XLA:CPU.

  python benchmarks/xla_cpu_loops.py

Two slices of 4 images (64x64, 64 -> 64 channels, 3x3): the forward pass and
the weight gradient, computed once per slice either unrolled or in a
`lax.scan`, with and without `unet.compiler_options()`, with jax's gradient
of `lax.conv_general_dilated` and with `unet.conv`'s (the same maths in the
dimension order XLA:CPU runs on Eigen inside loops too). It is why
`unet.conv` has its own gradient on CPU; docs/performance.md quotes it.
"""
import jax
import jax.numpy as jnp

from drdd_jax import unet
from drdd_jax.bench import median_call_s


def conv(x, w):
  return jax.lax.conv_general_dilated(
      x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def main():
  x = jax.random.normal(jax.random.key(0), (2, 4, 64, 64, 64))
  w = jax.random.normal(jax.random.key(1), (3, 3, 64, 64)) * 0.03
  grad = jax.grad(lambda w, x: jnp.sum(conv(x, w) ** 2))
  grad_unet = jax.grad(lambda w, x: jnp.sum(unet.conv(x, w) ** 2))
  cases = {
      'forward, unrolled': lambda w, x: conv(x[0], w) + conv(x[1], w),
      'forward, lax.scan': lambda w, x: jax.lax.scan(
          lambda c, a: (c + conv(a, w), None), jnp.zeros_like(x[0]), x)[0],
      'weight gradient, unrolled': lambda w, x: grad(w, x[0]) + grad(w, x[1]),
      'weight gradient, lax.scan': lambda w, x: jax.lax.scan(
          lambda c, a: (c + grad(w, a), None), jnp.zeros_like(w), x)[0],
      'weight gradient, lax.scan, unet.conv': lambda w, x: jax.lax.scan(
          lambda c, a: (c + grad_unet(w, a), None), jnp.zeros_like(w), x)[0],
  }
  for name, f in cases.items():
    for label, options in (('eigen', unet.compiler_options()),
                           ('default', None)):
      ms = 1e3 * median_call_s(f, (w, x), options, n=3)
      print(f'{name:38s} {label:8s} {ms:9.1f} ms', flush=True)


if __name__ == '__main__':
  main()
