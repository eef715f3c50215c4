"""Sampling throughput: our compiled sampler against `transformers.generate` (torch) on the same weights.
Prints one Markdown table.

    python bench/sampling.py --suite cpu        # ~10M Llama-style fp32, B=8, prompt 64, 64 new tokens
    python bench/sampling.py --suite gpu        # GPT-2 124M bf16, B in {32, 128}, prompt 256, 256 new;
                                                # teacher-mixed 124M + GPT-2 XL 1.5B at B=128, with the
                                                # fraction of the memory-bandwidth bound
    python bench/sampling.py --suite gpu --smoke    # the GPU suite's code path at tiny shapes
    python bench/sampling.py --suite gpu --batches 128 --ours-only --also /tmp/other   # ours against another
                                                # checkout of ours (its own bench/sampling.py), no HF side
    python bench/sampling.py --suite gpu --no-hf --cache-segments 4   # ours with SamplingConfig.cache_segments
    python bench/sampling.py --suite gpu --no-hf --split-layers       # ours with SamplingConfig.split_layers
    python bench/sampling.py --suite gpu --no-hf --kv-cache-dtype int8  # and SamplingConfig.kv_cache_dtype
    python bench/sampling.py --suite gpu --no-hf --attention cudnn    # ModelConfig.attention (the prefill's)

Random weights are written once as an HF checkpoint; each side then runs in its own process on the same
files (torch's OpenMP workers spin after each op and would slow JAX in the same process, and JAX
preallocates GPU memory). New tokens/s count every sampled token: no EOS, every row runs to the end.
Timings are medians over --repeats runs after one warm-up, with device synchronisation; each side runs
in --processes fresh processes and the fastest counts.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.timing import median_seconds  # noqa: E402

LLAMA_10M = dict(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False)
GPT2_124M = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
GPT2_XL = dict(vocab_size=50257, n_positions=1024, n_embd=1600, n_layer=48, n_head=25)
GPT2_TINY = dict(vocab_size=512, n_positions=128, n_embd=64, n_layer=2, n_head=4)
GPT2_TINY_TEACHER = dict(vocab_size=512, n_positions=128, n_embd=128, n_layer=3, n_head=4)


def write_checkpoint(kind: str, dims: dict, dtype: str, directory: Path) -> int:
    """Random HF weights of the given shape; returns the parameter count."""
    import torch
    import transformers

    config = {"llama": transformers.LlamaConfig, "gpt2": transformers.GPT2Config}[kind](**dims)
    torch.manual_seed(0)
    # on the GPU when there is one: initialising GPT-2 XL's 1.5B weights on the CPU took 2 minutes of an H200
    # session's 15 (2026-12-01)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------ workers


def hf_worker(case: dict) -> dict:
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = transformers.AutoModelForCausalLM.from_pretrained(case["student"], dtype=getattr(torch, case["dtype"]))
    model = model.to(device).eval()
    b, p, n = case["batch"], case["prompt"], case["new"]
    ids = torch.randint(3, case["vocab"], (b, p), device=device)

    def run():
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0,
                                 top_p=1.0, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
        if device == "cuda":
            torch.cuda.synchronize()
        assert out.shape == (b, p + n)

    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    return {"seconds": median_seconds(run, case["repeats"]), "device": name}


def ours_worker(case: dict) -> dict:
    import jax

    from minillm_jax.models import load_pretrained
    from minillm_jax.sampling import SamplingConfig, generate

    student = load_pretrained(case["student"], dtype=case["dtype"])
    teacher = load_pretrained(case["teacher"], dtype=case["dtype"]) if case.get("teacher") else None
    if case.get("attention", "xla") != "xla":  # as a run's --config.attention sets it (experiment.py)
        for model in filter(None, (student, teacher)):
            model.config = model.config.replace(attention=case["attention"])
    b, p, n = case["batch"], case["prompt"], case["new"]
    prompts = np.random.default_rng(0).integers(3, case["vocab"], (b, p)).tolist()
    segments = case.get("segments", 1)  # options left out at their defaults, so older checkouts run too
    options = {"cache_segments": segments} if segments > 1 else {}
    if case.get("split_layers"):
        options["split_layers"] = True
    if case.get("kv_cache_dtype", "auto") != "auto":
        options["kv_cache_dtype"] = case["kv_cache_dtype"]
    config = SamplingConfig(max_new_tokens=n, prompt_buckets=(p,), **options)
    keys = iter(jax.random.split(jax.random.key(0), case["repeats"] + 1))

    def run():
        out = generate(student, prompts, config, next(keys), teacher=teacher, mix_alpha=case.get("alpha", 0.0))
        jax.block_until_ready(out.tokens)
        assert int(out.lengths.min()) == n

    result = {"seconds": median_seconds(run, case["repeats"]), "device": jax.devices()[0].device_kind}
    if teacher is not None:
        context = p + n // 2  # mean context length over the decode
        kv = case.get("kv_cache_dtype", "auto")
        result["bytes_per_step"] = _bytes_per_step(student, b, context, kv) + _bytes_per_step(teacher, b, context, kv)
        result["copy_bytes_per_second"] = _copy_bandwidth()
    return result


def _bytes_per_step(model, batch: int, context: int, kv_cache_dtype: str = "auto") -> int:
    """Weights plus the whole KV cache as stored (int8: a byte an element and a float32 scale a vector), each
    read once per decode step."""
    import jax
    from flax import nnx

    c = model.config
    weights = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    vector = c.head_dim + 4 if kv_cache_dtype == "int8" else c.head_dim * np.dtype(c.dtype).itemsize
    return weights + 2 * c.num_layers * batch * context * c.num_kv_heads * vector


def _copy_bandwidth() -> float:
    """Device copy bandwidth, bytes read + written per second, on a 1 GiB array."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((256, 1024, 1024), jnp.float32)
    copy = jax.jit(lambda a: a + 1)
    return 2 * x.nbytes / median_seconds(lambda: copy(x).block_until_ready(), 10)


def _spawn(which: str, case: dict, processes: int = 1, checkout: str | None = None) -> dict:
    """Run a worker in `processes` fresh processes; keep the fastest (thread placement at process start
    makes a small machine bimodal, the same for both sides). `checkout`: another checkout's copy of this
    script runs the worker (its package, the same case)."""
    script = str(Path(checkout, "bench", "sampling.py")) if checkout else __file__
    results = []
    for _ in range(processes):
        out = subprocess.run([sys.executable, script, "--worker", which, "--case", json.dumps(case)],
                             capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"{which} worker failed:\n{out.stderr[-4000:]}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return min(results, key=lambda r: r["seconds"])


# ------------------------------------------------------------------------------------------ suites


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--suite", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--processes", type=int, default=3, help="fresh processes per side; the fastest counts")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, to test the script itself")
    parser.add_argument("--batches", help="comma-separated batch sizes instead of the suite's")
    parser.add_argument("--ours-only", action="store_true", help="no HF generate side, no teacher-mixed table")
    parser.add_argument("--no-hf", action="store_true", help="no HF generate side (the teacher-mixed table stays)")
    parser.add_argument("--cache-segments", type=int, default=1,
                        help="our SamplingConfig.cache_segments (--config.sampling.cache_segments in a run)")
    parser.add_argument("--split-layers", action="store_true",
                        help="our SamplingConfig.split_layers (--config.sampling.split_layers in a run)")
    parser.add_argument("--kv-cache-dtype", default="auto",
                        help="our SamplingConfig.kv_cache_dtype (--config.sampling.kv_cache_dtype in a run): int8")
    parser.add_argument("--attention", choices=("xla", "cudnn"), default="xla",
                        help="our models' ModelConfig.attention (--config.attention in a run): the prompt prefill's")
    parser.add_argument("--also", help="another checkout whose sampler runs each case too (one more column)")
    parser.add_argument("--worker", choices=["hf", "ours"], help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps((hf_worker if args.worker == "hf" else ours_worker)(json.loads(args.case))))
        return

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.suite == "cpu":
            kind, dims, dtype, batches, prompt, new = "llama", LLAMA_10M, "float32", (8,), 64, 64
            teacher_dims, mixed_batch = None, None
        elif args.smoke:
            kind, dims, dtype, batches, prompt, new = "gpt2", GPT2_TINY, "bfloat16", (4,), 16, 16
            teacher_dims, mixed_batch = GPT2_TINY_TEACHER, 4
        else:
            kind, dims, dtype, batches, prompt, new = "gpt2", GPT2_124M, "bfloat16", (32, 128), 256, 256
            teacher_dims, mixed_batch = GPT2_XL, 128
        if args.batches:
            batches = tuple(int(b) for b in args.batches.split(","))
        params = write_checkpoint(kind, dims, dtype, tmp / "student")
        base = dict(student=str(tmp / "student"), dtype=dtype, vocab=dims["vocab_size"], prompt=prompt, new=new,
                    repeats=args.repeats, segments=args.cache_segments, split_layers=args.split_layers,
                    kv_cache_dtype=args.kv_cache_dtype, attention=args.attention)
        if args.cache_segments > 1 or args.split_layers or args.kv_cache_dtype != "auto" or args.attention != "xla":
            print(f"ours: cache_segments={args.cache_segments}, split_layers={args.split_layers}, "
                  f"kv_cache_dtype={args.kv_cache_dtype}, attention={args.attention}")
        label = f"{kind} {params / 1e6:.1f}M {dtype}"
        also = f" | {args.also} tok/s | it / ours" if args.also else ""
        print(f"| model | device | batch | prompt | new | HF generate tok/s | ours tok/s | ours / HF{also} |")
        print("|---|---|---|---|---|---|---|---|" + "---|---|" * bool(also))
        for batch in batches:
            case = dict(base, batch=batch)
            ours = _spawn("ours", case, args.processes)
            our_tps = batch * new / ours["seconds"]
            hf_tps = (None if args.ours_only or args.no_hf
                      else batch * new / _spawn("hf", case, args.processes)["seconds"])
            row = (f"| {label} | {ours['device']} | {batch} | {prompt} | {new} | "
                   + (f"- | {our_tps:,.0f} | - |" if hf_tps is None else
                      f"{hf_tps:,.0f} | {our_tps:,.0f} | {our_tps / hf_tps:.1f}x |"))
            if args.also:
                other_tps = batch * new / _spawn("ours", case, args.processes, checkout=args.also)["seconds"]
                row += f" {other_tps:,.0f} | {other_tps / our_tps:.2f}x |"
            print(row, flush=True)
        if teacher_dims is None or args.ours_only:
            return
        teacher_params = write_checkpoint(kind, teacher_dims, dtype, tmp / "teacher")
        mixed = _spawn("ours", dict(base, batch=mixed_batch, teacher=str(tmp / "teacher"), alpha=0.2))
        tps = mixed_batch * new / mixed["seconds"]
        bound = mixed_batch * mixed["copy_bytes_per_second"] / mixed["bytes_per_step"]
        print()
        print("| teacher-mixed, alpha 0.2 | device | batch | prompt | new | ours tok/s | bandwidth bound tok/s | "
              "fraction | copy GB/s |")
        print("|---|---|---|---|---|---|---|---|---|")
        print(f"| {label} + {teacher_params / 1e6:.0f}M teacher | {mixed['device']} | {mixed_batch} | {prompt} | "
              f"{new} | {tps:,.0f} | {bound:,.0f} | {tps / bound:.0%} | "
              f"{mixed['copy_bytes_per_second'] / 1e9:,.0f} |")


if __name__ == "__main__":
    main()
