"""Tests for drdd_jax.writers: TensorBoard files and clu, without TensorFlow."""
import importlib.util
import io
import pathlib
import struct
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from drdd_jax import writers  # pylint: disable=g-bad-import-order
from clu import metric_writers  # pylint: disable=g-bad-import-order
from clu import periodic_actions
from tensorboardX.proto import event_pb2
from tensorboardX.proto import plugin_hparams_pb2
from tensorboardX.record_writer import masked_crc32c

REPO = pathlib.Path(__file__).resolve().parents[1]


def read_events(logdir) -> list[event_pb2.Event]:
  """Parses every TFRecord-framed Event in logdir, checking the CRCs."""
  events = []
  for path in sorted(pathlib.Path(logdir).rglob('events.out.tfevents.*')):
    data = path.read_bytes()
    while data:
      header, (header_crc,) = data[:8], struct.unpack('<I', data[8:12])
      (length,) = struct.unpack('<Q', header)
      record = data[12:12 + length]
      (record_crc,) = struct.unpack('<I', data[12 + length:16 + length])
      assert header_crc == masked_crc32c(header)
      assert record_crc == masked_crc32c(record)
      events.append(event_pb2.Event.FromString(record))
      data = data[16 + length:]
  return events


def values_by_tag(events):
  return {(v.tag, e.step): v for e in events for v in e.summary.value}


def test_writes_scalars_images_hparams_texts(tmp_path):
  writer = writers.create_writer(str(tmp_path), just_logging=False)
  assert isinstance(writer, metric_writers.MetricWriter)
  writer.write_hparams({'lr': np.float32(1e-3), 'model': {'depth': 4},
                        'name': 'aio5', 'ema': True, 'sizes': (1, 2)})
  writer.write_scalars(1, {'loss': np.float32(0.5), 'psnr': 30.25})
  writer.write_scalars(2, {'loss': 0.25})
  images = np.linspace(0, 1, 3 * 4 * 5 * 3).reshape(3, 4, 5, 3)  # float [0,1]
  writer.write_images(2, {'samples': images,
                          'gray': np.zeros((4, 5, 1), np.uint8)})
  writer.write_texts(2, {'note': 'hello'})
  writer.write_histograms(2, {'w': np.arange(10.0)}, num_buckets={'w': 5})
  writer.write_histograms(3, {'w': np.arange(10.0)})
  writer.flush()
  writer.close()

  values = values_by_tag(read_events(tmp_path))
  assert values['loss', 1].simple_value == 0.5
  assert values['loss', 2].simple_value == 0.25
  assert values['psnr', 1].simple_value == 30.25

  samples = values['samples', 2]
  assert samples.metadata.plugin_data.plugin_name == 'images'
  width, height, *pngs = samples.tensor.string_val
  assert (int(width), int(height), len(pngs)) == (5, 4, 3)
  first = np.asarray(Image.open(io.BytesIO(pngs[0])))
  np.testing.assert_array_equal(first, np.round(images[0] * 255))
  gray = np.asarray(Image.open(io.BytesIO(values['gray', 2].tensor.string_val[2])))
  assert gray.shape == (4, 5)

  assert values['note', 2].tensor.string_val == [b'hello']
  assert values['w', 2].histo.num == 10

  hp = plugin_hparams_pb2.HParamsPluginData.FromString(
      values['_hparams_/session_start_info', 0].metadata.plugin_data.content)
  hparams = hp.session_start_info.hparams
  assert hparams['lr'].number_value == pytest.approx(1e-3)
  assert hparams['model.depth'].number_value == 4
  assert hparams['name'].string_value == 'aio5'
  assert hparams['ema'].bool_value
  assert hparams['sizes'].string_value == '(1, 2)'


def test_tensorboard_reads_the_files(tmp_path):
  """TensorBoard's own reader (skipped when tensorboard is not installed)."""
  accumulator_lib = pytest.importorskip(
      'tensorboard.backend.event_processing.plugin_event_accumulator')
  writer = writers.TensorBoardWriter(str(tmp_path))
  writer.write_scalars(3, {'loss': 0.125})
  writer.write_images(3, {'samples': np.zeros((2, 4, 4, 3), np.uint8)})
  writer.close()
  acc = accumulator_lib.EventAccumulator(str(tmp_path))
  acc.Reload()
  assert set(acc.Tags()['tensors']) >= {'loss', 'samples'}
  assert acc.Tensors('loss')[0].step == 3
  assert acc.SummaryMetadata('samples').plugin_data.plugin_name == 'images'
  assert len(acc.Tensors('samples')[0].tensor_proto.string_val) == 4


def test_just_logging_writes_no_files(tmp_path):
  writer = writers.create_writer(str(tmp_path), just_logging=True)
  writer.write_scalars(1, {'loss': 1.0})
  writer.close()
  assert not list(tmp_path.iterdir())


def test_report_progress_runs_with_our_writer(tmp_path):
  writer = writers.create_writer(str(tmp_path), just_logging=False,
                                 asynchronous=False)
  report = periodic_actions.ReportProgress(num_train_steps=4, writer=writer,
                                           every_steps=2)
  for step in range(1, 5):
    with report.timed('train_step', wait_jax_async_dispatch=False):
      pass
    report(step, t=float(step))  # One step per second.
  writer.flush()
  values = values_by_tag(read_events(tmp_path))
  assert values['steps_per_sec', 2].simple_value == 1.0
  assert values['steps_per_sec', 4].simple_value == 1.0


def test_no_tensorflow_is_imported():
  if importlib.util.find_spec('tensorflow') is not None:
    pytest.skip('tensorflow is installed: clu uses its own SummaryWriter.')
  code = ('import sys, drdd_jax.writers, clu.periodic_actions; '
          'assert "tensorflow" not in sys.modules, "tensorflow was imported"; '
          'import clu.metric_writers as m; print(m.SummaryWriter.__name__)')
  result = subprocess.run([sys.executable, '-c', code], cwd=REPO,
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == 'TensorBoardWriter'
