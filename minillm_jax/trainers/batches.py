"""Building training batches from sampled text: prompt + response sequences with a response loss mask
(the layout `sft.py`, `kd.py`, `gkd.py` and `distillm.py` train on)."""

from __future__ import annotations

import jax.numpy as jnp

from minillm_jax.sampling import SampleOutput
from minillm_jax.sharding import to_host


def from_samples(out: SampleOutput) -> dict:
    """A batch from sampler output: left-padded prompt, then the response; loss on response tokens
    (EOS included); tokens after EOS are padding and masked out."""
    tokens = jnp.concatenate([out.prompt_tokens, out.tokens], axis=1)
    attention = jnp.concatenate([out.prompt_mask, out.mask], axis=1).astype(jnp.int32)
    loss_mask = jnp.concatenate([jnp.zeros_like(out.prompt_mask), out.mask], axis=1).astype(jnp.int32)
    return {"tokens": tokens, "attention_mask": attention, "loss_mask": loss_mask}


def to_numpy(batch: dict) -> dict:
    return {k: to_host(v) for k, v in batch.items()}
