"""The paper's GPT-2 setups: teacher GPT-2 XL (1.5B) fine-tuned on Dolly, students 120M / 340M / 760M.
Presets '<method>-<size>', method in {teacher_sft, sft_init, sft, kd, seqkd, minillm}, size in {120m, 340m,
760m} (teacher_sft: 1.5b). Data: `python -m minillm_jax.data.prepare dolly --output data/dolly` (and
self_inst, vicuna, sinst for the evaluation); `--config.data.root=DIR` points every preset elsewhere.

    python -m minillm_jax.main --config configs/gpt2.py:teacher_sft-1.5b --workdir runs/gpt2-1.5b-sft
    python -m minillm_jax.main --config configs/gpt2.py:sft_init-120m --workdir runs/gpt2-120m-sft_init
    python -m minillm_jax.main --config configs/gpt2.py:minillm-120m --workdir runs/gpt2-120m-minillm
    python -m minillm_jax.main --config configs/gpt2.py:sft-120m --workdir runs/gpt2-120m-sft   # baselines:
    python -m minillm_jax.main --config configs/gpt2.py:kd-120m --workdir runs/gpt2-120m-kd    # kd, seqkd too
    python -m minillm_jax.main --config configs/gpt2.py:minillm-120m --workdir runs/gpt2-120m-eval \
        --config.task=eval --config.student=runs/gpt2-120m-minillm/hf --config.eval.model=both

The presets and the reference scripts (microsoft/LMOps, minillm/scripts/gpt2/):
| preset | reference | what |
|---|---|---|
| teacher_sft-1.5b | sft/sft_xlarge.sh | 10 epochs, lr 5e-5, cosine, selected by validation Rouge-L |
| sft_init-<size> | sft/sft_{base,medium,large}.sh, checkpoint chosen by validation loss | MiniLLM's Phase-1 init |
| sft-<size> | the same scripts, chosen by validation Rouge-L | the SFT baseline |
| kd-<size> | kd/kd_{base,medium,large}.sh | word-level KD, kd_ratio 0.5 |
| seqkd-<size> | tools/generate_data_seqkd.sh + seqkd/seqkd_*.sh | SFT on the teacher's sampled answers |
| minillm-<size> | minillm/train_{base,medium,large}_xl.sh | 5,000 steps from sft_init, L_PT on OpenWebText |

Batch sizes: the reference sets a per-GPU batch (2 for SFT/KD/SeqKD, 16 for MiniLLM) and GPUS_PER_NODE
(16 by default), so its global batch grows with the GPU count. Ours is global and fixed, whatever the
device count: 32 for SFT/KD/SeqKD (2 x 16 GPUs) and 64 for MiniLLM (the PPO mini-batch; 256 rollouts per
round, 4 epochs: 16 optimizer steps per round). Step counts are derived from epochs x 11,435 training
records / batch (configs/common.py: epochs). The reference's teacher is loaded in fp16 for MiniLLM; ours
follows --config.dtype / compute_dtype (bf16 compute here).

Runtime (projected, not measured; see bench/project_gpt2_row.py): MiniLLM 120M <- 1.5B, 5,000 steps, on one
80 GB GPU several hours, dominated by the 256-token teacher-mixed sampling; SFT 120M about 1 h.
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
