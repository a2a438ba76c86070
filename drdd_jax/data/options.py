"""The `data` config group, parsed and checked once, and the error it raises.

Every bad value is reported by its config field (`data.tasks: ...`) before any
folder is read, so a typo never surfaces as a crash inside a worker.
"""
import os
from typing import Any

TASKS = ('lowlight', 'derain', 'denoise', 'deblur', 'dehaze')
SOURCES = ('aio5', 'embedded')


class DataError(ValueError):
  """A bad data config value, folder or image; the message names it."""


def task_names(config: Any) -> list[str]:
  """Returns the tasks in use (`data.tasks`), in config order."""
  names = [t.strip() for t in str(config.tasks).split(',') if t.strip()]
  if not names:
    raise DataError('data.tasks: no task given (known: %s)' % ', '.join(TASKS))
  for name in names:
    if name not in TASKS:
      raise DataError(f"data.tasks: unknown task '{name}' (known: "
                      f"{', '.join(TASKS)})")
  if len(set(names)) != len(names):
    raise DataError(f'data.tasks: a task is listed twice in {config.tasks!r}')
  return names


def task_shares(config: Any) -> dict[str, float]:
  """Returns `{task: share}` for the tasks in use; '' means equal shares."""
  tasks = task_names(config)
  text = str(config.task_shares).strip()
  if not text:
    return {t: 1.0 for t in tasks}
  shares = {}
  for entry in text.split(','):
    name, sep, value = entry.strip().partition(':')
    try:
      share = float(value)
    except ValueError:
      share = -1.0
    if not sep or share < 0:
      raise DataError(f'data.task_shares: {entry.strip()!r} is not '
                      "'task:share' with a share >= 0")
    if name not in TASKS:
      raise DataError(f"data.task_shares: unknown task '{name}' (known: "
                      f"{', '.join(TASKS)})")
    shares[name] = share
  missing = [t for t in tasks if t not in shares]
  if missing:
    raise DataError(f'data.task_shares: no share for {", ".join(missing)} '
                    "(write 'task:0' to train a task's targets only)")
  shares = {t: shares[t] for t in tasks}
  if not any(shares.values()):
    raise DataError('data.task_shares: all shares of the tasks in use are 0')
  return shares


def batch_counts(shares: dict[str, float], batch_size: int) -> dict[str, int]:
  """Splits `batch_size` over the tasks by largest remainder.

  The counts sum to `batch_size` exactly and depend only on the shares, so
  every step and every host has the same batch layout. Ties go to the task
  listed first.

  Args:
    shares: `{task: share}` in config order.
    batch_size: the (local) number of examples to split.

  Returns:
    `{task: count}` for the same tasks (a count may be 0).
  """
  total = sum(shares.values())
  quotas = {t: batch_size * s / total for t, s in shares.items()}
  counts = {t: int(q) for t, q in quotas.items()}
  order = sorted(shares, key=lambda t: -(quotas[t] - counts[t]))
  for t in order[:batch_size - sum(counts.values())]:
    counts[t] += 1
  return counts


def cache_root(config: Any) -> str:
  """`data.cache_dir`, or `$DRDD_JAX_CACHE`, or `~/.cache/drdd_jax`."""
  path = (config.cache_dir or os.environ.get('DRDD_JAX_CACHE') or
          os.path.join('~', '.cache', 'drdd_jax'))
  return os.path.abspath(os.path.expanduser(path))


def unpaired_dirs(config: Any) -> list[str]:
  """`data.unpaired_dirs` as absolute paths; relative ones are under root."""
  dirs = []
  for entry in str(config.unpaired_dirs).split(','):
    entry = os.path.expanduser(entry.strip())
    if entry:
      base = os.path.expanduser(config.root) if config.root else os.getcwd()
      dirs.append(os.path.abspath(os.path.join(base, entry)))
  return dirs


def check(config: Any) -> None:
  """Raises DataError naming the first bad field of the `data` group."""
  if config.source not in SOURCES:
    raise DataError(f'data.source: unknown source {config.source!r} (known: '
                    f"{', '.join(SOURCES)})")
  if config.source == 'aio5':
    if not config.root:
      raise DataError("data.root: empty; set it to the folder holding the "
                      "AiO5 datasets (see docs/data.md) or use "
                      "data.source='embedded'")
    if not os.path.isdir(os.path.expanduser(config.root)):
      raise DataError(f'data.root: no such folder: {config.root}')
  task_shares(config)
  if not 0 < config.paired_fraction <= 1:
    raise DataError('data.paired_fraction: must be in (0, 1], got '
                    f'{config.paired_fraction}')
  for field, low in (('crop_size', 1), ('num_workers', 0), ('seed', 0),
                     ('max_size', 0), ('embedded_variants', 1)):
    value = config.get(field, low)
    if not isinstance(value, int) or value < low:
      raise DataError(f'data.{field}: must be an integer >= {low}, got '
                      f'{value!r}')
  for path in unpaired_dirs(config):
    if not os.path.isdir(path):
      raise DataError(f'data.unpaired_dirs: no such folder: {path}')
