"""Qwen2.5 setups (not in the paper; same recipe): teacher Qwen2.5-7B-Instruct, students Qwen2.5-0.5B
and 1.5B (their checkpoints pad the vocabulary differently; the code slices to the real tokenizer size).
Chat template instead of Alpaca. Presets '<method>-<size>', method in {sft_init, sft, kd, seqkd, minillm, gkd,
distillm}, size in {0.5b, 1.5b}; sft_init is the Phase-1 SFT selected by validation loss, for a MiniLLM run
that should start from it (--config.student=runs/qwen-<size>-sft_init/hf).

    python -m minillm_jax.main --config configs/qwen.py:minillm-0.5b --workdir runs/qwen-0.5b-minillm

The teacher is used as released (already instruction-tuned), so there is no teacher_sft preset and the
MiniLLM student starts from the released Instruct student unless --config.student is set. Target: one
H100/H200 for 0.5B (teacher in bf16, about 15 GB); runtime (estimated, not measured) about a day for 5,000
MiniLLM steps.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from configs.common import base, paper_setup, parse_preset  # noqa: E402

STUDENTS = {"0.5b": ("Qwen/Qwen2.5-0.5B-Instruct", 1e-5), "1.5b": ("Qwen/Qwen2.5-1.5B-Instruct", 1e-5)}


def get_config(preset: str | None = "minillm-0.5b"):
    method, size = parse_preset(preset, ("sft_init", "sft", "kd", "seqkd", "minillm", "gkd", "distillm"),
                                tuple(STUDENTS),
                                "configs/qwen.py")
    student, lr = STUDENTS[size]
    c = paper_setup(base(), "sft" if method in ("gkd", "distillm") else method, teacher="Qwen/Qwen2.5-7B-Instruct",
                    student=student, sft_lr=lr, sft_init=student,  # MiniLLM from the released Instruct student
                    pretrain="Skylion007/openwebtext")
    if method in ("gkd", "distillm"):
        c.task, c.teacher = method, "Qwen/Qwen2.5-7B-Instruct"
    c.data.template = "chat"
    c.dtype = "bfloat16"
    c.remat = "dots"
    c.logits_chunk_size = 128
    return c
