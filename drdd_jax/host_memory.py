"""Host memory: huge pages for XLA:CPU's buffers, compiler heap handed back.

XLA:CPU takes the temporaries of each call of a compiled program from malloc:
one 933 MiB block per aio5 train step at 64x64. glibc serves a block that
large with a fresh `mmap` and unmaps it when it is freed, so every call
faults all of its pages in again: 240,000 page faults of 4 KiB per step on
this project's CPU machine. With glibc's `glibc.malloc.hugetlb=1` tunable,
malloc asks for transparent huge pages (2 MiB) for such blocks: about 1,500
faults per step, the train step and the 256x256 restore 2-10 % faster in
alternating runs (docs/performance.md), the RSS peak unchanged. Tunables are
read when a process starts, so `use_huge_pages` starts the program again with
the tunable set.
"""
import ctypes
import os
import sys
from typing import Sequence

_TUNABLE = 'glibc.malloc.hugetlb=1'
_THP = '/sys/kernel/mm/transparent_hugepage/enabled'


def is_program(argv: Sequence[str]) -> bool:
  """Whether `argv` (`sys.orig_argv`) runs `python -m drdd_jax.<module>`."""
  argv = list(argv)
  return any(a == '-m' and b.startswith('drdd_jax.')
             for a, b in zip(argv, argv[1:]))


def huge_pages_available() -> bool:
  """Whether the kernel has transparent huge pages on (Linux)."""
  try:
    with open(_THP) as f:
      return '[never]' not in f.read()
  except OSError:
    return False


def use_huge_pages():
  """Re-executes this program with glibc's malloc on transparent huge pages.

  Does nothing where the kernel has no transparent huge pages (off Linux),
  where `GLIBC_TUNABLES` already names the tunable, or when
  `DRDD_JAX_MALLOC=default`. Call it before the program starts any work:
  `drdd_jax/__init__.py` calls it first thing for `python -m drdd_jax.<module>`.
  """
  tunables = os.environ.get('GLIBC_TUNABLES', '')
  if ('glibc.malloc.hugetlb' in tunables or not huge_pages_available()
      or os.environ.get('DRDD_JAX_MALLOC') == 'default'):
    return
  env = dict(os.environ, GLIBC_TUNABLES=':'.join(
      t for t in (tunables, _TUNABLE) if t))
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, list(sys.orig_argv), env)
  except OSError:  # Not re-executable: go on with glibc's defaults.
    pass


def release_freed():
  """Hands heap that the XLA compiler freed back to the OS (glibc only).

  Compiling the aio5 train step leaves about 0.9 GiB of freed compiler memory
  resident, which then adds to the step's own peak (docs/performance.md).
  """
  try:
    ctypes.CDLL('libc.so.6').malloc_trim(0)
  except (OSError, AttributeError):  # Not glibc: nothing to do.
    pass
