"""Builds the optional native parts; the rest is declared in pyproject.toml.

- `drdd_jax._bf16_conv` (`csrc/bf16_conv.cc`, `csrc/linear_attention.cc`,
  `csrc/group_norm.cc`): the CPU's bfloat16 convolution kernels, the linear
  attention's float32 softmax products and GroupNorm + SiLU's gradient
  (drdd_jax/bf16_conv.py);
- `drdd_jax._block_cache` (`csrc/block_cache.c`): a library that the
  package's programs preload to keep XLA:CPU's per-call blocks
  (drdd_jax/host_memory.py). Linux only; it is never imported.

Each is skipped where it cannot be compiled (`optional=True`): bfloat16
convolutions then stay on XLA's, allocations on glibc's.
"""
import os
import sys

import jaxlib
from setuptools import Extension, setup

extensions = [Extension(
    'drdd_jax._bf16_conv',
    sources=['csrc/bf16_conv.cc', 'csrc/linear_attention.cc',
             'csrc/group_norm.cc'],
    include_dirs=['csrc',
                  os.path.join(os.path.dirname(jaxlib.__file__), 'include')],
    extra_compile_args=['-std=c++17', '-O3'], language='c++',
    optional=True)]
if sys.platform.startswith('linux'):
  extensions.append(Extension(
      'drdd_jax._block_cache', sources=['csrc/block_cache.c'],
      extra_compile_args=['-O2'], libraries=['dl', 'pthread'],
      optional=True))
setup(ext_modules=extensions)
