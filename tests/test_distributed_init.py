"""Tests for drdd_jax.distributed: real two-process runs on the CPU backend."""
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import pytest

import conftest

from drdd_jax import distributed

REPO = pathlib.Path(__file__).resolve().parents[1]

# Each process owns 2 CPU devices; together they fill a 1-D mesh of 4.
WORKER = textwrap.dedent("""
    import os, sys
    from drdd_jax import distributed
    mode, pid, port = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    distributed.initialize(f'127.0.0.1:{port}', 2, pid,
                           heartbeat_timeout_s=5, init_timeout_s=30)
    distributed.initialize(f'127.0.0.1:{port}', 2, pid)  # A no-op.
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    distributed.log_topology()
    if mode == 'die' and pid == 1:
      os._exit(0)
    mesh = jax.make_mesh((4,), ('data',))
    local = np.arange(2, dtype=np.float32) + 2 * pid + 1  # [1,2] and [3,4].
    x = jax.make_array_from_process_local_data(
        NamedSharding(mesh, P('data')), local, (4,))
    total = jax.jit(lambda a: a.sum(),
                    out_shardings=NamedSharding(mesh, P()))(x)
    print('RESULT', jax.process_count(), jax.device_count(), float(total),
          flush=True)
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _run_two(tmp_path, mode: str, timeout: float):
  """Runs the worker as processes 0 and 1; returns [(returncode, output)]."""
  script = tmp_path / 'worker.py'
  script.write_text(WORKER)
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO),
             XLA_FLAGS=conftest.xla_flags(2))
  for k in ('DRDD_COORDINATOR_ADDRESS', 'DRDD_NUM_PROCESSES',
            'DRDD_PROCESS_ID'):
    env.pop(k, None)
  port = str(_free_port())
  procs = [subprocess.Popen([sys.executable, str(script), mode, str(i), port],
                            env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  results = []
  try:
    for p in procs:
      out, _ = p.communicate(timeout=timeout)
      results.append((p.returncode, out))
  finally:
    for p in procs:
      p.kill()
  return results


def test_single_process_is_a_noop(monkeypatch):
  for k in ('DRDD_COORDINATOR_ADDRESS', 'DRDD_NUM_PROCESSES', 'DRDD_PROCESS_ID',
            'DRDD_DISTRIBUTED', 'SLURM_JOB_ID', 'OMPI_COMM_WORLD_SIZE',
            'TPU_WORKER_HOSTNAMES', 'TPU_PROCESS_ADDRESSES'):
    monkeypatch.delenv(k, raising=False)
  assert not distributed.cluster_detected()
  distributed.initialize()
  distributed.initialize('127.0.0.1:1', 1, 0)
  import jax  # pylint: disable=g-import-not-at-top
  assert not jax.distributed.is_initialized()


def test_cluster_detection(monkeypatch):
  monkeypatch.setenv('SLURM_JOB_ID', '7')
  monkeypatch.setenv('SLURM_NTASKS', '1')
  assert not distributed.cluster_detected()
  monkeypatch.setenv('SLURM_NTASKS', '8')
  assert distributed.cluster_detected()


def test_partial_arguments_are_rejected(monkeypatch):
  with pytest.raises(ValueError, match='go together'):
    distributed.initialize('127.0.0.1:1234')
  monkeypatch.setenv('DRDD_NUM_PROCESSES', '2')  # Env vars count as flags.
  with pytest.raises(ValueError, match='go together'):
    distributed.initialize()


@pytest.mark.slow
def test_two_processes_sum_a_global_array(tmp_path):
  for returncode, out in _run_two(tmp_path, 'ok', timeout=120):
    assert returncode == 0, out
    assert 'RESULT 2 4 10.0' in out, out


@pytest.mark.slow
def test_dead_peer_fails_the_survivor_in_bounded_time(tmp_path):
  # Heartbeat timeout is 5 s: process 0 must abort well before the 120 s cap
  # (a hang raises subprocess.TimeoutExpired and fails the test).
  (rc0, out0), (rc1, _) = _run_two(tmp_path, 'die', timeout=120)
  assert rc1 == 0
  assert rc0 != 0, out0
  assert 'stopped sending heartbeats' in out0, out0
