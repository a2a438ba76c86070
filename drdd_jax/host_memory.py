"""Host memory: XLA:CPU's per-call blocks kept, compiler heap handed back.

XLA:CPU takes the temporaries of each call of a compiled program from
`posix_memalign`: one 685 MiB block per aio5 train step at 64x64. glibc
serves a block that large with a fresh `mmap` and unmaps it when it is freed,
so on every call the kernel faults in and zeroes all of its pages again
(`perf`: 9 % of the train step's CPU time in the kernel's `clear_page_erms`
on this project's CPU machine). This package's programs therefore start
again, once (`tune_malloc`), with

- `LD_PRELOAD` naming `drdd_jax/_block_cache*.so` (`csrc/block_cache.c`,
  built at install where a C compiler is found; glibc only): it serves
  aligned allocations of 64 MiB or more from its own mappings and keeps a
  freed one for the next request of the same size, so each call reuses the
  last call's pages (a function with a 256 MiB temporary: 3 page faults
  per call instead of 65,541, tests/test_host_memory.py);
- glibc's `glibc.malloc.hugetlb=1` tunable (where the kernel has
  transparent huge pages): malloc asks for 2 MiB pages for the blocks it
  still maps itself.

`DRDD_JAX_MALLOC=default` keeps glibc's defaults. docs/performance.md has
the measurements.
"""
import ctypes
import glob
import os
import platform
import sys
from typing import Optional, Sequence

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


def block_cache_library() -> Optional[str]:
  """The built block cache (`csrc/block_cache.c`) on glibc, else None."""
  if platform.libc_ver()[0] != 'glibc':
    return None
  found = glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                 '_block_cache*.so'))
  return found[0] if found else None


def _block_cache_release():
  """The preloaded block cache's release function, or None."""
  try:
    return getattr(ctypes.CDLL(None), 'drdd_block_cache_release', None)
  except (OSError, TypeError):  # No dynamic loader to ask (not Linux).
    return None


def block_cache_loaded() -> bool:
  """Whether this process runs with the block cache preloaded."""
  return _block_cache_release() is not None


def tune_malloc():
  """Re-executes this program with the block cache and huge pages.

  Adds what is missing of the two (module docstring) to `LD_PRELOAD` and
  `GLIBC_TUNABLES`, keeping what they hold, and starts the program again:
  both are read when a process starts. Does nothing when nothing is missing
  (the block cache not built, no transparent huge pages, a `GLIBC_TUNABLES`
  that already names `glibc.malloc.hugetlb`) or when
  `DRDD_JAX_MALLOC=default`. Call it before the program starts any work:
  `drdd_jax/__init__.py` calls it first thing for `python -m drdd_jax.<module>`.
  """
  if os.environ.get('DRDD_JAX_MALLOC') == 'default':
    return
  env = dict(os.environ)
  tunables, preload = env.get('GLIBC_TUNABLES', ''), env.get('LD_PRELOAD', '')
  if 'glibc.malloc.hugetlb' not in tunables and huge_pages_available():
    env['GLIBC_TUNABLES'] = ':'.join(t for t in (tunables, _TUNABLE) if t)
  library = block_cache_library()
  if library and library not in preload.split(':'):
    env['LD_PRELOAD'] = ':'.join(p for p in (preload, library) if p)
  if env == os.environ:
    return
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
  Also unmaps the blocks the block cache keeps for the next call of the
  program that freed them.
  """
  release = _block_cache_release()
  if release is not None:
    release()
  try:
    ctypes.CDLL('libc.so.6').malloc_trim(0)
  except (OSError, AttributeError):  # Not glibc: nothing to do.
    pass
