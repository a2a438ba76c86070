"""Test set-up: 8 fake CPU devices (set before jax is imported) and helpers:
`tiny_config` and the module-scoped `cache` fixture for tiny training runs.

A persistent compilation cache shared by the whole session lets tests that
build the same programs (every tiny-config run compiles the same train step
and sampler) compile them once.
"""
import os
import sys
import tempfile

import pytest

# Tests run a few steps of small programs, so they are compile-bound: XLA's
# backend optimizations cost more compile time than they save, and XLA:CPU's
# older loop emitters compile the tiny train step in 60 % of the CPU time of
# its default fusion emitters (13 s against 21 s), with the same results
# within the tests' tolerances. Subprocesses get these flags with
# `xla_flags(devices)`.
FAST_COMPILE = ('--xla_backend_optimization_level=0 '
                '--xla_cpu_use_fusion_emitters=false')


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a test process with `devices` CPU devices."""
  return f'--xla_force_host_platform_device_count={devices} {FAST_COMPILE}'


os.environ.setdefault('XLA_FLAGS', xla_flags(8))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), 'drdd_jax_test_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_config(cache_dir, **overrides):
  """The tiny config with its dataset under `cache_dir`, no final evaluation,
  and `overrides` ({'training.num_steps': 4, ...}) applied."""
  import configs.aio5 as aio5  # pylint: disable=g-import-not-at-top
  config = aio5.get_config('tiny')
  config.data.cache_dir = str(cache_dir)
  config.eval.at_end = False
  config.update_from_flattened_dict(overrides)
  return config


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  """A dataset cache directory shared by a test module's tiny runs."""
  return tmp_path_factory.mktemp('cache')
