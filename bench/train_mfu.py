"""Training throughput and MFU: our student train step (fwd + bwd + AdamW) and teacher scoring (forward +
log-softmax gather of the sequence's tokens) against the PyTorch/HF eager anchors, on the same shapes.
Prints one Markdown table.

    python bench/train_mfu.py              # GPU: student GPT-2 124M, teacher GPT-2 XL, bf16, B=16 x 512
    python bench/train_mfu.py --smoke      # the same code path at tiny shapes (CPU)
    python bench/train_mfu.py --ours-only --attention cudnn   # GPU: the models with ModelConfig.attention
        # "cudnn" (--config.attention=cudnn in a run); refuses to report if cuDNN refused and XLA ran instead
    python bench/train_mfu.py --ours-only --attention cudnn --unrolled   # GPU: and the layers unrolled
        # (ModelConfig.scan_layers False, --config.scan_layers=False in a run)
    python bench/train_mfu.py --ours-only --attention "probe cudnn rolled"   # GPU: the model's attention call
        # replaced by one of bench/attention_impl.py's cuDNN designs in the measuring process, no anchor

Each side runs in its own process (JAX preallocates GPU memory; torch's OpenMP workers slow JAX on CPU).
Random weights, random tokens, every position counts. Timings are medians over --repeats steps after two
warm-up steps, with device synchronisation. MFU counts 6N (train) or 2N (forward) FLOPs per token plus the
attention term 12·L·d·T (train) or 4·L·d·T (forward), over the card's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.attention_impl import VARIANTS  # noqa: E402  (imports jax, starts no backend)
from bench.timing import median_seconds  # noqa: E402

SHAPES = {
    "gpu": dict(student=dict(n_embd=768, n_layer=12, n_head=12), teacher=dict(n_embd=1600, n_layer=48, n_head=25),
                vocab=50257, batch=16, length=512, dtype="bfloat16"),
    "smoke": dict(student=dict(n_embd=64, n_layer=2, n_head=4), teacher=dict(n_embd=128, n_layer=3, n_head=4),
                  vocab=512, batch=4, length=64, dtype="float32"),
}
# MFU's denominator, as architecture.md counts it: the bf16 matmul ceiling measured with JAX on an H100 (the H200
# has the same cores); the data-sheet dense bf16 peak beside it (the A100's only that)
CEILING_BF16 = {"H100": 783e12, "H200": 783e12}
SPEC_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
TARGET_MFU = {True: 40, False: 55}  # architecture.md: train step, scoring


def flops_per_token(params: int, layers: int, width: int, length: int, train: bool) -> float:
    return (6 if train else 2) * params + (12 if train else 4) * layers * width * length


def median(fn, repeats: int) -> float:
    return median_seconds(fn, repeats, warmup=2)


def hook_attention(attention: str) -> list:
    """Puts a recorder in place of jax.nn.dot_product_attention (for "probe NAME": that design of
    bench/attention_impl.py instead of the call) and returns the list it fills with the `implementation` the
    model asks for, once per trace."""
    import jax

    traced, real = [], jax.nn.dot_product_attention
    if attention.startswith("probe "):  # the model calls jax.nn.dot_product_attention(q, k, v, mask=..., ...)
        variant = VARIANTS[attention.removeprefix("probe ")]

        def probe(q, k, v, mask, implementation=None):
            traced.append(implementation)
            return variant(q, k, v, mask)
        jax.nn.dot_product_attention = probe
    else:  # what the model asks for, and whether it fell back to XLA's
        def record(*args, implementation=None, **kwargs):
            traced.append(implementation)
            return real(*args, implementation=implementation, **kwargs)
        jax.nn.dot_product_attention = record
    return traced


def gpt2_builder(dims: dict, shapes: dict, attention: str = "model", unrolled: bool = False):
    """A function that builds a random GPT-2 of `dims` in the shapes' dtype (ModelConfig.attention "cudnn" for
    --attention cudnn, scan_layers False for --unrolled; the keys are left out otherwise, so checkouts from
    before them build too)."""
    import transformers
    from flax import nnx

    from minillm_jax.models import Transformer
    from minillm_jax.models.families import config_from_hf

    config = config_from_hf(transformers.GPT2Config(vocab_size=shapes["vocab"], n_positions=1024, **dims))
    option = {"attention": "cudnn"} if attention == "cudnn" else {}
    option.update({"scan_layers": False} if unrolled else {})
    config = config.replace(param_dtype=shapes["dtype"], dtype=shapes["dtype"], **option)
    return lambda: Transformer(config, rngs=nnx.Rngs(0))


def sft_step(graphdef, tx, schedule):
    """The SFT update of trainers/sft.py with one micro-batch (not jitted)."""
    import jax

    from minillm_jax.trainers import sft
    from minillm_jax.trainers.common import apply_gradients

    def step(state, batch):
        (_, metrics), grads = jax.value_and_grad(sft.sft_loss, has_aux=True)(state.params, graphdef, batch)
        state, opt_metrics = apply_gradients(state, grads, tx, schedule)
        return state, {**metrics, **opt_metrics}
    return step


def score_fn(teacher_def, num_real: int):
    """Teacher scoring (not jitted): log-probabilities of each next token, the model over all T positions as
    response_hidden runs it."""
    import jax.numpy as jnp
    from flax import nnx

    from minillm_jax import losses

    def score(state, ids, mask):
        logits = nnx.merge(teacher_def, state)(ids, mask)[:, :-1]
        logp = losses.log_probs(logits, num_real)
        return jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    return score


def run_jax(shapes: dict, repeats: int, attention: str = "model", unrolled: bool = False) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from minillm_jax.data.batches import text_batch
    from minillm_jax.trainers.common import create_train_state, make_optimizer

    traced = hook_attention(attention)

    def model(dims):
        return gpt2_builder(dims, shapes, attention, unrolled)()

    def check_attention():
        if attention != "model" and not traced:
            raise RuntimeError(f"--attention {attention!r}: the model never called jax.nn.dot_product_attention on "
                               f"{jax.default_backend()} (on CPU it takes its explicit softmax attention)")
        if attention == "cudnn" and "xla" in traced:
            raise RuntimeError("--attention cudnn: cuDNN refused (see the warning above) and XLA's attention ran")

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, shapes["vocab"], (shapes["batch"], shapes["length"]), dtype=np.int32)
    batch = jax.device_put(text_batch(tokens))  # every position after the first is a loss position
    student = model(shapes["student"])
    tx, schedule = make_optimizer(learning_rate=1e-5)
    graphdef, state = create_train_state(student, tx)

    step = jax.jit(sft_step(graphdef, tx, schedule), donate_argnums=0)
    holder = {"state": state}

    def train():
        holder["state"], metrics = step(holder["state"], batch)
        jax.block_until_ready(metrics["loss"])

    train_seconds = median(train, repeats)
    check_attention()
    teacher = model(shapes["teacher"])
    teacher_def, teacher_state = nnx.split(teacher)
    score = jax.jit(score_fn(teacher_def, teacher.config.num_real_tokens))

    ids, mask = jnp.asarray(tokens), jnp.ones(tokens.shape, bool)
    score_seconds = median(lambda: jax.block_until_ready(score(teacher_state, ids, mask)), repeats)
    check_attention()
    count = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))  # noqa: E731
    return {"device": jax.devices()[0].device_kind, "train_seconds": train_seconds, "score_seconds": score_seconds,
            "student_params": count(student), "teacher_params": count(teacher)}


def run_torch(shapes: dict, repeats: int) -> dict:
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, shapes["dtype"])

    def model(dims):
        config = transformers.GPT2Config(vocab_size=shapes["vocab"], n_positions=1024, **dims)
        return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    tokens = torch.randint(0, shapes["vocab"], (shapes["batch"], shapes["length"]), device=device)

    def train_seconds():  # the student and its optimizer are freed when this returns
        student = model(shapes["student"]).train()
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5, betas=(0.9, 0.95))

        def train():
            student(input_ids=tokens, labels=tokens).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync()

        return median(train, repeats)

    train_time = train_seconds()
    teacher = model(shapes["teacher"]).eval()

    def score():
        with torch.no_grad():
            logits = teacher(input_ids=tokens).logits[:, :-1].float()
            logits.log_softmax(-1).gather(-1, tokens[:, 1:, None])
        sync()

    return {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "train_seconds": train_time,
            "score_seconds": median(score, repeats)}


def side(name: str, shapes: str, repeats: int, attention: str = "model", unrolled: bool = False) -> dict:
    done = subprocess.run([sys.executable, __file__, "--side", name, "--shapes", shapes, "--repeats", str(repeats),
                           "--attention", attention] + ["--unrolled"] * unrolled, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{name} side failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--attention", default="model", choices=("model", "cudnn", *(f"probe {v}" for v in VARIANTS)),
                        help="our side's attention: the model's default (XLA), its cuDNN option, or a cuDNN design "
                             "of bench/attention_impl.py in its place (GPU)")
    parser.add_argument("--unrolled", action="store_true", help="our models' layers unrolled (ModelConfig.scan_layers "
                        "False, --config.scan_layers=False in a run) instead of a loop over them")
    parser.add_argument("--ours-only", action="store_true", help="no HF/torch anchor")
    parser.add_argument("--side", choices=("jax", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--shapes", default="gpu", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        shapes = SHAPES[args.shapes]
        out = (run_jax(shapes, args.repeats, args.attention, args.unrolled) if args.side == "jax"
               else run_torch(shapes, args.repeats))
        print(json.dumps(out))
        return
    key = "smoke" if args.smoke else "gpu"
    shapes = SHAPES[key]
    ours = side("jax", key, args.repeats, args.attention, args.unrolled)
    anchor = None if args.ours_only else side("torch", key, args.repeats)
    tokens = shapes["batch"] * shapes["length"]
    ceiling = next((v for k, v in CEILING_BF16.items() if k in ours["device"]), None)
    spec = next((v for k, v in SPEC_BF16.items() if k in ours["device"]), None)
    print(f"device: {ours['device']} (torch: {anchor['device'] if anchor else 'not run'}); batch {shapes['batch']} x "
          f"{shapes['length']}, {shapes['dtype']}; median of {args.repeats}; our attention: {args.attention}; "
          f"our layers: {'unrolled' if args.unrolled else 'scanned'}")
    print("MFU: FLOPs (6N a trained token, 2N a scored one, plus attention) over "
          + ("the bf16 matmul ceiling measured with JAX (783 TFLOP/s, architecture.md), the data-sheet peak (989) in "
             "brackets" if ceiling else "the data-sheet dense bf16 peak"))
    print("| work | HF/torch eager tok/s | ours tok/s | ours / HF | HF MFU | our MFU | target |")
    print("|---|---|---|---|---|---|---|")

    def mfu(rate: float, flops: float) -> str:
        def share(peak: float) -> str:
            return f"{100 * rate * flops / peak:.1f}%"

        if ceiling:
            return f"{share(ceiling)} ({share(spec)})"
        return share(spec) if spec else "n/a (no known peak)"

    for work, key_seconds, params, dims, train in (
            ("student fwd+bwd+AdamW", "train_seconds", ours["student_params"], shapes["student"], True),
            ("teacher scoring (forward)", "score_seconds", ours["teacher_params"], shapes["teacher"], False)):
        ours_rate = tokens / ours[key_seconds]
        flops = flops_per_token(params, dims["n_layer"], dims["n_embd"], shapes["length"], train)
        target = f">= {TARGET_MFU[train]}%"
        if anchor:
            theirs_rate = tokens / anchor[key_seconds]
            print(f"| {work} | {theirs_rate:,.0f} | {ours_rate:,.0f} | {ours_rate / theirs_rate:.2f}x | "
                  f"{mfu(theirs_rate, flops)} | {mfu(ours_rate, flops)} | {target} |")
        else:
            print(f"| {work} | not run | {ours_rate:,.0f} | | | {mfu(ours_rate, flops)} | {target} |")


if __name__ == "__main__":
    main()
