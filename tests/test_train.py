"""`train.train_and_evaluate` end to end on the tiny config (CPU, 8 fake
devices): checkpoints, events, evaluation, export, resume, the non-finite
guard and config errors. The train step's own equivalences are in
test_train_step.py."""
import glob
import json
import os

import jax
import numpy as np
import pytest

from conftest import tiny_config
from drdd_jax import checkpoints
from drdd_jax import data as data_lib
from drdd_jax import evaluate
from drdd_jax import train


@pytest.fixture(scope='module')
def trained(tmp_path_factory, cache):
  """Two steps of `train_and_evaluate` (with the final evaluation)."""
  workdir = str(tmp_path_factory.mktemp('run'))
  config = tiny_config(cache, **{'eval.at_end': True})
  state = train.train_and_evaluate(config, workdir)
  return config, workdir, state


@pytest.mark.slow
def test_train_writes_checkpoint_events_and_eval_table(trained):
  config, workdir, state = trained
  assert int(state.step) == 2
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '2', 'state'))
  assert glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))
  with open(os.path.join(workdir, 'eval', 'latest.json')) as f:
    results = json.load(f)
  rows = set(results['model'])
  assert rows == set(data_lib.TASKS) | {'average'}
  table = open(os.path.join(workdir, 'eval', 'latest.md')).read()
  for task in data_lib.TASKS:
    assert f'| {task} |' in table
  assert os.path.exists(os.path.join(workdir, 'eval', 'grid_derain.png'))


@pytest.mark.slow
def test_export_then_reload_gives_identical_samples(trained, tmp_path):
  config, workdir, state = trained
  path = checkpoints.export(str(tmp_path), state.ema_params, config)
  exported_config, params = checkpoints.load_export(path)
  assert exported_config.model.channel_mults == config.model.channel_mults
  assert 'opt_state' not in params
  y = np.random.default_rng(0).integers(0, 256, (24, 40, 3), np.uint8)
  a = evaluate.make_restore_image(config, state.ema_params)(y)
  b = evaluate.make_restore_image(exported_config, params)(y)
  np.testing.assert_array_equal(a, b)
  # The checkpoint's EMA params reload the same way.
  ema, step = train.load_ema_params(config, workdir)
  assert step == 2
  jax.tree.map(np.testing.assert_array_equal, ema, params)


@pytest.mark.slow
def test_resume_is_identical_to_uninterrupted(tmp_path, cache):
  straight = train.train_and_evaluate(
      tiny_config(cache, **{'training.num_steps': 4}), str(tmp_path / 'a'))
  train.train_and_evaluate(tiny_config(cache, **{'training.num_steps': 2}),
                           str(tmp_path / 'b'))
  resumed = train.train_and_evaluate(tiny_config(cache, **{'training.num_steps': 4}),
                                     str(tmp_path / 'b'))
  assert int(resumed.step) == 4
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(straight.params),
               jax.device_get(resumed.params))
  # Same data order: the saved iterator positions agree too.
  state = lambda d: sorted(glob.glob(str(tmp_path / d / 'checkpoints' / '4' /
                                         'data' / 'process_*.json')))
  assert state('a') and [open(f).read() for f in state('a')] == [
      open(f).read() for f in state('b')]


@pytest.mark.slow
def test_nan_guard_stops_and_keeps_last_checkpoint(tmp_path, cache):
  workdir = str(tmp_path)
  train.train_and_evaluate(tiny_config(cache), workdir)
  bad = tiny_config(cache, **{'training.num_steps': 4, 'diffusion.w_res': float('nan')})
  with pytest.raises(train.NonFiniteError, match='step 3'):
    train.train_and_evaluate(bad, workdir)
  params, step = train.load_ema_params(tiny_config(cache), workdir)
  assert step == 2
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


@pytest.mark.parametrize('field, value, match', [
    ('data.tasks', 'lowlight,snow', 'snow'),
    ('training.batch_size', -4, 'training.batch_size'),
    ('training.batch_size', 12, 'training.batch_size'),  # 8 devices
    ('training.microbatches', 3, 'training.microbatches=3'),  # 8 / (8 * 3)
    ('training.microbatches', 0, 'training.microbatches'),
    ('data.crop_size', 4096, 'data.crop_size'),
    ('diffusion.method', 'ddpm', 'diffusion.method'),
    ('sampling.n_res', 0, 'sampling.n_res'),
])
def test_bad_config_values_name_the_field(tmp_path, cache, field, value, match):
  with pytest.raises(ValueError, match=match):
    train.train_and_evaluate(tiny_config(cache, **{field: value}), str(tmp_path))
