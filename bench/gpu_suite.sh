#!/usr/bin/env bash
# Every GPU check of the open issues in one run, printing one table each (see bench/RESULTS.md):
#   issue 3: sampling throughput vs transformers.generate (GPT-2 124M, B in {32, 128}; teacher-mixed
#            124M + GPT-2 XL with the fraction of the memory-bandwidth bound)
#   issue 4: student train step and teacher scoring tok/s and MFU vs the HF eager anchors
#   issue 6: compiled per-device memory of the GPT-2 XL -> 124M KD step at batch 64 x 512
# Prepare here first: ../shared/tools/offline_wheels.sh (wheels the GPU image lacks, into .whl/), then
# carry .whl to the device and run: bash bench/gpu_suite.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -d .whl ]]; then
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --target .site .whl/*
  export PYTHONPATH=$PWD/.site:${PYTHONPATH:-}
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
echo "## sampling (issue 3)"
python3 bench/sampling.py --suite gpu --repeats 5
echo "## train step and scoring (issue 4)"
python3 bench/train_mfu.py --repeats 10
echo "## memory of the GPT-2 XL -> 124M KD step, batch 64 x 512 (issue 6)"
for remat in none full; do
  JAX_PLATFORMS=cuda python3 bench/memory_plan.py --setup gpt2xl-124m --remat "$remat" | tail -1
done
