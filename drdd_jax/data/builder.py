"""A tfds builder for image pairs, and the fingerprinted cache that runs it.

Each `Plan` (layouts.py, embedded.py) becomes one tfds dataset of ArrayRecord
files with the features `input`, `target` (encoded image bytes; b'' for
unpaired targets), `name` and `task`. No TensorFlow is needed to build or
read it. A dataset lives in `<cache>/<plan name>-<fingerprint>/`, where the
fingerprint covers the builder version, the plan and every source file's
name, size and mtime: editing a folder gives a new fingerprint and so a
rebuild. It is built in a temporary folder and renamed into place, so
processes that race to build it all end up reading one complete copy.

Train records are stored in the order of a hash of their names, so
`data.paired_fraction` keeps a prefix: the same subset on every run and host
count, and the 25% subset inside the 50% one. Test records are sorted by name.
"""
import collections
from concurrent import futures
import functools
import hashlib
import json
import os
import shutil
import tempfile

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from drdd_jax.data import degrade
from drdd_jax.data import images
from drdd_jax.data.layouts import Example
from drdd_jax.data.layouts import Plan
from drdd_jax.data.options import DataError

# Bump when records or degradations change, so old caches are not reused.
VERSION = '1.0.0'


class PairedImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Builds the records of one plan (read back with `load`)."""

  VERSION = tfds.core.Version(VERSION)
  # tfds looks for a checksums file next to the code, through a module
  # (`importlib_resources`) it only installs for Python < 3.9; this builder
  # downloads nothing, so it has no such file.
  code_path = None

  def __init__(self, *, plan: Plan, **kwargs):
    self._plan = plan
    # Targets repeat (the embedded photos, RESIDE's clear images): keep a few
    # decoded, for this build only (a later build may see edited files).
    self._load_target = functools.lru_cache(maxsize=32)(images.load)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    image = tfds.features.Tensor(shape=(), dtype=np.object_)
    return tfds.core.DatasetInfo(
        builder=self,
        description='Image pairs (encoded bytes) of one DRDD task.',
        features=tfds.features.FeaturesDict({
            'input': image, 'target': image, 'name': tfds.features.Text(),
            'task': tfds.features.Scalar(dtype=np.int32)}),
        # Records go in our order (see the module docstring), not tfds's.
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    del dl_manager
    return {s: self._generate_examples(s) for s in self._plan.splits}

  def _generate_examples(self, split: str):
    examples = sorted(self._plan.splits[split], key=(
        _hash_order if split == 'train' else lambda e: e.name))
    names = [e.name for e in examples]
    if len(set(names)) != len(names):
      dup = collections.Counter(names).most_common(1)[0][0]
      clash = [e.input or e.target for e in examples if e.name == dup]
      raise DataError(f'{clash[0]} and {clash[1]}: same example name {dup!r}')
    pool, seen, sizes = [], set(), []
    records = _ordered_map(self._record, examples)
    for i, (record, digest, shape) in enumerate(records):
      if digest not in seen:
        seen.add(digest)
        pool.append([i, digest])
      sizes.append(shape)
      yield i, record
    sizes = np.array(sizes).reshape(-1, 2)
    smallest = int(np.argmin(sizes.min(axis=1)))
    self.info.metadata[split] = dict(
        count=len(examples), pool=pool, max_hw=sizes.max(axis=0).tolist(),
        min_hw=sizes[smallest].tolist(), min_name=names[smallest])

  def _record(self, e: Example):
    """Reads (or synthesises) one example; all checks happen here."""
    target, target_bytes = self._load_target(e.target, self._plan.max_size)
    input_bytes = b''
    if e.input:
      pixels, input_bytes = images.load(e.input, self._plan.max_size)
      if pixels.shape != target.shape:
        raise DataError(
            f'{e.input}: size {pixels.shape[1]}x{pixels.shape[0]} differs '
            f'from its target {e.target} ({target.shape[1]}x'
            f'{target.shape[0]}); crop or resize one of them')
    elif e.synth:
      input_bytes = images.encode(degrade.apply(e.synth, target, e.seed))
    record = dict(input=input_bytes, target=target_bytes, name=e.name,
                  task=self._plan.task)
    return record, images.digest(target), target.shape[:2]


def _hash_order(e: Example) -> str:
  return hashlib.sha256(e.name.encode()).hexdigest()


def _ordered_map(fn, items, workers: int = min(8, os.cpu_count() or 1)):
  """`map(fn, items)` on threads (decoding releases the GIL), in order."""
  with futures.ThreadPoolExecutor(workers) as pool:
    pending = collections.deque()
    for item in items:
      pending.append(pool.submit(fn, item))
      if len(pending) >= 4 * workers:  # Bounded: large sets stay off RAM.
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()


def fingerprint(plan: Plan) -> str:
  """A hash of the plan and its files' names, sizes and mtimes."""
  h = hashlib.sha256(json.dumps(
      [VERSION, plan.name, plan.task, plan.max_size]).encode())
  for split in sorted(plan.splits):
    for e in plan.splits[split]:
      row = [split, e.name, e.synth, e.seed]
      for path in (e.input, e.target):
        if path:
          try:
            st = os.stat(path)
          except OSError as err:
            raise DataError(f'{path}: cannot read ({err})') from err
          rel = os.path.relpath(path, plan.root) if plan.root else path
          row += [rel, st.st_size, st.st_mtime_ns]
      h.update(json.dumps(row).encode())
  return h.hexdigest()[:16]


def load(plan: Plan, cache_root: str) -> tfds.core.DatasetBuilder:
  """Returns the built dataset of `plan`, building it on first use."""
  final = os.path.join(cache_root, f'{plan.name}-{fingerprint(plan)}')
  data_dir = os.path.join(final, PairedImages.name, VERSION)
  if not os.path.isdir(final):
    _build(plan, cache_root, final)
  elif not os.path.exists(os.path.join(data_dir, 'dataset_info.json')):
    raise DataError(f'{final}: incomplete dataset cache; delete the folder')
  return tfds.builder_from_directory(data_dir)


def _build(plan: Plan, cache_root: str, final: str) -> None:
  os.makedirs(cache_root, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.tmp-{os.path.basename(final)}-',
                         dir=cache_root)
  count = sum(len(v) for v in plan.splits.values())
  logging.info('Building %s (%d examples) into %s', plan.name, count, final)
  tfds.disable_progress_bar()  # One bar per split and shard floods the logs.
  try:
    builder = PairedImages(plan=plan, data_dir=tmp,
                           file_format='array_record')
    builder.download_and_prepare(download_dir=os.path.join(tmp, 'downloads'))
    shutil.rmtree(os.path.join(tmp, 'downloads'), ignore_errors=True)
    try:
      os.rename(tmp, final)
    except OSError:
      if not os.path.isdir(final):  # Else another process won the race.
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
