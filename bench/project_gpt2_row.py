"""Projected wall time of the paper's GPT-2 row (student GPT-2 124M <- teacher GPT-2 XL 1.5B, Dolly, every stage
of `python -m minillm_jax.pipeline --config configs/gpt2.py --size 120m --teacher-size 1.5b`) on one 80 GB GPU,
from the FLOPs XLA counts in our compiled steps. Nothing is allocated: every step is lowered with
ShapeDtypeStructs on CPU and compiled there for its cost analysis. Prints one Markdown table.

    python bench/project_gpt2_row.py            # the paper's shapes (~10 min of compiles on 2 CPU cores)
    python bench/project_gpt2_row.py --smoke    # tiny shapes, to test the script itself

Counting. XLA's cost analysis counts a loop body once, whatever its trip count. The layer loop (`lax.scan` in
models/transformer.py) is unrolled while tracing (this script wraps `jax.lax.scan` so that calls from that file
get `unroll=True`), so each compiled step below holds every layer; the remaining loops are multiplied here by
their trip counts, each body compiled on its own:
  - SFT / KD / teacher-SFT step (batch 32 x (256 prompt + 256 answer), fwd + bwd + AdamW): exact, no loop.
  - MiniLLM round: `trainers.minillm.rollout_buffer` (256 rollouts: teacher-mixed sampling of 256 new tokens
    after 256-token prompts, rescoring in 4 chunks of 64) counts the prefills, ONE decode step and ONE rescoring
    chunk; the round adds 255 decode steps (student + teacher `decode_step` at B=256 on a 512-slot cache), 255
    times the per-token sampling math (log-softmax of both models, the mixture, the draw, at [256, V]), 3
    rescoring chunks, and 16 PPO steps (4 epochs x 4 mini-batches of 64: `minillm_loss` fwd + bwd + AdamW, with
    an L_PT batch of 64 x 512 whose KD half runs the teacher forward).
  - Sampling elsewhere (SeqKD's teacher answers, validation, greedy summaries, evaluation): prefill + 256 decode
    steps per batch, from the same compiled decode steps scaled linearly in the batch.

The models are compiled in float32 (XLA:CPU lowers bf16 dots to f32 ones with converts around them and counts
those, which would quadruple a decode step's count); the dtype does not change a matmul's FLOPs.

Time. MFU is FLOPs / (time x 783 TFLOP/s), the bf16 matmul ceiling measured on an H100 in
../shared/docs/architecture.md. "target": this project's targets there (student fwd + bwd 40% MFU, teacher
forward / scoring 55% MFU, sampling at 60% of the HBM bound); "anchor": the PyTorch/HF rates measured there
(student fwd + bwd 16% MFU, teacher forward 32% MFU; sampling at HF generate's 13,557 of ~190k tok/s = 7.1% of
the HBM bound, applied to every sampler since HF offers no teacher-mixed one); "h200": the rates our code
reached in bench/gpu_suite.sh on one H200 (2026-12-01), as the same fractions. A decode step costs
max(FLOPs / (55% x peak), bytes / (fraction x 2.99 TB/s)), the bytes counted here, not by XLA: every weight
once in bf16 plus the whole fixed-size KV cache (our decode attends over all 512 slots). Validation (1,000
prompts every epoch, every 100 MiniLLM steps) and the runs' greedy before/after answers are included; data
loading, checkpoints and compiles are not.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from types import SimpleNamespace

PEAK = 783e12  # bf16 matmul FLOP/s, H100 (architecture.md, measured with JAX)
HBM = 2.99e12  # bytes/s, device copy read + write (architecture.md)
MFU = {"target": {"train": 0.40, "score": 0.55, "sample": 0.60}, "anchor": {"train": 0.16, "score": 0.32,
                                                                            "sample": 13_557 / 190_000},
       # our rates measured by bench/gpu_suite.sh on one H200 (bench/RESULTS.md, 2026-12-01) in this script's
       # units: train 12.6% and scoring 30.6% of 989 TFLOP/s = 15.9% / 38.6% of PEAK; the teacher-mixed sampler at
       # 51% of the bandwidth bound with 2,526 GB/s of copy bandwidth = 43.1% of HBM
       "h200": {"train": 0.159, "score": 0.386, "sample": 0.51 * 2_526 / 2_990}}
DOLLY_TRAIN, VALID, EVAL_PROMPTS = 11_435, 1_000, 500 + 242 + 80 + 1_694  # Dolly test, SelfInst, Vicuna, S-NI


def unroll_layer_scans():
    """Wrap jax.lax.scan so that the layer scan of models/transformer.py is unrolled (XLA then counts every layer)."""
    import jax

    real = jax.lax.scan

    def scan(f, init, xs=None, length=None, reverse=False, unroll=1, **kwargs):
        if sys._getframe(1).f_code.co_filename.endswith(os.path.join("models", "transformer.py")):
            unroll = True
        return real(f, init, xs, length=length, reverse=reverse, unroll=unroll, **kwargs)

    jax.lax.scan = scan


def flops(fn, *args, **static) -> float:
    import jax

    compiled = jax.jit(fn, static_argnames=tuple(static)).lower(*args, **static).compile()
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return float(analysis["flops"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="tiny models and shapes (tests the script)")
    args = parser.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    unroll_layer_scans()
    import jax
    import jax.numpy as jnp
    import transformers
    from flax import nnx

    from minillm_jax.checkpoint import abstract_train_state
    from minillm_jax.models import Transformer
    from minillm_jax.models.families import config_from_hf
    from minillm_jax.sampling import SamplingConfig
    from minillm_jax.trainers import kd, minillm, sft
    from minillm_jax.trainers.common import apply_gradients, make_optimizer, step_keys

    if args.smoke:
        sizes = {"student": dict(n_embd=64, n_layer=2, n_head=2), "teacher": dict(n_embd=96, n_layer=3, n_head=3)}
        vocab, B, MB, P, R, N, EPOCHS, PT = 512, 4, 4, 16, 16, 8, 2, 32
    else:
        sizes = {"student": dict(n_embd=768, n_layer=12, n_head=12),
                 "teacher": dict(n_embd=1600, n_layer=48, n_head=25)}
        vocab, B, MB, P, R, N, EPOCHS, PT = 50257, 32, 64, 256, 256, 256, 4, 512
    started = time.time()
    # counted in float32: XLA:CPU turns bf16 dots into f32 ones plus converts (and counts the converts, ~4x a
    # decode step's FLOPs); a GPU compile fuses them. Matmul FLOPs do not depend on the dtype.
    configs = {name: config_from_hf(transformers.GPT2Config(vocab_size=vocab, n_positions=1024, **size)).replace(
        param_dtype="float32", dtype="float32") for name, size in sizes.items()}
    models = {name: nnx.eval_shape(lambda c=c: Transformer(c, rngs=nnx.Rngs(0))) for name, c in configs.items()}
    graphdefs = {name: nnx.graphdef(m) for name, m in models.items()}
    params = {name: nnx.state(m) for name, m in models.items()}
    n_params = {name: sum(x.size for x in jax.tree.leaves(p)) for name, p in params.items()}
    tx, schedule = make_optimizer(learning_rate=1e-5)
    states = {name: abstract_train_state(m, tx) for name, m in models.items()}
    i32, f32 = jnp.int32, jnp.float32

    def seq_batch(rows, prompt, response):
        return {"prompt": jax.ShapeDtypeStruct((rows, prompt), i32),
                "prompt_mask": jax.ShapeDtypeStruct((rows, prompt), bool),
                "response": jax.ShapeDtypeStruct((rows, response), i32),
                "response_mask": jax.ShapeDtypeStruct((rows, response), bool)}

    sampling = SamplingConfig(max_new_tokens=R, eos_token_id=vocab - 1, pad_token_id=vocab - 1, prompt_buckets=(P,))
    setup = SimpleNamespace(graphdef=graphdefs["student"], teacher_graphdef=graphdefs["teacher"], sampling=sampling,
                            mesh=None, config=SimpleNamespace(logits_chunk_size=0))
    counted = {}

    def supervised_step(name):
        def step(state, batch):
            grads = jax.grad(lambda p: sft.sft_loss(p, graphdefs[name], batch)[0])(state.params)
            return apply_gradients(state, grads, tx, schedule)
        return step

    def kd_step(state, teacher_params, batch):
        loss = lambda p: kd.kd_loss(p, teacher_params, batch, None, setup=setup, kd_ratio=0.5)[0]  # noqa: E731
        return apply_gradients(state, jax.grad(loss)(state.params), tx, schedule)

    def forward(name):
        return lambda p, batch: nnx.merge(graphdefs[name], p)(
            jnp.concatenate([batch["prompt"], batch["response"]], 1),
            jnp.concatenate([batch["prompt_mask"], batch["response_mask"]], 1))

    counted["sft_step"] = flops(supervised_step("student"), states["student"], seq_batch(B, P, R))
    counted["teacher_sft_step"] = flops(supervised_step("teacher"), states["teacher"], seq_batch(B, P, R))
    counted["kd_step"] = flops(kd_step, states["student"], params["teacher"], seq_batch(B, P, R))
    counted["teacher_forward"] = flops(forward("teacher"), params["teacher"], seq_batch(B, P, R))  # B x (P + R)
    print(f"supervised steps compiled ({time.time() - started:.0f} s)", file=sys.stderr, flush=True)

    def decode(name):
        def step(p, tokens, cache):
            return nnx.merge(graphdefs[name], p).decode_step(tokens, cache)
        return step

    def prefill(name):
        def run(p, ids, mask, cache):
            return nnx.merge(graphdefs[name], p).prefill(ids, mask, cache, empty_cache=True, last_only=True)
        return run

    for name, model in models.items():
        cache = jax.eval_shape(lambda m=model: m.init_cache(N, P + R))
        counted[f"{name}_decode"] = flops(decode(name), params[name], jax.ShapeDtypeStruct((N,), i32), cache)
        counted[f"{name}_prefill"] = flops(prefill(name), params[name], jax.ShapeDtypeStruct((N, P), i32),
                                           jax.ShapeDtypeStruct((N, P), bool), cache)

    def sampling_math(student_logits, teacher_logits, key):  # what each mixed decode step adds beyond the models
        from minillm_jax import losses
        from minillm_jax.sampling import sample_categorical

        log_q, log_p = losses.log_probs(student_logits, vocab), losses.log_probs(teacher_logits, vocab)
        return sample_categorical(key, jnp.logaddexp(jnp.log(0.8) + log_q, jnp.log(0.2) + log_p))

    logits = jax.ShapeDtypeStruct((N, vocab), f32)
    counted["sampling_math"] = flops(sampling_math, logits, logits, jax.random.key(0))
    print(f"decode steps compiled ({time.time() - started:.0f} s)", file=sys.stderr, flush=True)

    config = minillm.MiniLLMConfig(num_rollouts=N, ppo_epochs=EPOCHS)
    keys = step_keys(0, 0)
    prompts = (jax.ShapeDtypeStruct((N, P), i32), jax.ShapeDtypeStruct((N, P), bool))
    counted["rollout_buffer"] = flops(
        lambda s, t, ids, mask, order: minillm.rollout_buffer(setup, config, s, t, ids, mask, keys, order, MB),
        params["student"], params["teacher"], *prompts, jax.ShapeDtypeStruct((N,), i32))
    rollouts = seq_batch(MB, P, R)
    counted["rescore_chunk"] = flops(lambda s, t, r, order: minillm.rescore(setup, s, t, r, order, MB),
                                     params["student"], params["teacher"], rollouts, jax.ShapeDtypeStruct((MB,), i32))
    hidden = configs["teacher"].hidden_size
    ppo_batch = {**seq_batch(MB, P, R), "old_logprobs": jax.ShapeDtypeStruct((MB, R), f32),
                 "weights": jax.ShapeDtypeStruct((MB, R), f32), "advantages": jax.ShapeDtypeStruct((MB, R), f32),
                 "teacher_hidden": jax.ShapeDtypeStruct((MB, R, hidden), f32), "pt": seq_batch(MB, 1, PT - 1)}

    def ppo_step(state, teacher_params, batch):
        loss = lambda p: minillm.minillm_loss(p, teacher_params, batch, setup=setup, config=config)[0]  # noqa: E731
        return apply_gradients(state, jax.grad(loss)(state.params), tx, schedule)

    counted["ppo_step"] = flops(ppo_step, states["student"], params["teacher"], ppo_batch)
    print(f"MiniLLM round compiled ({time.time() - started:.0f} s)", file=sys.stderr, flush=True)

    report(counted, n_params, configs, B=B, MB=MB, P=P, R=R, N=N, epochs=EPOCHS, pt=PT, smoke=args.smoke)


def decode_bytes(n_params: dict, configs: dict, models: tuple[str, ...], rows: int, slots: int) -> float:
    """HBM bytes of one decode step: each model's weights in bf16 plus its whole KV cache (bf16)."""
    total = 0.0
    for name in models:
        c = configs[name]
        total += 2 * n_params[name] + 2 * 2 * c.num_layers * rows * slots * c.num_kv_heads * c.head_dim
    return total


def report(counted, n_params, configs, *, B, MB, P, R, N, epochs, pt, smoke) -> None:
    steps_per_round = epochs * N // MB
    rescore_chunks = N // MB
    round_flops = (counted["rollout_buffer"] + (R - 1) * (counted["student_decode"] + counted["teacher_decode"] +
                                                        counted["sampling_math"])
                   + (rescore_chunks - 1) * counted["rescore_chunk"] + steps_per_round * counted["ppo_step"])
    per_row = {k: counted[k] / N for k in ("student_decode", "teacher_decode", "student_prefill", "teacher_prefill")}

    def sampler(mode, models, prompts, rows):
        """Seconds to sample R tokens for `prompts` prompts in batches of `rows` (every row runs to R)."""
        batches = math.ceil(prompts / rows)
        step_flops = sum(per_row[f"{m}_decode"] for m in models) * rows
        step_bytes = decode_bytes(n_params, configs, models, rows, P + R)
        step = max(step_flops / (PEAK * MFU[mode]["score"]), step_bytes / (HBM * MFU[mode]["sample"]))
        prefill = sum(per_row[f"{m}_prefill"] for m in models) * rows / (PEAK * MFU[mode]["score"])
        return batches * (prefill + R * step)

    kd_student = counted["kd_step"] - counted["teacher_forward"]  # the teacher's forward runs at scoring MFU
    ppo_teacher = counted["teacher_forward"] / B * MB * pt / (P + R)  # the L_PT batch's teacher forward

    def train_seconds(mode, student_flops, teacher_flops=0.0):
        return student_flops / (PEAK * MFU[mode]["train"]) + teacher_flops / (PEAK * MFU[mode]["score"])

    def round_seconds(mode):
        sample = sampler(mode, ("student", "teacher"), N, N)
        rescore = rescore_chunks * counted["rescore_chunk"] / (PEAK * MFU[mode]["score"])
        ppo = steps_per_round * train_seconds(mode, counted["ppo_step"] - ppo_teacher, ppo_teacher)
        return sample + rescore + ppo

    sft_steps, teacher_steps, minillm_rounds = math.ceil(20 * DOLLY_TRAIN / B), math.ceil(10 * DOLLY_TRAIN / B), 313

    def validation(mode, steps, every, trained, teacher, rows):
        """Sampling of a training run: validations at step 0 and every `every` steps (1,000 prompts; with a
        teacher, it scores the student's samples in lock-step), the teacher's own answers once, and the greedy
        answers of the student before and after (and of the teacher) for the summary."""
        scored = (trained, "teacher") if teacher else (trained,)
        seconds = (steps // every + 1) * sampler(mode, scored, VALID, rows) + 2 * sampler(mode, (trained,), VALID, rows)
        return seconds + (2 * sampler(mode, ("teacher",), VALID, rows) if teacher else 0.0)

    epoch = math.ceil(DOLLY_TRAIN / B)
    teacher_answers = math.ceil(DOLLY_TRAIN / B) * B * (per_row["teacher_prefill"] + R * per_row["teacher_decode"])
    teacher_row = per_row["teacher_prefill"] + R * per_row["teacher_decode"]
    eval_flops = 5 * EVAL_PROMPTS * (4 * (per_row["student_prefill"] + R * per_row["student_decode"] + teacher_row)
                                     + teacher_row)
    work = {  # stage: (what, training FLOPs, seconds(mode))
        "teacher_sft": (f"{teacher_steps} XL SFT steps (10 epochs of B={B}); validation each epoch",
                        teacher_steps * counted["teacher_sft_step"],
                        lambda m: teacher_steps * train_seconds(m, counted["teacher_sft_step"])
                        + validation(m, teacher_steps, epoch, "teacher", False, B)),
        "sft": (f"{sft_steps} SFT steps (20 epochs of B={B}); validation each epoch",
                sft_steps * counted["sft_step"],
                lambda m: sft_steps * train_seconds(m, counted["sft_step"])
                + validation(m, sft_steps, epoch, "student", False, B)),
        "kd": (f"{sft_steps} KD steps; validation each epoch, the teacher scoring",
               sft_steps * counted["kd_step"],
               lambda m: sft_steps * train_seconds(m, kd_student, counted["teacher_forward"])
               + validation(m, sft_steps, epoch, "student", True, B)),
        "seqkd": (f"the teacher's answers to {DOLLY_TRAIN:,} prompts, then {sft_steps} SFT steps; validation as KD",
                  sft_steps * counted["sft_step"] + teacher_answers,
                  lambda m: sampler(m, ("teacher",), DOLLY_TRAIN, B) + sft_steps * train_seconds(m, counted["sft_step"])
                  + validation(m, sft_steps, epoch, "student", True, B)),
        "minillm": (f"{minillm_rounds} rounds = {minillm_rounds * steps_per_round} steps; validation every 100 "
                    f"steps (B={MB})", minillm_rounds * round_flops,
                    lambda m: minillm_rounds * round_seconds(m)
                    + validation(m, minillm_rounds * steps_per_round, 100, "student", True, MB)),
        "eval": (f"5 models x 5 seeds x {EVAL_PROMPTS:,} prompts (B={B}); students with the teacher scoring",
                 eval_flops, lambda m: 5 * (4 * sampler(m, ("student", "teacher"), EVAL_PROMPTS, B)
                                            + sampler(m, ("teacher",), EVAL_PROMPTS, B))),
    }
    work = {"teacher_sft": work.pop("teacher_sft"), "sft_init": work["sft"], **work}  # phase 1: the same SFT run
    rows = []  # (stage, what, FLOPs, {mode: seconds})
    for stage, (what, total_flops, seconds) in work.items():
        rows.append((stage, what, total_flops, {mode: seconds(mode) for mode in MFU}))

    print(f"\nGPT-2 {n_params['student'] / 1e6:.0f}M <- GPT-2 XL {n_params['teacher'] / 1e9:.2f}B on one 80 GB H100"
          f"{' (SMOKE: tiny shapes)' if smoke else ''}: FLOPs from XLA's cost analysis of our compiled steps (layer "
          "scans unrolled; loop trip counts applied here), time at this project's MFU targets and at the "
          "PyTorch/HF anchors of architecture.md\n")
    print("| compiled unit | XLA GFLOPs (trip-corrected) | analytic check |")
    print("|---|---|---|")
    tokens = B * (P + R)
    analytic = {"sft_step": 6 * n_params["student"] * tokens, "teacher_sft_step": 6 * n_params["teacher"] * tokens,
                "kd_step": (6 * n_params["student"] + 2 * n_params["teacher"]) * tokens,
                "teacher_forward": 2 * n_params["teacher"] * tokens,
                "student_decode": 2 * n_params["student"] * N, "teacher_decode": 2 * n_params["teacher"] * N}
    for name in ("sft_step", "kd_step", "teacher_sft_step", "teacher_forward", "student_decode", "teacher_decode",
                 "student_prefill", "teacher_prefill", "rescore_chunk", "ppo_step", "rollout_buffer"):
        check = f"{analytic[name] / 1e9:,.0f} (6N or 2N per token, no attention)" if name in analytic else ""
        print(f"| {name} | {counted[name] / 1e9:,.1f} | {check} |")
    print(f"| MiniLLM round ({N} rollouts, {steps_per_round} PPO steps) | {round_flops / 1e9:,.0f} | |")
    print(f"\n(rollout_buffer counts one decode step and one rescoring chunk; the round adds {R - 1} decode steps "
          f"of both models with their sampling math ({counted['sampling_math'] / 1e9:,.2f} GFLOP a step), "
          f"{rescore_chunks - 1} rescoring chunks and {steps_per_round} PPO steps. PFLOPs below are the compiled "
          "work, sampling included.)\n")
    print("| stage | work | PFLOPs | time at our targets | time at the PyTorch/HF anchors | time at our rates "
          "measured on one H200 |")
    print("|---|---|---|---|---|---|")
    for stage, what, total_flops, seconds in rows:
        print(f"| {stage} | {what} | {total_flops / 1e15:,.1f} | {_hours(seconds['target'])} | "
              f"{_hours(seconds['anchor'])} | {_hours(seconds['h200'])} |")
    total = {mode: sum(s[mode] for *_, s in rows) for mode in MFU}
    print(f"| **row** | teacher SFT + 5 student runs + evaluation | {sum(r[2] for r in rows) / 1e15:,.1f} | "
          f"**{_hours(total['target'])}** | **{_hours(total['anchor'])}** | **{_hours(total['h200'])}** |")


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


if __name__ == "__main__":
    main()
