#!/usr/bin/env bash
# Every GPU check of the open issues in one run, printing one table each (see bench/RESULTS.md):
#   issue 4: student train step and teacher scoring tok/s and MFU vs the HF eager anchors
#   attention: XLA (what the model uses) against cuDNN's fused kernel at the train/decode shapes, the first
#            suspect for the train step's 12.6% MFU on the H200 (2026-12-01)
#   issue 3: sampling throughput vs transformers.generate (GPT-2 124M, B in {32, 128}; teacher-mixed
#            124M + GPT-2 XL with the fraction of the memory-bandwidth bound)
#   issue 6: compiled per-device memory of the GPT-2 XL -> 124M KD step at batch 64 x 512
# Prepare here first: ../shared/tools/offline_wheels.sh (wheels the GPU image lacks, into .whl/), then
# carry .whl to the device and run: bash bench/gpu_suite.sh
# Sized for a 15-minute device budget: one fresh process per side (a GPU is not bimodal the way the
# 2-core CPU is), each section under its own time limit, a failed section does not stop the others. The
# log is also written to $OUT/gpu_suite.log when $OUT is set.
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ -d .whl ]]; then
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --target .site .whl/*
  export PYTHONPATH=$PWD/.site:${PYTHONPATH:-}
fi
log=${OUT:-/tmp}/gpu_suite.log
exec > >(tee -a "$log") 2>&1
section() {  # title, time limit in s, command...
  local title=$1 limit=$2 start=$SECONDS
  shift 2
  echo "## $title"
  timeout "$limit" "$@"
  local rc=$?
  echo "(section: rc $rc, $((SECONDS - start)) s)"
}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
python3 -c "import jax, flax, transformers, torch; print('jax', jax.__version__, 'flax', flax.__version__, \
'transformers', transformers.__version__, 'torch', torch.__version__, jax.devices())"
section "attention: XLA vs cuDNN (bench/attention_impl.py)" 90 python3 bench/attention_impl.py
section "train step and scoring (issue 4)" 200 python3 bench/train_mfu.py --repeats 10
section "sampling (issue 3)" 260 python3 bench/sampling.py --suite gpu --repeats 3 --processes 1
for remat in none full; do
  section "memory of the GPT-2 XL -> 124M KD step, batch 64 x 512, remat $remat (issue 6)" 90 \
    env JAX_PLATFORMS=cuda python3 bench/memory_plan.py --setup gpt2xl-124m --remat "$remat" --cpu-hoisting
done
