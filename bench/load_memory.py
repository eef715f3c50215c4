"""Time and peak host memory of `load_pretrained` on a random GPT-2-XL-shaped (1.5B) bf16 checkpoint.

    python bench/load_memory.py [--dir /tmp/gpt2xl-bf16] [--dtype bfloat16]

Writes the checkpoint once (streamed, random weights), then loads it in a fresh process under
`/usr/bin/time -v` and prints wall time, peak RSS and the ratio to the checkpoint size (target < 1.5).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import subprocess
import sys
import time

import ml_dtypes
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

GPT2_XL = dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=50257, n_positions=1024,
               n_embd=1600, n_layer=48, n_head=25, activation_function="gelu_new", layer_norm_epsilon=1e-5,
               tie_word_embeddings=True, bos_token_id=50256, eos_token_id=50256, dtype="bfloat16")


def write_checkpoint(directory: pathlib.Path) -> int:
    from transformers import GPT2Config

    from minillm_jax.models import families
    from minillm_jax.models.hf import write_safetensors

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(GPT2_XL))
    config = families.config_from_hf(GPT2Config(**{k: v for k, v in GPT2_XL.items() if k != "model_type"}))
    rng = np.random.default_rng(0)
    dtype = np.dtype(ml_dtypes.bfloat16)

    def producer(shape):
        return lambda: (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)

    entries = [(s.hf_name, s.hf_shape, dtype, producer(s.hf_shape)) for s in families.tensor_specs(config)]
    write_safetensors(directory / "model.safetensors", entries)
    return (directory / "model.safetensors").stat().st_size


def load_only(directory: str, dtype: str) -> None:
    import jax

    from minillm_jax.models import load_pretrained

    start = time.perf_counter()
    model = load_pretrained(directory, dtype=dtype)
    jax.block_until_ready(model.layers["up_proj"][...])
    count = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(model.layers)) + model.embed_tokens[...].size
    print(json.dumps({"load_seconds": time.perf_counter() - start, "parameters": int(count)}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default="/tmp/minillm_bench/gpt2-xl-bf16")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--load-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load_only:
        load_only(args.dir, args.dtype)
        return
    directory = pathlib.Path(args.dir)
    file = directory / "model.safetensors"
    size = file.stat().st_size if file.exists() else write_checkpoint(directory)
    command = ["/usr/bin/time", "-v", sys.executable, __file__, "--load-only", "--dir", str(directory),
               "--dtype", args.dtype]
    result = subprocess.run(command, capture_output=True, text=True, env={"JAX_PLATFORMS": "cpu",
                                                                          "PATH": "/usr/bin:/bin"}, check=True)
    inner = json.loads(result.stdout.strip().splitlines()[-1])
    peak_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", result.stderr).group(1)
    peak = peak_kib * 1024
    print("| checkpoint | params | file size | load (in process) | process wall | peak RSS | peak / file |")
    print("|---|---|---|---|---|---|---|")
    print(f"| GPT-2 XL shape, random, {args.dtype} | {inner['parameters'] / 1e9:.3f} B | {size / 1e9:.2f} GB | "
          f"{inner['load_seconds']:.1f} s | {wall} | {peak / 1e9:.2f} GB | {peak / size:.2f} |")


if __name__ == "__main__":
    main()
