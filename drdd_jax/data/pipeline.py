"""The training batches and evaluation images, from tfds data sources via grain.

One grain stream per task draws that task's share of the residual batch;
one more stream draws the noise batch from the target pool (every distinct
target of the full paired train sets, plus `data.unpaired_dirs`). Each stream
is sharded by process, shuffled afresh every epoch, randomly cropped and
flipped, then all are zipped into one batch. Every random choice is seeded
from `data.seed` and the element's index, so the sequence is the same on
every run and for any `data.num_workers`.
"""
import json
from typing import Any

from absl import flags
from absl import logging
import grain
import numpy as np

from drdd_jax.data import builder
from drdd_jax.data import degrade
from drdd_jax.data import embedded
from drdd_jax.data import images
from drdd_jax.data import layouts
from drdd_jax.data import options
from drdd_jax.data.options import DataError
from drdd_jax.data.options import TASKS


def dataset(config: Any, task: str):
  """The built dataset (a tfds builder) of one task; built on first use."""
  if task not in TASKS:
    raise DataError(f"unknown task '{task}' (known: {', '.join(TASKS)})")
  if config.source == 'embedded':
    plan = embedded.embedded_plan(task, config.max_size,
                                  config.get('embedded_variants', 4))
  else:
    plan = layouts.aio5_plan(config.root, task)
  return builder.load(plan, options.cache_root(config))


def pool_parts(config: Any, paired: dict) -> list[tuple[Any, list[int]]]:
  """The noise pool: (dataset, train record indices), distinct targets only.

  Args:
    config: the `data` config group.
    paired: `{task: dataset}` of the tasks in use.

  Returns:
    One entry per paired task, then one per unpaired folder; an image that
    several datasets share (the embedded photos, a folder given twice) is
    counted once.
  """
  unpaired = [builder.load(layouts.unpaired_plan(d), options.cache_root(config))
              for d in options.unpaired_dirs(config)]
  parts, seen = [], set()
  for ds in list(paired.values()) + unpaired:
    indices = []
    for i, digest in ds.info.metadata['train']['pool']:
      if digest not in seen:
        seen.add(digest)
        indices.append(i)
    if indices:
      parts.append((ds, indices))
  return parts


def paired_count(config: Any, ds) -> int:
  """How many train pairs `data.paired_fraction` keeps (a stored prefix)."""
  n = ds.info.metadata['train']['count']
  return max(1, int(config.paired_fraction * n + 0.5))  # Half rounds up.


class _Subset(grain.sources.RandomAccessDataSource):
  """Some records of a data source, by index."""

  def __init__(self, source, indices):
    self._source, self._indices = source, np.asarray(indices)

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, index):
    return self._source[int(self._indices[index])]


class _Crop(grain.transforms.RandomMap):
  """Decodes the images of a record and takes one random crop, maybe flipped."""

  def __init__(self, size: int, keys: tuple[str, ...]):
    self._size, self._keys = size, keys

  def random_map(self, record, rng: np.random.Generator):
    out = {k: images.decode(record[k]) for k in self._keys}
    h, w = out[self._keys[0]].shape[:2]
    if min(h, w) < self._size:  # Checked up front; this is a last guard.
      raise DataError(f'data.crop_size={self._size} is larger than '
                      f'{record["name"]!r} ({h}x{w})')
    y = rng.integers(0, h - self._size + 1)
    x = rng.integers(0, w - self._size + 1)
    step = -1 if rng.random() < 0.5 else 1  # Horizontal flip.
    for k in self._keys:
      out[k] = out[k][y:y + self._size, x:x + self._size][:, ::step]
    if 'input' in self._keys:
      out['task'] = np.int32(record['task'])
    return out


class _Assemble(grain.transforms.Map):
  """Zipped per-task batches -> the training loop's batch dict."""

  def __init__(self, crop: int, noise: bool):
    self._crop, self._noise = crop, noise

  def map(self, parts):
    residual = parts[:-1] if self._noise else parts
    batch = {'residual': {k: np.concatenate([p[k] for p in residual])
                          for k in ('input', 'target', 'task')}}
    noise = (parts[-1]['target'] if self._noise else
             np.zeros((0, self._crop, self._crop, 3), np.uint8))
    batch['noise'] = {'target': noise}
    return batch


def _stream(ds: grain.MapDataset, count: int, size: int, keys, shard,
            seed: int) -> grain.MapDataset:
  """Batches of `count` random crops from this process's shard of `ds`."""
  ds = ds[shard.shard_index::shard.shard_count]
  ds = ds.shuffle(seed=seed).repeat()  # Reshuffled every epoch.
  ds = ds.random_map(_Crop(size, keys), seed=(seed + 1) % 2**32)
  # drop_remainder: integer lengths (a float ceil overflows on sys.maxsize).
  return ds.batch(count, drop_remainder=True)


def _check_crop(config: Any, ds) -> None:
  meta = ds.info.metadata['train']
  h, w = meta['min_hw']
  if min(h, w) < config.crop_size:
    raise DataError(f'data.crop_size={config.crop_size} is larger than '
                    f"{meta['min_name']!r} ({h}x{w}) in {ds.data_dir}")


class TrainIterator:
  """Yields training batches; its state is checkpointable like grain's.

  `get_state`/`set_state` exchange JSON bytes, as `grain.DataLoaderIterator`
  does, so `grain.checkpoint.CheckpointSave/CheckpointRestore` work with it.
  """

  def __init__(self, ds: grain.IterDataset):
    self._iterator = iter(ds)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return next(self._iterator)

  def get_state(self) -> bytes:
    return json.dumps(self._iterator.get_state()).encode()

  def set_state(self, state: bytes) -> None:
    self._iterator.set_state(json.loads(state))

  def start_prefetch(self) -> None:
    """Called by grain's checkpoint handler after a restore."""
    start = getattr(self._iterator, 'start_prefetch', None)
    if start:
      start()

  def close(self) -> None:
    close = getattr(self._iterator, 'close', None)
    if close:
      close()


def create_train_iterator(config: Any, batch_size: int, noise_batch_size: int,
                          *, shard_index: int | None = None,
                          shard_count: int | None = None) -> TrainIterator:
  """The training batches of this process.

  Args:
    config: the `data` config group.
    batch_size: global number of pairs per step (split over the tasks by
      `data.task_shares`).
    noise_batch_size: global number of pool targets per step (0: none).
    shard_index: this process; default `jax.process_index()`.
    shard_count: the number of processes; default `jax.process_count()`.

  Returns:
    An iterator of `{'residual': {'input', 'target': uint8[b, c, c, 3],
    'task': int32[b]}, 'noise': {'target': uint8[bn, c, c, 3]}}`, with the
    local sizes `b = batch_size // shard_count`, `bn = noise_batch_size //
    shard_count` and `c = data.crop_size`; `task` indexes `TASKS`.
  """
  options.check(config)
  if shard_index is None:
    shard = grain.sharding.ShardByJaxProcess()
  else:
    shard = grain.sharding.ShardOptions(shard_index, shard_count or 1)
  n = shard.shard_count
  if batch_size < n or batch_size % n or noise_batch_size % n:
    raise DataError(f'batch_size={batch_size} (global) must be a positive '
                    f'multiple of the process count {n}, and noise_batch_size='
                    f'{noise_batch_size} a multiple')
  counts = options.batch_counts(options.task_shares(config), batch_size // n)
  paired = {t: dataset(config, t) for t in options.task_names(config)}
  crop, streams = config.crop_size, []
  for task, count in counts.items():
    if not count:
      logging.warning('Task %s gets none of the %d pairs of the local '
                      'batch; raise the batch size or its share', task,
                      batch_size // n)
      continue
    ds = paired[task]
    _check_crop(config, ds)
    kept = paired_count(config, ds)
    if kept < n:
      raise DataError(f'data.paired_fraction={config.paired_fraction} keeps '
                      f'{kept} {task} pair(s), fewer than the {n} processes')
    source = grain.MapDataset.source(ds.as_data_source('train'))[:kept]
    streams.append(_stream(source, count, crop, ('input', 'target'), shard,
                           _seed(config, 'pairs', task, shard.shard_index)))
  if noise_batch_size:
    parts = pool_parts(config, paired)
    for ds, _ in parts:
      _check_crop(config, ds)
    if sum(len(idx) for _, idx in parts) < n:
      raise DataError(f'the noise pool has fewer targets than the {n} '
                      'processes; add data.unpaired_dirs')
    pool = grain.MapDataset.concatenate([
        grain.MapDataset.source(_Subset(ds.as_data_source('train'), idx))
        for ds, idx in parts])
    streams.append(_stream(pool, noise_batch_size // n, crop, ('target',),
                           shard, _seed(config, 'pool', shard.shard_index)))
  length = min(len(s) for s in streams)
  ds = grain.experimental.ZipMapDataset([s[:length] for s in streams])
  ds = ds.map(_Assemble(crop, noise=bool(noise_batch_size)))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=4,
                                            prefetch_buffer_size=8))
  if config.num_workers:
    _mark_flags_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=config.num_workers))
  return TrainIterator(it)


def _seed(config: Any, *parts) -> int:
  return degrade.seed_of('pipeline', config.seed, *parts)


def _mark_flags_parsed() -> None:
  """Grain's worker processes read absl flags, which pytest never parses."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def load_eval_split(config: Any, task: str) -> list[dict]:
  """The full test images of `task`, sorted by name.

  Returns:
    `[{'name': str, 'input': uint8[H, W, 3], 'target': uint8[H, W, 3]}]`.
  """
  options.check(config)
  source = dataset(config, task).as_data_source('test')
  records = source.__getitems__(range(len(source)))
  out = [dict(name=r['name'].decode(), input=images.decode(r['input']),
              target=images.decode(r['target'])) for r in records]
  return sorted(out, key=lambda r: r['name'])

