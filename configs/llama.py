"""The paper's LLaMA setup: teacher LLaMA-13B fine-tuned on Dolly, student LLaMA-7B (the Llama-2
checkpoints by default). Presets '<method>-<size>', method in {teacher_sft, sft_init, sft, kd, seqkd,
minillm}, size 7b (teacher_sft: 13b). Data as in configs/gpt2.py.

    python -m minillm_jax.main --config configs/llama.py:sft_init-7b --workdir runs/llama-7b-sft_init
    python -m minillm_jax.main --config configs/llama.py:minillm-7b --workdir runs/llama-7b-minillm

Reference scripts (microsoft/LMOps minillm/scripts/llama/): sft/sft_13B.sh (teacher, 10 epochs),
sft/sft_7B.sh (sft_init by validation loss, sft by Rouge-L), kd/kd_7B_13B.sh, seqkd/seqkd_7B_13B.sh,
minillm/train_7B_13B.sh. The reference's global batch is per GPU times the GPU count; ours is fixed (32 /
64).

Target: a TPU v5p-64 slice (see launch/tpu.sh) or 2x8 H100; both models sharded with fsdp=8, tensor=2 by
default. Runtime (estimated, not measured): several days for 5,000 MiniLLM steps.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from configs.common import base, paper_setup, parse_preset  # noqa: E402

STUDENTS = {"7b": ("meta-llama/Llama-2-7b-hf", 1e-5), "13b": ("meta-llama/Llama-2-13b-hf", 1e-5)}


def get_config(preset: str | None = "minillm-7b"):
    method, size = parse_preset(preset, ("teacher_sft", "sft_init", "sft", "kd", "seqkd", "minillm"), tuple(STUDENTS),
                                "configs/llama.py")
    student, lr = STUDENTS[size]
    c = paper_setup(base(), method, teacher="runs/llama-13b-sft/hf" if method != "teacher_sft" else student,
                    student=student, sft_lr=lr, sft_init=f"runs/llama-{size}-sft_init/hf",
                    pretrain="Skylion007/openwebtext")
    c.dtype = "bfloat16"
    c.remat = "dots"
    c.logits_chunk_size = 128
    c.mesh.update(dict(data=-1, fsdp=8, tensor=2))
    return c
