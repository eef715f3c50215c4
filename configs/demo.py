"""The offline default: MiniLLM distils SmolLM2-135M-Instruct into a student built from 10 of its 30
layers (the first 2 and the last 8: SmolLM2's late layers carry the most, bench/layer_cuts.py), on the
project's own instruction set (minillm_jax/data/demo), on CPU.

    python -m minillm_jax.main --config configs/demo.py --workdir runs/demo

Measured 2026-11-30 on the 2-core development machine while it also ran the test suite: 27 min 39 s wall,
1,550 s user CPU, 6.7 GB peak RSS; reverse KL to the teacher per token 4.09 -> 1.31 on the 40 held-out
prompts (sampled protocol), greedy Rouge-L against the teacher's greedy answers 5.9 -> 7.5 (the student's
greedy answers are not fluent yet after 32 steps). It prints those figures with the teacher's and the
student's greedy answers side by side and exports the student to runs/demo/hf (an HF directory
transformers loads). With network, the teacher can come from the hub instead:
--config.teacher=HuggingFaceTB/SmolLM2-135M-Instruct. With your own data (--config.data.train=mine.jsonl),
also set data.holdout (or data.valid) and data.pretrain, which hold out the last 40 records and train L_PT
on the training answers here; the start-up line says which apply.

Preset `tiny` (tests, seconds): tiny random models over a byte-level tokenizer, every task.

    python -m minillm_jax.main --config configs/demo.py:tiny --workdir /tmp/tiny --config.task=sft
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from configs.common import base, smollm2_teacher  # noqa: E402

DEMO_DATA = pathlib.Path(__file__).resolve().parents[1] / "minillm_jax" / "data" / "demo" / "instructions.jsonl"


def get_config(preset: str | None = None):
    c = base()
    c.task = "minillm"
    c.teacher = smollm2_teacher()
    c.student_layers = (0, 1, 22, 23, 24, 25, 26, 27, 28, 29)
    c.data.train = str(DEMO_DATA)
    c.data.valid = ""
    c.data.holdout = 40
    c.data.template = "chat"
    c.data.max_prompt_length = 128
    c.data.max_length = 256
    c.data.pretrain = "@train"  # L_PT on the training answers (the demo ships no other corpus)
    c.data.pretrain_length = 128
    c.sampling.max_new_tokens = 64
    c.steps = 32
    c.batch_size = 8
    c.optimizer.learning_rate = 1e-4
    c.optimizer.warmup_steps = 4
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
