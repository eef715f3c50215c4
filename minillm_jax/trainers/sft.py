"""Supervised fine-tuning (teacher SFT, the student's Phase 1, SeqKD's second stage): token-mean
cross-entropy on the response tokens, with the model's own dropout (its HF config's rates)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from minillm_jax import losses
from minillm_jax.data.batches import GoldFeed, Widths
from minillm_jax.trainers.common import (
    Method,
    accumulated_gradients,
    apply_gradients,
    batch_tokens,
    response_hidden,
    step_keys,
)


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    dropout: bool = True  # train with the model's dropout rates (0 where its config has none)


def sft_loss(params, graphdef, batch, dropout_rng=None, *, chunk_size: int | None = None):
    model = nnx.merge(graphdef, params)
    hidden = response_hidden(model, batch, dropout_rng=dropout_rng)
    values = losses.token_values(["cross_entropy"], hidden,
                                 model.unembed, labels=batch["response"], num_real_tokens=model.config.num_real_tokens,
                                 chunk_size=chunk_size)
    ce = losses.masked_mean(values[..., 0], batch["response_mask"])
    return ce, {"loss": ce, "ce": ce}


def supervised_update(loss_fn, setup, *, dropout: bool):
    """The update of every teacher-forced method: one optimizer step over the stacked micro-batches of
    `inputs`; `loss_fn(params, teacher_params, batch, dropout_rng)` the method's loss."""
    seed, tx, schedule = setup.config.seed, setup.tx, setup.schedule

    def update(state, teacher_params, inputs):
        key = step_keys(seed, state.step)["dropout"] if dropout else None
        grads, metrics = accumulated_gradients(lambda p, b, k: loss_fn(p, teacher_params, b, k), state.params,
                                               inputs, key)
        state, opt_metrics = apply_gradients(state, grads, tx, schedule)
        metrics = {**metrics, **opt_metrics, "tokens": batch_tokens(inputs)}
        return state, jax.tree.map(lambda x: jnp.asarray(x)[None], metrics)

    return update


def widths(setup, data=None, **fixed) -> Widths:
    """The run's prompt and response width buckets (`data.length_buckets` of them per dimension)."""
    return Widths.of(data if data is not None else setup.train, setup.config.data.length_buckets, **fixed)


def gold_feed(setup, data=None, **fixed) -> GoldFeed:
    c = setup.config
    data = data if data is not None else setup.train
    return GoldFeed(data, c.batch_size, c.accumulate_steps, c.seed, widths(setup, data, **fixed))


def build(setup, data=None) -> Method:
    chunk = setup.config.logits_chunk_size

    def loss(params, teacher_params, batch, key):
        return sft_loss(params, setup.graphdef, batch, key, chunk_size=chunk)

    return Method(update=supervised_update(loss, setup, dropout=setup.config.method.dropout), steps_per_update=1,
                  feed=gold_feed(setup, data))
