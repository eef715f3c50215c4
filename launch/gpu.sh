#!/usr/bin/env bash
# Run minillm_jax on local GPUs: one process sees all of this host's GPUs (JAX uses them as one mesh).
# For several hosts, run this once per host with the same --coordinator and --num-processes and that
# host's --process-id; process 0 writes logs and exports.
#
#   launch/gpu.sh [--gpus 0,1,2,3] [--restarts N] [--dry-run] -- --config configs/gpt2.py:minillm-120m --workdir runs/x
#   launch/gpu.sh --coordinator 10.0.0.1:1234 --num-processes 2 --process-id 0 -- --config ... --workdir /shared/x
#
# Everything after `--` goes to `python -m minillm_jax.main` (through launch/worker.sh, which starts a run its
# hang watchdog stopped again, up to --restarts times, default 2). --dry-run prints the command and its
# environment instead of running it.
set -euo pipefail

gpus="" coordinator="" num_processes=1 process_id=0 restarts=2 dry_run=0

usage() {
  sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
  exit "${1:-0}"
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --gpus) gpus="$2"; shift 2 ;;
    --coordinator) coordinator="$2"; shift 2 ;;
    --num-processes) num_processes="$2"; shift 2 ;;
    --process-id) process_id="$2"; shift 2 ;;
    --restarts) restarts="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "launch/gpu.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
main_args=("$@")

if [[ ${#main_args[@]} -eq 0 ]]; then
  echo "launch/gpu.sh: give the main job's arguments after --, e.g. -- --config configs/demo.py --workdir runs/x" >&2
  exit 2
fi
if [[ $num_processes -gt 1 && -z "$coordinator" ]]; then
  echo "launch/gpu.sh: --num-processes $num_processes needs --coordinator HOST:PORT (process 0's address)" >&2
  exit 2
fi
if ! [[ $restarts =~ ^[0-9]+$ ]]; then
  echo "launch/gpu.sh: --restarts must be a count >= 0, got $restarts" >&2
  exit 2
fi
if ! [[ $process_id =~ ^[0-9]+$ && $process_id -lt $num_processes ]]; then
  echo "launch/gpu.sh: --process-id must be in [0, $num_processes), got $process_id" >&2
  exit 2
fi

env_vars=(
  "XLA_PYTHON_CLIENT_MEM_FRACTION=0.92"  # leave room for NCCL and cuDNN workspaces
  "XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true${XLA_FLAGS:+ $XLA_FLAGS}"
)
if [[ -n "$gpus" ]]; then
  env_vars+=("CUDA_VISIBLE_DEVICES=$gpus")
fi
if [[ $num_processes -gt 1 ]]; then
  env_vars+=("MINILLM_COORDINATOR=$coordinator" "MINILLM_NUM_PROCESSES=$num_processes"
             "MINILLM_PROCESS_ID=$process_id")
fi

cd "$(dirname "$0")/.."
command=(env "${env_vars[@]}" launch/worker.sh --restarts "$restarts" -- "${main_args[@]}")
printf '+'; printf ' %q' "${command[@]}"; printf '\n'
if [[ $dry_run -eq 0 ]]; then
  exec "${command[@]}"
fi
