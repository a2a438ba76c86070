"""The convolutions of the network, each timed alone: a floor for the step.

  python benchmarks/conv_budget.py                      # train: 8 x 64x64
  python benchmarks/conv_budget.py --batch=1 --size=256 --forward_only

Traces the aio5 network's forward pass at [batch, size, size] (the train
step at 64x64 runs it once on 4 pairs + 4 noise targets: batch 8), collects
its `conv_general_dilated`s, and times each distinct one compiled alone
(with `unet.compiler_options()`, as training does, unless `--library` names
another convolution library): forward, and (unless `--forward_only`) forward
plus the gradients the step needs, with `unet.conv`'s gradient as the network
computes them (kernel only for the first layer, whose
input is data). The sum over the network is what the convolutions alone
cost at XLA:CPU's speed for their shapes; the step cannot be faster than
that, nor reach a larger fraction of the calibration convolution than their
rate. Run it as the package runs (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`).
docs/performance.md quotes it.
"""
import argparse
import collections
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from drdd_jax import bf16_conv, train, unet
from drdd_jax.bench import median_call_s
import xla_cpu_convolutions  # pylint: disable=g-bad-import-order


def network_convolutions(config, batch: int, size: int) -> collections.Counter:
  """(input shape, kernel shape, padding) -> count, over one forward pass."""
  with bf16_conv.disabled():  # XLA's convolutions: the primitives found
    model = train.create_model(config)
    params = jax.eval_shape(lambda r: unet.init_params(model, r),
                            jax.random.key(0))
    x = jnp.zeros((batch, size, size, 3))
    t, phase = jnp.zeros((batch,)), jnp.zeros((batch,), jnp.int32)
    jaxpr = jax.make_jaxpr(
        lambda p: model.apply({'params': p}, x, x, t, phase))(params)
  found = collections.Counter()

  def walk(jx):
    for eqn in jx.eqns:
      if eqn.primitive.name == 'conv_general_dilated':
        lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
        found[(tuple(lhs), tuple(rhs),
               tuple(map(tuple, eqn.params['padding'])))] += 1
      for value in eqn.params.values():
        inner = getattr(value, 'jaxpr', None)
        if inner is not None:
          walk(getattr(inner, 'jaxpr', inner))

  walk(jaxpr.jaxpr)
  return found


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--size', type=int, default=64)
  parser.add_argument('--forward_only', action='store_true')
  parser.add_argument('--calls', type=int, default=7)
  parser.add_argument('--library', default='eigen',
                      help='XLA:CPU convolution library: a key of '
                      'xla_cpu_convolutions.OPTIONS (eigen = what training '
                      'uses, unet.compiler_options())')
  parser.add_argument('--dtype', default='float32',
                      help='bfloat16: the convolutions in bfloat16 (on '
                      "drdd_jax.bf16_conv's kernels where enabled)")
  args = parser.parse_args()
  spec = importlib.util.spec_from_file_location('aio5', os.path.join(
      os.path.dirname(os.path.abspath(__file__)), '..', 'configs', 'aio5.py'))
  aio5 = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(aio5)
  convs = network_convolutions(aio5.get_config(), args.batch, args.size)
  options = xla_cpu_convolutions.OPTIONS[args.library]
  total_s = total_flops = 0.0
  for (lhs, rhs, padding), count in sorted(
      convs.items(), key=lambda kv: -np.prod(kv[0][0]) * kv[0][1][-1]):
    x = jax.random.normal(jax.random.key(0), lhs).astype(args.dtype)
    w = (jax.random.normal(jax.random.key(1), rhs) * 0.03).astype(args.dtype)

    def conv(a, b, padding=padding):  # the network's, with its gradient
      return unet.conv(a, b, padding)

    out = jax.eval_shape(conv, x, w)
    flops = 2.0 * np.prod(out.shape) * np.prod(rhs[:-1])
    seconds = median_call_s(conv, (x, w), options, args.calls)
    record = dict(input=lhs, kernel=rhs, count=count,
                  forward_ms=1e3 * seconds,
                  forward_gflops=flops / seconds / 1e9)
    if not args.forward_only:
      cotangent = jnp.ones(out.shape, out.dtype)
      first = lhs[-1] == 6  # the stem reads the data: kernel gradient only
      if first:
        grads = lambda a, b: jax.vjp(lambda k: conv(a, k), b)[1](cotangent)
      else:
        grads = lambda a, b: jax.vjp(conv, a, b)[1](cotangent)
      grad_s = median_call_s(grads, (x, w), options, args.calls)
      record.update(gradient_ms=1e3 * grad_s,
                    gradient_gflops=(1 if first else 2) * flops / grad_s / 1e9)
      seconds += grad_s
      flops *= 2 if first else 3
    total_s += count * seconds
    total_flops += count * flops
    print(json.dumps(record), flush=True)
  print(json.dumps(dict(
      batch=args.batch, size=args.size, forward_only=args.forward_only,
      library=args.library, dtype=args.dtype,
      convolutions=sum(convs.values()), distinct=len(convs),
      total_s=total_s, total_gflop=total_flops / 1e9,
      gflops=total_flops / total_s / 1e9)))


if __name__ == '__main__':
  main()
