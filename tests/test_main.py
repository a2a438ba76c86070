"""The command line end to end: train, export, restore a folder, SIGTERM."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
from PIL import Image
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*flags, cache, check=True, **kwargs):
  cmd = [sys.executable, '-m', 'drdd_jax.main', '--config=configs/aio5.py:tiny',
         f'--config.data.cache_dir={cache}', '--config.eval.at_end=False',
         *flags]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                        timeout=600, check=False, **kwargs)
  if check:
    assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


@pytest.mark.slow
def test_train_export_restore_folder(tmp_path):
  cache, workdir = tmp_path / 'cache', tmp_path / 'run'
  _main(f'--workdir={workdir}', cache=cache)
  _main(f'--workdir={workdir}', '--mode=export', cache=cache)
  assert (workdir / 'export' / 'config.json').exists()

  inputs, outputs = tmp_path / 'in', tmp_path / 'out'
  inputs.mkdir()
  rng = np.random.default_rng(0)
  sizes = {'small.png': (40, 56), 'large.jpg': (150, 170)}  # large > tile 64
  for name, (h, w) in sizes.items():
    Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(
        inputs / name)
  (inputs / 'bad.png').write_bytes(b'not an image at all')
  proc = _main(f'--workdir={workdir}', '--mode=restore',
               f'--input_dir={inputs}', f'--output_dir={outputs}',
               cache=cache, check=False)
  assert proc.returncode == 1
  assert 'bad.png' in proc.stderr
  for name, (h, w) in sizes.items():
    with Image.open(outputs / name) as im:
      assert im.size == (w, h)
  assert not (outputs / 'bad.png').exists()


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_stops(tmp_path):
  cache, workdir = tmp_path / 'cache', tmp_path / 'run'
  cmd = [sys.executable, '-m', 'drdd_jax.main', '--config=configs/aio5.py:tiny',
         f'--config.data.cache_dir={cache}', f'--workdir={workdir}',
         '--config.training.num_steps=100000',
         '--config.training.checkpoint_every=100000']
  proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 400
  for line in proc.stderr:
    if 'step 2/100000' in line or time.time() > deadline:
      break
  proc.send_signal(signal.SIGTERM)
  rest = proc.stderr.read()
  assert proc.wait(timeout=120) == 0, rest[-3000:]
  assert 'Stopped at step' in rest
  steps = [int(d) for d in os.listdir(workdir / 'checkpoints') if d.isdigit()]
  assert steps and 2 <= max(steps) < 100000
