#!/usr/bin/env bash
# The accelerator numbers of docs/performance.md, in one run (about 5 minutes
# on an H100): the aio5 train step at 128x128 with 32 pairs + 32 noise targets
# per device in the backend's default dtype (bf16 on GPU/TPU) and in float32,
# the 2+2-step sampler at 128x128 and 256x256, and the matrix-unit ceiling
# (an 8192^3 bf16 matmul) next to the calibration convolution.
#
# Usage: benchmarks/accelerator.sh OUT_DIR [extra drdd_jax.bench flags]
#   Each case appends its JSON to OUT_DIR/<name>.jsonl and its log to
#   OUT_DIR/<name>.log; extra flags go last, so they override the defaults.
#   CONFIG (default configs/aio5.py) picks the config and TIMEOUT_S (default
#   300) bounds each case. A dry run on CPU: CONFIG=configs/aio5.py:tiny
#   benchmarks/accelerator.sh /tmp/acc --image_size=16 --batch=1 --steps=1
set -u
out=${1:?usage: benchmarks/accelerator.sh OUT_DIR [bench flags]}
shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
per_device=$("$python" -c 'import jax; print(jax.local_device_count())')
batch=$((32 * per_device))

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
    --format=csv 2>/dev/null || true
  "$python" -c 'import jax, flax, optax
print("jax", jax.__version__, "flax", flax.__version__, "optax",
      optax.__version__, jax.devices())'
} | tee "$out/device.txt"

status=0
bench() {
  local name=$1
  shift
  timeout "${TIMEOUT_S:-300}" "$python" -m drdd_jax.bench \
    --config="${CONFIG:-configs/aio5.py}" --json_out="$out/$name.jsonl" "$@" >"$out/$name.log" 2>&1 || {
    echo "$name failed (exit $?); see $name.log" | tee -a "$out/device.txt"
    status=1
  }
  tail -n 3 "$out/$name.log"
}

bench train --cases=train --image_size=128 --batch="$batch" \
  --profile_dir="${PROFILE_DIR:-/tmp/drdd_profile}" "$@"
bench sample --cases=sample --sample_sizes=128,256 "$@"
bench ceiling --cases=matmul,calibration "$@"
bench train_f32 --cases=train --image_size=128 --batch="$batch" "$@" \
  --config.training.compute_dtype=float32
exit "$status"
