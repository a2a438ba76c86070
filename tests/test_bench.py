"""`python -m drdd_jax.bench` keeps working: quick run on the tiny config."""
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

import conftest

from drdd_jax import bench
from drdd_jax import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ('case', 'backend', 'devices', 'image_size', 'batch',
        'train_step_s_median', 'train_step_s_min', 'train_step_s_max',
        'images_per_s', 'compile_s', 'sample_s_per_image', 'peak_rss_mib',
        'flops_per_step', 'achieved_tflops', 'fraction_of_calibration',
        'peak_bf16_tflops', 'model_flops_utilization', 'peak_device_mib')


@pytest.mark.slow
def test_quick_bench_on_tiny_config(tmp_path):
  out = tmp_path / 'bench.jsonl'
  # One CPU device, compiled as the other tests are (a smoke test: XLA's
  # backend optimizations would cost more compile time than two steps take).
  env = dict(os.environ, XLA_FLAGS=conftest.FAST_COMPILE,
             JAX_PLATFORMS='cpu')
  proc = subprocess.run(
      [sys.executable, '-m', 'drdd_jax.bench', '--config=configs/aio5.py:tiny',
       '--quick', '--steps=2', '--image_size=32', '--sample_sizes=32',
       '--config.training.steps_per_dispatch=2',
       f'--json_out={out}', f'--profile_dir={tmp_path / "prof"}'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
      check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  printed = [json.loads(l) for l in proc.stdout.splitlines()
             if l.startswith('{')]
  assert printed == [json.loads(l) for l in out.read_text().splitlines()]
  assert [r['case'] for r in printed] == ['calibration', 'train', 'sample']
  cal, tr, sa = printed
  for r in printed:
    assert set(KEYS) <= set(r), set(KEYS) - set(r)
    assert r['backend'] == 'cpu' and r['devices'] == 1
    assert r['flops_per_step'] > 0 and r['peak_rss_mib'] > 0
    assert r['fraction_of_calibration'] > 0
    assert r['peak_bf16_tflops'] is None and r['model_flops_utilization'] is None
  assert cal['fraction_of_calibration'] == 1.0
  # The program started again with the block cache and malloc on huge pages
  # (host_memory.py).
  if 'DRDD_JAX_MALLOC' not in os.environ:
    built = host_memory.block_cache_library() is not None
    assert all(r['block_cache'] == built for r in printed)
    if host_memory.huge_pages_available() and 'GLIBC_TUNABLES' not in os.environ:
      assert all(r['glibc_tunables'] == 'glibc.malloc.hugetlb=1'
                 for r in printed)
  assert tr['steps'] == 2 and tr['batch'] == 4 and tr['image_size'] == 32
  assert tr['steps_per_dispatch'] == 2  # Times per step, 2 steps per call.
  assert 0 < tr['train_step_s_min'] <= tr['train_step_s_median']
  assert tr['train_step_s_median'] <= tr['train_step_s_max']
  assert tr['images_per_s'] == pytest.approx(8 / tr['train_step_s_median'])
  assert tr['images_per_s_pipelined'] == pytest.approx(
      8 / tr['train_step_s_pipelined'])
  assert tr['model_flops_utilization_pipelined'] is None  # No known peak.
  assert sa['image_size'] == 32 and sa['sample_s_per_image'] > 0
  assert sa['train_step_s_median'] is None
  assert 'fraction_of_calibration' in proc.stdout  # The table's header.
  # --profile_dir: a trace per case and its longest XLA ops.
  assert (tmp_path / 'prof' / 'train').is_dir()
  for r in (tr, sa):
    kinds = [k for k, ms, n in r['profile_top_ops']]
    assert kinds and all(ms >= 0 and n > 0 for _, ms, n in r['profile_top_ops'])
    assert not any(k.startswith('$') for k in kinds)


def test_fractions_and_table():
  recs = [dict(case='calibration', achieved_tflops=0.1, flops_per_step=2.0,
               time_s_min=0.5),
          dict(case='train', achieved_tflops=0.08, image_size=64,
               flops_per_step=6.0, time_s_min=2.0)]
  bench.add_fractions(recs)
  assert [r['fraction_of_calibration'] for r in recs] == pytest.approx([1, 0.8])
  assert [r['best_fraction_of_calibration'] for r in recs] == pytest.approx(
      [1, 0.75])
  text = bench.table(recs)
  assert text.splitlines()[0].split()[0] == 'case'
  assert '0.80' in text and '-' in text  # Missing fields print as '-'.


def test_model_flops_is_xlas_count_of_the_program_as_written():
  a = jnp.ones((8, 16), jnp.bfloat16)
  b = jnp.ones((16, 4), jnp.bfloat16)
  assert bench.model_flops(jnp.matmul, a, b) == 2 * 8 * 16 * 4
  # Pytrees of arguments, as the train step takes them.
  assert bench.model_flops(lambda d: d['a'] @ d['b'], dict(a=a, b=b)) == 1024


def test_matmul_case_and_accelerator_peaks():
  rec = bench.bench_matmul(2)
  assert rec['case'] == 'matmul' and rec['steps'] == 2
  assert rec['flops_per_step'] == 2.0 * 1024**3  # 1024 on CPU.
  assert rec['achieved_tflops'] > 0 and rec['images_per_s'] is None
  assert bench.peak_bf16_tflops('NVIDIA H100 80GB HBM3') == 989.4
  assert bench.peak_bf16_tflops('NVIDIA H100 PCIe') == 756.0
  assert bench.peak_bf16_tflops('NVIDIA H200') == 989.4
  assert bench.peak_bf16_tflops('TPU v5 lite') == 197.0
  assert bench.peak_bf16_tflops('TPU v5p') == 459.0
  assert bench.peak_bf16_tflops('cpu') is None


def test_trace_by_scope_names_every_traced_op(tmp_path):
  """benchmarks/trace_by_scope.py: each op of a traced gradient step gets a
  module and pass, fusions without metadata and XLA's reduce-windows too."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from drdd_jax import unet  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
  import trace_by_scope  # pylint: disable=g-import-not-at-top

  class Net(nn.Module):

    @nn.compact
    def __call__(self, x):
      return nn.Dense(16)(nn.silu(unet.GroupNorm(4)(x)))

  x = jnp.ones((4, 64, 64, 16))
  params = Net().init(jax.random.key(0), x)
  loss = lambda p: jnp.mean(jnp.square(Net().apply(p, x)))
  def grad_step(p):
    return jax.grad(loss)(p)
  compiled = jax.jit(grad_step).lower(params).compile(unet.compiler_options())
  names = trace_by_scope.op_names(compiled.as_text())
  jax.block_until_ready(compiled(params))
  with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
    jax.block_until_ready(compiled(params))
  times = trace_by_scope.op_times(bench.trace_events(str(tmp_path)),
                                  'grad_step')
  assert times and set(times) <= set(names)
  scopes = {trace_by_scope.scope(names[op]) for op in times}
  assert {'GroupNorm fwd', 'GroupNorm bwd', 'Dense bwd'} <= scopes
  # The rewrite of the pixel sums into reduce-windows (no metadata of their
  # own) is among the named ops.
  assert any('reduce-window' in op for op in times)


@pytest.mark.parametrize('remat', [False, True])  # True: inside custom_vjp
def test_conv_budget_finds_every_convolution(remat):
  """benchmarks/conv_budget.py: one convolution per 4-D kernel, at the
  shapes of the pass (the stem, the downsampling levels and the upsampling
  convolution checked). An upsampling 3x3 kernel runs as one 2x2
  convolution with 4x the outputs (`unet.upsample_conv`); a linear
  attention convolves with the q and k columns of its qkv kernel (`Conv_0`)
  and folds its output projection (`Conv_1`) into a matmul."""
  import jax  # pylint: disable=g-import-not-at-top
  import configs.aio5 as aio5  # pylint: disable=g-import-not-at-top
  from drdd_jax import train, unet  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
  import conv_budget  # pylint: disable=g-import-not-at-top
  config = aio5.get_config('tiny')
  config.model.remat = remat
  convs = conv_budget.network_convolutions(config, 2, 16)
  model = train.create_model(config)
  params = jax.eval_shape(lambda r: unet.init_params(model, r),
                          jax.random.key(0))
  kernels = []
  for path, k in jax.tree_util.tree_leaves_with_path(params):
    name = jax.tree_util.keystr(path)
    if k.ndim != 4 or 'LinearAttention' in name and 'Conv_1' in name:
      continue
    qk = 'LinearAttention' in name and 'Conv_0' in name
    kernels.append(k.shape[:3] + (k.shape[3] * 2 // 3,) if qk else k.shape)
  assert sum(convs.values()) == len(kernels)
  as_param = lambda k: (3, 3, k[2], k[3] // 4) if k[0] == 2 else k
  found = [as_param(rhs) for (_, rhs, _), n in convs.items()
           for _ in range(n)]
  assert sorted(found) == sorted(kernels)
  base = config.model.base_channels
  assert ((2, 16, 16, 6), (7, 7, 6, base), ((3, 3), (3, 3))) in convs
  assert ((2, 8, 8, 2 * base), (2, 2, 2 * base, 4 * base),
          ((1, 1), (1, 1))) in convs
  assert {lhs[1] for lhs, _, _ in convs} == {16, 8}


def test_cpu_profile_sorts_samples_by_kernel_kind():
  """benchmarks/cpu_profile.py: `perf script` sample lines summed by kind
  (the convolution's weight gradient tasks are not GroupNorm's `Grad`)."""
  sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
  import cpu_profile  # pylint: disable=g-import-not-at-top
  so = '/x/drdd_jax/_bf16_conv.cpython-311-x86_64-linux-gnu.so'
  lines = [
      f'  7f01 (anonymous namespace)::Tile<6, 4, false, unsigned short> ({so})',
      f'  7f02 (anonymous namespace)::AmxBlock<2> ({so})',
      f'  7f03 (anonymous namespace)::Interleave<float> ({so})',
      f'  7f04 (anonymous namespace)::HeadSoftmax ({so})',
      f'  7f05 (anonymous namespace)::Grad<float>(xla::ffi::ThreadPool&, '
      f'unsigned short const*)::{{lambda(long)#1}}::operator() ({so})',
      f'  7f06 (anonymous namespace)::WeightGrad<float, float>::{{lambda}} '
      f'({so})',
      '  7f07 [unknown] (/tmp/perf-8007.map)',
      '  7f08 [unknown] (/tmp/perf-8007.map)',
      '  7f09 memcpy (/usr/lib/x86_64-linux-gnu/libc.so.6)',
      '  7f0a ynn::dot_fp32 (/v/jaxlib/libjax_common.so)',
      'not a sample line']
  shares = cpu_profile.by_kind('\n'.join(lines))
  assert shares['conv tiles'] == 20.0
  assert shares['conv packing, padding, rounding'] == 10.0
  assert shares['linear attention kernels'] == 10.0
  assert shares['GroupNorm gradient kernels'] == 10.0
  assert shares['kernels, other (task set-up)'] == 10.0
  assert shares["XLA's generated code"] == 20.0
  assert shares['libc'] == shares['libjax_common.so'] == 10.0
  assert sum(shares.values()) == pytest.approx(100)
  assert cpu_profile.top_symbols('\n'.join(lines), 1) == [
      ('perf-8007.map [unknown]', 20.0)]
