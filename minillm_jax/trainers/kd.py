"""Word-level KD: (1 - kd_ratio) * CE on the gold response + kd_ratio * soft CE(p || q), teacher-forced on
the same sequences (kd_ratio = 0.5 as in the MiniLLM baselines). Batch layout as in `sft.py`."""

from __future__ import annotations

import functools

import jax
from flax import nnx

from minillm_jax import losses
from minillm_jax.trainers.common import apply_gradients, shifted_logits


def kd_loss(params, graphdef, teacher_graphdef, teacher_params, batch, kd_ratio: float):
    student = nnx.merge(graphdef, params)
    teacher = nnx.merge(teacher_graphdef, teacher_params)
    logits = shifted_logits(student, batch["tokens"], batch["attention_mask"])
    teacher_logits = jax.lax.stop_gradient(shifted_logits(teacher, batch["tokens"], batch["attention_mask"]))
    labels, mask = batch["tokens"][:, 1:], batch["loss_mask"][:, 1:]
    n = student.config.num_real_tokens
    ce = losses.cross_entropy(logits, labels, mask, num_real_tokens=n)
    soft = losses.soft_cross_entropy(logits, teacher_logits, mask, num_real_tokens=n)
    loss = (1.0 - kd_ratio) * ce + kd_ratio * soft
    return loss, {"loss": loss, "ce": ce, "soft_ce": soft,
                  "forward_kl": losses.forward_kl(logits, teacher_logits, mask, num_real_tokens=n)}


def make_train_step(graphdef, teacher_graphdef, tx, schedule, kd_ratio: float = 0.5):
    """A jitted `train_step(state, teacher_params, batch) -> (state, metrics)`; only the state is donated."""

    @functools.partial(jax.jit, donate_argnums=0)
    def train_step(state, teacher_params, batch):
        grad_fn = jax.value_and_grad(kd_loss, has_aux=True)
        (_, metrics), grads = grad_fn(state.params, graphdef, teacher_graphdef, teacher_params, batch, kd_ratio)
        state, opt_metrics = apply_gradients(state, grads, tx, schedule)
        return state, {**metrics, **opt_metrics}

    return train_step
