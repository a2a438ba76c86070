"""The grain pipeline: shards, paired_fraction, task shares, iterator state."""
import numpy as np
import orbax.checkpoint as ocp
import pytest

import grain
from drdd_jax import data
from drdd_jax.data import options
from test_data_folders import H, W, config, make_aio5, save


def solid_lol(root, n=8):
  """LOL pairs whose target is solid `10 k + 5`: a crop names its example."""
  for k in range(n):
    for side, value in (('low', 10 * k), ('high', 10 * k + 5)):
      for split in ('our485', 'eval15'):
        save(str(root / f'LOL/{split}/{side}/{k}.png'),
             np.full((H, W, 3), value, np.uint8))


def ids(batch, part='residual'):
  return [int(v) // 10 for v in batch[part]['target'][:, 0, 0, 0]]


@pytest.fixture(name='lol')
def fixture_lol(tmp_path):
  solid_lol(tmp_path / 'root')
  return config(tmp_path / 'root', tmp_path / 'cache', tasks='lowlight',
                task_shares='lowlight:1')


def seen(c, batches, shard, count, part='residual', global_batch=4):
  it = data.create_train_iterator(c, global_batch, global_batch,
                                  shard_index=shard, shard_count=count)
  return [i for _ in range(batches) for i in ids(next(it), part)]


def test_processes_get_disjoint_shards_covering_the_split(lol):
  # 8 pairs, 2 processes of 2 pairs a step: 2 steps are one epoch of a shard.
  first, second = seen(lol, 2, 0, 2), seen(lol, 2, 1, 2)
  assert len(set(first)) == len(set(second)) == 4
  assert not set(first) & set(second)
  assert set(first) | set(second) == set(range(8))
  assert seen(lol, 2, 0, 2) == first  # Same order on every run.
  # Default: one shard per JAX process (here one).
  assert len(ids(next(data.create_train_iterator(lol, 4, 0)))) == 4


def test_paired_fraction_is_one_subset_for_any_run_and_host_count(lol):
  lol.paired_fraction = 0.25
  alone = set(seen(lol, 6, 0, 1))
  assert len(alone) == 2
  assert set(seen(lol, 4, 0, 2)) | set(seen(lol, 4, 1, 2)) == alone
  assert set(seen(lol, 6, 0, 1)) == alone
  lol.paired_fraction = 0.5  # Nested: the 25% subset stays in.
  assert alone < set(seen(lol, 6, 0, 1))
  lol.paired_fraction = 0.25  # The noise pool keeps every target.
  assert set(seen(lol, 2, 0, 1, part='noise')) == set(range(8))


def test_batch_shares_follow_the_config(tmp_path):
  make_aio5(tmp_path / 'aio5')
  c = config(tmp_path / 'aio5', tmp_path / 'cache')
  shares = options.task_shares(c)
  assert shares == {'lowlight': 4, 'derain': 2, 'denoise': 2, 'deblur': 4,
                    'dehaze': 4}
  it = data.create_train_iterator(c, 32, 8, shard_index=1, shard_count=2)
  batch = next(it)
  counts = np.bincount(batch['residual']['task'], minlength=5)
  assert dict(zip(data.TASKS, counts.tolist())) == {
      t: 16 * s // 16 for t, s in shares.items()}
  assert batch['residual']['input'].shape == (16, 16, 16, 3)
  assert batch['residual']['input'].dtype == np.uint8
  assert batch['residual']['task'].dtype == np.int32
  assert batch['noise']['target'].shape == (4, 16, 16, 3)
  # Largest remainder: sums to the batch, ties to the first task listed.
  assert list(options.batch_counts(shares, 5).values()) == [1, 1, 1, 1, 1]
  assert list(options.batch_counts(shares, 7).values()) == [2, 1, 1, 2, 1]
  assert list(options.batch_counts(shares, 2).values()) == [1, 0, 0, 1, 0]


def _take(it, n):
  return [next(it) for _ in range(n)]


def _equal(a, b):
  for x, y in zip(a, b):
    for part in x:
      for k in x[part]:
        assert x[part][k].tobytes() == y[part][k].tobytes()


def test_iterator_state_restores_the_same_batches(lol, tmp_path):
  it = data.create_train_iterator(lol, 4, 2, shard_index=0, shard_count=1)
  _take(it, 3)
  state = it.get_state()
  assert isinstance(state, bytes)
  want = _take(it, 2)
  fresh = data.create_train_iterator(lol, 4, 2, shard_index=0, shard_count=1)
  fresh.set_state(state)
  _equal(_take(fresh, 2), want)
  # Through orbax, with grain's checkpoint handler.
  fresh.set_state(state)
  with ocp.CheckpointManager(tmp_path / 'ckpt') as manager:
    manager.save(3, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointSave(fresh)))
    manager.wait_until_finished()
    other = data.create_train_iterator(lol, 4, 2, shard_index=0, shard_count=1)
    manager.restore(3, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(other)))
  _equal(_take(other, 2), want)


def test_worker_processes_give_the_same_batches(lol):
  it = data.create_train_iterator(lol, 4, 2, shard_index=0, shard_count=1)
  want = _take(it, 3)
  lol.num_workers = 2
  it = data.create_train_iterator(lol, 4, 2, shard_index=0, shard_count=1)
  _equal(_take(it, 3), want)
  it.close()


def test_unpaired_dirs_join_the_noise_pool_once(lol, tmp_path):
  for k, name in ((8, 'a.png'), (9, 'sub/b.png'), (0, 'copy_of_0.png')):
    save(str(tmp_path / 'clean' / name),
         np.full((H, W, 3), 10 * k + 5, np.uint8))
  lol.unpaired_dirs = str(tmp_path / 'clean')
  lol.paired_fraction = 0.25
  it = data.create_train_iterator(lol, 2, 5, shard_index=0, shard_count=1)
  pool = [i for _ in range(2) for i in ids(next(it), 'noise')]
  assert sorted(pool) == list(range(10))  # One epoch: each target once.
