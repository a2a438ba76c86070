"""Where each AiO5 task lives under `data.root`, and how its files pair up.

A layout lists candidate (input, target) folders per split, relative to the
root; the first candidate whose input folder exists is used, so the common
alternative names work without code edits. `*` in a folder matches one level
(GoPro's per-sequence folders) and becomes part of the example name; `/**`
lists a folder recursively. Files pair by name stem after a per-task rule
(`rain-001` with `norain-001`; RESIDE's `0001_0.8_0.2` hazy images with the
clear `0001`). The result is a `Plan`: the examples a dataset is built from.
"""
import dataclasses
import glob
import os
import re

from drdd_jax.data import degrade
from drdd_jax.data import images
from drdd_jax.data.options import DataError
from drdd_jax.data.options import TASKS


@dataclasses.dataclass(frozen=True)
class Example:
  """One record to build: a target image and its degraded input.

  Attributes:
    name: unique within its split (the input's stem, with `*` folders).
    target: path of the clean image.
    input: path of the degraded image; '' when `synth` makes it (or none).
    synth: the task whose synthetic degradation makes the input (degrade.py).
    seed: the degradation's seed.
  """
  name: str
  target: str
  input: str = ''
  synth: str = ''
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class Plan:
  """The examples of one dataset, per split.

  Attributes:
    name: the cache folder's prefix, e.g. 'aio5-derain'.
    task: index in TASKS, or -1 for a folder of unpaired clean images.
    splits: `{split: [Example]}`.
    root: paths are fingerprinted relative to this ('' = as they are).
    max_size: if > 0, images are resized to this longer side.
  """
  name: str
  task: int
  splits: dict
  root: str = ''
  max_size: int = 0


@dataclasses.dataclass(frozen=True)
class Layout:
  """The folders of one task and its pairing rule.

  Attributes:
    train: candidate (input, target) folders; input '' = synthesised.
    test: the same for the test split.
    input_key: regex on input stems; group 1 is the pairing key.
    target_key: the same for target stems.
    many_to_one: several inputs may share one target (RESIDE).
    synth: the task whose degradation makes missing inputs (denoise).
  """
  train: tuple
  test: tuple
  input_key: str = r'(.*)'
  target_key: str = r'(.*)'
  many_to_one: bool = False
  synth: str = ''


def _alts(bases, names):
  return tuple((f'{b}/{i}', f'{b}/{t}') for b in bases for i, t in names)


_RAIN_NAMES = (('rain', 'norain'), ('input', 'target'))
_RAIN_KEY = r'(?:(?:no)?rain[-_]?)?(.*)'  # rain-001 / norain-001 -> 001.
_BLUR_NAMES = (('input', 'target'), ('blur', 'sharp'))
_GOPRO = ('GoPro', 'GOPRO_Large')

LAYOUTS = {
    'lowlight': Layout(
        train=_alts(['LOL/our485', 'LOL/train'], [('low', 'high')]),
        test=_alts(['LOL/eval15', 'LOL/test'], [('low', 'high')])),
    'derain': Layout(
        train=_alts(['Rain100H/train', 'Rain100H'], _RAIN_NAMES),
        test=_alts(['Rain100L/test', 'Rain100L'], _RAIN_NAMES),
        input_key=_RAIN_KEY, target_key=_RAIN_KEY),
    'denoise': Layout(
        train=(('', 'denoise/train/**'),),
        test=(('', 'CBSD68/original_png'), ('', 'CBSD68/original'),
              ('', 'CBSD68')),
        synth='denoise'),
    'deblur': Layout(
        train=_alts([f'{g}/train' for g in _GOPRO], _BLUR_NAMES) +
        _alts([f'{g}/train/*' for g in _GOPRO], [('blur', 'sharp')]),
        test=_alts([f'{g}/test' for g in _GOPRO], _BLUR_NAMES) +
        _alts([f'{g}/test/*' for g in _GOPRO], [('blur', 'sharp')])),
    'dehaze': Layout(
        train=_alts(['RESIDE/OTS'], [('hazy', 'clear'), ('hazy', 'gt')]),
        test=_alts(['RESIDE/SOTS/outdoor'],
                   [('hazy', 'gt'), ('hazy', 'clear')]),
        input_key=r'([^_]+)', many_to_one=True),  # 0001_0.8_0.2 -> 0001.
}


def _stem(path: str) -> str:
  return os.path.splitext(os.path.basename(path))[0]


def _key(rule: str, path: str) -> str:
  return re.match(rule, _stem(path)).group(1)


def _pair(in_dir: str, target_dir: str, prefix: str,
          layout: Layout) -> list[Example]:
  """Pairs the files of two folders by key; any leftover file is an error."""
  targets = {}
  for path in images.list_images(target_dir):
    k = _key(layout.target_key, path)
    if k in targets:
      raise DataError(f'{path}: pairs by the same name {k!r} as '
                      f'{targets[k]}; keep one of them')
    targets[k] = path
  examples, used = [], {}
  for path in images.list_images(in_dir):
    k = _key(layout.input_key, path)
    if k not in targets:
      raise DataError(f'{path}: unpaired input, no target named {k!r} in '
                      f'{target_dir}')
    if k in used and not layout.many_to_one:
      raise DataError(f'{path}: pairs with {targets[k]} as {used[k]} does; '
                      'keep one of them')
    used[k] = path
    examples.append(Example(prefix + _stem(path), targets[k], input=path))
  unused = sorted(set(targets) - set(used))
  if unused:
    raise DataError(f'{targets[unused[0]]}: unpaired target, no input named '
                    f'{unused[0]!r} in {in_dir} ({len(unused)} unpaired)')
  return examples


def _clean(folder: str, synth: str, task: str) -> list[Example]:
  """Examples whose inputs are synthesised from clean images."""
  recursive = folder.endswith('/**')
  folder = folder[:-3] if recursive else folder
  examples = []
  for path in images.list_images(folder, recursive=recursive):
    name = os.path.splitext(os.path.relpath(path, folder))[0]
    examples.append(Example(name, path, synth=synth,
                            seed=degrade.seed_of('aio5', task, name)))
  return examples


def _folders(root: str, in_pattern: str, target_pattern: str):
  """(input folder, target folder, name prefix) for each match of a pattern."""
  in_dirs = glob.glob(os.path.join(glob.escape(root), in_pattern))
  out = []
  for in_dir in sorted(d for d in in_dirs if os.path.isdir(d)):
    # Fill each `*` of the target pattern with what it matched in the input.
    parts = os.path.relpath(in_dir, root).split(os.sep)
    stars = [p for p, q in zip(parts, in_pattern.split('/')) if q == '*']
    target = target_pattern
    for s in stars:
      target = target.replace('*', s, 1)
    out.append((in_dir, os.path.join(root, target),
                ''.join(s + '/' for s in stars)))
  return out


def _split(root: str, task: str, split: str, layout: Layout) -> list[Example]:
  """The examples of one split: the first candidate folders present win."""
  missing = None
  for in_pattern, target_pattern in getattr(layout, split):
    if not in_pattern:  # Inputs synthesised from the targets.
      folder = os.path.join(root, target_pattern)
      if os.path.isdir(folder.removesuffix('/**')):
        return _clean(folder, layout.synth, task)
      continue
    folders = _folders(root, in_pattern, target_pattern)
    absent = [(i, t) for i, t, _ in folders if not os.path.isdir(t)]
    if folders and not absent:
      return [e for i, t, prefix in folders
              for e in _pair(i, t, prefix, layout)]
    missing = missing or (absent[0] if absent else None)
  if missing:  # An input folder without its target folder.
    raise DataError(f'{missing[1]}: missing folder (the targets of '
                    f'{missing[0]})')
  tried = ', '.join(f'{i or "(synthesised)"} -> {t}'
                    for i, t in getattr(layout, split))
  raise DataError(f"data.root={root}: no {split} folders for task '{task}' "
                  f'(looked for {tried}); remove it from data.tasks if it is '
                  'not on disk')


def aio5_plan(root: str, task: str) -> Plan:
  """The plan of one AiO5 task under `root` (layout in docs/data.md)."""
  root = os.path.abspath(os.path.expanduser(root))
  layout = LAYOUTS[task]
  splits = {s: _split(root, task, s, layout) for s in ('train', 'test')}
  return Plan(f'aio5-{task}', TASKS.index(task), splits, root=root)


def unpaired_plan(folder: str) -> Plan:
  """A folder (recursively) of clean images for the noise objective."""
  examples = [Example(os.path.splitext(os.path.relpath(p, folder))[0], p)
              for p in images.list_images(folder, recursive=True)]
  name = re.sub(r'[^A-Za-z0-9_.-]', '_', os.path.basename(folder)) or 'root'
  return Plan(f'unpaired-{name}', -1, {'train': examples}, root=folder)
