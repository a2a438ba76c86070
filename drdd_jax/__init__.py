"""DRDD (Decoupled Residual Denoising Diffusion) in JAX/Flax."""
# Installs the TensorFlow-free TensorBoard writer under clu's metric_writers
# before anything imports clu.metric_writers (see writers.py).
from drdd_jax import writers as _writers  # pylint: disable=unused-import
