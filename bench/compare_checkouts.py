"""The same CPU workloads on two checkouts of this repository, in interleaved fresh processes: sampling
(`generate`, new tokens/s), decode steps alone (ms per greedy step, prompt prefilled; `decode` at the
sampling shape, `decode_long` with a KV cache 3x the weights' size: B=32, 448 + 64 slots), and a training
forward+backward (tokens/s), on the ~10M Llama of `bench/sampling.py --suite cpu` in fp32 with random
weights. Prints one Markdown table with the min and max over the processes of each side, of the median
wall time and of the median process CPU time (all threads): on a shared, oversubscribed machine the CPU
time is the steadier of the two.

    git worktree add /tmp/before HEAD       # the reference checkout
    python bench/compare_checkouts.py --before /tmp/before [--processes 3] [--chunks 1,4,8,16] \
        [--workloads generate,decode,train] [--other NAME=PATH ...]

`--chunks` adds rows for this checkout's sampler at other `SamplingConfig.decode_chunk` values. Each
process times its workload as the median of --repeats runs after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE))
from bench.greedy import greedy_decoder  # noqa: E402  (imports no minillm_jax: workers time other checkouts)

CONFIG = dict(model_type="llama", vocab_size=8192, hidden_size=256, num_layers=8, num_heads=8, num_kv_heads=4,
              head_dim=32, intermediate_size=688, max_position_embeddings=512, tie_word_embeddings=False)
B, P, R = 8, 64, 64  # sampling: batch, prompt, new tokens
TRAIN_B, TRAIN_T = 8, 128


def _medians(fn, repeats: int) -> tuple[float, float]:
    """Median wall and process-CPU seconds of `repeats` calls after one warm-up call."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def worker(repo: str, workload: str, repeats: int, chunk: int | None) -> dict:
    sys.path.insert(0, repo)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from minillm_jax.models import ModelConfig, Transformer
    from minillm_jax.sampling import SamplingConfig, generate

    assert Path(sys.modules["minillm_jax"].__file__).resolve().is_relative_to(Path(repo).resolve())
    model = Transformer(ModelConfig(**CONFIG), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    rows = np.random.default_rng(0).integers(1, 8000, size=(B, P))
    if workload == "generate":
        extra = {} if chunk is None else dict(decode_chunk=chunk)
        config = SamplingConfig(max_new_tokens=R, eos_token_id=None, prompt_buckets=(P,), **extra)
        keys = iter(jax.random.split(jax.random.key(0), repeats + 1))
        wall, cpu = _medians(
            lambda: jax.block_until_ready(generate(model, rows.tolist(), config, next(keys)).tokens), repeats)
        return dict(wall=B * R / wall, cpu=B * R / cpu, unit="new tok/s")
    if workload in ("decode", "decode_long"):
        b, p, r = (B, P, R) if workload == "decode" else (32, 448, 64)
        ids = jnp.asarray(np.random.default_rng(0).integers(1, 8000, size=(b, p)), jnp.int32)

        prefill, decode = greedy_decoder(graphdef, b, p, r)
        cache = prefill(state, ids)[1]
        wall, cpu = _medians(lambda: jax.block_until_ready(decode(state, cache, ids[:, -1])), repeats)
        return dict(wall=wall / r * 1e3, cpu=cpu / r * 1e3, unit="ms per decode step")
    if workload == "train":
        data = np.random.default_rng(1).integers(1, 8000, size=(TRAIN_B, TRAIN_T))
        mask = np.ones_like(data)
        mask[1:, : TRAIN_T // 4] = 0  # left padding on most rows
        ids, mask = jnp.asarray(data, jnp.int32), jnp.asarray(mask, jnp.int32)

        @jax.jit
        def loss_and_grad(state):
            def loss(state):
                logits = nnx.merge(graphdef, state)(ids[:, :-1], mask[:, :-1])
                logp = jax.nn.log_softmax(logits, axis=-1)
                picked = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
                return -jnp.sum(picked * mask[:, 1:]) / jnp.sum(mask[:, 1:])

            return jax.value_and_grad(loss)(state)

        wall, cpu = _medians(lambda: jax.block_until_ready(loss_and_grad(state)), repeats)
        tokens = TRAIN_B * (TRAIN_T - 1)
        return dict(wall=tokens / wall, cpu=tokens / cpu, unit="train tok/s (fwd+bwd)")
    raise ValueError(workload)


def _spawn(repo: str, workload: str, repeats: int, chunk: int | None) -> dict:
    args = [sys.executable, __file__, "--worker", workload, "--repo", repo, "--repeats", str(repeats)]
    if chunk is not None:
        args += ["--chunk", str(chunk)]
    out = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    if out.returncode:
        raise RuntimeError(f"{workload} worker ({repo}) failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", help="the reference checkout (e.g. a git worktree of HEAD)")
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workloads", default="generate,decode,train")
    parser.add_argument("--chunks", default="", help="extra decode_chunk values to time for this checkout")
    parser.add_argument("--other", action="append", default=[], metavar="NAME=PATH",
                        help="another checkout to time alongside (e.g. an experimental variant)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--repo", help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.repo, args.worker, args.repeats, args.chunk)))
        return
    if not args.before:
        parser.error("--before is required")

    sides = [("before", args.before, None), ("after", str(HERE), None)]
    sides += [(*other.split("=", 1), None) for other in args.other]
    chunks = [int(c) for c in args.chunks.split(",") if c]
    print("| workload | checkout | wall: min | wall: max | CPU time: min | CPU time: max | unit |")
    print("|---|---|---|---|---|---|---|")
    for workload in args.workloads.split(","):
        runs = sides + ([(f"after, decode_chunk={c}", str(HERE), c) for c in chunks] if workload == "generate" else [])
        results = {name: [] for name, _, _ in runs}
        for _ in range(args.processes):  # interleaved, so drifting machine load hits every side alike
            for name, repo, chunk in runs:
                results[name].append(_spawn(repo, workload, args.repeats, chunk))
        for name, _, _ in runs:
            wall, cpu = ([r[kind] for r in results[name]] for kind in ("wall", "cpu"))
            print(f"| {workload} | {name} | {min(wall):,.2f} | {max(wall):,.2f} | {min(cpu):,.2f} | {max(cpu):,.2f} | "
                  f"{results[name][0]['unit']} |", flush=True)


if __name__ == "__main__":
    main()
