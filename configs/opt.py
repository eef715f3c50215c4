"""The paper's OPT setups: teacher OPT-13B fine-tuned on Dolly, students OPT-1.3B / 2.7B / 6.7B.
Presets '<method>-<size>', method in {teacher_sft, sft_init, sft, kd, seqkd, minillm}, size in {1.3b, 2.7b,
6.7b} (teacher_sft: 13b). Data as in configs/gpt2.py (`python -m minillm_jax.data.prepare dolly --output
data/dolly`).

    python -m minillm_jax.main --config configs/opt.py:sft_init-1.3b --workdir runs/opt-1.3b-sft_init
    python -m minillm_jax.main --config configs/opt.py:minillm-1.3b --workdir runs/opt-1.3b-minillm \
        --config.mesh.fsdp=8 --config.mesh.data=-1

Reference scripts (microsoft/LMOps minillm/scripts/opt/): sft/sft_*.sh (sft_init: the checkpoint with the
lowest validation loss; sft: the best validation Rouge-L), kd/kd_*.sh, seqkd/seqkd_*.sh,
minillm/train_*.sh. As for GPT-2, the reference's global batch is its per-GPU batch times the GPU count;
ours is fixed (32 for SFT/KD/SeqKD, 64 for MiniLLM) and step counts are derived from epochs (10 for the
13B teacher, 20 for the students).

Target: a TPU v5p-64 slice or 8x H100 (the 13B teacher is sharded with fsdp/tensor). Runtime (estimated,
not measured): MiniLLM 1.3B <- 13B, 5,000 steps, about 1-2 days on 8x H100. L_PT reads a RoBERTa-style
corpus; the default is OpenWebText from the hub (override --config.data.pretrain).
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from configs.common import base, paper_setup, parse_preset  # noqa: E402

STUDENTS = {"1.3b": ("facebook/opt-1.3b", 1e-5), "2.7b": ("facebook/opt-2.7b", 1e-5),
            "6.7b": ("facebook/opt-6.7b", 1e-5), "13b": ("facebook/opt-13b", 1e-5)}


def get_config(preset: str | None = "minillm-1.3b"):
    method, size = parse_preset(preset, ("teacher_sft", "sft_init", "sft", "kd", "seqkd", "minillm"), tuple(STUDENTS),
                                "configs/opt.py")
    student, lr = STUDENTS[size]
    c = paper_setup(base(), method, teacher="runs/opt-13b-sft/hf" if method != "teacher_sft" else student,
                    student=student, sft_lr=lr, sft_init=f"runs/opt-{size}-sft_init/hf",
                    pretrain="Skylion007/openwebtext")
    c.dtype = "bfloat16"
    c.remat = "dots"
    c.mesh.update(dict(data=-1, fsdp=8, tensor=1))
    c.batch_size = 64 if method == "minillm" else 32
    return c
