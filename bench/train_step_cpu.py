"""Student train step (fwd + bwd + AdamW) at the demo's shapes on CPU: tokens/s against HF + torch eager, and
achieved FLOP/s against this CPU's measured float32 matmul peak (issue 11). Prints one Markdown table.

    python bench/train_step_cpu.py [--processes 3] [--repeats 5] [--batch 8] [--length 192] [--response 64]
    python bench/train_step_cpu.py --smoke      # tiny shapes, to test the script itself
    python bench/train_step_cpu.py --repo DIR   # ours from another checkout of the package
    python bench/train_step_cpu.py --dtype bfloat16   # mixed precision on both sides (below)

The model: 10 SmolLM2-135M layers (the demo's student until 2026-12-01, now 26) (hidden 576, 9 heads, 3 KV heads,
MLP 1536, vocab 49,152, tied embeddings, RoPE theta 1e5), random weights, float32. A batch is 8 rows of 192
random tokens (no padding); the loss is the token cross-entropy over the last 64 positions (the response),
with logits computed at every position on both sides (as HF's LlamaForCausalLM and our model do by default).
The optimizer on both sides is AdamW (lr 1e-4, betas 0.9/0.95, eps 1e-8, weight decay 1e-6) after a global
grad-norm clip at 1.0 (our `make_optimizer`; torch: clip_grad_norm_ + torch.optim.AdamW, default foreach).

  - ours: `ours_train_step` below, the one place that touches the package: our Transformer built from a
    ModelConfig, our optimizer, and a jitted value_and_grad + optax update with the train state donated.
  - HF: transformers' LlamaForCausalLM (default attention, sdpa), eager, torch.set_num_threads(2).

`--dtype bfloat16`: mixed precision, float32 parameters and optimizer on both sides, the model computed in
bfloat16: ours with `compute_dtype` bfloat16 (matmuls with bf16 operands and float32 accumulation), torch under
`torch.autocast("cpu", dtype=torch.bfloat16)` (oneDNN); the peak is then each library's bf16 matmul (bf16
operands, float32 accumulation in JAX; bf16 in torch).

Each side runs in --processes fresh processes, the sides alternating (the other side's threads never
run beside it); each process takes the median of --repeats steps after 2 warm-up steps (our compile), and
measures this CPU's float32 matmul peak with its own library (2048x2048 @ 2048x2048, median of 10 after
warm-up). The table shows the slowest and fastest process (the min and max of the per-process medians).

FLOPs per step, the usual model count: 6 * (N + V*d) * tokens + 12 * L * d * T * tokens, where N = the
non-embedding parameters (layers and final norm; the embedding lookup costs no FLOPs), V*d the tied
unembedding matmul (run at every position), and 12*L*d*T the attention scores and weighted values (forward
4*L*d*T per token over the full T x T product, as in bench/train_mfu.py; backward twice that). Ours also
reports XLA's own count (`jit(...).lower(...).compile().cost_analysis()["flops"]`), which counts the body of a
loop once: our layers run in a `lax.scan`, so that figure holds the unembedding, the optimizer and ONE layer
(at the demo shapes ~298 G of the model count's ~608 G; 261 G of which is the unembedding), an undercount.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

OPTIM = dict(learning_rate=1e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=1e-6, max_grad_norm=1.0)
DEMO_STUDENT = dict(vocab_size=49152, hidden_size=576, num_layers=10, num_heads=9, num_kv_heads=3, head_dim=64,
                    intermediate_size=1536, max_position_embeddings=8192, rope_theta=100000.0, norm_eps=1e-5)
SMOKE_STUDENT = dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                     intermediate_size=128, max_position_embeddings=256, rope_theta=10000.0, norm_eps=1e-5)
WARMUP = 2


# ------------------------------------------------------------------------------------------ ours


def ours_train_step(dims: dict, tokens: np.ndarray, loss_mask: np.ndarray, compute_dtype: str = "float32"):
    """Our model, our optimizer and one jitted fwd + bwd + AdamW step on a fixed batch.

    Returns (step, info): `step()` runs one step and blocks until it is done; info holds the XLA FLOP count of
    one step and the parameter count. The only code here that depends on the package's API."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from minillm_jax import losses
    from minillm_jax.models.config import ModelConfig
    from minillm_jax.models.transformer import Transformer
    from minillm_jax.trainers.common import make_optimizer

    config = ModelConfig(model_type="llama", tie_word_embeddings=True, dtype=compute_dtype, param_dtype="float32",
                         **dims)
    model = Transformer(config, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tx, _ = make_optimizer(**OPTIM)
    state = (params, tx.init(params))

    def loss_fn(params, tokens, loss_mask):  # the package's token cross-entropy, at every position (as HF)
        logits = nnx.merge(graphdef, params)(tokens)[:, :-1]  # float32 [B, T-1, V]
        nll = losses.cross_entropy(losses.log_probs(logits), tokens[:, 1:])
        return losses.masked_mean(nll, loss_mask[:, 1:])

    def train_step(state, tokens, loss_mask):
        params, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens, loss_mask)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    tokens, loss_mask = jnp.asarray(tokens, jnp.int32), jnp.asarray(loss_mask, jnp.int32)
    jitted = jax.jit(train_step, donate_argnums=0)
    compiled = jitted.lower(state, tokens, loss_mask).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    holder = {"state": state}

    def step():
        holder["state"], loss = compiled(holder["state"], tokens, loss_mask)
        jax.block_until_ready(loss)
        return float(loss)

    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    return step, {"xla_flops": float(cost.get("flops", float("nan"))), "params": count}


def ours_worker(case: dict) -> dict:
    import jax
    import jax.numpy as jnp

    tokens, loss_mask = make_batch(case)
    step, info = ours_train_step(case["dims"], tokens, loss_mask, case.get("dtype", "float32"))
    seconds, losses = timed(step, case["repeats"])
    a = jnp.ones((case["matmul"], case["matmul"]), case.get("dtype", "float32"))
    dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    peak = 2 * case["matmul"] ** 3 / median_seconds(lambda: dot(a, a).block_until_ready(), 10)
    return dict(info, seconds=seconds, loss=losses, peak=peak, device=jax.devices()[0].device_kind,
                versions=f"jax {jax.__version__}")


# ------------------------------------------------------------------------------------------ HF + torch


def hf_worker(case: dict) -> dict:
    import torch
    import transformers

    torch.set_num_threads(case["threads"])
    d = case["dims"]
    config = transformers.LlamaConfig(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
        num_hidden_layers=d["num_layers"], num_attention_heads=d["num_heads"], num_key_value_heads=d["num_kv_heads"],
        head_dim=d["head_dim"], max_position_embeddings=d["max_position_embeddings"], rope_theta=d["rope_theta"],
        rms_norm_eps=d["norm_eps"], tie_word_embeddings=True, attention_dropout=0.0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=OPTIM["learning_rate"], betas=(OPTIM["b1"], OPTIM["b2"]),
                                  eps=OPTIM["eps"], weight_decay=OPTIM["weight_decay"])
    tokens, loss_mask = make_batch(case)
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    mask = torch.as_tensor(loss_mask[:, 1:], dtype=torch.float32)

    autocast = case.get("dtype", "float32") != "float32"

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=tokens).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1),
                                                reduction="none").view_as(mask)
        loss = (nll * mask).sum() / mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM["max_grad_norm"])
        optimizer.step()
        return float(loss.detach())

    seconds, losses = timed(step, case["repeats"])
    a = torch.ones((case["matmul"], case["matmul"]), dtype=getattr(torch, case.get("dtype", "float32")))
    peak = 2 * case["matmul"] ** 3 / median_seconds(lambda: torch.matmul(a, a), 10)
    count = sum(p.numel() for p in model.parameters())
    return dict(seconds=seconds, loss=losses, peak=peak, params=count, device="CPU",
                versions=f"torch {torch.__version__}, transformers {transformers.__version__}, "
                         f"{torch.get_num_threads()} threads")


# ------------------------------------------------------------------------------------------ shared


def make_batch(case: dict) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, case["dims"]["vocab_size"], (case["batch"], case["length"]), dtype=np.int32)
    loss_mask = np.zeros_like(tokens)
    loss_mask[:, -case["response"]:] = 1  # target positions: the response
    return tokens, loss_mask


def median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timed(step, repeats: int) -> tuple[float, list[float]]:
    losses = [step() for _ in range(WARMUP)]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - start)
    return statistics.median(times), losses


def model_flops(dims: dict, batch: int, length: int) -> float:
    """6 * (non-embedding params + unembedding) per token + the attention term 12 * L * d * T per token."""
    d, f, L, V = dims["hidden_size"], dims["intermediate_size"], dims["num_layers"], dims["vocab_size"]
    q = dims["num_heads"] * dims["head_dim"]
    kv = dims["num_kv_heads"] * dims["head_dim"]
    per_layer = d * q + 2 * d * kv + q * d + 3 * d * f + 2 * d  # q, k, v, o, gate/up/down, two norms
    non_embedding = L * per_layer + d  # + the final norm
    tokens = batch * length
    return 6 * (non_embedding + V * d) * tokens + 12 * L * q * length * tokens


def spawn(which: str, case: dict, processes: int) -> list[dict]:
    results = []
    for _ in range(processes):
        out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", which, "--case",
                              json.dumps(case)], capture_output=True, text=True, cwd=case["repo"])
        if out.returncode:
            raise SystemExit(f"{which} worker failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"[{which}] {results[-1]['seconds']:.3f} s/step, loss {results[-1]['loss'][0]:.3f} -> "
              f"{results[-1]['loss'][-1]:.3f}", file=sys.stderr, flush=True)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=3, help="fresh processes per side (min and max shown)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per process (median)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=192)
    parser.add_argument("--response", type=int, default=64, help="loss positions at the end of each row")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--matmul", type=int, default=2048, help="square matmul size for the peak")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="compute dtype on both sides (parameters and optimizer stay float32)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, to test the script itself")
    parser.add_argument("--repo", default=str(REPO),
                        help="the checkout whose minillm_jax ours uses (default: this one)")
    parser.add_argument("--worker", choices=["ours", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        case = json.loads(args.case)
        sys.path.insert(0, case["repo"])  # the checkout whose package `ours_train_step` uses
        print(json.dumps((ours_worker if args.worker == "ours" else hf_worker)(case)))
        return

    dims = SMOKE_STUDENT if args.smoke else DEMO_STUDENT
    matmul = 256 if args.smoke else args.matmul
    case = dict(dims=dims, batch=args.batch, length=args.length, response=args.response, repeats=args.repeats,
                threads=args.threads, matmul=matmul, repo=str(Path(args.repo).resolve()), dtype=args.dtype)
    hf, ours = [], []
    for _ in range(args.processes):  # alternating, so both sides see the same spells of this CPU's slow mode
        hf += spawn("hf", case, 1)
        ours += spawn("ours", case, 1)

    tokens = args.batch * args.length
    flops = model_flops(dims, args.batch, args.length)
    peak = max(r["peak"] for r in ours + hf)  # the CPU's measured matmul peak in --dtype, either library

    def span(results, fn, fmt):
        values = sorted(fn(r) for r in results)
        return fmt(values[0]) if len(values) == 1 else f"{fmt(values[0])} - {fmt(values[-1])}"

    def tps(r):
        return tokens / r["seconds"]

    print(f"Student train step (fwd + bwd + AdamW), demo student {ours[0]['params'] / 1e6:.1f}M params "
          f"(HF counts {hf[0]['params'] / 1e6:.1f}M), compute {args.dtype}, batch {args.batch} x {args.length} "
          "tokens, loss on the "
          f"last {args.response}; {args.processes} fresh processes per side, min - max of per-process medians of "
          f"{args.repeats} steps. {ours[0]['versions']}; {hf[0]['versions']}.")
    print(f"Model FLOPs per step {flops / 1e9:.1f} G; XLA's count {ours[0]['xla_flops'] / 1e9:.1f} G (it counts "
          "the scanned layer loop's body once: an undercount). Measured "
          f"{args.dtype} matmul peak ({matmul}^3): JAX {span(ours, lambda r: r['peak'], lambda v: f'{v / 1e9:.1f}')} "
          f"GFLOP/s, torch {span(hf, lambda r: r['peak'], lambda v: f'{v / 1e9:.1f}')} GFLOP/s; % of peak below is "
          f"of the higher ({peak / 1e9:.1f}).")
    print()
    print("| side | s/step | tokens/s | vs HF (best/best) | GFLOP/s (model count) | % of matmul peak | "
          "GFLOP/s (XLA count) |")
    print("|---|---|---|---|---|---|---|")
    best_hf = max(tps(r) for r in hf)
    for label, results in (("HF + torch eager", hf), ("ours (JAX)", ours)):
        best = max(tps(r) for r in results)
        xla = (span(results, lambda r: r["xla_flops"] / r["seconds"], lambda v: f"{v / 1e9:.1f}")
               if "xla_flops" in results[0] else "n/a")
        print(f"| {label} | {span(results, lambda r: r['seconds'], lambda v: f'{v:.3f}')} | "
              f"{span(results, tps, lambda v: f'{v:,.0f}')} | {best / best_hf:.2f}x | "
              f"{span(results, lambda r: flops / r['seconds'], lambda v: f'{v / 1e9:.1f}')} | "
              f"{span(results, lambda r: flops / r['seconds'] / peak, lambda v: f'{v:.0%}')} | {xla} |")


if __name__ == "__main__":
    main()
