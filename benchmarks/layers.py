"""Micro-benchmark: the UNet's norm layers against their textbook forms.

  python benchmarks/layers.py

GroupNorm (`nn.GroupNorm` vs `unet.GroupNorm`, alone and with FiLM + SiLU;
gradients for the parameters, the input and the FiLM factors) and weight
standardization (`mean(axis=(0, 1, 2))` vs `unet.standardize_kernel`),
forward and forward+backward, under `unet.compiler_options()`; then the
elementwise work around a convolution in float32 against bfloat16 (SiLU,
GroupNorm's `x * mul + add` with SiLU and its gradient, the conversions).
docs/performance.md quotes it.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from drdd_jax import unet
from drdd_jax.bench import median_call_s


def bench(name, f, *args):
  ms = 1e3 * median_call_s(f, args, unet.compiler_options())
  print(f'{name:52s} {ms:8.2f} ms', flush=True)


def ws_textbook(w):
  mean = w.mean(axis=(0, 1, 2), keepdims=True)
  var = w.var(axis=(0, 1, 2), keepdims=True)
  return (w - mean) * jax.lax.rsqrt(var + 1e-5)


def main():
  key = jax.random.key(0)
  norms = {'nn.GroupNorm': nn.GroupNorm(8, epsilon=1e-5),
           'unet.GroupNorm': unet.GroupNorm(8)}
  for shape in [(1, 256, 256, 64), (8, 64, 64, 64)]:
    x = jax.random.normal(key, shape)
    film = jax.random.normal(key, (shape[0], 2 * shape[-1]))
    for name, norm in norms.items():
      p = norm.init(key, x)
      f = lambda x, p=p, norm=norm: norm.apply(p, x)

      def block(p, x, film, norm=norm):
        scale, shift = jnp.split(film[:, None, None, :], 2, axis=-1)
        return jax.nn.silu(norm.apply(p, x) * (scale + 1) + shift)

      tag = f'{name} {shape}'
      bench(f'{tag} fwd', f, x)
      bench(f'{tag} +FiLM+SiLU fwd', block, p, x, film)
      bench(f'{tag} +FiLM+SiLU fwd+bwd', lambda p, x, film, block=block: jax.grad(
          lambda *a: jnp.sum(block(*a) * x), argnums=(0, 1, 2))(p, x, film),
            p, x, film)
  w = jax.random.normal(key, (3, 3, 512, 512))
  g = jax.random.normal(jax.random.key(1), w.shape)
  for name, f in (('mean(axis=(0, 1, 2))', ws_textbook),
                  ('unet.standardize_kernel', unet.standardize_kernel)):
    bench(f'weight standardization {name} fwd', f, w)
    bench(f'weight standardization {name} fwd+bwd',
          lambda w, f=f: jax.vjp(f, w)[1](g)[0], w)
  elementwise_dtypes(key)


def elementwise_dtypes(key, shape=(8, 64, 64, 64)):
  """XLA:CPU's elementwise ops in float32 and in bfloat16."""
  x32 = jax.random.normal(key, shape)
  mul32, add32 = jax.random.normal(key, (2, shape[0], 1, 1, shape[-1]))
  norm_silu = lambda x, mul, add: jax.nn.silu(x * mul + add)
  for dtype in (jnp.float32, jnp.bfloat16):
    x, mul, add = (a.astype(dtype) for a in (x32, mul32, add32))
    tag = f'{jnp.dtype(dtype).name} {shape}'
    bench(f'SiLU {tag}', jax.nn.silu, x)
    bench(f'x * mul + add, SiLU {tag}', norm_silu, x, mul, add)
    bench(f'x * mul + add, SiLU, gradient {tag}',
          lambda x, mul, add: jax.vjp(norm_silu, x, mul, add)[1](x), x, mul,
          add)
  bench(f'float32 to bfloat16 {shape}', lambda x: x.astype(jnp.bfloat16), x32)
  bench(f'bfloat16 to float32 {shape}', lambda x: x.astype(jnp.float32),
        x32.astype(jnp.bfloat16))


if __name__ == '__main__':
  main()
