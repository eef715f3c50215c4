"""A Table-1 row of tiny random models for tests/test_pipeline.py: configs/demo.py:tiny with presets
sft_init, sft, kd, seqkd and minillm (plain method names, as configs/smollm2.py), one evaluation set of 3
prompts. Training validates nothing (each stage exports its last state) to keep a stage to seconds."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from configs.demo import get_config as demo  # noqa: E402


def get_config(preset: str | None = "minillm"):
    if preset not in ("sft_init", "sft", "kd", "seqkd", "minillm"):
        raise ValueError(f"tests/pipeline_tiny.py: unknown preset {preset!r}")
    c = demo("tiny")
    c.task = "sft" if preset == "sft_init" else preset
    if preset in ("sft_init", "sft"):
        c.teacher = ""
    c.eval_every, c.best_metric, c.checkpoint_every = 0, "", 2
    c.logging.tensorboard = False
    c.eval.limit = 3
    c.eval.exposure_bias_prompts = 2
    return c
