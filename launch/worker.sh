#!/usr/bin/env bash
# One host's process of a run: `python3 -m minillm_jax.main ARGS`, started again when its hang watchdog
# stopped it (exit 75: no progress for hang_timeout_s, e.g. a collective that never completed), up to
# --restarts times; each restart resumes from the run's last checkpoint. Any other exit status ends it.
# launch/gpu.sh and launch/tpu.sh run it on every host.
#
#   launch/worker.sh [--restarts N] -- --config configs/gpt2.py:minillm-120m --workdir runs/x
set -uo pipefail

restarts=2
hang_exit=75  # minillm_jax.loop.HANG_EXIT_CODE

while [[ $# -gt 0 ]]; do
  case "$1" in
    --restarts) restarts="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "launch/worker.sh: unknown option $1 (expected --restarts N -- MAIN ARGS)" >&2; exit 2 ;;
  esac
done
if ! [[ $restarts =~ ^[0-9]+$ ]]; then
  echo "launch/worker.sh: --restarts must be a count >= 0, got $restarts" >&2
  exit 2
fi

cd "$(dirname "$0")/.." || exit 2
for ((attempt = 0; ; attempt++)); do
  status=0
  python3 -m minillm_jax.main "$@" || status=$?
  if [[ $status -ne $hang_exit || $attempt -ge $restarts ]]; then
    exit "$status"
  fi
  echo "launch/worker.sh: the run stopped as hung (exit $hang_exit); starting it again from its last checkpoint" \
    "(restart $((attempt + 1)) of $restarts)" >&2
done
