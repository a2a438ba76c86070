"""Test set-up: 8 fake CPU devices (set before jax is imported) and helpers.

A persistent compilation cache shared by the whole session lets tests that
build the same programs (every tiny-config run compiles the same train step
and sampler) compile them once.
"""
import os
import sys
import tempfile

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
