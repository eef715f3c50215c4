#!/usr/bin/env bash
# Every GPU check of the open issues in one run, printing one table each (see bench/RESULTS.md), in the
# order of what is most worth the device time:
#   [1] attention: XLA (what the model uses off CPU) against cuDNN's fused kernel at the train/decode shapes,
#       with three ways of giving the model's mask to cuDNN (bench/attention_impl.py); attention is the first
#       suspect for the train step's 15.9% MFU on the H200 (2026-12-01; 12.6% of the data-sheet peak), and
#       bench/gpu_hlo.py's estimate agrees
#   [2] issue 4: student train step and teacher scoring tok/s and MFU vs the HF eager anchors
#   [3] the same, ours only, with the models' attention option "cudnn" (cuDNN's flash attention given the
#       model's boolean mask; compiled for an H200 from the CPU machine, bench/gpu_hlo.py estimates the train
#       step 1.7x and the scoring forward 1.5x faster than with XLA's attention: this measures it)
#   [4] the same with the layers unrolled too (ModelConfig.scan_layers False: no stacked copies of the saved
#       activations; bench/gpu_hlo.py estimates the train step a further ~19% faster, scoring ~2%)
#   [5] issue 3: sampling throughput vs transformers.generate (GPT-2 124M, B in {32, 128}; teacher-mixed
#       124M + GPT-2 XL with the fraction of the memory-bandwidth bound)
#   [6] the same, ours only, with split layers (decode steps over per-layer weights taken once a call, the layers
#       unrolled: no per-step copies of each layer's weights; bench/gpu_hlo.py estimates 1.34x at B 128, 1.70x at
#       B 32, 1.35x teacher-mixed)
#   [7] split layers and 4 cache segments (each decode loop attends over the slots filled by its end; estimated
#       a further 1.11x at B 128, 1.14x teacher-mixed; cache segments alone estimated 1.08x / 1.10x)
#   [8] split layers, 4 cache segments and int8 KV caches (SamplingConfig.kv_cache_dtype: each slot's key and
#       value vectors as int8 with a float32 scale; about half the bytes each decode step's attention reads;
#       estimated a further 1.32x at B 128, 1.14x at B 32, 1.40x teacher-mixed with 1 us a kernel launch, the
#       figure that reproduces this card's decode timings of 2026-12-01), and the models' attention "cudnn"
#       (the prompt prefill's attention: a further 1.03x B 128, 1.04x teacher-mixed): every option, the
#       configuration estimated at ~10x generate at B 128
#   [9, 10] issue 6: compiled per-device memory of the GPT-2 XL -> 124M KD step at batch 64 x 512 (measured on
#       the H200 on 2026-12-01; last, so that a run out of time loses it first)
# (The decode-layout A/B that stood here is decided without a GPU: compiled for an H200, the layer scan copies
# no KV cache, only each layer's weights, and the unrolled layout is estimated slower; bench/RESULTS.md.)
# Prepare here first: ../shared/tools/offline_wheels.sh (wheels the GPU image lacks, into .whl/), then
# carry .whl to the device and run: bash bench/gpu_suite.sh. The section limits add up to more than one
# device call allows (600 s): a run cut short is continued on the same (warm) machine with
#   bash bench/gpu_suite.sh --from N      # N: the first section that did not finish
# Sized for a 15-minute device budget: one fresh process per side (a GPU is not bimodal the way the
# 2-core CPU is), each section under its own time limit, a failed section does not stop the others. The
# log is also written to $OUT/gpu_suite.log when $OUT is set.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
from=1
if [[ ${1:-} == --from ]]; then
  from=${2:?--from needs a section number}
fi
if [[ -d .whl ]]; then
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --target .site .whl/*
  export PYTHONPATH=$PWD/.site:${PYTHONPATH:-}
fi
log=${OUT:-/tmp}/gpu_suite.log
exec > >(tee -a "$log") 2>&1
number=0
section() {  # title, time limit in s, command...
  local title=$1 limit=$2 start=$SECONDS
  shift 2
  number=$((number + 1))
  if ((number < from)); then
    return
  fi
  echo "## [$number] $title"
  timeout "$limit" "$@"
  local rc=$?
  echo "(section $number: rc $rc, $((SECONDS - start)) s)"
}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
python3 -c "import jax, flax, transformers, torch; print('jax', jax.__version__, 'flax', flax.__version__, \
'transformers', transformers.__version__, 'torch', torch.__version__, jax.devices())"
section "attention: XLA vs cuDNN (bench/attention_impl.py)" 90 python3 bench/attention_impl.py
section "train step and scoring (issue 4)" 200 python3 bench/train_mfu.py --repeats 10
section "train step and scoring, ours with --config.attention=cudnn (ModelConfig.attention)" 120 \
  python3 bench/train_mfu.py --repeats 10 --ours-only --attention cudnn
section "train step and scoring, ours with --config.attention=cudnn --config.scan_layers=False" 120 \
  python3 bench/train_mfu.py --repeats 10 --ours-only --attention cudnn --unrolled
section "sampling (issue 3)" 260 python3 bench/sampling.py --suite gpu --repeats 3 --processes 1
section "sampling, ours with --config.sampling.split_layers=True" 200 \
  python3 bench/sampling.py --suite gpu --repeats 3 --processes 1 --no-hf --split-layers
section "sampling, ours with --config.sampling.split_layers=True --config.sampling.cache_segments=4" 200 \
  python3 bench/sampling.py --suite gpu --repeats 3 --processes 1 --no-hf --split-layers --cache-segments 4
section "sampling, ours with split_layers, cache_segments=4, kv_cache_dtype=int8 and --config.attention=cudnn" 200 \
  python3 bench/sampling.py --suite gpu --repeats 3 --processes 1 --no-hf --split-layers --cache-segments 4 \
  --kv-cache-dtype int8 --attention cudnn
for remat in none full; do
  section "memory of the GPT-2 XL -> 124M KD step, batch 64 x 512, remat $remat (issue 6)" 90 \
    env JAX_PLATFORMS=cuda python3 bench/memory_plan.py --setup gpt2xl-124m --remat "$remat" --cpu-hoisting
done
