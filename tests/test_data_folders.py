"""Building datasets: AiO5 folder presets, bad input, the cache, embedded."""
import ast
import concurrent.futures
import logging
import os
import re
import socket
import threading
import time

import numpy as np
from PIL import Image
import pytest

from configs import aio5
from drdd_jax import data
from drdd_jax.data import builder
from drdd_jax.data import degrade
from drdd_jax.data import embedded
from drdd_jax.data import images
from drdd_jax.data import pipeline

H, W = 20, 24


def save(path, pixels):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(pixels).save(path)


def make_aio5(root, seed=0):
  """Tiny AiO5 folders; returns `{(task, split, name): (input, target)}`."""
  rng = np.random.default_rng(seed)
  expected = {}

  def pair(task, split, name, in_path, target_path, target=None):
    x = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    y = target if target is not None else rng.integers(
        0, 256, (H, W, 3), dtype=np.uint8)
    save(os.path.join(root, in_path), x)
    save(os.path.join(root, target_path), y)
    expected[(task, split, name)] = (x, y)
    return y

  for i in range(4):
    pair('lowlight', 'train', f'{i}', f'LOL/our485/low/{i}.png',
         f'LOL/our485/high/{i}.png')
  for i in range(2):
    pair('lowlight', 'test', f'{i}', f'LOL/eval15/low/{i}.png',
         f'LOL/eval15/high/{i}.png')
  for i in range(1, 4):
    pair('derain', 'train', f'rain-{i:03d}',
         f'Rain100H/train/rain/rain-{i:03d}.png',
         f'Rain100H/train/norain/norain-{i:03d}.png')
  for i in range(2):
    pair('derain', 'test', f'{i}', f'Rain100L/input/{i}.png',
         f'Rain100L/target/{i}.png')
  for i in range(3):
    pair('deblur', 'train', f'GOPR_{i}', f'GoPro/train/input/GOPR_{i}.png',
         f'GoPro/train/target/GOPR_{i}.png')
  for seq in ('SEQ0', 'SEQ1'):  # GoPro_Large's per-sequence layout.
    pair('deblur', 'test', f'{seq}/7', f'GoPro/test/{seq}/blur/7.png',
         f'GoPro/test/{seq}/sharp/7.png')
  for k in (1, 2):  # Two hazy images per clear one.
    clear = None
    for beta in ('0.8_0.1', '0.9_0.2'):
      clear = pair('dehaze', 'train', f'{k:04d}_{beta}',
                   f'RESIDE/OTS/hazy/{k:04d}_{beta}.png',
                   f'RESIDE/OTS/clear/{k:04d}.png', target=clear)
  for k in (1, 2):
    pair('dehaze', 'test', f'{k:04d}_0.8_0.1',
         f'RESIDE/SOTS/outdoor/hazy/{k:04d}_0.8_0.1.png',
         f'RESIDE/SOTS/outdoor/clear/{k:04d}.png')  # `gt` is tried first.
  for split, paths in (('train', ['denoise/train/BSD/a.png',
                                  'denoise/train/BSD/b.png',
                                  'denoise/train/WED/c.png']),
                       ('test', ['CBSD68/x.png', 'CBSD68/y.png'])):
    base = 'denoise/train' if split == 'train' else 'CBSD68'
    for p in paths:
      y = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
      save(os.path.join(root, p), y)
      name = os.path.splitext(os.path.relpath(p, base))[0]
      x = degrade.apply('denoise', y, degrade.seed_of('aio5', 'denoise', name))
      expected[('denoise', split, name)] = (x, y)
  return expected


def config(root, cache, /, **kw):
  c = aio5.get_config().data
  c.root, c.cache_dir, c.crop_size, c.num_workers = str(root), str(cache), 16, 0
  c.update(kw)
  return c


def records(ds, split):
  src = ds.as_data_source(split)
  return src.__getitems__(range(len(src)))


def test_folders_give_the_pairs_and_exact_pixels(tmp_path):
  expected = make_aio5(tmp_path / 'aio5')
  c = config(tmp_path / 'aio5', tmp_path / 'cache')
  for task in data.TASKS:
    ds = pipeline.dataset(c, task)
    for split in ('train', 'test'):
      want = {n: v for (t, s, n), v in expected.items()
              if (t, s) == (task, split)}
      got = records(ds, split)
      assert len(got) == len(want) == ds.info.metadata[split]['count'], task
      for r in got:
        x, y = want[r['name'].decode()]
        np.testing.assert_array_equal(images.decode(r['input']), x)
        np.testing.assert_array_equal(images.decode(r['target']), y)
        assert r['task'] == data.TASKS.index(task)
    evals = data.load_eval_split(c, task)
    assert [e['name'] for e in evals] == sorted(
        n for (t, s, n) in expected if (t, s) == (task, 'test'))
  # RESIDE: 4 hazy images, 2 clear ones; the pool counts each clear once.
  assert len(pipeline.dataset(c, 'dehaze').info.metadata['train']['pool']) == 2


def test_cache_is_reused_and_rebuilt_when_a_folder_changes(tmp_path,
                                                           monkeypatch):
  root = tmp_path / 'aio5'
  make_aio5(root)
  c = config(root, tmp_path / 'cache', tasks='lowlight')
  first = pipeline.dataset(c, 'lowlight').data_dir
  real_build = builder._build
  monkeypatch.setattr(builder, '_build', lambda *a: pytest.fail('rebuilt'))
  assert pipeline.dataset(c, 'lowlight').data_dir == first
  monkeypatch.setattr(builder, '_build', real_build)
  pixels = np.zeros((H, W, 3), np.uint8)
  save(str(root / 'LOL/our485/low/9.png'), pixels)
  save(str(root / 'LOL/our485/high/9.png'), pixels)
  ds = pipeline.dataset(c, 'lowlight')
  assert ds.data_dir != first and ds.info.metadata['train']['count'] == 5
  assert not [p for p in os.listdir(tmp_path / 'cache') if p.startswith('.tmp')]


def _lol(root, n=3):
  for split in ('our485', 'eval15'):
    for i in range(n):
      for side in ('low', 'high'):
        save(str(root / f'LOL/{split}/{side}/{i}.png'),
             np.full((H, W, 3), 10 * i, np.uint8))


def _blank(root, path, width=W):
  save(str(root / path), np.zeros((H, width, 3), np.uint8))


def _empty(root, folder):
  for p in (root / folder).iterdir():
    os.remove(p)


def _truncate(path):
  raw = path.read_bytes()
  path.write_bytes(raw[:len(raw) // 2])


def _float_tif(root):
  os.remove(root / 'LOL/our485/low/1.png')
  Image.fromarray(np.zeros((H, W), np.float32)).save(
      root / 'LOL/our485/low/1.tif')


BAD = {  # case: (how to break a valid LOL tree, what the message names)
    'missing folder': (
        lambda r: (_empty(r, 'LOL/our485/high'),
                   os.rmdir(r / 'LOL/our485/high')), 'LOL/our485/high'),
    'no task folder': (lambda r: os.rename(r / 'LOL', r / 'LOLv1'),
                       'LOL/our485/low'),
    'empty folder': (lambda r: _empty(r, 'LOL/eval15/low'), 'eval15/low'),
    'unpaired input': (lambda r: _blank(r, 'LOL/our485/low/7.png'),
                       'low/7.png'),
    'unpaired target': (lambda r: _blank(r, 'LOL/our485/high/8.png'),
                        'high/8.png'),
    'same stem twice': (lambda r: _blank(r, 'LOL/our485/high/1.bmp'),
                        '1.bmp'),
    'corrupt': (lambda r: (r / 'LOL/our485/low/2.png').write_bytes(b'no'),
                'low/2.png'),
    'truncated': (lambda r: _truncate(r / 'LOL/eval15/high/1.png'),
                  'high/1.png'),
    'sizes differ': (lambda r: _blank(r, 'LOL/our485/high/0.png', W + 1),
                     'high/0.png'),
    'float image': (_float_tif, 'low/1.tif'),
}


@pytest.mark.parametrize('case', sorted(BAD))
def test_bad_input_fails_naming_the_file(tmp_path, case):
  change, name = BAD[case]
  _lol(tmp_path / 'root')
  change(tmp_path / 'root')
  cache = tmp_path / 'cache'
  with pytest.raises(data.DataError, match=re.escape(name)):
    pipeline.dataset(config(tmp_path / 'root', cache), 'lowlight')
  assert not cache.exists() or not os.listdir(cache)  # No partial build.


def _png16(path, pixels):
  """A 16-bit RGB PNG (PIL cannot write one)."""
  import struct, zlib  # pylint: disable=g-import-not-at-top,multiple-imports
  h, w, _ = pixels.shape
  raw = b''.join(b'\0' + pixels[y].astype('>u2').tobytes() for y in range(h))
  chunk = lambda t, d: (struct.pack('>I', len(d)) + t + d +
                        struct.pack('>I', zlib.crc32(t + d)))
  with open(path, 'wb') as f:
    f.write(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack(
        '>IIBBBBB', w, h, 16, 2, 0, 0, 0)) + chunk(b'IDAT', zlib.compress(raw))
            + chunk(b'IEND', b''))


def test_convertible_images_are_converted_and_logged(tmp_path, caplog):
  root = tmp_path / 'root'
  _lol(root, n=5)
  low = root / 'LOL/our485/low'
  gray = np.arange(H * W, dtype=np.uint8).reshape(H, W)
  Image.fromarray(gray).save(low / '0.png')
  Image.fromarray(np.dstack([gray] * 3 + [gray])).save(low / '1.png')  # RGBA.
  Image.fromarray((gray.astype(np.uint16) * 257)).save(low / '2.png')  # I;16.
  _png16(low / '3.png', np.dstack([gray] * 3).astype(np.uint16) * 257)
  Image.fromarray(np.dstack([gray] * 3)).convert('P').save(low / '4.png')
  with caplog.at_level(logging.WARNING):
    ds = pipeline.dataset(config(root, tmp_path / 'c'), 'lowlight')
  got = {r['name'].decode(): images.decode(r['input'])
         for r in records(ds, 'train')}
  for i in range(4):
    np.testing.assert_array_equal(got[str(i)], np.dstack([gray] * 3), str(i))
    assert f'low/{i}.png' in caplog.text
  assert got['4'].shape == (H, W, 3) and 'palette' in caplog.text


def test_a_task_may_be_absent_only_when_unused(tmp_path):
  _lol(tmp_path / 'root')
  c = config(tmp_path / 'root', tmp_path / 'c', tasks='lowlight',
             task_shares='lowlight:1')
  assert len(data.create_train_iterator(c, 2, 0, shard_index=0, shard_count=1)
             .__next__()['residual']['task']) == 2
  c.tasks = 'lowlight,derain'
  c.task_shares = 'lowlight:1,derain:1'
  with pytest.raises(data.DataError, match="task 'derain'"):
    data.create_train_iterator(c, 2, 0, shard_index=0, shard_count=1)


@pytest.mark.parametrize('field, value, message', [
    ('tasks', 'lowlight,foo', "data.tasks: unknown task 'foo'"),
    ('task_shares', 'lowlight:1', 'data.task_shares: no share for derain'),
    ('paired_fraction', 0.0, 'data.paired_fraction'),
    ('source', 'web', 'data.source'),
    ('root', '', 'data.root'),
    ('crop_size', 0, 'data.crop_size'),
    ('unpaired_dirs', 'nowhere', 'data.unpaired_dirs: no such folder'),
])
def test_bad_config_names_the_field(tmp_path, field, value, message):
  c = config(tmp_path, tmp_path / 'c', **{field: value})
  with pytest.raises(data.DataError, match=message):
    data.create_train_iterator(c, 5, 0, shard_index=0, shard_count=1)


def test_crop_larger_than_an_image_names_field_and_image(tmp_path):
  _lol(tmp_path / 'root')
  c = config(tmp_path / 'root', tmp_path / 'c', tasks='lowlight', crop_size=22)
  with pytest.raises(data.DataError,
                     match=r"data.crop_size=22 .* '\d' \(20x24\)"):
    data.create_train_iterator(c, 2, 0, shard_index=0, shard_count=1)


def test_embedded_builds_offline_split_by_photo_same_bytes(tmp_path,
                                                           monkeypatch):
  def no_network(*args, **kwargs):
    raise AssertionError('network used')
  monkeypatch.setattr(socket, 'socket', no_network)
  c = config('', tmp_path / 'a', source='embedded', max_size=32,
             embedded_variants=2)
  again = config('', tmp_path / 'b', source='embedded', max_size=32,
                 embedded_variants=2)
  train_photos = len(embedded.PHOTOS) - len(embedded.TEST_PHOTOS)
  for task in data.TASKS:
    ds = pipeline.dataset(c, task)
    train, test = records(ds, 'train'), records(ds, 'test')
    assert len(train) == 2 * train_photos and len(test) == 3
    train_names = {r['name'].decode().rsplit('-', 1)[0] for r in train}
    test_names = {r['name'].decode() for r in test}
    assert test_names == set(embedded.TEST_PHOTOS)
    assert not train_names & test_names
    # The pixels too: no test photo hides in train under another name.
    test_digests = {images.digest(images.decode(r['target'])) for r in test}
    assert not {d for _, d in ds.info.metadata['train']['pool']} & test_digests
    for r in train + test:
      x, y = images.decode(r['input']), images.decode(r['target'])
      assert max(y.shape) == 32 and x.shape == y.shape
      assert np.abs(x.astype(int) - y).mean() > 0.5, (task, r["name"])
    other = records(pipeline.dataset(again, task), 'train')
    assert [r['input'] for r in other] == [r['input'] for r in train]


def test_npy_decoding_parses_one_header_at_a_time(monkeypatch):
  # numpy parses .npy headers with ast.literal_eval, which is not thread-safe
  # on CPython 3.11 (grain decodes in threads): decode must serialize it.
  literal_eval, lock, active, most = ast.literal_eval, threading.Lock(), [0], [0]

  def slow_literal_eval(node):
    with lock:
      active[0] += 1
      most[0] = max(most[0], active[0])
    time.sleep(0.01)  # Long enough for the other threads to enter.
    with lock:
      active[0] -= 1
    return literal_eval(node)

  monkeypatch.setattr(ast, 'literal_eval', slow_literal_eval)
  arrays = [np.full((3 + i, 4, 3), i, np.uint8) for i in range(16)]
  blobs = [images.encode(a) for a in arrays]
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    out = list(pool.map(images.decode, blobs))
  assert most[0] == 1
  for a, b in zip(arrays, out):
    np.testing.assert_array_equal(a, b)
