"""Real multi-process runs: `launch/local_multiprocess.sh` with 2 processes.

Each process has 2 CPU devices and reads only its own data shard. The result
must equal one process with one device training on the same global batch (the
two shards' batches side by side), and a fresh pair resuming from the pair's
checkpoint must continue exactly as that uninterrupted reference.
"""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import conftest

from drdd_jax import checkpoints
from drdd_jax import data as data_lib
from drdd_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(workdir, cache, num_steps):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHON=sys.executable,
             XLA_FLAGS=conftest.xla_flags(2))
  proc = subprocess.run(
      ['bash', 'launch/local_multiprocess.sh', '2',
       '--config=configs/aio5.py:tiny', f'--workdir={workdir}',
       f'--config.data.cache_dir={cache}',
       f'--config.training.num_steps={num_steps}',
       '--config.eval.at_end=False'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
      check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout + proc.stderr


def _params(config, workdir):
  mesh = train.make_mesh(config.mesh, jax.devices()[:1])
  abstract = train.abstract_state(config, train.create_model(config),
                                  train.make_optimizer(config), mesh)
  manager = checkpoints.create_manager(workdir, config.training)
  state = checkpoints.restore_latest(manager, abstract, None)
  return int(state.step), jax.device_get(state.params)


def _reference(config, num_steps):
  """One process and device, fed both shards' batches: {step: params}.

  (The 8-device and 1-device steps agree to these tolerances:
  tests/test_train.py; one device shares its program with those tests.)
  """
  mesh = train.make_mesh(config.mesh, jax.devices()[:1])
  model, tx = train.create_model(config), train.make_optimizer(config)
  state, shardings = train.create_train_state(config, model, tx, mesh)
  step_fn = train.jit_train_step(
      train.make_train_step(config, model, train.make_schedule(config)),
      shardings, mesh, leading=0)
  t = config.training
  shards = [data_lib.create_train_iterator(
      config.data, t.batch_size, t.batch_size, shard_index=i, shard_count=2)
            for i in range(2)]
  rng = jax.random.key(t.seed + 1)
  params = {}
  for step in range(1, num_steps + 1):
    local = [next(it) for it in shards]
    batch = jax.tree.map(lambda *x: np.concatenate(x), *local)
    state, _ = step_fn(state, train.global_batch(batch, mesh), rng)
    params[step] = jax.device_get(state.params)
  return params


@pytest.mark.slow
def test_two_processes_match_one_and_resume_identically(tmp_path, cache):
  workdir = str(tmp_path / 'run')
  log = _launch(workdir, cache, 2)
  assert '[0] ' in log and '[1] ' in log
  config = conftest.tiny_config(cache, **{'training.num_steps': 3})
  step, params = _params(config, workdir)
  reference = _reference(config, 3)
  assert step == 2
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  jax.tree.map(close, params, reference[2])

  # A fresh pair restores the checkpoint and continues as if uninterrupted.
  log = _launch(workdir, cache, 3)
  assert 'Restoring checkpoint of step 2' in log
  step, params = _params(config, workdir)
  assert step == 3
  jax.tree.map(close, params, reference[3])
