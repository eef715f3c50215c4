"""Greedy decoding split in its two compiled halves, for timing them apart: the prompt prefill into a fresh KV
cache, and `new_tokens` decode steps as one `lax.scan`. Uses only the model's `init_cache`, `prefill` and
`decode_step`, so the benches can time other checkouts of this repository with it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def greedy_decoder(graphdef, batch: int, prompt_length: int, new_tokens: int):
    """(prefill(state, ids) -> (last logits, cache), decode(state, cache, token) -> last token), both jitted."""

    @jax.jit
    def prefill(state, ids):
        model = nnx.merge(graphdef, state)
        cache = model.init_cache(batch, prompt_length + new_tokens)
        return model.prefill(ids, None, cache, empty_cache=True, last_only=True)

    @jax.jit
    def decode(state, cache, token):
        model = nnx.merge(graphdef, state)

        def body(carry, _):
            cache, token = carry
            logits, cache = model.decode_step(token, cache)
            return (cache, jnp.argmax(logits, -1).astype(jnp.int32)), None

        return jax.lax.scan(body, (cache, token), None, length=new_tokens)[0][1]

    return prefill, decode
