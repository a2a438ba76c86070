"""Orbax checkpoints of the train state and data iterator, and exports.

`workdir/checkpoints/<step>/{state,data}`: the sharded `TrainState` (every
process writes its shards) and each process's grain iterator state. Orbax
writes into a temporary directory and renames it when complete, so an
interrupted save never leaves a checkpoint that looks valid.

`workdir/export/{params,config.json}`: the EMA parameters alone plus the
config, for inference without the optimizer.
"""
import json
import os
from typing import Any, Optional

from absl import logging
import grain
import jax
import ml_collections
import orbax.checkpoint as ocp


def create_manager(workdir: str, training_config) -> ocp.CheckpointManager:
  """A manager keeping the last N checkpoints plus every `keep_every`-th."""
  cfg = training_config
  options = ocp.CheckpointManagerOptions(
      max_to_keep=cfg.keep_checkpoints,
      keep_period=cfg.keep_every or None,
      enable_async_checkpointing=True,
      create=True)
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir) if '://' not in workdir
                   else workdir, 'checkpoints'),
      item_names=('state', 'data'),
      item_handlers=dict(state=ocp.StandardCheckpointHandler(),
                         data=grain.checkpoint.CheckpointHandler()),
      options=options)


def save(manager: ocp.CheckpointManager, step: int, state, data_iter,
         *, force: bool = False) -> bool:
  """Saves asynchronously (collective: every process calls it)."""
  return manager.save(
      step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=grain.checkpoint.CheckpointSave(data_iter)),
      force=force)


def restore_latest(manager: ocp.CheckpointManager, abstract_state, data_iter,
                   step: Optional[int] = None):
  """Restores `step` (default: the latest) into the given shardings.

  Args:
    manager: from `create_manager`.
    abstract_state: `jax.ShapeDtypeStruct`s with shardings.
    data_iter: the iterator whose state is set in place, or None.
    step: which step; None for the latest.

  Returns:
    The state, or None if there is no checkpoint.
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    return None
  logging.info('Restoring checkpoint of step %d from %s.', step,
               manager.directory)
  items = dict(state=ocp.args.StandardRestore(abstract_state))
  if data_iter is not None:
    items['data'] = grain.checkpoint.CheckpointRestore(data_iter)
  return manager.restore(step, args=ocp.args.Composite(**items)).state


def export(workdir: str, params, config: ml_collections.ConfigDict) -> str:
  """Writes EMA params and the config to `workdir/export` (collective)."""
  path = os.path.join(workdir, 'export')
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(os.path.abspath(path), 'params'), params, force=True)
  ckptr.wait_until_finished()
  if jax.process_index() == 0:
    with open(os.path.join(path, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
  logging.info('Exported EMA params and config to %s.', path)
  return path


def load_export(path: str):
  """Loads `(config, params)` written by `export`, without the optimizer."""
  config_file = os.path.join(path, 'config.json')
  if not os.path.exists(config_file):
    raise FileNotFoundError(
        f'No export at {path!r} (expected {config_file}); run '
        '`python -m drdd_jax.main --mode=export --workdir=...` first.')
  with open(config_file) as f:
    config = ml_collections.ConfigDict(_tuples(json.load(f)))
  ckptr = ocp.StandardCheckpointer()
  params_dir = os.path.join(os.path.abspath(path), 'params')
  # Onto this host's first device, whatever topology wrote the export.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
      ckptr.metadata(params_dir).item_metadata)
  return config, ckptr.restore(params_dir, target)


def _tuples(tree: Any) -> Any:
  """JSON lists back to the tuples the configs use."""
  if isinstance(tree, dict):
    return {k: _tuples(v) for k, v in tree.items()}
  if isinstance(tree, list):
    return tuple(_tuples(v) for v in tree)
  return tree
