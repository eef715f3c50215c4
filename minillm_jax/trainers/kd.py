"""Word-level KD: (1 - kd_ratio) * CE on the gold response + kd_ratio * soft CE(p || q), teacher-forced on
the same sequences (kd_ratio = 0.5 as in the MiniLLM baselines). Batch layout as in `sft.py`."""

from __future__ import annotations

import jax
from flax import nnx

from minillm_jax.trainers.common import StepLayout, apply_gradients, jit_train_step, token_means


def kd_loss(params, graphdef, teacher_graphdef, teacher_params, batch, kd_ratio: float, chunk_size=None):
    student = nnx.merge(graphdef, params)
    teacher = nnx.merge(teacher_graphdef, teacher_params)
    mean = token_means(student, teacher, batch, chunk_size)
    ce, soft = mean("ce"), mean("soft_ce")
    loss = (1.0 - kd_ratio) * ce + kd_ratio * soft
    return loss, {"loss": loss, "ce": ce, "soft_ce": soft, "forward_kl": jax.lax.stop_gradient(mean("forward_kl"))}


def make_train_step(graphdef, teacher_graphdef, tx, schedule, kd_ratio: float = 0.5, logits_chunk_size=None,
                    layout: StepLayout | None = None, batch_rows: int | None = None):
    """A jitted `train_step(state, teacher_params, batch) -> (state, metrics)`; only the state is donated.
    `logits_chunk_size` computes the [B, T, V] logits of both models a time-chunk at a time. With a
    `layout`, the step is compiled with its explicit in/out shardings (batches of `batch_rows` rows)."""

    def train_step(state, teacher_params, batch):
        grad_fn = jax.value_and_grad(kd_loss, has_aux=True)
        (_, metrics), grads = grad_fn(state.params, graphdef, teacher_graphdef, teacher_params, batch, kd_ratio,
                                      logits_chunk_size)
        state, opt_metrics = apply_gradients(state, grads, tx, schedule)
        return state, {**metrics, **opt_metrics}

    return jit_train_step(train_step, layout, batch_rows)
