"""host_memory: the programs start again with the block cache and huge pages."""
import os
import subprocess
import sys

import pytest

from drdd_jax import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Runs `tune_malloc` as a program's first step would, then prints what the
# (possibly re-executed) process sees; a re-executed process prints once.
# host_memory.py is loaded alone: the package would import jax (seconds).
_SHOW = ('import importlib.util as u, os; '
         's = u.spec_from_file_location("m", "drdd_jax/host_memory.py"); '
         'm = u.module_from_spec(s); s.loader.exec_module(m); '
         'm.tune_malloc(); print(os.environ.get("GLIBC_TUNABLES"), '
         'os.environ.get("LD_PRELOAD"), m.block_cache_loaded())')


def _show(**env):
  env = {k: v for k, v in dict(os.environ, **env).items() if v is not None}
  out = subprocess.run([sys.executable, '-c', _SHOW], cwd=ROOT, env=env,
                       capture_output=True, text=True, check=True, timeout=60)
  return out.stdout.splitlines()


def test_is_program():
  assert host_memory.is_program(['python', '-m', 'drdd_jax.main', '--x=1'])
  assert host_memory.is_program(['/v/bin/python3', '-u', '-m', 'drdd_jax.bench'])
  assert not host_memory.is_program(['python', '-m', 'pytest', 'drdd_jax.x'])
  assert not host_memory.is_program(['python', 'drdd_jax/main.py'])
  assert not host_memory.is_program([])


LIBRARY = host_memory.block_cache_library()
_HUGE = 'glibc.malloc.hugetlb=1' if host_memory.huge_pages_available() else None
_CLEAN = dict(GLIBC_TUNABLES=None, LD_PRELOAD=None, DRDD_JAX_MALLOC=None)


def _joined(*parts):
  return ':'.join(p for p in parts if p) or None


def test_tune_malloc_starts_again_with_the_cache_and_the_tunable():
  loaded = LIBRARY is not None
  assert _show(**_CLEAN) == [f'{_HUGE} {LIBRARY} {loaded}']
  # What the variables hold is kept; a set hugetlb tunable is left alone.
  assert _show(**dict(_CLEAN, GLIBC_TUNABLES='glibc.malloc.arena_max=2')) == [
      f'{_joined("glibc.malloc.arena_max=2", _HUGE)} {LIBRARY} {loaded}']
  assert _show(**dict(_CLEAN, GLIBC_TUNABLES='glibc.malloc.hugetlb=0')) == [
      f'glibc.malloc.hugetlb=0 {LIBRARY} {loaded}']
  assert _show(**dict(_CLEAN, LD_PRELOAD='libm.so.6')) == [
      f'{_HUGE} {_joined("libm.so.6", LIBRARY)} {loaded}']
  # The opt-out.
  assert _show(**dict(_CLEAN, DRDD_JAX_MALLOC='default')) == [
      'None None False']


def _run_preloaded(code, preload=True):
  env = dict(os.environ, DRDD_JAX_MALLOC='default', JAX_PLATFORMS='cpu')
  env.pop('GLIBC_TUNABLES', None)
  if preload:
    env['LD_PRELOAD'] = LIBRARY
  else:
    env.pop('LD_PRELOAD', None)
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  return out.stdout.split()


_needs_library = pytest.mark.skipif(
    LIBRARY is None, reason='csrc/block_cache.c not built (no C compiler)')

_ALLOCATE = """
import ctypes
c = ctypes.CDLL(None)
c.realloc.restype = ctypes.c_void_p
c.malloc_usable_size.restype = ctypes.c_size_t
c.drdd_block_cache_release.restype = ctypes.c_size_t
def memalign(n, align=64):
  p = ctypes.c_void_p()
  assert c.posix_memalign(ctypes.byref(p), ctypes.c_size_t(align),
                          ctypes.c_size_t(n)) == 0
  ctypes.memset(p, 1, n)  # Touched: must be writable memory.
  return p.value
MiB = 2**20
a = memalign(100 * MiB)
c.free(ctypes.c_void_p(a))
b = memalign(100 * MiB)            # The freed block again.
print(a == b, a % (2 * MiB) == 0, c.malloc_usable_size(ctypes.c_void_p(b)))
d = memalign(100 * MiB)            # Both in use: a second block.
c.free(ctypes.c_void_p(b))         # d serves that size: b is let go,
c.free(ctypes.c_void_p(d))         # d is kept.
print(d != b, memalign(100 * MiB) == d)
c.free(ctypes.c_void_p(d))
e = memalign(80 * MiB)             # Another size: the kept one let go.
print(e != d, c.drdd_block_cache_release())
small = memalign(1024)              # glibc's, as are small blocks.
print(c.malloc_usable_size(ctypes.c_void_p(small)) >= 1024)
c.free(ctypes.c_void_p(small))
q = c.realloc(ctypes.c_void_p(e), ctypes.c_size_t(MiB))  # Moved to glibc.
print(ctypes.string_at(q, 4) == b'\x01' * 4, c.drdd_block_cache_release())
c.free(ctypes.c_void_p(q))
g = memalign(100 * MiB)            # In use throughout (a program's input):
h = memalign(100 * MiB)
c.free(ctypes.c_void_p(h))         # a block of its size taken before it
print(memalign(100 * MiB) == h)    # does not make a freed one go.
import os
pid = os.fork()                    # A child can allocate and free its own.
if pid == 0:
  c.free(ctypes.c_void_p(memalign(100 * MiB)))
  os._exit(0)
print(os.waitpid(pid, 0)[1] == 0)
"""


@_needs_library
def test_block_cache_reuses_a_freed_block_of_the_same_size():
  assert _run_preloaded(_ALLOCATE) == [
      'True', 'True', str(100 * 2**20), 'True', 'True', 'True', '0', 'True',
      'True', str(80 * 2**20), 'True', 'True']


_FAULTS = """
import ctypes, resource
# 4 KiB pages whatever the kernel's transparent huge page setting.
PR_SET_THP_DISABLE = 41
assert ctypes.CDLL(None).prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) == 0
import jax, jax.numpy as jnp
from jax import lax
# A 256 MiB temporary per call (the barrier keeps XLA from fusing it away).
f = jax.jit(lambda x: lax.optimization_barrier(jnp.sin(x) * 2).sum())
x = jnp.ones((64 * 2**20,), jnp.float32)
f(x).block_until_ready()
faults = []
for _ in range(5):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sorted(faults)[2])  # The median: a call may start before the last
                          # one's block is freed, and get a fresh one.
"""


@_needs_library
def test_block_cache_keeps_xla_temporaries_between_calls():
  # glibc maps the 256 MiB afresh per call: 65,536 pages of 4 KiB to fault
  # (median of 5 calls).
  without, = _run_preloaded(_FAULTS, preload=False)
  with_cache, = _run_preloaded(_FAULTS)
  assert int(without) > 30_000, without
  assert int(with_cache) < 1_000, with_cache
