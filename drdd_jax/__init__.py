"""DRDD (Decoupled Residual Denoising Diffusion) in JAX/Flax."""
import sys as _sys

# First, for this package's programs (`python -m drdd_jax.<module>`): start
# again with XLA:CPU's per-call blocks kept and malloc on huge pages
# (host_memory.py).
from drdd_jax import host_memory as _host_memory
if _host_memory.is_program(getattr(_sys, 'orig_argv', ())):
  _host_memory.tune_malloc()
# Installs the TensorFlow-free TensorBoard writer under clu's metric_writers
# before anything imports clu.metric_writers (see writers.py).
from drdd_jax import writers as _writers  # pylint: disable=unused-import
