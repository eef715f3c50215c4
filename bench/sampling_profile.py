"""Where sampling time goes on the CPU bench model (the ~10M Llama of `bench/sampling.py --suite cpu`,
B=8, prompt 64, 64 new tokens): the whole `generate`, the prompt prefill alone, and 64 greedy decode
steps alone (one jitted scan), each the median of 7 runs after a warm-up.

    python bench/sampling_profile.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.greedy import greedy_decoder  # noqa: E402
from bench.timing import median_seconds  # noqa: E402
from minillm_jax.models import ModelConfig, Transformer  # noqa: E402
from minillm_jax.sampling import SamplingConfig, generate  # noqa: E402

B, P, R = 8, 64, 64


def main() -> None:
    config = ModelConfig(model_type="llama", vocab_size=8192, hidden_size=256, num_layers=8, num_heads=8,
                         num_kv_heads=4, head_dim=32, intermediate_size=688, max_position_embeddings=256,
                         tie_word_embeddings=False)
    model = Transformer(config, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    prompts = np.random.default_rng(0).integers(1, 8000, size=(B, P)).tolist()
    sampling = SamplingConfig(max_new_tokens=R, pad_token_id=0, eos_token_id=None, prompt_buckets=(P,))
    ids = jnp.asarray(prompts, jnp.int32)

    prefill, decode = greedy_decoder(graphdef, B, P, R)
    _, cache = prefill(state, ids)
    whole = median_seconds(lambda: jax.block_until_ready(generate(model, prompts, sampling, jax.random.key(0)).tokens),
                           7)
    first = median_seconds(lambda: jax.block_until_ready(prefill(state, ids)[0]), 7)
    steps = median_seconds(lambda: jax.block_until_ready(decode(state, cache, jnp.zeros((B,), jnp.int32))), 7)
    print(f"generate {whole * 1e3:.1f} ms ({B * R / whole:,.0f} new tok/s); prefill {first * 1e3:.1f} ms; "
          f"{R} greedy decode steps {steps * 1e3:.1f} ms = {steps / R * 1e3:.2f} ms per step for "
          f"{weight_bytes / 2**20:.0f} MiB of weights ({weight_bytes / (steps / R) / 1e9:.1f} GB/s)")


if __name__ == "__main__":
    main()
