"""Builds the optional CPU kernels (`csrc/bf16_conv.cc`, see drdd_jax/bf16_conv.py).

The rest of the package is declared in pyproject.toml. Where no C++17
compiler is found the build is skipped (`optional=True`) and bfloat16
convolutions stay on XLA's.
"""
import os

import jaxlib
from setuptools import Extension, setup

setup(ext_modules=[Extension(
    'drdd_jax._bf16_conv', sources=['csrc/bf16_conv.cc'],
    include_dirs=[os.path.join(os.path.dirname(jaxlib.__file__), 'include')],
    extra_compile_args=['-std=c++17', '-O3'], language='c++',
    optional=True)])
