#!/usr/bin/env bash
# Trains drdd_jax on a Cloud TPU VM pod slice: create (or reuse) the slice, copy
# this checkout to every worker, install it, run `python -m drdd_jax.main`.
#
# Usage: launch/tpu_pod.sh [--dry-run] [--name=N] [--zone=Z] [--type=T]
#          [--runtime=V] [--project=P] [--workdir=gs://B/D] [--config=C]
#          [--repo=GIT_URL] [-- main.py flags...]
# Each --opt defaults to an env var: DRDD_TPU_NAME, DRDD_TPU_ZONE,
# DRDD_TPU_TYPE (v4-32), DRDD_TPU_RUNTIME (tpu-ubuntu2204-base),
# DRDD_GCP_PROJECT (gcloud's default), DRDD_WORKDIR, DRDD_CONFIG
# (configs/aio5.py), DRDD_REPO_URL (empty: scp a tarball of this checkout).
# DRDD_REMOTE_ENV ("K=V ...", e.g. TFDS_DATA_DIR=gs://...) prefixes the run.
# --dry-run prints the commands instead of running them.
set -euo pipefail

name=${DRDD_TPU_NAME:-} zone=${DRDD_TPU_ZONE:-} type=${DRDD_TPU_TYPE:-v4-32}
runtime=${DRDD_TPU_RUNTIME:-tpu-ubuntu2204-base} project=${DRDD_GCP_PROJECT:-}
workdir=${DRDD_WORKDIR:-} config=${DRDD_CONFIG:-configs/aio5.py}
repo=${DRDD_REPO_URL:-} remote_env=${DRDD_REMOTE_ENV:-} dry_run=0
usage() { sed -n '2,13s/^# \{0,1\}//p' "$0" >&2; exit 2; }
while (($#)); do
  case $1 in
    --dry-run) dry_run=1 ;;
    --name=*) name=${1#*=} ;;
    --zone=*) zone=${1#*=} ;;
    --type=*) type=${1#*=} ;;
    --runtime=*) runtime=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    --workdir=*) workdir=${1#*=} ;;
    --config=*) config=${1#*=} ;;
    --repo=*) repo=${1#*=} ;;
    --) shift; break ;;
    -h | --help) usage ;;
    *) echo "tpu_pod.sh: unknown option $1" >&2; usage ;;
  esac
  shift
done
die() { echo "tpu_pod.sh: $1" >&2; exit 2; }
[[ -n $name && -n $zone ]] || die "--name and --zone are required (see --help)."
[[ $workdir == gs://?* ]] || die "--workdir must be a gs:// path all workers reach."

# Dry run: print each command, quoting only the arguments that need it.
show() {
  local a
  for a; do
    if [[ $a =~ ^[[:alnum:]_./:=@,+-]+$ ]]; then printf '%s ' "$a"; else printf '%s ' "${a@Q}"; fi
  done
  echo
}
run() { if ((dry_run)); then show "$@"; else "$@"; fi; }
tpu=(gcloud compute tpus tpu-vm)
loc=(--zone="$zone")
[[ -z $project ]] || loc+=(--project="$project")
remote() { run "${tpu[@]}" ssh "$name" "${loc[@]}" --worker=all --command="$1"; }

# 1. The slice.
if ! run "${tpu[@]}" describe "$name" "${loc[@]}" --format='value(state)' || ((dry_run)); then
  run "${tpu[@]}" create "$name" "${loc[@]}" --accelerator-type="$type" --version="$runtime"
fi

# 2. The code, in ~/drdd_jax on every worker.
if [[ -n $repo ]]; then
  remote "rm -rf ~/drdd_jax && git clone --depth=1 $(printf %q "$repo") ~/drdd_jax"
else
  tarball=${TMPDIR:-/tmp}/drdd_jax_$name.tgz
  root=$(cd "$(dirname "$0")/.." && pwd)
  run tar -czf "$tarball" -C "$root" --exclude-vcs --exclude=.venv \
    --exclude=__pycache__ --exclude=.pytest_cache --exclude='./workdir*' .
  run "${tpu[@]}" scp "$tarball" "$name:drdd_jax.tgz" "${loc[@]}" --worker=all
  remote "rm -rf ~/drdd_jax && mkdir ~/drdd_jax && tar -xzf ~/drdd_jax.tgz -C ~/drdd_jax"
fi

# 3. The environment (google-cloud-storage: TensorBoard event files on gs://).
remote "set -e; [ -x ~/drdd_venv/bin/python ] || { sudo apt-get -qq update && \
sudo apt-get -qq install -y python3-venv && python3 -m venv ~/drdd_venv; }; \
~/drdd_venv/bin/pip install -q -U pip && \
~/drdd_venv/bin/pip install -q -e ~/drdd_jax \"jax[tpu]\" google-cloud-storage"

# 4. The run: the same command on every worker; JAX finds the pod topology.
flags=$(printf ' %q' --config="$config" --workdir="$workdir" "$@")
remote "cd ~/drdd_jax && env DRDD_DISTRIBUTED=auto ${remote_env:+$remote_env }\
~/drdd_venv/bin/python -m drdd_jax.main$flags"
