"""The paper's GPT-2 setups: teacher GPT-2 XL (1.5B) fine-tuned on Dolly, students 120M / 340M / 760M
with SFT, KD, SeqKD and MiniLLM. Presets '<method>-<size>', method in {teacher_sft, sft, kd, seqkd,
minillm}, size in {120m, 340m, 760m} (teacher_sft: 1.5b).

    python -m minillm_jax.main --config configs/gpt2.py:teacher_sft-1.5b --workdir runs/gpt2-1.5b-sft
    python -m minillm_jax.main --config configs/gpt2.py:sft-120m --workdir runs/gpt2-120m-sft
    python -m minillm_jax.main --config configs/gpt2.py:minillm-120m --workdir runs/gpt2-120m-minillm
    python -m minillm_jax.main --config configs/demo.py --workdir runs/x --config.task=eval \
        --config.student=runs/gpt2-120m-minillm/hf --config.teacher=runs/gpt2-1.5b-sft/hf --config.eval.model=both

MiniLLM starts from the SFT'd student (runs/gpt2-<size>-sft/hf) and the SFT'd teacher
(runs/gpt2-1.5b-sft/hf); override with --config.student / --config.teacher. L_PT reads OpenWebText from
the hub (streamed). Runtime (estimated from FLOPs, not measured): MiniLLM 120M <- 1.5B, 5,000 steps, on
one H100 about 6-10 h, dominated by 256-token sampling; SFT 120M about 1 h.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from configs.common import base, paper_setup, parse_preset  # noqa: E402

STUDENTS = {"120m": ("openai-community/gpt2", 5e-4), "340m": ("openai-community/gpt2-medium", 1e-4),
            "760m": ("openai-community/gpt2-large", 1e-4), "1.5b": ("openai-community/gpt2-xl", 5e-5)}


def get_config(preset: str | None = "minillm-120m"):
    method, size = parse_preset(preset, ("teacher_sft", "sft_init", "sft", "kd", "seqkd", "minillm"), tuple(STUDENTS),
                                "configs/gpt2.py")
    student, lr = STUDENTS[size]
    return paper_setup(base(), method, teacher="runs/gpt2-1.5b-sft/hf" if method != "teacher_sft" else student,
                       student=student, sft_lr=lr, sft_init=f"runs/gpt2-{size}-sft_init/hf",
                       pretrain="Skylion007/openwebtext")
