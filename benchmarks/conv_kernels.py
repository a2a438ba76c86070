"""Times `drdd_jax.bf16_conv`'s kernels alone, at the network's 3×3 shapes.

    python benchmarks/conv_kernels.py                  # AMX where the CPU has it
    DRDD_JAX_AMX=0 python benchmarks/conv_kernels.py   # AVX512-BF16 tiles

For each shape, the convolution (`fwd`) and its weight gradient (`wgrad`)
on bfloat16 operands, one jitted call at a time (30 after a warm-up): one
JSON line each with the median and best seconds and GFLOP/s at the best.
"""
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from drdd_jax import bf16_conv

# (batch, size, input channels, output channels): the calibration
# convolution, then the aio5 UNet's levels at 64×64, batch 4.
SHAPES = [(8, 64, 128, 128), (4, 64, 64, 64), (4, 32, 128, 128),
          (4, 16, 256, 256), (4, 8, 512, 512)]


def main(calls: int = 30):
  if not bf16_conv.available():
    raise SystemExit('drdd_jax._bf16_conv is not built or this CPU lacks '
                     'AVX512-BF16.')
  rng = np.random.default_rng(0)
  pad = ((1, 1), (1, 1))
  for b, s, c, o in SHAPES:
    x = jnp.asarray(rng.standard_normal((b, s, s, c)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((3, 3, c, o)) * 0.1, jnp.bfloat16)
    g = jnp.asarray(rng.standard_normal((b, s, s, o)), jnp.bfloat16)
    for what, fn in [
        ('fwd', lambda x, w, g: bf16_conv.conv(x, w, pad, False, jnp.bfloat16)),
        ('wgrad', lambda x, w, g: bf16_conv.conv_weight_gradient(
            x, g, (3, 3), pad))]:
      fn = jax.jit(fn)
      fn(x, w, g).block_until_ready()
      times = []
      for _ in range(calls):
        t = time.perf_counter()
        fn(x, w, g).block_until_ready()
        times.append(time.perf_counter() - t)
      flops = 2 * b * s * s * c * o * 9
      print(json.dumps(dict(
          what=what, batch=b, size=s, in_channels=c, out_channels=o,
          amx=bf16_conv.amx(), time_s_median=float(np.median(times)),
          time_s_min=min(times), gflops_at_min=flops / min(times) / 1e9)))


if __name__ == '__main__':
  main()
