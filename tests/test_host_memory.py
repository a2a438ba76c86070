"""host_memory: this package's programs start again with malloc on huge pages."""
import os
import subprocess
import sys

import pytest

from drdd_jax import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Runs `use_huge_pages` as a program's first step would, then prints what the
# (possibly re-executed) process sees; a re-executed process prints once.
# host_memory.py is loaded alone: the package would import jax (seconds).
_SHOW = ('import importlib.util as u, os; '
         's = u.spec_from_file_location("m", "drdd_jax/host_memory.py"); '
         'm = u.module_from_spec(s); s.loader.exec_module(m); '
         'm.use_huge_pages(); print(os.environ.get("GLIBC_TUNABLES"))')


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


@pytest.mark.skipif(not host_memory.huge_pages_available(),
                    reason='no transparent huge pages here')
def test_use_huge_pages_starts_again_with_the_tunable():
  assert _show(GLIBC_TUNABLES=None, DRDD_JAX_MALLOC=None) == [
      'glibc.malloc.hugetlb=1']
  # Other tunables are kept; a set hugetlb tunable is left as it is.
  assert _show(GLIBC_TUNABLES='glibc.malloc.arena_max=2',
               DRDD_JAX_MALLOC=None) == [
                   'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1']
  assert _show(GLIBC_TUNABLES='glibc.malloc.hugetlb=0',
               DRDD_JAX_MALLOC=None) == ['glibc.malloc.hugetlb=0']
  # The opt-out.
  assert _show(GLIBC_TUNABLES=None, DRDD_JAX_MALLOC='default') == ['None']
