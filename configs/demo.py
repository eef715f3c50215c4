"""The offline default: MiniLLM distils SmolLM2-135M-Instruct into a student built from 26 of its 30
layers (all but the four whose removal costs the least: bench/layer_cuts.py), on the project's own
instruction set (minillm_jax/data/demo), on CPU.

    python -m minillm_jax.main --config configs/demo.py --workdir runs/demo

Measured on the 2-core development machines with nothing else running, three fresh processes each,
bfloat16 compute over float32 parameters: Intel Xeon with AMX (2026-12-03, 63db4d9) 2:51-3:02 wall, 6.1-6.3 GB
peak RSS, greedy Rouge-L against the teacher's greedy answers on the 16 held-out prompts 24.81 -> 37.67; AMD EPYC
Zen 4 with AVX512-BF16, no AMX (2026-12-04, cbebc2d) 3:13-3:30, 6.1-6.2 GB, 24.93 -> 38.14 (the CPUs' bf16
kernels round differently). float32 (--config.compute_dtype=float32, for CPUs with neither amx_bf16 nor
avx512_bf16): 6:08-6:18 on the Xeon, 6:21 on the AMD (one run). It prints those
figures with the teacher's and the student's greedy answers side by side and exports the student to
runs/demo/hf (an HF directory transformers loads).

Why 26 layers: an untrained layer cut answers fluently only down to about 26 of SmolLM2's 30 layers
(greedy Rouge-L against the full model: 26.3 with these 26, 19.4 with the best 24, 0-5 with 22 or fewer),
and the few minutes of CPU training a demo has cannot heal a deeper cut: a 10-layer student went from word
salad to word salad in 32 MiniLLM steps and 27 minutes (bench/RESULTS.md, issue 14). Two MiniLLM rounds
(32 teacher-mixed rollouts each, 2 PPO epochs of mini-batches of 8: 16 steps), no L_PT (the demo ships
no pre-training corpus), 16 held-out prompts, 48 new tokens.

With network, the teacher can come from the hub instead: --config.teacher=HuggingFaceTB/SmolLM2-135M-Instruct.
With your own data (--config.data.train=mine.jsonl), the last 16 records are still held out for validation
(data.holdout; or name a file with data.valid); the start-up line says so. With another teacher, clear or
set student_layers (they index SmolLM2's 30 layers).

Preset `tiny` (tests, seconds): tiny random models over a byte-level tokenizer, every task.

    python -m minillm_jax.main --config configs/demo.py:tiny --workdir /tmp/tiny --config.task=sft
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from configs.common import base, smollm2_teacher  # noqa: E402

DEMO_DATA = pathlib.Path(__file__).resolve().parents[1] / "minillm_jax" / "data" / "demo" / "instructions.jsonl"
# Dropping any one of SmolLM2's layers alone keeps the most of the full model's greedy answers for these
# four (Rouge-L 55.2 / 52.0 / 51.7 / 51.7 with 29 layers; all four dropped: 26.3)
DROPPED_LAYERS = (3, 5, 17, 25)


def get_config(preset: str | None = None):
    c = base()
    c.task = "minillm"
    c.teacher = smollm2_teacher()
    c.student_layers = tuple(i for i in range(30) if i not in DROPPED_LAYERS)
    c.data.train = str(DEMO_DATA)
    c.data.valid = ""
    c.data.holdout = 16
    c.data.template = "chat"
    c.data.max_prompt_length = 128
    c.data.max_length = 256
    c.data.pretrain = ""  # no L_PT: the demo ships no pre-training corpus
    c.sampling.max_new_tokens = 48
    c.steps = 16
    c.batch_size = 8
    c.optimizer.learning_rate = 5e-5  # 1e-4 with L_PT on the demo answers: greedy Rouge-L 42.8, not 39.8, 1.4x CPU
    c.optimizer.warmup_steps = 1
    # fused vocabulary terms in one chunk (responses and L_PT sequences alike): their logits are made once and
    # kept for the backward pass (memory ~ B T V, fine on CPU; chunks bound it elsewhere: bench/RESULTS.md)
    c.logits_chunk_size = 0
    # float32 parameters and optimizer, bfloat16 compute: on CPUs with bfloat16 matrix units (AMX, AVX512-BF16)
    # the demo takes 0.5-0.6x the float32 time (bench/RESULTS.md); without them, --config.compute_dtype=float32
    c.compute_dtype = "bfloat16"
    c.minillm.num_rollouts = 32
    c.minillm.ppo_epochs = 2
    c.eval_every = c.steps
    c.checkpoint_every = c.steps
    for name in c.eval.sets:  # task eval on the demo student: only the sets you name
        c.eval.sets[name] = ""
    if preset == "tiny":
        tiny(c)
    elif preset:
        raise ValueError(f"configs/demo.py: unknown preset {preset!r} (expected none or 'tiny')")
    return c


def tiny(c):
    """Random models (teacher 2 layers, student 1) over the byte tokenizer: every task in seconds."""
    c.tokenizer = "byte"
    c.teacher = "random:llama:layers=2,hidden=64,heads=4,kv_heads=2,mlp=128"
    c.student_layers = ()
    c.student = "random:llama:layers=1,hidden=32,heads=2,kv_heads=1,mlp=64"
    c.data.max_train_examples = 32
    c.data.holdout = 4
    c.data.max_prompt_length = 256
    c.data.max_length = 320
    c.data.pretrain = "@train"  # the tests cover L_PT through this preset
    c.compute_dtype = ""  # float32, as the tests' expectations were written (bf16: tests/test_main.py, parity)
    c.data.pretrain_length = 32
    c.sampling.max_new_tokens = 8
    c.steps = 4
    c.batch_size = 4
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 0
    c.minillm.num_rollouts = 8
    c.minillm.ppo_epochs = 1
    c.eval_every = 2
    c.checkpoint_every = 2
    c.logging.progress = False
    c.eval.sets.dolly = str(DEMO_DATA)
    c.eval.seeds = (10, 20)
    c.eval.limit = 4
    c.eval.max_new_tokens = 8
    c.eval.batch_size = 4
