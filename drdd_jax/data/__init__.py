"""DRDD's data: paired folders and the embedded default, as grain batches.

  from drdd_jax import data
  it = data.create_train_iterator(config.data, batch_size, noise_batch_size)
  images = data.load_eval_split(config.data, 'derain')

`python -m drdd_jax.data --config=configs/aio5.py:tiny` builds and summarises
a dataset. Layouts, the cache and the embedded set: docs/data.md.
"""
from drdd_jax.data.options import DataError
from drdd_jax.data.options import TASKS
from drdd_jax.data.options import task_names
from drdd_jax.data.pipeline import TrainIterator
from drdd_jax.data.pipeline import create_train_iterator
from drdd_jax.data.pipeline import load_eval_split
