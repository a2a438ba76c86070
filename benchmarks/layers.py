"""Micro-benchmark: the UNet's layers against their textbook or earlier forms.

  python benchmarks/layers.py [SECTION ...]

Sections (all by default), each timed forward and forward+backward under
`unet.compiler_options()`:

  group_norm        `nn.GroupNorm` vs `unet.GroupNorm`, alone and with FiLM +
                    SiLU (gradients for the parameters, the input and FiLM).
  standardize       weight standardization: `mean(axis=(0, 1, 2))` vs
                    `unet.standardize_kernel` on a [3, 3, 512, 512] kernel,
                    then all of aio5's WSConv kernels at once, against the
                    `sum_rows` form it replaced (`ab.standardize_kernel`).
  linear_attention  `unet.LinearAttention` against the form before the fold
                    (`ab.LinearAttention`) and against itself on XLA's ops
                    instead of the kernels, at the network's largest shapes.
  elementwise       the elementwise work around a convolution in float32
                    against bfloat16 (SiLU, GroupNorm's `x * mul + add` with
                    SiLU and its gradient, the conversions).

docs/performance.md quotes it.
"""
import contextlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp

import ab  # benchmarks/ab.py: the earlier forms
from drdd_jax import unet
from drdd_jax.bench import median_call_s


def bench(name, f, *args):
  ms = 1e3 * median_call_s(f, args, unet.compiler_options())
  print(f'{name:52s} {ms:8.2f} ms', flush=True)


def ws_textbook(w):
  mean = w.mean(axis=(0, 1, 2), keepdims=True)
  var = w.var(axis=(0, 1, 2), keepdims=True)
  return (w - mean) * jax.lax.rsqrt(var + 1e-5)


def group_norm(key):
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


def standardize(key):
  w = jax.random.normal(key, (3, 3, 512, 512))
  g = jax.random.normal(jax.random.key(1), w.shape)
  for name, f in (('mean(axis=(0, 1, 2))', ws_textbook),
                  ('unet.standardize_kernel', unet.standardize_kernel)):
    bench(f'weight standardization {name} fwd', f, w)
    bench(f'weight standardization {name} fwd+bwd',
          lambda w, f=f: jax.vjp(f, w)[1](g)[0], w)
  model = unet.create_model(ab.aio5_config().model)
  params = jax.eval_shape(lambda: unet.init_params(model, key))
  kernels = [jax.random.normal(key, leaf.shape) for path, leaf in
             jax.tree_util.tree_leaves_with_path(params)
             if 'WSConv' in jax.tree_util.keystr(path) and leaf.ndim == 4]
  for name, f in (('sum_rows (before)', ab.standardize_kernel),
                  ('unet.standardize_kernel', unet.standardize_kernel)):
    tag = f'all {len(kernels)} WSConv kernels of aio5, {name}'
    bench(f'{tag} fwd', lambda ks, f=f: [f(k) for k in ks], kernels)
    bench(f'{tag} fwd+bwd', lambda ks, f=f: jax.vjp(
        lambda ks: [f(k) for k in ks], ks)[1](ks)[0], kernels)


def linear_attention(key):
  for shape in [(8, 64, 64, 64), (1, 256, 256, 64)]:
    x = jax.random.normal(key, shape)
    for name, layer, change in (
        ('before the fold', ab.LinearAttention, None),
        ("unet.LinearAttention, XLA's ops", unet.LinearAttention,
         'attention_kernels'),
        ('unet.LinearAttention', unet.LinearAttention, None)):
      attn = layer(4, 32, precision=jnp.bfloat16)
      p = attn.init(key, x)
      tag = f'linear attention {shape}, {name}'
      with (ab.traced_as(change, ab.CHANGES[change][2][0]) if change
            else contextlib.nullcontext()):
        bench(f'{tag} fwd', attn.apply, p, x)
        bench(f'{tag} fwd+bwd', lambda p, x, attn=attn: jax.grad(
            lambda p, x: jnp.sum(attn.apply(p, x) * x), argnums=(0, 1))(
                p, x), p, x)


def elementwise(key, shape=(8, 64, 64, 64)):
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


SECTIONS = {'group_norm': group_norm, 'standardize': standardize,
            'linear_attention': linear_attention, 'elementwise': elementwise}


def main():
  for name in sys.argv[1:] or SECTIONS:
    if name not in SECTIONS:
      raise SystemExit(
          f'Unknown section {name!r}; known: {", ".join(SECTIONS)}.')
    SECTIONS[name](jax.random.key(0))


if __name__ == '__main__':
  main()
