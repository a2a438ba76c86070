"""Micro-benchmark: XLA:CPU convolution paths, dtypes and a Winograd variant.

  python benchmarks/xla_cpu_convolutions.py

Times a 3x3 'SAME' convolution (forward, and forward + both gradients) at
the network's shapes under each XLA:CPU library option (Eigen, YNNPACK,
oneDNN, XNNPACK), in float32 and bfloat16, a matmul of the same FLOPs, and a
Winograd F(2x2, 3x3) convolution written in JAX. Prints milliseconds and
GFLOP/s (direct-convolution FLOPs). docs/performance.md quotes it.
"""
import jax
import jax.numpy as jnp
import numpy as np

from drdd_jax.bench import median_call_s

_DOT = 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'
OPTIONS = {
    'eigen': {'xla_cpu_experimental_ynn_fusion_type': _DOT},
    'ynnpack': {'xla_cpu_experimental_ynn_fusion_type':
                    _DOT + ',LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION'},
    'onednn_custom_call': {'xla_cpu_experimental_ynn_fusion_type': _DOT,
                           'xla_cpu_use_onednn': True,
                           'xla_cpu_experimental_onednn_custom_call': True},
    'onednn_fusion': {'xla_cpu_experimental_ynn_fusion_type': _DOT,
                      'xla_cpu_experimental_onednn_fusion_type':
                          'LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION'},
    'xnnpack': {'xla_cpu_experimental_ynn_fusion_type': _DOT,
                'xla_cpu_experimental_xnn_fusion_type':
                    'LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION'},
}


def bench(name, f, args, flops, options, n=5):
  med = median_call_s(f, args, options, n)
  print(f'{name:48s} {med * 1e3:8.1f} ms {flops / med / 1e9:7.1f} GFLOP/s',
        flush=True)


def conv(x, w):
  return jax.lax.conv_general_dilated(
      x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


_G = np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], np.float32)


def winograd(x, w):
  """F(2x2, 3x3) Winograd convolution ('SAME', even H and W)."""
  b, h, wd, _ = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))

  def transform(r, axis):  # B^T d along one axis, from 4 strided slices.
    n = h if axis == 1 else wd
    s = [jax.lax.slice_in_dim(r, k, k + n - 1, 2, axis) for k in range(4)]
    return [s[0] - s[2], s[1] + s[2], s[2] - s[1], s[1] - s[3]]

  v = jnp.stack([t for a in transform(xp, 1) for t in transform(a, 2)])
  u = jnp.einsum('ui,vj,ijcd->uvcd', _G, _G, w).reshape(16, *w.shape[2:])
  m = jnp.einsum('kbhwc,kcd->kbhwd', v, u)
  m = m.reshape(4, 4, *m.shape[1:])
  at = lambda m0, m1, m2, m3: (m0 + m1 + m2, m1 - m2 - m3)  # A^T
  cols = [at(*[m[i, j] for j in range(4)]) for i in range(4)]
  rows = [at(*[cols[i][q] for i in range(4)]) for q in range(2)]
  y = jnp.stack([jnp.stack([rows[q][p] for q in range(2)], 3)
                 for p in range(2)], 2)
  return y.reshape(b, h, wd, -1)


def grads(f):
  return lambda x, w: jax.grad(
      lambda x, w: jnp.sum(jnp.square(f(x, w).astype(jnp.float32))),
      argnums=(0, 1))(x, w)


def main():
  for dtype in (jnp.float32, jnp.bfloat16):
    for b, s, c in [(8, 64, 128), (8, 64, 64), (8, 16, 256), (1, 256, 64)]:
      x = jax.random.normal(jax.random.key(0), (b, s, s, c)).astype(dtype)
      w = (jax.random.normal(jax.random.key(1), (3, 3, c, c)) * 0.03).astype(
          dtype)
      flops = 2.0 * b * s * s * c * c * 9
      tag = f'{jnp.dtype(dtype).name} {b}x{s}x{s}x{c}'
      for name, options in OPTIONS.items():
        bench(f'{tag} fwd {name}', conv, (x, w), flops, options)
        bench(f'{tag} fwd+bwd {name}', grads(conv), (x, w), 3 * flops,
              options, n=3)
      if dtype == jnp.float32:
        err = jnp.abs(jax.jit(winograd)(x, w) - jax.jit(conv)(x, w)).max()
        print(f'{tag} winograd max |error| {float(err):.2e}')
        bench(f'{tag} fwd winograd', winograd, (x, w), flops, OPTIONS['eigen'])
        bench(f'{tag} fwd+bwd winograd', grads(winograd), (x, w), 3 * flops,
              OPTIONS['eigen'], n=3)
    m = jax.random.normal(jax.random.key(2), (4096, 1152)).astype(dtype)
    k = jax.random.normal(jax.random.key(3), (1152, 512)).astype(dtype)
    for name, options in OPTIONS.items():
      bench(f'{jnp.dtype(dtype).name} matmul 4096x1152x512 {name}', jnp.dot,
            (m, k), 2.0 * 4096 * 1152 * 512, options)


if __name__ == '__main__':
  main()
