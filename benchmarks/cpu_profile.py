"""Where the CPU time of the aio5 train step or sampler goes, by kernel kind.

  python benchmarks/cpu_profile.py --what=train --seconds=15
  python benchmarks/cpu_profile.py --what=256

Compiles the program as `benchmarks/ab.py` does (the aio5 config; the train
step at 64x64 with 4 pairs + 4 noise targets, or the 2+2-step sampler on one
image of that size), calls it twice, then calls it in a loop while `perf
record -F 999 -p PID` samples this process, and sums the samples by kind:
the native kernels of `drdd_jax.bf16_conv` (the convolution tiles, the
convolutions' packing, padding and rounding, the linear attention's
kernels, GroupNorm's gradient kernels), XLA's generated code (one entry:
`perf` sees its JIT code without names), `libjax_common.so` (YNNPACK's and
Eigen's code, XLA's runtime), libc, the Linux kernel. Prints a table and
one JSON object. Needs `perf` (linux-perf) with permission to attach to the
process (`kernel.perf_event_paranoid` <= 2 for one's own processes).
docs/performance.md quotes it.
"""
import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile

import ab
from drdd_jax import host_memory

# (kind, regex over "dso symbol"), first match wins.
KINDS = [
    ('conv tiles', r'_bf16_conv.* \S*(Tile|AmxBlock)<'),
    ('conv packing, padding, rounding', r'_bf16_conv.* \S*(Interleave|ToBf16'
     r'|Pad|PackKernel|PairRows|PackGradRows|WeightGradRows|FirstLanes'
     r'|StoreBlock|AmxWeightGrad)'),
    ('linear attention kernels', r'_bf16_conv.* \S*(Context|Output|HeadSoftmax'
     r'|ColumnMaxima|RowsTimes|TransposeTimes)'),
    ('GroupNorm gradient kernels', r'_bf16_conv.* \S*(SumsBlock|Sums<|[^t]Grad<)'),
    ('kernels, other (task set-up)', r'_bf16_conv'),
    ("XLA's generated code", r'^(perf-\d+\.map|\[JIT\]) '),  # unnamed
    ('libjax_common.so', r'^libjax_common'),
    ('libc', r'^libc\.'),
    ('Linux kernel', r'^\[kernel'),
]


def _entries(samples: str):
  """"DSO SYMBOL" per `perf script -F ip,sym,dso` line ("IP SYMBOL (DSO)")."""
  for line in samples.splitlines():
    m = re.match(r'\s*[0-9a-f]+ (.*) \((.*)\)$', line)
    if m:
      yield f'{os.path.basename(m.group(2))} {m.group(1)}'


def by_kind(samples: str):
  """{kind: percent of samples} from `perf script -F ip,sym,dso` lines."""
  count = collections.Counter(
      next((k for k, rx in KINDS if re.search(rx, entry)), 'other')
      for entry in _entries(samples))
  total = max(1, sum(count.values()))
  return {k: round(100 * count[k] / total, 1) for k, _ in KINDS + [('other', '')]}


def top_symbols(samples: str, n: int):
  """The n most sampled "DSO SYMBOL" entries, with their percent."""
  count = collections.Counter(_entries(samples))
  total = max(1, sum(count.values()))
  return [(e, round(100 * c / total, 1)) for e, c in count.most_common(n)]


def main():
  host_memory.tune_malloc()
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--what', default='train',
                      help="'train' or an image size for the sampler")
  parser.add_argument('--seconds', type=float, default=15)
  parser.add_argument('--symbols', type=int, default=0,
                      help='also print the N most sampled symbols')
  args = parser.parse_args()
  config = ab.aio5_config()
  call, = (ab.train_calls(config, None) if args.what == 'train'
           else ab.sample_calls(config, None, int(args.what))).values()
  call()
  call()
  with tempfile.TemporaryDirectory() as tmp:
    data = os.path.join(tmp, 'perf.data')
    perf = subprocess.Popen(
        ['perf', 'record', '-q', '-F', '999', '-p', str(os.getpid()), '-o',
         data, '--', 'sleep', str(args.seconds)])
    calls = 0
    while perf.poll() is None:
      call()
      calls += 1
    if perf.returncode:
      sys.exit(f'perf record failed ({perf.returncode})')
    samples = subprocess.run(
        ['perf', 'script', '-i', data, '-F', 'ip,sym,dso'],
        capture_output=True, text=True, check=True).stdout
  shares = by_kind(samples)
  for entry, percent in top_symbols(samples, args.symbols):
    print(f'{percent:5.1f} %  {entry[:150]}')
  for kind, percent in shares.items():
    print(f'{kind:34s} {percent:5.1f} %')
  print(json.dumps(dict(what=args.what, calls=calls, seconds=args.seconds,
                        percent_of_samples=shares)))


if __name__ == '__main__':
  main()
