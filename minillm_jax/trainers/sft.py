"""Supervised fine-tuning (teacher SFT, the student's Phase 1, SeqKD's second stage): token-mean
cross-entropy on the response tokens of prompt + response sequences.

Batch: `tokens` [B, T] int32, `attention_mask` [B, T], `loss_mask` [B, T] (1 on response tokens).
"""

from __future__ import annotations

import jax
from flax import nnx

from minillm_jax import losses
from minillm_jax.trainers.common import StepLayout, apply_gradients, jit_train_step, shifted_logits


def sft_loss(params, graphdef, batch):
    model = nnx.merge(graphdef, params)
    logits = shifted_logits(model, batch["tokens"], batch["attention_mask"])
    loss = losses.cross_entropy(logits, batch["tokens"][:, 1:], batch["loss_mask"][:, 1:],
                                num_real_tokens=model.config.num_real_tokens)
    return loss, {"loss": loss, "ce": loss}


def make_train_step(graphdef, tx, schedule, layout: StepLayout | None = None, batch_rows: int | None = None):
    """A jitted `train_step(state, batch) -> (state, metrics)`; the state is donated. With a `layout`, the
    step is compiled with its explicit in/out shardings (batches of `batch_rows` rows)."""

    def train_step(state, batch):
        (_, metrics), grads = jax.value_and_grad(sft_loss, has_aux=True)(state.params, graphdef, batch)
        state, opt_metrics = apply_gradients(state, grads, tx, schedule)
        return state, {**metrics, **opt_metrics}

    return jit_train_step(train_step, layout, batch_rows, teacher=False)
