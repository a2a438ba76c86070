"""Evaluation: restore every test split, write per-task tables and grids.

`evaluate` runs the sampler (tiled for large images) on each task's test
pairs, scores the outputs and the degraded inputs (so the table shows what
the model adds), and writes `workdir/eval/step_<N>.{md,json}`, the same as
`eval/latest.{md,json}`, and PNG grids (input / DRDD output / target).
"""
import json
import os
from typing import Optional

from absl import logging
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
from PIL import Image
import tqdm

from drdd_jax import data as data_lib
from drdd_jax import metrics
from drdd_jax import restore
from drdd_jax import sampler
from drdd_jax import train

_SAMPLERS = {}


def get_sampler(config, model, sched):
  """The jitted sampler for this model and sampling config (built once)."""
  key = (id(model), id(sched), config.diffusion.method,
         config.diffusion.noise_condition, tuple(config.sampling.items()))
  if key not in _SAMPLERS:
    _SAMPLERS[key] = sampler.make_sampler(model, sched, config.diffusion,
                                          config.sampling)
  return _SAMPLERS[key]


def make_restore_image(config, params, model=None, sched=None):
  """uint8 [H, W, 3] -> restored uint8 [H, W, 3], tiled above eval.tile_size.

  Tiles are restored `eval.batch_size` at a time (0 = one per local device),
  split over this process's devices. Every process restores on its own
  devices, so no collective waits on a peer compiling another image shape.
  """
  model = model or train.create_model(config)
  sched = sched or train.make_schedule(config)
  sample = get_sampler(config, model, sched)
  devices = jax.local_devices()
  mesh = jax.make_mesh((len(devices),), ('data',), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))
  params = jax.device_put(jax.device_get(params), NamedSharding(mesh, P()))
  key = jax.device_put(jax.random.key(config.sampling.seed),
                       NamedSharding(mesh, P()))
  split = NamedSharding(mesh, P('data'))

  def sample_fn(y):
    if len(y) % len(devices) == 0:
      y = jax.device_put(y, split)
    return np.asarray(sample(params, y, key)[0])

  e = config.eval
  return restore.restore_image_fn(sample_fn, e.tile_size, e.tile_overlap,
                                  e.batch_size or len(devices))


def grid(rows) -> np.ndarray:
  """Rows of (input, output, target) uint8 images -> one uint8 image."""
  height = max(r[0].shape[0] for r in rows)
  lines = []
  for row in rows:
    cells = [np.pad(im, ((0, height - im.shape[0]), (0, 4), (0, 0)))
             for im in row]
    lines.append(np.concatenate(cells, axis=1))
  width = max(l.shape[1] for l in lines)
  return np.concatenate(
      [np.pad(l, ((0, 4), (0, width - l.shape[1]), (0, 0))) for l in lines])


def evaluate(config, workdir: str, params, step: int, writer=None,
             out_dir: Optional[str] = None) -> dict:
  """Scores the model on every task's test split; returns the results.

  Args:
    config: the run's config.
    workdir: where `eval/` goes (unless `out_dir`).
    params: EMA parameters.
    step: the training step, for file names and TensorBoard.
    writer: a clu `MetricWriter` for scalars and image grids, or None.
    out_dir: overrides `workdir/eval`.

  Returns:
    `{'model': per-task metrics, 'input': the degraded inputs' metrics}`.
  """
  e = config.eval
  restore_image = make_restore_image(config, params)
  scores = {name: metrics.Evaluator(e.lpips_net, fd=e.fd_vgg16)
            for name in ('model', 'input')}
  lead = jax.process_index() == 0
  out_dir = out_dir or os.path.join(workdir, 'eval')
  grids = {}
  tasks = data_lib.task_names(config.data)
  splits = {t: data_lib.load_eval_split(config.data, t)[:e.max_images or None]
            for t in tasks}
  bar = tqdm.tqdm(total=sum(map(len, splits.values())), desc='evaluate',
                  unit='image', disable=not lead)
  for task, pairs in splits.items():
    rows = []
    for pair in pairs:
      out = restore_image(pair['input'])
      scores['model'].add(task, out, pair['target'])
      scores['input'].add(task, pair['input'], pair['target'])
      if len(rows) < e.num_grid_images:
        rows.append((pair['input'], out, pair['target']))
      bar.update()
    grids[task] = grid(rows)
  bar.close()
  results = {name: ev.results() for name, ev in scores.items()}
  if lead:
    _write(out_dir, step, results, grids, writer)
  return results


def _write(out_dir, step, results, grids, writer):
  os.makedirs(out_dir, exist_ok=True)
  table = (f'## DRDD, step {step}\n\n{metrics.to_markdown(results["model"])}'
           f'\n\n## Degraded input (no restoration)\n\n'
           f'{metrics.to_markdown(results["input"])}\n')
  as_json = json.dumps(dict(step=step, **results), indent=2, default=str)
  for name in (f'step_{step}', 'latest'):
    for ext, text in (('md', table), ('json', as_json)):
      with open(os.path.join(out_dir, f'{name}.{ext}'), 'w') as f:
        f.write(text)
  for task, image in grids.items():
    Image.fromarray(image).save(os.path.join(out_dir, f'grid_{task}.png'))
  logging.info('Evaluation at step %d:\n%s', step, table)
  if writer is not None:
    writer.write_scalars(step, {
        f'eval/{task}/{k}': v for task, row in results['model'].items()
        for k, v in row.items() if k != 'count' and np.isfinite(v)})
    writer.write_images(step, {f'eval/{t}': g[None] for t, g in grids.items()})
    writer.flush()


def write_sample_grid(config, model, sched, params, writer, step: int) -> None:
  """A TensorBoard grid of the first test image of each task (center crop)."""
  c = 2 * config.data.crop_size
  rows = []
  restore_image = make_restore_image(config, params, model, sched)
  for task in data_lib.task_names(config.data):
    pair = data_lib.load_eval_split(config.data, task)[0]
    h, w = pair['input'].shape[:2]
    top, left = max(0, (h - c) // 2), max(0, (w - c) // 2)
    crop = lambda im: im[top:top + c, left:left + c]
    rows.append((crop(pair['input']), restore_image(crop(pair['input'])),
                 crop(pair['target'])))
  writer.write_images(step, {'samples': grid(rows)[None]})
