"""Builds the datasets of a config and prints what they hold.

  python -m drdd_jax.data --config=configs/aio5.py:tiny
  python -m drdd_jax.data --config=configs/aio5.py --config.data.root=/data/aio5
"""
import sys

from absl import app
from ml_collections import config_flags

from drdd_jax.data import options
from drdd_jax.data import pipeline

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.')


def summary(config) -> str:
  """Builds every dataset `config` (the data group) uses; returns a table."""
  options.check(config)
  paired = {t: pipeline.dataset(config, t) for t in options.task_names(config)}
  rows = [('task', 'train', 'kept', 'test', 'train HxW (min..max)',
           'test HxW (min..max)', 'cache')]
  for task, ds in paired.items():
    train, test = ds.info.metadata['train'], ds.info.metadata['test']
    rows.append((task, train['count'], pipeline.paired_count(config, ds),
                 test['count'], _sizes(train), _sizes(test), ds.data_dir))
  widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
  lines = ['  '.join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip()
           for r in rows]
  parts = pipeline.pool_parts(config, paired)
  unpaired = len(options.unpaired_dirs(config))
  lines.append(f'noise pool: {sum(len(i) for _, i in parts)} distinct targets '
               f'({len(paired)} paired sets + {unpaired} unpaired folders)')
  lines.append(f'paired_fraction: {config.paired_fraction}; cache root: '
               f'{options.cache_root(config)}')
  return '\n'.join(lines)


def _sizes(meta: dict) -> str:
  (h, w), (mh, mw) = meta['min_hw'], meta['max_hw']
  return f'{h}x{w}..{mh}x{mw}'


def main(argv):
  del argv
  if _CONFIG.value is None:
    raise app.UsageError('--config is required')
  try:
    print(summary(_CONFIG.value.data))
  except options.DataError as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main)
