"""GKD (Agarwal et al., 2024): the generalised JSD(beta) between teacher and student, token by token, on
a mix of gold sequences and the student's own samples: with probability `lmbda` a batch's responses are
regenerated on-policy by the current student (no gradient through sampling)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
from flax import nnx

from minillm_jax import losses
from minillm_jax.sampling import SamplingConfig, generate
from minillm_jax.trainers.batches import from_samples
from minillm_jax.trainers.common import apply_gradients, shifted_logits


@dataclasses.dataclass(frozen=True)
class GKDConfig:
    beta: float = 0.5  # 0: forward KL, 1: reverse KL
    lmbda: float = 0.5  # fraction of on-policy batches


def gkd_loss(params, graphdef, teacher_graphdef, teacher_params, batch, beta: float):
    student = nnx.merge(graphdef, params)
    teacher = nnx.merge(teacher_graphdef, teacher_params)
    logits = shifted_logits(student, batch["tokens"], batch["attention_mask"])
    teacher_logits = jax.lax.stop_gradient(shifted_logits(teacher, batch["tokens"], batch["attention_mask"]))
    mask = batch["loss_mask"][:, 1:]
    loss = losses.jsd(logits, teacher_logits, mask, beta, num_real_tokens=student.config.num_real_tokens)
    return loss, {"loss": loss, "jsd": loss}


def make_train_step(graphdef, teacher_graphdef, tx, schedule, config: GKDConfig):
    @functools.partial(jax.jit, donate_argnums=0)
    def train_step(state, teacher_params, batch):
        grad_fn = jax.value_and_grad(gkd_loss, has_aux=True)
        (_, metrics), grads = grad_fn(state.params, graphdef, teacher_graphdef, teacher_params, batch, config.beta)
        state, opt_metrics = apply_gradients(state, grads, tx, schedule)
        return state, {**metrics, **opt_metrics}

    return train_step


def choose_batch(gold_batch: dict, prompts, state, graphdef, sampling: SamplingConfig, rng, config: GKDConfig,
                 coin: np.random.Generator) -> tuple[dict, bool]:
    """The gold batch, or with probability lmbda the same prompts answered by the current student."""
    if coin.random() >= config.lmbda:
        return gold_batch, False
    student = nnx.merge(graphdef, state.params)
    return from_samples(generate(student, prompts, sampling, rng)), True
