"""`jax.nn.dot_product_attention` as the model calls it (one boolean mask for left padding, causality and
windows; GQA), with `implementation=None` (what the model uses off CPU: XLA as of jax 0.11), against
`implementation="cudnn"` where a GPU is present, and the explicit softmax attention the model uses on CPU:
forward and forward+backward time, the largest difference, and whether fully masked (left-padding) query
rows stay finite. One Markdown table.

On a GPU, two more ways to hand the model's attention to cuDNN at the training shapes (T = S), so that one
run decides the design: "cudnn causal+mask" (cuDNN's causal mask type, so it may skip the blocks above the
diagonal, with the boolean mask still passed: cuDNN turns it into a bias it also differentiates), and "cudnn
rolled" (each row's real tokens, one contiguous block after the left padding, rolled to the front so that
cuDNN's causal padding mask type with per-row lengths expresses the whole mask with no [B, 1, T, S] array;
the output rolled back; the two gathers are counted in its times).

    python bench/attention_impl.py              # GPT-2 124M / SmolLM2-like shapes in bf16
    python bench/attention_impl.py --smoke      # tiny shapes (on CPU only the XLA rows run)
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.timing import median_seconds  # noqa: E402

# name: (B, T query, S keys, H, K, Dh); decode is one query over a 512-slot cache
SHAPES = {"train gpt2-124M": (16, 512, 512, 12, 12, 64), "train smollm2 (GQA 9/3)": (16, 512, 512, 9, 3, 64),
          "train smollm2, CPU round (T 191)": (8, 191, 191, 9, 3, 64), "decode gpt2-124M": (128, 1, 512, 12, 12, 64)}
SMOKE = {"train tiny": (2, 16, 16, 4, 2, 8), "decode tiny": (2, 1, 16, 4, 2, 8)}


def _inputs(shape, dtype):
    B, T, S, H, K, Dh = shape
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (B, T, H, Dh), dtype)
    k, v = (jax.random.normal(key, (B, S, K, Dh), dtype) for key in keys[1:])
    pad = np.arange(B) % 4 * (S // 8)  # rows left-padded by 0, 1/8, 2/8, 3/8 of the keys
    key_real = np.arange(S)[None, :] >= pad[:, None]
    causal = np.arange(S)[None, :] <= (S - T + np.arange(T))[:, None]
    return q, k, v, jnp.asarray(key_real[:, None, :] & causal[None])[:, None]  # [B 1 T S]


def _explicit(q, k, v, mask):
    """The model's attention without a cache on CPU (models.transformer._softmax_attention), same arguments."""
    from minillm_jax.models import transformer

    return transformer._softmax_attention(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), mask[:, 0],
                                          transformer._Dropout(None), 0.0)


_DPA = jax.nn.dot_product_attention  # bench/train_mfu.py --attention puts these variants in its place


def _cudnn_masked(q, k, v, mask):
    return _DPA(q, k, v, mask=mask, implementation="cudnn")


def _cudnn_causal_masked(q, k, v, mask):
    return _DPA(q, k, v, mask=mask, is_causal=True, implementation="cudnn")


def _cudnn_rolled(q, k, v, mask):
    """Self-attention (T = S) whose real keys per row are one contiguous block: the block rolled to the front,
    cuDNN with causal masking and per-row lengths, the output rolled back (padded query rows come back 0)."""
    attended = mask[:, 0].any(axis=1)  # [B S] keys some query may read: the real ones
    start, length = jnp.argmax(attended, axis=1), attended.sum(axis=1, dtype=jnp.int32)
    T = q.shape[1]

    def roll(x, shift):  # row t of x[b] <- row (t + shift[b]) mod T
        order = (jnp.arange(T)[None, :] + shift[:, None]) % T
        return jnp.take_along_axis(x, order[:, :, None, None], axis=1)

    out = _DPA(roll(q, start), roll(k, start), roll(v, start), is_causal=True, query_seq_lengths=length,
               key_value_seq_lengths=length, implementation="cudnn")
    return roll(out, -start)


VARIANTS = {"cudnn": _cudnn_masked, "cudnn causal+mask": _cudnn_causal_masked, "cudnn rolled": _cudnn_rolled}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)
    impls = {"None": functools.partial(_DPA, implementation=None)}
    if jax.default_backend() == "gpu":
        impls.update(VARIANTS)
    impls["explicit (the model's on CPU)"] = _explicit
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, {dtype}")
    print("| shape | implementation | fwd ms | fwd+bwd ms | max diff vs None | padded rows finite |")
    print("|---|---|---|---|---|---|")
    for name, shape in (SMOKE if args.smoke else SHAPES).items():
        q, k, v, mask = _inputs(shape, dtype)
        reference = None
        for impl, attend in impls.items():
            if impl in ("cudnn causal+mask", "cudnn rolled") and shape[1] != shape[2]:
                continue  # training-shape designs (causal over the same T positions)
            forward = jax.jit(lambda q, k, v, attend=attend: attend(q, k, v, mask=mask))
            grad = jax.jit(jax.grad(lambda q, k, v, attend=attend: jnp.sum(attend(q, k, v, mask=mask).astype(
                jnp.float32) ** 2), argnums=(0, 1, 2)))
            try:
                out = np.asarray(forward(q, k, v), np.float32)
                fwd = median_seconds(lambda: forward(q, k, v).block_until_ready(), 10)
                bwd = median_seconds(lambda: jax.block_until_ready(grad(q, k, v)), 10)
            except Exception as e:  # an unsupported shape or dtype: say so in the table
                print(f"| {name} | {impl} | failed: {type(e).__name__}: {str(e)[:120]} | | | |")
                continue
            reference = out if reference is None else reference
            real = np.asarray(mask).any(-1)[:, 0]  # [B T] queries with at least one real key
            diff = float(np.abs(np.where(real[..., None, None], out - reference, 0)).max())
            print(f"| {name} | {impl} | {fwd * 1e3:.3f} | {bwd * 1e3:.3f} | {diff:.2e} | "
                  f"{bool(np.isfinite(out).all())} |", flush=True)


if __name__ == "__main__":
    main()
