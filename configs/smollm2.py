"""DRAFT (sizes being measured)"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from configs.common import base, paper_setup, smollm2_teacher  # noqa: E402

METHODS = ("teacher_sft", "sft_init", "sft", "kd", "seqkd", "minillm")
STUDENT_LAYERS = (0, 3, 6, 9, 12, 15, 18, 21, 24, 29)  # 10 of the teacher's 30, first and last kept
BATCH = 8  # sequences per optimizer step, every method (MiniLLM: rollouts per PPO mini-batch)
INIT_STEPS = 64  # sft_init (phase 1)
STEPS = 192  # every baseline; MiniLLM runs STEPS - INIT_STEPS after sft_init: the same optimizer steps in all
ROLLOUTS, PPO_EPOCHS = 32, 4  # a MiniLLM round: 32 rollouts, 4 epochs of 4 mini-batches = 16 steps
NEW_TOKENS = 128


def get_config(preset: str | None = "minillm"):
    if preset not in METHODS:
        raise ValueError(f"configs/smollm2.py: preset {preset!r} is not one of {', '.join(METHODS)}")
    teacher = smollm2_teacher()
    c = paper_setup(base(), preset, teacher=teacher, student="", sft_lr=1e-4,
                    sft_init="runs/smollm2/sft_init-seed0/hf", pretrain="")
    c.compute_dtype = ""  # float32 on CPU (bfloat16 matmuls are slower there)
    c.student_layers = STUDENT_LAYERS if preset not in ("teacher_sft", "minillm") else ()
    c.data.template = "chat"
    c.data.max_prompt_length, c.data.max_length = 256, 384
    c.data.valid_examples = 64
    c.data.max_train_examples = STEPS * BATCH  # one pass over the same 1,536 prompts for every method
    c.sampling.max_new_tokens = NEW_TOKENS
    c.batch_size = BATCH
    c.keep_checkpoints = 2
    if preset == "minillm":
        c.steps = STEPS - INIT_STEPS
        c.optimizer.update(dict(learning_rate=5e-5, warmup_steps=8))
        c.minillm.update(dict(num_rollouts=ROLLOUTS, ppo_epochs=PPO_EPOCHS, pt_coef=0.0))
        c.eval_every = c.checkpoint_every = 32
    else:
        c.steps = INIT_STEPS if preset == "sft_init" else STEPS
        c.optimizer.update(dict(end_learning_rate=1e-6))
        c.eval_every = c.checkpoint_every = c.steps // 4
    c.eval.max_new_tokens = NEW_TOKENS
    c.eval.limit = 200
    c.eval.batch_size = 32
    c.eval.exposure_bias_prompts = 32
    return c
