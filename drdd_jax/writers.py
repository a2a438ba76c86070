"""Metric writers: clu's `MetricWriter` API, TensorBoard files without TF.

Why a shim: `clu.metric_writers` (hence `clu.periodic_actions`) imports
`clu.metric_writers.summary_writer`, whose `SummaryWriter` imports TensorFlow,
which this project does not depend on. When TensorFlow is not importable,
importing this module registers `sys.modules['clu.metric_writers.summary_writer']`
as a small module whose `SummaryWriter` is `TensorBoardWriter` (below), which
writes the same event protos with tensorboardX. clu then imports unchanged:
`metric_writers.SummaryWriter`, `create_default_writer` and `periodic_actions`
all work. This needs one thing: `drdd_jax.writers` is imported before anything
imports `clu.metric_writers` (so before `clu.periodic_actions`). Patching the
two clu modules that bind `SummaryWriter` instead would break silently if clu
moved it. `TensorBoardWriter` cannot subclass `MetricWriter` (importing it
would import clu.metric_writers before the shim exists), so it is registered
as a virtual subclass of that ABC. With TensorFlow installed, clu's own
writer is used and nothing is patched.

Values are written as `tf.summary` writes them: an image batch as one
"images"-plugin tensor (width, height, PNGs) per key, so TensorBoard shows its
N images under one tag; hparams as an hparams session-start info.
"""
import importlib.util
import io
import os
import sys
import time
import types
from typing import Any, Mapping

from absl import logging
import numpy as np
from PIL import Image
from tensorboardX import event_file_writer
from tensorboardX import record_writer
from tensorboardX import summary as tbx_summary
from tensorboardX.proto import event_pb2
from tensorboardX.proto import summary_pb2
from tensorboardX.proto import tensor_pb2
from tensorboardX.proto import tensor_shape_pb2

_DTYPES = {  # numpy dtype -> DataType enum of tensorflow's types.proto.
    np.dtype(np.float32): 1, np.dtype(np.float64): 2, np.dtype(np.int32): 3,
    np.dtype(np.uint8): 4, np.dtype(np.int64): 9, np.dtype(np.bool_): 10,
    np.dtype(np.float16): 19,
}


def _tensor_proto(value: Any) -> tensor_pb2.TensorProto:
  """A TensorProto of a numeric array, or of strings/bytes (DT_STRING)."""
  arr = np.asarray(value)
  shape = tensor_shape_pb2.TensorShapeProto(
      dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in arr.shape])
  if arr.dtype.kind in 'SUO':
    return tensor_pb2.TensorProto(
        dtype=7, tensor_shape=shape, string_val=[
            v if isinstance(v, bytes) else str(v).encode() for v in arr.flat])
  if arr.dtype not in _DTYPES:
    arr = arr.astype(np.float32)
  return tensor_pb2.TensorProto(dtype=_DTYPES[arr.dtype], tensor_shape=shape,
                                tensor_content=arr.tobytes())


def _plugin_metadata(plugin: str) -> summary_pb2.SummaryMetadata:
  return summary_pb2.SummaryMetadata(
      plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=plugin))


def _png(image: np.ndarray) -> bytes:
  """PNG of a uint8, or float in [0, 1], [H, W, C] image (C: 1, 3 or 4)."""
  if image.dtype != np.uint8:
    image = np.round(np.clip(image.astype(np.float32), 0, 1) * 255)
  image = image.astype(np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(
      buffer, format='PNG')
  return buffer.getvalue()


def _flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


class TensorBoardWriter:
  """A `clu.metric_writers.MetricWriter` writing TensorBoard event files.

  Writes are synchronous (clu's `AsyncWriter` moves them off the training
  thread), so `flush()` really has everything on disk; tensorboardX's own
  `FileWriter` queues events in a thread that `flush()` does not drain.
  """

  def __init__(self, logdir: str, flush_secs: float = 30.0):
    record_writer.directory_check(logdir)
    self._events = event_file_writer.EventsWriter(
        os.path.join(logdir, 'events'))
    self._flush_secs = flush_secs
    self._last_flush = time.monotonic()

  def _write(self, step: int, summary: summary_pb2.Summary) -> None:
    self._events.write_event(
        event_pb2.Event(wall_time=time.time(), step=step, summary=summary))
    if time.monotonic() - self._last_flush > self._flush_secs:
      self.flush()  # Keeps a live TensorBoard current between flush() calls.

  def _add(self, step: int, tag: str, **value) -> None:
    value = summary_pb2.Summary.Value(tag=tag, **value)
    self._write(step, summary_pb2.Summary(value=[value]))

  def write_summaries(self, step: int, values: Mapping[str, Any],
                      metadata: Mapping[str, Any] | None = None) -> None:
    for key, value in values.items():
      md = (metadata or {}).get(key)
      if isinstance(md, bytes):
        md = summary_pb2.SummaryMetadata.FromString(md)
      self._add(step, key, tensor=_tensor_proto(value), metadata=md)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    for key, value in scalars.items():
      self._add(step, key, simple_value=float(np.asarray(value)))

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    for key, value in images.items():
      batch = np.asarray(value)
      batch = batch[None] if batch.ndim == 3 else batch
      pngs = [_png(image) for image in batch]
      height, width = batch.shape[1:3]
      tensor = np.array([str(width).encode(), str(height).encode(), *pngs],
                        object)
      self._add(step, key, tensor=_tensor_proto(tensor),
                metadata=_plugin_metadata('images'))

  def write_videos(self, step: int, videos: Mapping[str, Any]) -> None:
    del step, videos
    logging.log_first_n(logging.WARNING,
                        'TensorBoardWriter does not write videos.', 1)

  def write_audios(self, step: int, audios: Mapping[str, Any], *,
                   sample_rate: int) -> None:
    del step, audios, sample_rate
    logging.log_first_n(logging.WARNING,
                        'TensorBoardWriter does not write audios.', 1)

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    for key, value in texts.items():
      self._add(step, key, tensor=_tensor_proto(np.array(value, object)),
                metadata=_plugin_metadata('text'))

  def write_histograms(self, step: int, arrays: Mapping[str, Any],
                       num_buckets: Mapping[str, int] | None = None) -> None:
    for key, value in arrays.items():
      bins = (num_buckets or {}).get(key) or 30  # tf.summary's default.
      self._write(step, tbx_summary.histogram(key, np.asarray(value), bins))

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    flat = {}
    for key, value in _flatten(hparams).items():
      value = value.item() if isinstance(value, np.generic) else value
      flat[key] = value if isinstance(value, (bool, int, float, str)) else str(
          value)
    _, session_start_info, _ = tbx_summary.hparams(flat, {})
    self._write(0, session_start_info)

  def flush(self) -> None:
    self._events.flush()
    self._last_flush = time.monotonic()

  def close(self) -> None:
    self._events.close()


def _install_summary_writer_shim() -> None:
  """Makes clu's SummaryWriter the TensorBoardWriter if TF is unavailable."""
  name = 'clu.metric_writers.summary_writer'
  if (name in sys.modules or 'clu.metric_writers' in sys.modules
      or importlib.util.find_spec('tensorflow') is not None):
    return
  shim = types.ModuleType(name, 'SummaryWriter without TF (drdd_jax.writers).')
  shim.SummaryWriter = TensorBoardWriter
  sys.modules[name] = shim


_install_summary_writer_shim()
# pylint: disable=g-import-not-at-top,g-bad-import-order,wrong-import-position
from clu import metric_writers  # Must follow the shim.
from clu.metric_writers import interface
# pylint: enable=g-import-not-at-top,g-bad-import-order,wrong-import-position

interface.MetricWriter.register(TensorBoardWriter)


def create_writer(logdir: str, *, just_logging: bool,
                  asynchronous: bool = True) -> interface.MetricWriter:
  """clu's default writer: console logs, plus TensorBoard files in `logdir`.

  Args:
    logdir: directory (local or gs://) for the event files.
    just_logging: only log (pass `jax.process_index() > 0`, so that one
      process writes the files).
    asynchronous: write from a background thread; `flush()` waits for it.

  Returns:
    A `MetricWriter`.
  """
  return metric_writers.create_default_writer(
      logdir, just_logging=just_logging, asynchronous=asynchronous)
