"""A/B in one process: the aio5 train step or sampler traced two ways.

  python benchmarks/ab.py --change=split_sums --what=train --calls=10
  python benchmarks/ab.py --change=split_sums --what=256 --calls=10
  python benchmarks/ab.py --change=conv_gradient --what=train --calls=8
  python benchmarks/ab.py --change=conv_io --what=train --calls=8
  python benchmarks/ab.py --change=kernels --other_kernels=OTHER.so --what=train

Compiles the program twice, once with the change undone while tracing, and
calls the two in turn, so that this machine's drift (±15 % between runs)
hits both alike. `--what=train`: the train step at 64x64, 4 pairs + 4 noise
targets; a number: the 2+2-step sampler on one image of that size. The
changes:

  split_sums     `unet.sum_rows` against plain `x.sum(axis=-2)`.
  conv_gradient  `unet.conv`'s own gradient against jax's.
  upsample_conv  `unet.upsample_conv` against `jnp.repeat` twice and a 3x3
                 convolution.
  bf16_conv      `drdd_jax.bf16_conv`'s kernels against XLA's bfloat16
                 convolutions (the default `training.conv_precision` where
                 the kernels run, or `training.compute_dtype` bfloat16).
  attention_kernels  `unet.LinearAttention`'s softmax products and their
                 gradients on the float32 kernels (`csrc/linear_attention.cc`),
                 against XLA's ops (`unet._attend`).
  conv_io        a float32 network's bfloat16 convolutions as casts to
                 bfloat16 around the kernels (XLA fuses them into the
                 neighbouring ops), against the kernels reading and writing
                 float32 (where the kernels run).
  fold_bias      `unet.GroupNorm` folding the convolution's bias and the
                 time embedding's FiLM into its factors, against adding them
                 as separate elementwise ops.
  linear_attention  `unet.LinearAttention` with v and the output projection
                 folded into the context, against v and out made at full
                 resolution and projected by 1x1 convolutions.
  standardize    `unet.standardize_kernel`'s sums as products with a ones
                 vector and its own gradient, against `unet.sum_rows` and
                 autodiff's gradient.
  norm_kernels   `unet.GroupNorm`'s gradient with SiLU on the kernels
                 (`csrc/group_norm.cc`), against XLA's autodiff (where the
                 kernels run).
  materialize    `unet.materialize` (GroupNorm's factors through an identity
                 matmul) against an optimization barrier.
  global_norm    `train.global_norm` (the gradient's norm as dots) against
                 `optax.tree.norm` (train only).
  kernels        this build's `bf16_conv` kernels against another build's
                 (`--other_kernels`: a `_bf16_conv*.so` built from another
                 commit, e.g. `git worktree add /tmp/o COMMIT && cd /tmp/o &&
                 python setup.py build_ext --inplace`).

Two programs in one process can interfere: beside the new program, the
ResNet block before GroupNorm's gradient kernels ran 1.12-1.28 s a step
against 0.86-0.99 s alone (docs/performance.md, "On the Zen 5 machine");
check a surprising result with separate runs that alternate.

It runs as the package's programs do (`host_memory.tune_malloc`: XLA's
per-call blocks kept, huge pages). docs/performance.md quotes it.
"""
import argparse
import contextlib
import ctypes
import importlib.util
import os
import time
import types
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from drdd_jax import bench, bf16_conv, host_memory, sampler, train, unet


class GroupNorm(nn.Module):
  """`unet.GroupNorm` before the fold: `x + shift` and FiLM as separate ops."""
  num_groups: int
  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, shift=None, film=None):
    if shift is not None:
      x = x + shift.astype(x.dtype)
    c = x.shape[-1]
    mul, add = unet.group_norm_factors(
        x, self.param('scale', nn.initializers.ones, (c,)),
        self.param('bias', nn.initializers.zeros, (c,)), self.num_groups,
        self.epsilon)
    mul, add = jax.lax.optimization_barrier((mul, add))
    y = (x * mul + add).astype(self.dtype)
    return y if film is None else y * (film[0] + 1) + film[1]


class LinearAttention(nn.Module):
  """`unet.LinearAttention` before the fold: v and out at full resolution."""
  heads: int
  head_dim: int
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    b, width = x.shape[0], self.heads * self.head_dim
    h = nn.LayerNorm(epsilon=1e-5, use_bias=False, dtype=self.dtype)(x)
    qkv = unet.Conv(3 * width, 1, self.dtype, use_bias=False,
                    precision=self.precision)(h)
    q, k, v = jnp.split(qkv.reshape(b, -1, 3 * width), 3, axis=-1)
    q = jax.nn.softmax(q.astype(jnp.float32).reshape(b, -1, self.heads,
                                                     self.head_dim), axis=-1)
    q = q.reshape(b, -1, width) * self.head_dim**-0.5
    k = k.astype(jnp.float32)
    k = jnp.exp(k - jax.lax.stop_gradient(k.max(axis=1, keepdims=True)))
    v = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)
    context = jnp.einsum('bnc,bne->bce', k.astype(self.dtype), v,
                         preferred_element_type=jnp.float32)
    head = np.arange(width) // self.head_dim
    context = (context[..., :-1] / context[..., -1:]) * (
        head[:, None] == head[None, :])
    out = jnp.einsum('bnc,bce->bne', q.astype(self.dtype),
                     context.astype(self.dtype))
    out = unet.Conv(x.shape[-1], 1, self.dtype, precision=self.precision)(
        out.reshape(x.shape[:-1] + (-1,)))
    return x + nn.LayerNorm(epsilon=1e-5, use_bias=False, dtype=self.dtype)(out)


def standardize_kernel(w):
  """`unet.standardize_kernel` before the ones-vector products."""
  rows = w.reshape(-1, w.shape[-1])
  mean = unet.sum_rows(rows)[0] / rows.shape[0]
  var = unet.sum_rows(jnp.square(rows - mean))[0] / rows.shape[0]
  return ((rows - mean) * jax.lax.rsqrt(var + 1e-5)).reshape(w.shape)


_CONV = unet.conv


def conv_float32_io(x, w, padding=None, precision=None):
  """`unet.conv`, but a float32 convolution in bfloat16 runs on the kernels
  reading and writing float32 (they round the operands themselves)."""
  if precision is None or x.dtype == jnp.bfloat16:
    return _CONV(x, w, padding, precision)
  kh, kw = w.shape[:2]
  padding = padding or ((kh // 2, kh // 2), (kw // 2, kw // 2))
  return unet._conv(x, w, tuple(map(tuple, padding)), True)  # pylint: disable=protected-access


_FFI_CALL = jax.ffi.ffi_call
_OTHER = 'other:'  # prefix of the FFI targets of --other_kernels


def register_other_kernels(path: str):
  lib = ctypes.CDLL(path)
  for name, symbol in bf16_conv._TARGETS.items():  # pylint: disable=protected-access
    jax.ffi.register_ffi_target(_OTHER + name,
                                jax.ffi.pycapsule(getattr(lib, symbol)),
                                platform='cpu')


def ffi_call_other(name, *args, **kwargs):
  """`jax.ffi.ffi_call`, bf16_conv's targets taken from --other_kernels."""
  if name in bf16_conv._TARGETS:  # pylint: disable=protected-access
    name = _OTHER + name
  return _FFI_CALL(name, *args, **kwargs)


# Per change: the `unet` attribute it replaces (or `(module, attribute)`),
# the stand-in for the 'before' variant, and the two variants' names.
CHANGES = {
    'materialize': ('materialize', lambda *xs: jax.lax.optimization_barrier(xs),
                    ('optimization barrier', 'identity matmul')),
    'global_norm': ((train, 'global_norm'), optax.tree.norm,
                    ('optax.tree.norm', 'vdot per leaf')),
    'kernels': ((jax.ffi, 'ffi_call'), ffi_call_other,
                ('--other_kernels', "this build's kernels")),
    'linear_attention': ('LinearAttention', LinearAttention,
                         ('v and out at full size', 'folded into context')),
    'standardize': ('standardize_kernel', standardize_kernel,
                    ('sum_rows, autodiff', 'ones-vector products')),
    'fold_bias': ('GroupNorm', GroupNorm,
                  ('bias and FiLM apart', 'bias and FiLM folded')),
    'upsample_conv': ('upsample_conv',
                      lambda x, w: unet.conv(jnp.repeat(jnp.repeat(
                          x, 2, axis=1), 2, axis=2), w.astype(x.dtype)),
                      ('upsampled, then 3x3', 'four 2x2 phases')),
    'split_sums': ('sum_rows',
                   lambda *xs: tuple(x.sum(axis=-2) for x in xs),
                   ('plain sums', 'split sums')),
    'conv_gradient': ('_conv',
                      lambda x, w, padding, *_: unet._lax_conv(  # pylint: disable=protected-access
                          x, w.astype(x.dtype), padding),
                      ("jax's gradient", "unet.conv's gradient")),
    'bf16_conv': ('bf16_conv', types.SimpleNamespace(enabled=lambda: False),
                  ("XLA's bfloat16 convolutions", "bf16_conv's kernels")),
    'conv_io': ('conv', conv_float32_io,
                ('kernels on float32', 'kernels on bfloat16 casts')),
    'norm_kernels': ('_norm_silu_on_kernels', lambda x: False,
                     ("XLA's gradient", 'csrc/group_norm.cc')),
    'attention_kernels': ('_attend_on_kernels',
                          lambda *args: unet._attend(*args),  # pylint: disable=protected-access
                          ("XLA's softmax products", 'float32 kernels')),
}


@contextlib.contextmanager
def traced_as(change: str, variant: str):
  """`change` undone in `unet` while tracing its 'before' variant (nothing
  for `change=None`)."""
  if change is None:
    yield
    return
  name, before, variants = CHANGES[change]
  module, name = name if isinstance(name, tuple) else (unet, name)
  saved = getattr(module, name)
  if variant == variants[0]:
    setattr(module, name, before)
  try:
    yield
  finally:
    setattr(module, name, saved)


def variants(change):
  """The names of `change`'s two variants; for None, the code as it is."""
  return ('as is',) if change is None else CHANGES[change][2]


def train_calls(config, change):
  """{variant: a call of the train step traced that way} for `change`."""
  with config.unlocked():
    config.training.batch_size = 4
    config.training.steps_per_dispatch = 1
  mesh = train.make_mesh(config.mesh)
  model, tx = train.create_model(config), train.make_optimizer(config)
  data = train.global_batch(
      bench._synthetic_batch(4, train.noise_batch_size(config), 64), mesh)  # pylint: disable=protected-access
  rng = jax.device_put(jax.random.key(0))
  calls = {}
  for name in variants(change):
    state, shardings = train.create_train_state(config, model, tx, mesh)
    step = train.jit_train_step(
        train.make_train_step(config, model, train.make_schedule(config)),
        shardings, mesh, leading=0)
    with traced_as(change, name):
      compiled = step.lower(state, data, rng).compile(unet.compiler_options())
    box = [state]

    def call(compiled=compiled, box=box):
      box[0], metrics = compiled(box[0], data, rng)
      jax.block_until_ready((box[0], metrics))

    calls[name] = call
  return calls


def sample_calls(config, change, size: int):
  """{variant: a call of the sampler on one size x size image}."""
  model = train.create_model(config)
  params = jax.jit(lambda r: unet.init_params(model, r))(jax.random.key(0))
  y = jax.random.uniform(jax.random.key(1), (1, size, size, 3), jnp.float32,
                         -1.0, 1.0)
  rng = jax.random.key(2)
  calls = {}
  for name in variants(change):
    sample = sampler.make_sampler(model, train.make_schedule(config),
                                  config.diffusion, config.sampling)
    with traced_as(change, name):
      compiled = sample.lower(params, y, rng).compile()
    calls[name] = (
        lambda compiled=compiled: jax.block_until_ready(
            compiled(params, y, rng)))
  return calls


def aio5_config():
  """configs/aio5.py's default config (loaded from the file)."""
  spec = importlib.util.spec_from_file_location('aio5', os.path.join(
      os.path.dirname(os.path.abspath(__file__)), '..', 'configs', 'aio5.py'))
  aio5 = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(aio5)
  return aio5.get_config()


def main():
  host_memory.tune_malloc()
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--change', required=True, choices=sorted(CHANGES))
  parser.add_argument('--what', default='train',
                      help="'train' or an image size for the sampler")
  parser.add_argument('--calls', type=int, default=10)
  parser.add_argument('--other_kernels',
                      help='--change=kernels: the other _bf16_conv*.so')
  args = parser.parse_args()
  if args.change == 'kernels':
    if not (args.other_kernels and bf16_conv.enabled()):
      parser.error('--change=kernels needs --other_kernels and a CPU where '
                   "bf16_conv's kernels run")
    register_other_kernels(args.other_kernels)
  config = aio5_config()
  calls = (train_calls(config, args.change) if args.what == 'train'
           else sample_calls(config, args.change, int(args.what)))
  wall = {name: [] for name in calls}
  cpu = {name: [] for name in calls}
  for call in calls.values():  # warm-up
    call()
  for _ in range(args.calls):
    for name, call in calls.items():
      t0, c0 = time.perf_counter(), time.process_time()
      call()
      wall[name].append(time.perf_counter() - t0)
      cpu[name].append(time.process_time() - c0)
  for name in calls:
    print(f'{args.what} {name}: median {np.median(wall[name]):.3f} s, min '
          f'{min(wall[name]):.3f} s, CPU time median '
          f'{np.median(cpu[name]):.2f} s over {args.calls} calls', flush=True)


if __name__ == '__main__':
  main()
