"""GKD (Agarwal et al., 2024): the generalised JSD(beta) between teacher and student, token by token, on
a mix of gold sequences and the student's own samples: with probability `lmbda` a batch's responses are
regenerated on-policy by the current student (no gradient through sampling)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx

from minillm_jax.sampling import SamplingConfig, generate
from minillm_jax.trainers.batches import from_samples
from minillm_jax.trainers.common import StepLayout, apply_gradients, jit_train_step, token_means


@dataclasses.dataclass(frozen=True)
class GKDConfig:
    beta: float = 0.5  # 0: forward KL, 1: reverse KL
    lmbda: float = 0.5  # fraction of on-policy batches
    logits_chunk_size: int | None = None  # compute logits a time-chunk at a time


def gkd_loss(params, graphdef, teacher_graphdef, teacher_params, batch, config: GKDConfig):
    student = nnx.merge(graphdef, params)
    teacher = nnx.merge(teacher_graphdef, teacher_params)
    loss = token_means(student, teacher, batch, config.logits_chunk_size)("jsd", beta=config.beta)
    return loss, {"loss": loss, "jsd": loss}


def make_train_step(graphdef, teacher_graphdef, tx, schedule, config: GKDConfig, layout: StepLayout | None = None,
                    batch_rows: int | None = None):
    def train_step(state, teacher_params, batch):
        grad_fn = jax.value_and_grad(gkd_loss, has_aux=True)
        (_, metrics), grads = grad_fn(state.params, graphdef, teacher_graphdef, teacher_params, batch, config)
        state, opt_metrics = apply_gradients(state, grads, tx, schedule)
        return state, {**metrics, **opt_metrics}

    return jit_train_step(train_step, layout, batch_rows)


def choose_batch(gold_batch: dict, prompts, state, graphdef, sampling: SamplingConfig, rng, config: GKDConfig,
                 coin: np.random.Generator) -> tuple[dict, bool]:
    """The gold batch, or with probability lmbda the same prompts answered by the current student."""
    if coin.random() >= config.lmbda:
        return gold_batch, False
    student = nnx.merge(graphdef, state.params)
    return from_samples(generate(student, prompts, sampling, rng)), True
