"""Command line: train, evaluate, export, or restore a folder of images.

  python -m drdd_jax.main --config=configs/aio5.py --workdir=DIR [--mode=train]
  python -m drdd_jax.main --config=configs/aio5.py --workdir=DIR --mode=evaluate
  python -m drdd_jax.main --config=configs/aio5.py --workdir=DIR --mode=export
  python -m drdd_jax.main --workdir=DIR --mode=restore --input_dir=IN --output_dir=OUT
"""
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from drdd_jax import distributed

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file (e.g. configs/aio5.py or configs/aio5.py:tiny).',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, logs, exports.')
_MODE = flags.DEFINE_enum('mode', 'train',
                          ['train', 'evaluate', 'restore', 'export'],
                          'What to do.')
_STEP = flags.DEFINE_integer('checkpoint_step', None,
                             'evaluate/export: this step instead of the latest.')
_INPUT_DIR = flags.DEFINE_string('input_dir', None, 'restore: images to restore.')
_OUTPUT_DIR = flags.DEFINE_string('output_dir', None, 'restore: where to write.')
_EXPORT_DIR = flags.DEFINE_string('export_dir', None,
                                  'restore: an export (default WORKDIR/export).')
_SIGMA_H = flags.DEFINE_float('sigma_h', None,
                              "restore: noise level (default: the export's).")
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'Multi-process: host:port of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None,
                                      'Multi-process: number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None,
                                   'Multi-process: this process index.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                         _PROCESS_ID.value)
  distributed.log_topology()
  config, workdir, mode = _CONFIG.value, _WORKDIR.value, _MODE.value
  if mode != 'restore' and (config is None or workdir is None):
    raise app.UsageError(f'--mode={mode} needs --config and --workdir.')

  # Imported here so `--help` and flag errors stay fast.
  from drdd_jax import checkpoints, evaluate, restore, train  # pylint: disable=g-import-not-at-top

  if mode == 'train':
    train.train_and_evaluate(config, workdir)
  elif mode in ('evaluate', 'export'):
    params, step = train.load_ema_params(config, workdir, _STEP.value)
    if mode == 'evaluate':
      evaluate.evaluate(config, workdir, params, step)
    else:
      checkpoints.export(workdir, params, config)
  else:
    if not (_INPUT_DIR.value and _OUTPUT_DIR.value):
      raise app.UsageError('--mode=restore needs --input_dir and --output_dir.')
    export_dir = _EXPORT_DIR.value or (workdir and os.path.join(workdir,
                                                                'export'))
    if not export_dir:
      raise app.UsageError('--mode=restore needs --export_dir or --workdir.')
    exported, params = checkpoints.load_export(export_dir)
    with exported.unlocked():
      if config is not None:  # Sampling and tiling settings from --config.
        exported.sampling = config.sampling
        exported.eval = config.eval
      if _SIGMA_H.value is not None:
        exported.diffusion.sigma_h = _SIGMA_H.value
    failed = restore.restore_folder(
        _INPUT_DIR.value, _OUTPUT_DIR.value,
        evaluate.make_restore_image(exported, params),
        progress=jax.process_index() == 0)
    if failed:
      logging.error('%d image(s) could not be restored: %s', len(failed),
                    ', '.join(name for name, _ in failed))
      return 1
  return 0


def run(argv):
  status = main(argv)
  # Explicitly, before interpreter exit: every client leaves through the
  # shutdown barrier before process 0 stops the coordination service.
  jax.distributed.shutdown()
  sys.exit(status)


if __name__ == '__main__':
  jax.config.config_with_absl()
  app.run(run)
