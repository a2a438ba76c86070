#!/usr/bin/env bash
# One-command set-up and run. Creates .venv (once), installs the package, then:
#   bash run.sh demo   trains on the embedded offline dataset (3-20 min on CPU),
#                      evaluates and writes tables and grids to workdir/demo/eval
#   bash run.sh test   runs the whole test suite (slow end-to-end tests included)
# Extra arguments are passed on (to main.py for demo, to pytest for test).
set -euo pipefail
cd "$(dirname "$0")"
what="${1:-}"
shift || true

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=".venv/.drdd_jax-installed"
# Installed again (the native kernels rebuilt) when the package's build
# inputs changed since.
if [ ! -f "$stamp" ] || [ -n "$(find pyproject.toml setup.py csrc -newer "$stamp" | head -1)" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test]'
  touch "$stamp"
fi

case "$what" in
  demo)
    exec .venv/bin/python -m drdd_jax.main --config=configs/demo.py \
      --workdir="${WORKDIR:-workdir/demo}" "$@"
    ;;
  test)
    # Test files run in parallel (one file per worker process at a time):
    # 8 min instead of 12.5 on the 2-core machine. TEST_WORKERS=0: in-process.
    exec .venv/bin/python -m pytest -q -n "${TEST_WORKERS:-2}" --dist loadfile "$@"
    ;;
  *)
    echo "usage: bash run.sh demo|test [args...]" >&2
    exit 2
    ;;
esac
