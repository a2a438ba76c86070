"""Test set-up: 8 fake CPU devices (set before jax is imported) and helpers.

A persistent compilation cache shared by the whole session lets tests that
build the same programs (every tiny-config run compiles the same train step
and sampler) compile them once.
"""
import os
import sys
import tempfile

# Tests run a few steps of small programs: XLA's backend optimizations would
# cost more compile time than they save (subprocesses inherit the flag).
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8 '
                      '--xla_backend_optimization_level=0')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), 'drdd_jax_test_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
