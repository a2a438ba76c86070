"""Examples per second of the training pipeline, one JSON line per setting.

  python benchmarks/data_pipeline.py [--workers=0,2] [--steps=20] \
      [--config=configs/aio5.py --config.data.source=embedded]

Counts residual pairs plus noise targets; the first batch (worker start-up,
first decode) is timed apart as `first_batch_s`. Datasets missing from the
cache are built before any timing.
"""
import json
import os
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from drdd_jax import data
from drdd_jax.data import pipeline

_CONFIG = config_flags.DEFINE_config_file(
    'config', os.path.join(os.path.dirname(__file__), '..', 'configs',
                           'aio5.py'), 'Config file.')
_WORKERS = flags.DEFINE_list('workers', ['0', '2'], 'data.num_workers values.')
_STEPS = flags.DEFINE_integer('steps', 20, 'Batches timed per setting.')
_BATCH = flags.DEFINE_integer('batch_size', 16, 'Global residual batch.')
_NOISE_BATCH = flags.DEFINE_integer('noise_batch_size', 16,
                                    'Global noise batch.')


def main(argv):
  del argv
  config = _CONFIG.value.data
  if config.source == 'aio5' and not config.root:
    config.source = 'embedded'  # Offline by default.
  config.crop_size = 128
  for task in data.task_names(config):  # Build outside the timings.
    pipeline.dataset(config, task)
  for workers in _WORKERS.value:
    config.num_workers = int(workers)
    start = time.perf_counter()
    it = data.create_train_iterator(config, _BATCH.value, _NOISE_BATCH.value)
    next(it)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(_STEPS.value):
      next(it)
    seconds = time.perf_counter() - start
    it.close()
    examples = _STEPS.value * (_BATCH.value + _NOISE_BATCH.value)
    print(json.dumps(dict(
        source=config.source, crop_size=config.crop_size,
        num_workers=config.num_workers, batch_size=_BATCH.value,
        noise_batch_size=_NOISE_BATCH.value, steps=_STEPS.value,
        examples_per_s=round(examples / seconds, 1),
        first_batch_s=round(first, 2), cpus=os.cpu_count())), flush=True)


if __name__ == '__main__':
  app.run(main)
