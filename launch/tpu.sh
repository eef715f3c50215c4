#!/usr/bin/env bash
# Run minillm_jax on a Cloud TPU VM or pod slice: create it (or reuse it), copy this checkout to every
# worker, install the requirements with jax[tpu], run the main job on all workers at once, stream the
# logs, and optionally delete the slice afterwards.
#
#   launch/tpu.sh --name minillm --zone us-east5-a --accelerator v5p-64 [--version VERSION] \
#       [--project P] [--spot] [--restarts N] [--delete] [--dry-run] -- \
#       --config configs/llama.py:minillm-7b --workdir /mnt/gcs/runs/llama-7b-minillm
#
# Everything after `--` goes to `python -m minillm_jax.main`. The workdir must be one directory that every
# worker sees (Orbax writes there from all of them): a bucket mounted with gcsfuse at the same path on each
# worker, or Filestore. Each worker runs launch/worker.sh, which starts a job its hang watchdog stopped
# (exit 75) again, up to --restarts times (default 2), resuming from its last checkpoint. --dry-run prints the
# gcloud commands instead of running them. The TPU software (runtime) version follows the accelerator's
# generation unless --version names one.
set -euo pipefail

name="" zone="" accelerator="" version="" project="" spot=0 restarts=2 delete=0 dry_run=0

usage() {
  sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
  exit "${1:-0}"
}

# The software version Cloud TPU documents for JAX on each generation ("TPU software versions",
# https://cloud.google.com/tpu/docs/runtimes, read 2026-11-30): Trillium (v6e) v2-alpha-tpuv6e, v5p
# v2-alpha-tpuv5, v5e (accelerator types v5litepod-N) v2-alpha-tpuv5-lite, v4 and older tpu-ubuntu2204-base.
software_version() {
  case "$1" in
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v5litepod-*|v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v2-*|v3-*|v4-*) echo "tpu-ubuntu2204-base" ;;
    *) return 1 ;;
  esac
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --accelerator) accelerator="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --spot) spot=1; shift ;;
    --restarts) restarts="$2"; shift 2 ;;
    --delete) delete=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "launch/tpu.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
main_args=("$@")

for required in name zone accelerator; do
  if [[ -z "${!required}" ]]; then
    echo "launch/tpu.sh: --${required} is required (see --help)" >&2
    exit 2
  fi
done
if [[ -z "$version" ]] && ! version="$(software_version "$accelerator")"; then
  echo "launch/tpu.sh: no TPU software version known for --accelerator $accelerator; name one with --version" \
    "(see https://cloud.google.com/tpu/docs/runtimes)" >&2
  exit 2
fi
if ! [[ $restarts =~ ^[0-9]+$ ]]; then
  echo "launch/tpu.sh: --restarts must be a count >= 0, got $restarts" >&2
  exit 2
fi
if [[ ${#main_args[@]} -eq 0 ]]; then
  echo "launch/tpu.sh: give the main job's arguments after --, e.g. -- --config configs/demo.py --workdir /mnt/gcs/run" >&2
  exit 2
fi

# Print (dry run) or run one command, shown with shell quoting so it can be pasted.
run() {
  printf '+'; printf ' %q' "$@"; printf '\n'
  if [[ $dry_run -eq 0 ]]; then
    "$@"
  fi
}

gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone "$zone")
if [[ -n "$project" ]]; then
  where+=(--project "$project")
fi

# 1. Create the slice unless it exists.
if [[ $dry_run -eq 1 ]] || ! "${gcloud_tpu[@]}" describe "$name" "${where[@]}" > /dev/null 2>&1; then
  create=("${gcloud_tpu[@]}" create "$name" "${where[@]}" --accelerator-type "$accelerator" --version "$version")
  if [[ $spot -eq 1 ]]; then
    create+=(--spot)
  fi
  run "${create[@]}"
else
  echo "reusing TPU $name in $zone"
fi

# 2. Copy the committed code (no runs/, no local data) to every worker.
repo="$(cd "$(dirname "$0")/.." && pwd)"
archive="$(mktemp -d)/minillm_jax.tar.gz"
run git -C "$repo" archive --format=tar.gz -o "$archive" HEAD
run "${gcloud_tpu[@]}" scp "$archive" "$name:minillm_jax.tar.gz" "${where[@]}" --worker=all

# 3. Unpack and install on every worker.
setup='rm -rf minillm_jax && mkdir minillm_jax && tar xzf minillm_jax.tar.gz -C minillm_jax && '
setup+='python3 -m pip install -q -r minillm_jax/requirements.txt -U "jax[tpu]"'
run "${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command "$setup"

# 4. The job on all workers at once (one JAX process per worker); their output streams back here.
job="cd minillm_jax && MINILLM_DISTRIBUTED=1 launch/worker.sh --restarts $restarts --$(printf ' %q' "${main_args[@]}")"
status=0
run "${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command "$job 2>&1 | tee -a ~/minillm_jax.log" \
  || status=$?

# 5. Optionally give the slice back (also after a failed job).
if [[ $delete -eq 1 ]]; then
  run "${gcloud_tpu[@]}" delete "$name" "${where[@]}" --quiet
fi
exit "$status"
