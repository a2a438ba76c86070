#!/usr/bin/env bash
# Where the aio5 train step's GPU time goes (docs/performance.md, "Accelerator"):
# the step at 128x128, 32 pairs + 32 noise targets per device, timed with the
# backend's default flags (per-step and pipelined), then traced once with the
# optimized HLO dumped and CUDA graphs off (each kernel its own trace event),
# and the trace summed by network module and op kind
# (benchmarks/trace_by_scope.py). About 5 minutes on an H200.
#
# Usage: benchmarks/gpu_time_by_scope.sh OUT_DIR [extra drdd_jax.bench flags]
#   CONFIG, PYTHON and TIMEOUT_S (default 240 s per run) as in accelerator.sh.
set -u
out=${1:?usage: benchmarks/gpu_time_by_scope.sh OUT_DIR [bench flags]}
shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
batch=$((32 * $("$python" -c 'import jax; print(jax.local_device_count())')))
tmp=$(mktemp -d)
bench() {
  timeout "${TIMEOUT_S:-240}" "$python" -m drdd_jax.bench \
    --config="${CONFIG:-configs/aio5.py}" --cases=train --image_size=128 \
    --batch="$batch" "$@"
}
bench --json_out="$out/train.jsonl" "$@" >"$out/train.log" 2>&1 ||
  echo "default run failed (exit $?)"
tail -n 3 "$out/train.log"
XLA_FLAGS="--xla_dump_to=$tmp/dump --xla_dump_hlo_module_re=one_step \
--xla_gpu_enable_command_buffer=" \
  bench --json_out="$out/traced.jsonl" --profile_dir="$tmp/prof" "$@" \
  >"$out/traced.log" 2>&1 || echo "traced run failed (exit $?)"
tail -n 3 "$out/traced.log"
hlo=
for f in "$tmp"/dump/*one_step*after_optimizations.txt; do
  [ -f "$f" ] && hlo=$f
done
trace=$(find "$tmp/prof" -name perfetto_trace.json.gz | tail -n 1)
[ -n "$hlo" ] && gzip -c "$hlo" >"$out/hlo.txt.gz"
[ -n "$trace" ] && cp "$trace" "$out/trace.json.gz"
PYTHONPATH="$(dirname "$0")/..${PYTHONPATH:+:$PYTHONPATH}" \
  "$python" "$(dirname "$0")/trace_by_scope.py" --trace="$trace" --hlo="$hlo" \
  --json_out="$out/scope.json" | tee "$out/scope.txt"
