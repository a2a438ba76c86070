"""Where a traced step's time goes, by network module and by kind of XLA op.

Joins a `jax.profiler` trace (the `--profile_dir` of `python -m
drdd_jax.bench`) with the optimized HLO of the same program (dumped with
`XLA_FLAGS="--xla_dump_to=DIR --xla_dump_hlo_module_re=one_step"`): each op
event of the trace names its HLO instruction, whose `op_name` metadata holds
the Flax module path (`.../ResBlock_3/GroupNorm_0/...`) and, for gradients,
`transpose(...)`. Prints milliseconds by module class and pass (forward /
backward) and by op kind (convolution, matmul, reduction, elementwise, copy).

  python benchmarks/trace_by_scope.py --trace=PROFILE_DIR \
      --hlo=DUMP_DIR/module_*.jit_one_step.*after_optimizations.txt
"""
import argparse
import collections
import json
import re

from drdd_jax import bench

_INSTR = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+) = ')
_OP_NAME = re.compile(r'metadata=\{[^}]*op_name="([^"]+)"')
_OPERAND = re.compile(r'%([\w.\-]+)')
_CALLS = re.compile(r'calls=%?([\w.\-]+)')
_COMPUTATION = re.compile(r'^(?:ENTRY\s+)?%?([\w.\-]+) .*\{\s*$')
_MODULE = re.compile(r'^([A-Z][A-Za-z]*)_\d+$')


def op_names(hlo_text: str) -> dict:
  """HLO instruction name -> its `op_name` metadata.

  A fusion often carries no metadata of its own (XLA:CPU's loop fusions):
  it takes the `op_name` of the computation it calls, that of the
  computation's root or else the most common one inside it. What is still
  unnamed (the reduce-windows of XLA's tree-reduction rewrite) takes the
  `op_name` of a user.
  """
  out, calls, operands = {}, {}, {}
  roots, inside = {}, collections.defaultdict(collections.Counter)
  computation = None
  for line in hlo_text.splitlines():
    m = _INSTR.match(line)
    if not m:
      m = _COMPUTATION.match(line)
      computation = m.group(1) if m else computation
      continue
    op_name, called = _OP_NAME.search(line), _CALLS.search(line)
    operands[m.group(1)] = _OPERAND.findall(line.split(' = ', 1)[1])
    if op_name:
      out[m.group(1)] = op_name.group(1)
      inside[computation][op_name.group(1)] += 1
      if line.lstrip().startswith('ROOT'):
        roots[computation] = op_name.group(1)
    elif called:
      calls[m.group(1)] = called.group(1)
  for name, computation in calls.items():
    if computation in roots:
      out[name] = roots[computation]
    elif inside[computation]:
      out[name] = inside[computation].most_common(1)[0][0]
  for name, used in reversed(operands.items()):  # users before operands
    for operand in used:
      if name in out and operand in operands:
        out.setdefault(operand, out[name])
  return out


def scope(op_name: str) -> str:
  """'GroupNorm bwd', 'WSConv fwd', ...; ops outside any module together."""
  parts = op_name.split('/')
  modules = [_MODULE.match(p).group(1) for p in parts if _MODULE.match(p)]
  if not modules:
    return 'outside the network (optimizer, losses, data)'
  direction = 'bwd' if 'transpose(' in op_name else 'fwd'
  return f'{modules[-1]} {direction}'


def kind(hlo_op: str) -> str:
  name = hlo_op.lower()
  if 'conv' in name and 'convert' not in name or 'cudnn' in name:
    return 'convolution'
  if any(k in name for k in ('dot', 'gemm', 'cublas', 'matmul')):
    return 'matmul'
  if 'reduce' in name:
    return 'reduction'
  if 'copy' in name or 'transpose' in name or 'concatenate' in name:
    return 'copy/transpose'
  if 'fusion' in name or 'wrapped' in name:
    return 'elementwise'
  return 'other'


def op_times(events: list, module: str) -> collections.Counter:
  """Milliseconds per HLO op of `module`, from the op events of a trace.

  Uses the trace lines whose events are named after their HLO op (XLA's op
  lines); kernel lines, which repeat the same time under kernel names, are
  skipped where such op lines exist.
  """
  by_line = collections.defaultdict(list)
  for e in events:
    args = e.get('args') or {}
    if e.get('ph') == 'X' and 'hlo_op' in args and (
        module in str(args.get('hlo_module', module))):
      by_line[(e.get('pid'), e.get('tid'))].append(e)
  op_lines = [k for k, evs in by_line.items()
              if all(e['name'] == e['args']['hlo_op'] for e in evs)]
  total = collections.Counter()
  for line in op_lines or list(by_line):
    for e in by_line[line]:
      total[e['args']['hlo_op']] += e.get('dur', 0) / 1e3
  return total


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--trace', required=True,
                      help='perfetto_trace.json.gz or a directory holding it')
  parser.add_argument('--hlo', required=True,
                      help='the optimized HLO text of the traced program')
  parser.add_argument('--module', default='one_step')
  parser.add_argument('--json_out', help='Also write the tables here.')
  args = parser.parse_args()
  with open(args.hlo) as f:
    names = op_names(f.read())
  times = op_times(bench.trace_events(args.trace), args.module)
  if not times:
    raise SystemExit(f'No op events of a module matching {args.module!r}.')
  by_scope, by_kind, cross = (collections.Counter() for _ in range(3))
  for op, ms in times.items():
    s = scope(names[op]) if op in names else 'unmatched'
    by_scope[s] += ms
    by_kind[kind(op)] += ms
    cross[(s, kind(op))] += ms
  total = sum(times.values())
  print(f'{total:.1f} ms of op time ({by_scope["unmatched"]:.1f} ms not in '
        'the HLO dump)')
  for title, table in (('by module and pass', by_scope), ('by op kind', by_kind)):
    print(f'\n{title}:')
    for k, ms in table.most_common():
      print(f'  {ms:8.2f} ms  {100 * ms / total:5.1f} %  {k}')
  print('\nlongest (module and pass, op kind):')
  for (s, k), ms in cross.most_common(20):
    print(f'  {ms:8.2f} ms  {s} / {k}')
  if args.json_out:
    with open(args.json_out, 'w') as f:
      json.dump(dict(total_ms=total, by_scope=dict(by_scope),
                     by_kind=dict(by_kind),
                     top_ops=times.most_common(40)), f, indent=1)


if __name__ == '__main__':
  main()
