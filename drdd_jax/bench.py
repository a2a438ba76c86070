"""Benchmark: the real train step, the sampler, and a plain convolution.

  python -m drdd_jax.bench                                 # aio5 architecture
  python -m drdd_jax.bench --config=configs/aio5.py:tiny   # the small one
  python -m drdd_jax.bench --quick                         # < 5 min on 2 CPUs
  python -m drdd_jax.bench --cases=train --image_size=128  # memory check
  python -m drdd_jax.bench --cases=train --profile_dir=/tmp/prof  # where time goes

Prints one JSON object per case, then a table. Cases:
- `calibration`: a plain 3x3 convolution (128 -> 128 channels, 64x64, batch
  8) in the config's compute dtype and convolution precision, as the network
  runs it (`unet.conv`: on `bf16_conv`'s kernels where they run); its
  FLOP/s is what the other cases are compared with.
- `train`: `train.make_train_step` + `jit_train_step` on synthetic uint8
  batches (`--batch` pairs and as many noise targets), one step per dispatch.
  `time_s_*` wait for each step; `train_step_s_pipelined` is the mean over
  `--steps` steps run as the training loop runs them: dispatched back to
  back with one wait at the end (the host prepares the next step while the
  device runs this one), except on CPU, where the loop waits for each step
  (`train.wait_each_step`).
- `sample`: `sampler.make_sampler` (n_res + n_noise network calls) on one
  `S x S` image for each `S` in `--sample_sizes`.
- `matmul` (not run by default): an 8192^3 bf16 matrix product, the measured
  ceiling of an accelerator's matrix units.

`flops_per_step` is XLA's cost analysis of the program as written (lowered
for CPU with XLA's convolutions, so it is the same number on every backend:
accelerator compilers hide convolutions in library calls, and `bf16_conv` in
custom calls, that cost analysis does not count). Records say which compute
dtype and convolution precision they measured (`compute_dtype`,
`conv_precision`), whether `bf16_conv`'s kernels ran (`bf16_conv`) and on
AMX tiles (`amx`).
On an accelerator whose bf16 dense peak is known (`PEAK_BF16_TFLOPS`),
`model_flops_utilization` is the achieved FLOP/s over that peak.

Each case runs in a fresh subprocess (unless `--noisolate`), so `peak_rss_mib`
(`ru_maxrss`: compilation included) is that case's own peak. Times are wall
clock after one warm-up call; `cpu_s_median` (process CPU time) and the load
average help to read numbers from a shared machine.
"""
import glob
import gzip
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
from ml_collections import config_flags

from drdd_jax import host_memory

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'configs', 'aio5.py')
_CONFIG = config_flags.DEFINE_config_file(
    'config', _DEFAULT_CONFIG, 'Config file (default: configs/aio5.py).')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 64, 'train: crop size.')
_BATCH = flags.DEFINE_integer('batch', 4, 'train: global pairs per step (the '
                              'noise batch follows training.noise_batch_size).')
_STEPS = flags.DEFINE_integer('steps', None, 'Timed calls per case after one '
                              'warm-up (default 10; 3 with --quick).')
_QUICK = flags.DEFINE_bool('quick', False, 'Fewer timed calls.')
_CASES = flags.DEFINE_list('cases', ['calibration', 'train', 'sample'],
                           'Cases to run (also: matmul).')
_SAMPLE_SIZES = flags.DEFINE_list('sample_sizes', ['128', '256'],
                                  'sample: image sizes.')
_ISOLATE = flags.DEFINE_bool('isolate', True, 'One subprocess per case.')
_JSON_OUT = flags.DEFINE_string('json_out', None, 'Also append the JSON here.')
_PROFILE_DIR = flags.DEFINE_string(
    'profile_dir', None, 'train, sample: trace one more call with '
    '`jax.profiler` (a Perfetto trace under DIR/<case>) and add the XLA ops '
    'that took longest, summed by kind, to the JSON as `profile_top_ops`.')
_EIGEN_CONVS = flags.DEFINE_bool(
    'eigen_convs', True, 'calibration, train: compile with '
    '`unet.compiler_options()` (XLA:CPU convolutions on Eigen, as training '
    'does); --noeigen_convs puts them on YNNPACK, jaxlib 0.10\'s default. '
    'The sampler always uses `unet.compiler_options()`.')

CALIBRATION = dict(batch=8, image_size=64, channels=128)
MATMUL_SIZE = 8192
# Dense bf16 peaks (TFLOP/s, datasheets) by a substring of `device_kind`; the
# first match wins.
PEAK_BF16_TFLOPS = (('H100 PCIe', 756.0), ('H100', 989.4), ('H200', 989.4),
                    ('A100', 312.0), ('TPU v4', 275.0), ('TPU v5 lite', 197.0),
                    ('TPU v5', 459.0), ('TPU v6', 918.0))
# Parameter initialization runs once: skip XLA's slow optimization passes.
_RUN_ONCE = {'xla_backend_optimization_level': 0}


def _steps() -> int:
  if _STEPS.value is not None:
    return _STEPS.value
  return 3 if _QUICK.value else 10


def _compiler_options():
  """Options for the calibration and train cases (see `--eigen_convs`)."""
  import jax  # pylint: disable=g-import-not-at-top
  from drdd_jax import unet  # pylint: disable=g-import-not-at-top
  if _EIGEN_CONVS.value or jax.default_backend() != 'cpu':
    return unet.compiler_options()
  return {'xla_cpu_experimental_ynn_fusion_type':
              'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,'
              'LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION'}


def _xla_convs():
  import jax  # pylint: disable=g-import-not-at-top
  if jax.default_backend() != 'cpu':
    return None
  return 'eigen' if _EIGEN_CONVS.value else 'ynnpack'


def _dtype_fields(config) -> dict:
  """The record's compute dtype, convolution precision, and whether
  `bf16_conv`'s kernels ran, on AMX tiles or not."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from drdd_jax import bf16_conv, train  # pylint: disable=g-import-not-at-top
  dtype, precision = train.compute_dtype(config), train.conv_precision(config)
  kernels = bool(jnp.bfloat16 in (dtype, precision) and bf16_conv.enabled())
  return dict(compute_dtype=dtype.name,
              conv_precision=precision.name if precision else 'default',
              bf16_conv=kernels, amx=kernels and bf16_conv.amx())


def _cpu_s() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def model_flops(fn, *args) -> float:
  """XLA's FLOP count of `fn(*args)`, lowered for CPU whatever the backend,
  with XLA's convolutions (it counts none in `bf16_conv`'s custom calls)."""
  import jax  # pylint: disable=g-import-not-at-top
  from drdd_jax import bf16_conv  # pylint: disable=g-import-not-at-top
  cpu = jax.sharding.SingleDeviceSharding(jax.devices('cpu')[0])
  specs = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu), args)
  with bf16_conv.disabled():
    cost = jax.jit(fn).lower(*specs).cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older JAX: one dict per program.
    cost = cost[0]
  return float(cost.get('flops', 0.0)) if cost else 0.0


def peak_bf16_tflops(device_kind: str):
  """The datasheet bf16 dense peak of `device_kind`, or None if unknown."""
  for name, peak in PEAK_BF16_TFLOPS:
    if name in device_kind:
      return peak
  return None


def _xla_memory(compiled) -> dict:
  """XLA's buffer sizes for one call (MiB): temporaries and arguments."""
  try:
    m = compiled.memory_analysis()
    return dict(xla_temp_mib=m.temp_size_in_bytes / 2**20,
                xla_argument_mib=m.argument_size_in_bytes / 2**20)
  except Exception:  # pylint: disable=broad-except
    return {}  # Not every backend reports it.


def _time_calls(fn, n: int):
  """Wall and CPU seconds of `n` calls of `fn` (which blocks), after a warm-up."""
  fn()
  wall, cpu = [], []
  for _ in range(n):
    t0, c0 = time.perf_counter(), _cpu_s()
    fn()
    wall.append(time.perf_counter() - t0)
    cpu.append(_cpu_s() - c0)
  return wall, cpu


def median_call_s(f, args, compiler_options=None, n: int = 10) -> float:
  """Median wall seconds of `jax.jit(f)(*args)`, after compiling and a warm-up.

  For micro-benchmarks (benchmarks/*.py).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  compiled = jax.jit(f).lower(*args).compile(compiler_options)
  wall, _ = _time_calls(lambda: jax.block_until_ready(compiled(*args)), n)
  return float(np.median(wall))


def trace_events(path: str) -> list:
  """The events of the newest `perfetto_trace.json.gz` under `path` (or of
  that file)."""
  if os.path.isdir(path):
    found = sorted(glob.glob(os.path.join(path, '**', 'perfetto_trace.json.gz'),
                             recursive=True))
    if not found:
      raise FileNotFoundError(f'No perfetto_trace.json.gz under {path}.')
    path = found[-1]
  with gzip.open(path) as f:
    events = json.load(f)
  return events.get('traceEvents', []) if isinstance(events, dict) else events


def _profile(fn, name: str):
  """Traces one call of `fn`; returns [[op kind, ms, count], ...], longest first.

  Op kinds are XLA instruction names without their numeric suffix. Ops that
  run concurrently on the thread pool overlap, so the column can sum to more
  than the wall time: read it as where the time goes, not as a partition.
  """
  import collections  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  if not _PROFILE_DIR.value:
    return None
  out = os.path.join(_PROFILE_DIR.value, name)
  try:
    with jax.profiler.trace(out, create_perfetto_trace=True):
      fn()
    events = trace_events(out)
  except Exception as e:  # pylint: disable=broad-except
    # A diagnostic: the case's timings stand without it.
    return [[f'profile failed: {type(e).__name__}: {e}', 0.0, 0]]
  total, count = collections.Counter(), collections.Counter()
  for e in events:
    name_ = e.get('name', '')
    if e.get('ph') != 'X' or name_.startswith('$') or 'Thunk' in name_ or (
        'Pjit' in name_) or 'PjRt' in name_:
      continue
    kind = re.sub(r'\.\d+$', '', name_)
    total[kind] += e.get('dur', 0) / 1e3
    count[kind] += 1
  return [[k, round(ms, 1), count[k]] for k, ms in total.most_common(15)]


def _record(case, *, image_size, batch, wall, cpu, compile_s, flops,
            images_per_call, **extra):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  med = float(np.median(wall))
  device_kind = jax.devices()[0].device_kind
  peak = peak_bf16_tflops(device_kind)
  stats = {}
  try:
    stats = jax.local_devices()[0].memory_stats() or {}
  except Exception:  # pylint: disable=broad-except
    pass  # CPU devices have no memory statistics.
  rec = dict(
      case=case, backend=jax.default_backend(), devices=jax.device_count(),
      device_kind=device_kind, image_size=image_size,
      batch=batch, steps=len(wall), time_s_median=med,
      time_s_min=float(min(wall)), time_s_max=float(max(wall)),
      cpu_s_median=float(np.median(cpu)),
      train_step_s_median=None, train_step_s_min=None, train_step_s_max=None,
      images_per_s=images_per_call / med if images_per_call else None,
      compile_s=compile_s,
      sample_s_per_image=None,
      peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      peak_device_mib=(stats['peak_bytes_in_use'] / 2**20
                       if 'peak_bytes_in_use' in stats else None),
      flops_per_step=flops, achieved_tflops=flops / med / 1e12,
      fraction_of_calibration=None, peak_bf16_tflops=peak,
      model_flops_utilization=flops / med / 1e12 / peak if peak else None,
      load_avg_1m=os.getloadavg()[0],
      glibc_tunables=os.environ.get('GLIBC_TUNABLES'),
      block_cache=host_memory.block_cache_loaded())
  rec.update(extra)
  return rec


# ------------------------------------------------------------------ cases ---
def bench_calibration(config, n: int) -> dict:
  """A plain 3x3 convolution in the config's compute dtype, as the network
  runs it (`unet.conv`) and compiled like the train step."""
  import jax  # pylint: disable=g-import-not-at-top
  from drdd_jax import train, unet  # pylint: disable=g-import-not-at-top
  b, s, c = (CALIBRATION[k] for k in ('batch', 'image_size', 'channels'))
  x = jax.random.normal(jax.random.key(0), (b, s, s, c)).astype(
      train.compute_dtype(config))
  w = jax.random.normal(jax.random.key(1), (3, 3, c, c)) * 0.03
  conv = jax.jit(lambda x, w: unet.conv(
      x, w, precision=train.conv_precision(config)),
                 compiler_options=_compiler_options())
  t0 = time.perf_counter()
  compiled = conv.lower(x, w).compile()
  compile_s = time.perf_counter() - t0
  wall, cpu = _time_calls(lambda: compiled(x, w).block_until_ready(), n)
  return _record('calibration', image_size=s, batch=b, wall=wall, cpu=cpu,
                 compile_s=compile_s, flops=2.0 * b * s * s * c * c * 9,
                 images_per_call=b, fraction_of_calibration=1.0,
                 xla_convs=_xla_convs(), **_dtype_fields(config))


def _synthetic_batch(batch: int, noise_batch: int, size: int):
  import numpy as np  # pylint: disable=g-import-not-at-top
  rs = np.random.RandomState(0)
  images = lambda n: rs.randint(0, 256, (n, size, size, 3), dtype=np.uint8)
  return {'residual': {'input': images(batch), 'target': images(batch),
                       'task': np.zeros((batch,), np.int32)},
          'noise': {'target': images(noise_batch)}}


def _one_pass_step(config, model):
  """One train step without microbatches: the same FLOPs, but no loop.

  XLA's cost analysis counts a loop body once.
  """
  from drdd_jax import train  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  config.training.microbatches = 1
  config.training.steps_per_dispatch = 1
  return train.make_train_step(config, model, train.make_schedule(config))


def bench_train(config, image_size: int, batch: int, n: int) -> dict:
  """The project's train step on random uint8 batches.

  With `training.steps_per_dispatch` = K > 1, each timed call runs K steps
  (K copies of the batch); the times are per train step.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from drdd_jax import train, unet  # pylint: disable=g-import-not-at-top
  with config.unlocked():
    config.training.batch_size = batch
  k = config.training.steps_per_dispatch
  mesh = train.make_mesh(config.mesh)
  train.check_config(config, len(mesh.devices.flat))
  model = train.create_model(config)
  tx = train.make_optimizer(config)
  state, shardings = train.create_train_state(config, model, tx, mesh)
  step = train.jit_train_step(
      train.make_train_step(config, model, train.make_schedule(config)),
      shardings, mesh, leading=int(k > 1))
  noise_batch = train.noise_batch_size(config)
  one_batch = _synthetic_batch(batch, noise_batch, image_size)
  data = train.global_batch(
      jax.tree.map(lambda x: np.stack([x] * k), one_batch) if k > 1
      else one_batch, mesh, int(k > 1))
  rng = jax.device_put(jax.random.key(0))
  t0 = time.perf_counter()
  # `jit_train_step` passes `unet.compiler_options()`; --noeigen_convs
  # overrides them here.
  compiled = step.lower(state, data, rng).compile(_compiler_options())
  compile_s = time.perf_counter() - t0
  host_memory.release_freed()  # As the training loop does.
  box = [state]

  def one_step():
    box[0], metrics = compiled(box[0], data, rng)
    jax.block_until_ready((box[0], metrics))

  wall, cpu = (np.array(t) / k for t in _time_calls(one_step, n))
  # As the training loop runs: `n` calls dispatched back to back, waiting for
  # each only where the loop does (`train.wait_each_step`: on CPU).
  wait = train.wait_each_step()
  t0 = time.perf_counter()
  for _ in range(n):
    box[0], metrics = compiled(box[0], data, rng)
    if wait:
      jax.block_until_ready(box[0])
  jax.block_until_ready((box[0], metrics))
  pipelined = (time.perf_counter() - t0) / (n * k)
  host_memory.release_freed()  # As the training loop does between programs.
  rec = _record('train', image_size=image_size, batch=batch, wall=wall,
                cpu=cpu, compile_s=compile_s,
                flops=model_flops(_one_pass_step(config, model), state,
                                  train.global_batch(one_batch, mesh), rng),
                images_per_call=batch + noise_batch, noise_batch=noise_batch,
                steps_per_dispatch=k,
                **_dtype_fields(config),
                remat=bool(config.model.remat),
                microbatches=config.training.microbatches,
                xla_convs=_xla_convs(),
                params=unet.count_params(state.params),
                **_xla_memory(compiled))
  # After `_record`: the trace must not count in `peak_rss_mib`.
  rec['profile_top_ops'] = _profile(one_step, 'train')
  flops, peak = rec['flops_per_step'], rec['peak_bf16_tflops']
  rec.update(train_step_s_pipelined=pipelined,
             images_per_s_pipelined=(batch + noise_batch) / pipelined,
             model_flops_utilization_pipelined=(
                 flops / pipelined / 1e12 / peak if peak else None))
  rec.update(train_step_s_median=rec['time_s_median'],
             train_step_s_min=rec['time_s_min'],
             train_step_s_max=rec['time_s_max'])
  return rec


def bench_sample(config, size: int, n: int) -> dict:
  """`sampler.make_sampler` on one random size x size image."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from drdd_jax import sampler, schedules, train, unet  # pylint: disable=g-import-not-at-top
  model = train.create_model(config)
  init = jax.jit(lambda r: unet.init_params(model, r)).lower(jax.random.key(0))
  params = init.compile(_RUN_ONCE if jax.default_backend() == 'cpu' else None)(
      jax.random.key(0))
  sample = sampler.make_sampler(model, train.make_schedule(config),
                                config.diffusion, config.sampling)
  y = jax.random.uniform(jax.random.key(1), (1, size, size, 3), jnp.float32,
                         -1.0, 1.0)
  rng = jax.device_put(jax.random.key(2))
  t0 = time.perf_counter()
  compiled = sample.lower(params, y, rng).compile()
  compile_s = time.perf_counter() - t0
  # The sampler's loops are counted once by XLA's cost analysis: count one
  # network call and multiply.
  calls = config.sampling.n_res + config.sampling.n_noise
  one_call = lambda p, x: model.apply(
      {'params': p}, x, x, jnp.zeros((1,), jnp.float32), schedules.RESIDUAL)
  call = lambda: jax.block_until_ready(compiled(params, y, rng))
  wall, cpu = _time_calls(call, n)
  host_memory.release_freed()
  rec = _record('sample', image_size=size, batch=1, wall=wall, cpu=cpu,
                compile_s=compile_s,
                flops=calls * model_flops(one_call, params, y),
                images_per_call=1, network_calls=calls,
                **_dtype_fields(config),
                xla_convs='eigen' if jax.default_backend() == 'cpu' else None)
  rec['profile_top_ops'] = _profile(call, f'sample_{size}')
  rec['sample_s_per_image'] = rec['time_s_median']
  return rec


def bench_matmul(n: int) -> dict:
  """An N^3 bf16 matrix product (N = `MATMUL_SIZE`; 1024 on CPU)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  size = 1024 if jax.default_backend() == 'cpu' else MATMUL_SIZE
  a, b = (jax.random.normal(jax.random.key(i), (size, size), jnp.bfloat16)
          for i in (0, 1))
  t0 = time.perf_counter()
  compiled = jax.jit(jnp.matmul).lower(a, b).compile()
  compile_s = time.perf_counter() - t0
  wall, cpu = _time_calls(lambda: compiled(a, b).block_until_ready(), n)
  return _record('matmul', image_size=size, batch=1, wall=wall, cpu=cpu,
                 compile_s=compile_s, flops=2.0 * size**3, images_per_call=0,
                 compute_dtype='bfloat16')


# ------------------------------------------------------------- reporting ---
def add_fractions(records):
  """Sets `fraction_of_calibration` from the calibration case, if measured.

  `cpu_fraction_of_calibration` compares FLOPs per CPU-second instead: on a
  machine shared with other jobs it moves less than the wall-clock ratio.
  `best_fraction_of_calibration` compares the best times of both: the short
  calibration call's median moved 2x between runs on a shared machine
  (docs/performance.md), its best time far less.
  """
  cal = [r for r in records if r['case'] == 'calibration']
  if cal:
    c = cal[0]
    for r in records:
      r['fraction_of_calibration'] = r['achieved_tflops'] / c['achieved_tflops']
      if r.get('time_s_min') and c.get('time_s_min'):
        r['best_fraction_of_calibration'] = (
            r['flops_per_step'] / r['time_s_min'] /
            (c['flops_per_step'] / c['time_s_min']))
      if r.get('cpu_s_median') and c.get('cpu_s_median'):
        r['cpu_fraction_of_calibration'] = (
            r['flops_per_step'] / r['cpu_s_median'] /
            (c['flops_per_step'] / c['cpu_s_median']))
  return records


def table(records) -> str:
  cols = [('case', '{}'), ('image_size', '{}'), ('batch', '{}'),
          ('time_s_median', '{:.3f}'), ('time_s_min', '{:.3f}'),
          ('time_s_max', '{:.3f}'), ('images_per_s', '{:.2f}'),
          ('compile_s', '{:.1f}'), ('flops_per_step', '{:.3g}'),
          ('achieved_tflops', '{:.4f}'), ('fraction_of_calibration', '{:.2f}'),
          ('model_flops_utilization', '{:.3f}'), ('peak_device_mib', '{:.0f}'),
          ('peak_rss_mib', '{:.0f}'), ('load_avg_1m', '{:.1f}')]
  rows = [[name for name, _ in cols]]
  for r in records:
    rows.append(['-' if r.get(k) is None else fmt.format(r[k])
                 for k, fmt in cols])
  widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
  return '\n'.join('  '.join(v.rjust(w) for v, w in zip(row, widths))
                   for row in rows)


def _units():
  units = []
  for case in _CASES.value:
    if case == 'sample':
      units += [('sample', int(s)) for s in _SAMPLE_SIZES.value]
    elif case in ('calibration', 'train', 'matmul'):
      units.append((case, None))
    else:
      raise app.UsageError(f'Unknown case {case!r} (calibration, train, '
                           'sample, matmul).')
  return units


def run_unit(case, size):
  import jax  # pylint: disable=g-import-not-at-top
  # compile_s is a real compile, not a read from a persistent cache.
  jax.config.update('jax_enable_compilation_cache', False)
  config = _CONFIG.value
  n = _steps()
  if case == 'calibration':
    return bench_calibration(config, max(10, 3 * n))  # Cheap: more calls.
  if case == 'matmul':
    return bench_matmul(max(10, 3 * n))
  if case == 'train':
    return bench_train(config, _IMAGE_SIZE.value, _BATCH.value, n)
  return bench_sample(config, size, max(1, min(n, 5)))


def _run_isolated(case, size, argv):
  """Runs one case in a fresh interpreter; returns its record."""
  with tempfile.NamedTemporaryFile('r', suffix='.json') as out:
    args = [a for a in argv[1:] if not a.startswith(
        ('--cases', '--sample_sizes', '--isolate', '--noisolate',
         '--json_out'))]
    args += [f'--cases={case}', '--noisolate', f'--json_out={out.name}']
    if size is not None:
      args.append(f'--sample_sizes={size}')
    subprocess.run([sys.executable, '-m', 'drdd_jax.bench'] + args,
                   check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read().splitlines()[-1])


def main(argv):
  records = []
  for case, size in _units():
    if _ISOLATE.value:
      rec = _run_isolated(case, size, sys.argv)
    else:
      rec = run_unit(case, size)
    records.append(rec)
  add_fractions(records)
  for r in records:
    print(json.dumps(r), flush=True)
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, 'a') as f:
      f.writelines(json.dumps(r) + '\n' for r in records)
  if _ISOLATE.value or len(records) > 1:
    print(table(records))


if __name__ == '__main__':
  app.run(main)
