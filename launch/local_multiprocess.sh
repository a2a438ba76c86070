#!/usr/bin/env bash
# Runs N local processes of drdd_jax.main as one multi-process JAX job.
#
# Usage: launch/local_multiprocess.sh N [main.py flags...]
#   e.g. XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu \
#        launch/local_multiprocess.sh 2 --config=configs/aio5.py:tiny --workdir=/tmp/w
# Each process gets --coordinator_address=127.0.0.1:PORT --num_processes=N
# --process_id=i; its output lines are prefixed with "[i] ". If one process
# fails the others are killed and the script exits with that status.
# Env: PYTHON (default python), DRDD_MAIN_MODULE (default drdd_jax.main).
# Needs bash >= 5.1 (wait -n with pids).
set -euo pipefail

if (($# < 1)) || ! [[ $1 =~ ^[1-9][0-9]*$ ]]; then
  sed -n '2,12s/^# \{0,1\}//p' "$0" >&2
  exit 2
fi
n=$1
shift
python=${PYTHON:-python}
module=${DRDD_MAIN_MODULE:-drdd_jax.main}
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

declare -A running=()  # pid -> process id
kill_all() { kill "${!running[@]}" 2>/dev/null || true; }
trap 'kill_all; exit 130' INT TERM

for ((i = 0; i < n; i++)); do
  "$python" -m "$module" "$@" --coordinator_address="127.0.0.1:$port" \
    --num_processes="$n" --process_id="$i" > >(sed -u "s/^/[$i] /") 2>&1 &
  running[$!]=$i
done

status=0
while ((${#running[@]})); do
  rc=0
  wait -n -p done_pid "${!running[@]}" || rc=$?
  i=${running[$done_pid]}
  unset "running[$done_pid]"
  if ((rc != 0 && status == 0)); then
    echo "local_multiprocess.sh: process $i exited with status $rc; stopping the others." >&2
    status=$rc
    kill_all
  fi
done
wait  # Lets the log prefixers drain.
exit "$status"
