"""What every trainer shares: the student's train state, the optimizer, sequence layout helpers.

The teacher never enters the train state: it is a read-only argument of the steps that need it, so it
is neither optimised nor checkpointed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jaxtyping import Array, Float, Int

from minillm_jax import losses, sharding


@flax.struct.dataclass
class TrainState:
    step: Int[Array, ""]
    params: nnx.State
    opt_state: optax.OptState


def make_optimizer(*, learning_rate: float, warmup_steps: int = 0, total_steps: int | None = None,
                   schedule: str = "constant", end_learning_rate: float = 1e-7, weight_decay: float = 0.0,
                   b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8, max_grad_norm: float | None = 1.0,
                   accumulate_steps: int = 1) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW after global-norm clipping; linear warm-up, then constant or cosine decay. With
    `accumulate_steps` = k, gradients of k consecutive micro-batches are averaged into one update (the
    returned schedule then maps micro-steps to the learning rate of their update)."""
    if schedule == "constant":
        lr = optax.warmup_constant_schedule(0.0, learning_rate, warmup_steps) if warmup_steps else \
            optax.constant_schedule(learning_rate)
    elif schedule == "cosine":
        if total_steps is None:
            raise ValueError("schedule='cosine' needs total_steps")
        lr = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, total_steps, end_learning_rate) \
            if warmup_steps else optax.cosine_decay_schedule(learning_rate, total_steps,
                                                              end_learning_rate / learning_rate)
    else:
        raise ValueError(f"schedule={schedule!r}: expected 'constant' or 'cosine'")
    chain = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm else []
    chain.append(optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    tx = optax.chain(*chain)
    if accumulate_steps > 1:
        return optax.MultiSteps(tx, every_k_schedule=accumulate_steps), lambda step: lr(step // accumulate_steps)
    return tx, lr


def train_state_shardings(params: nnx.State, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh,
                          rules: sharding.Rules = sharding.TRAIN_RULES) -> TrainState:
    """Where each part of the train state lives: parameters by the training rules, every optimizer
    moment like its parameter (`optax.tree_map_params`), counters replicated. A prefix tree of
    NamedShardings, usable as jit in/out shardings."""
    params_layout = sharding.state_shardings(params, mesh, rules)
    replicated = sharding.replicated(mesh)
    opt_layout = optax.tree_map_params(tx, lambda _, layout: layout, jax.eval_shape(tx.init, params), params_layout,
                                       transform_non_params=lambda _: replicated,
                                       is_leaf=lambda x: isinstance(x, nnx.Variable))
    return TrainState(step=replicated, params=params_layout, opt_state=opt_layout)


def create_train_state(model: nnx.Module, tx: optax.GradientTransformation) -> tuple[nnx.GraphDef, TrainState]:
    graphdef, params = nnx.split(model)
    return graphdef, TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def sharded_train_state(model: nnx.Module, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh
                        ) -> tuple[nnx.GraphDef, TrainState, "StepLayout"]:
    """The student's initial train state on the mesh, the optimizer state created straight into its
    shardings, and the StepLayout that the jitted steps use."""
    graphdef, params = nnx.split(model)
    layout = train_state_shardings(params, tx, mesh)
    params = jax.device_put(params, layout.params)  # a no-op for a model placed by the same rules
    opt_state = jax.jit(tx.init, out_shardings=layout.opt_state)(params)
    state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), layout.step), params=params, opt_state=opt_state)
    return graphdef, state, StepLayout(mesh=mesh, state=layout)


@dataclasses.dataclass(frozen=True)
class StepLayout:
    """Explicit shardings of a jitted step's arguments and results: the train state (see
    `train_state_shardings`), the teacher's parameters as they were placed (`experiment.teacher_rules`),
    and batches, whose rows go over the batch mesh axes (data, fsdp) when they divide them."""

    mesh: jax.sharding.Mesh
    state: Any
    teacher: Any = None

    def with_teacher(self, teacher: nnx.Module | None) -> "StepLayout":
        if teacher is None:
            return self
        return dataclasses.replace(self, teacher=jax.tree.map(lambda x: x.sharding, nnx.state(teacher)))

    def rows(self, count: int | None):
        return None if count is None else sharding.rows_sharding(self.mesh, (count,))


def jit_eval_step(fn: Callable, layout: StepLayout | None, *batch_rows: int) -> Callable:
    """jit `fn(params, *batches) -> metrics` (a scoring step: nothing donated), with the student's parameter
    layout and batch rows over (data, fsdp) in, and replicated results out, when there is a layout."""
    if layout is None:
        return jax.jit(fn)
    return jax.jit(fn, in_shardings=(layout.state.params, *(layout.rows(n) for n in batch_rows)),
                   out_shardings=sharding.replicated(layout.mesh))


def jit_train_step(step: Callable, layout: StepLayout | None, *batch_rows: int | None,
                   teacher: bool = True) -> Callable:
    """jit `step(state, [teacher_params,] *batches) -> (state, metrics)`, the state donated. With a layout:
    explicit in/out shardings (batches of `batch_rows` rows; None for an absent batch), metrics replicated."""
    if layout is None:
        return jax.jit(step, donate_argnums=0)
    if teacher and layout.teacher is None:
        raise ValueError("this step takes the teacher's parameters: build the layout with_teacher(teacher)")
    ins = (layout.state, *((layout.teacher,) if teacher else ()), *(layout.rows(n) for n in batch_rows))
    return jax.jit(step, in_shardings=ins, out_shardings=(layout.state, sharding.replicated(layout.mesh)),
                   donate_argnums=0)


def apply_gradients(state: TrainState, grads, tx: optax.GradientTransformation, schedule) -> tuple[TrainState, dict]:
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"grad_norm": optax.global_norm(grads), "lr": schedule(state.step)}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def shifted_logits(model, tokens: Int[Array, "B T"], attention_mask) -> Float[Array, "B T-1 V"]:
    """Logits at positions 0..T-2, each predicting the next token (tokens[:, 1:])."""
    return model(tokens[:, :-1], attention_mask[:, :-1])


def response_hidden(model, prompt_tokens, prompt_mask, response_tokens, response_mask):
    """Teacher-forced final hidden states aligned with the response tokens [B, R, E]: position t holds the
    state that predicts response token t (left-padded prompt, then the response)."""
    tokens = jnp.concatenate([prompt_tokens, response_tokens], axis=1)
    mask = jnp.concatenate([prompt_mask, response_mask], axis=1).astype(jnp.int32)
    return model.hidden_states(tokens[:, :-1], mask[:, :-1])[:, prompt_tokens.shape[1] - 1:]


def response_logits(model, prompt_tokens, prompt_mask, response_tokens, response_mask):
    """Teacher-forced logits aligned with the response tokens [B, R, V]."""
    return model.unembed(response_hidden(model, prompt_tokens, prompt_mask, response_tokens, response_mask))


def sequence_reverse_kl(student_logprobs, teacher_logprobs, mask) -> Float[Array, ""]:
    """Monte-Carlo estimate of KL[q || p] per response: mean over responses of sum_t (log q - log p)."""
    mask = mask.astype(jnp.float32)
    per_response = jnp.sum((student_logprobs - teacher_logprobs) * mask, axis=1)
    return jnp.mean(per_response)


__all__ = ["StepLayout", "TrainState", "apply_gradients", "create_train_state", "jit_eval_step",
           "jit_train_step", "make_optimizer", "response_hidden", "response_logits", "sequence_reverse_kl",
           "sharded_train_state", "shifted_logits", "token_means", "train_state_shardings"]


def token_means(student, teacher, batch: dict, chunk_size: int | None = None):
    """Runs both models once over the batch and returns `mean(name, **params)`: the masked mean over the
    batch's loss tokens of `losses.token_divergence(name, **params)`. With `chunk_size`, logits are made
    one time-chunk at a time (see `losses.chunked_token_mean`) instead of as whole [B, T, V] arrays."""
    tokens, attention = batch["tokens"], batch["attention_mask"]
    labels, mask = tokens[:, 1:], batch["loss_mask"][:, 1:]
    n = student.config.num_real_tokens
    if chunk_size is None:
        log_q = losses.log_probs(shifted_logits(student, tokens, attention), n)
        log_p = jax.lax.stop_gradient(losses.log_probs(shifted_logits(teacher, tokens, attention), n)) \
            if teacher is not None else log_q

        def mean(name, **params):
            return losses.masked_mean(losses.token_divergence(name, **params)(log_q, log_p, labels), mask)

        return mean
    student_hidden = student.hidden_states(tokens[:, :-1], attention[:, :-1])
    teacher_hidden = jax.lax.stop_gradient(teacher.hidden_states(tokens[:, :-1], attention[:, :-1])) \
        if teacher is not None else None

    def chunked_mean(name, **params):
        return losses.chunked_token_mean(losses.token_divergence(name, **params), student_hidden, student.unembed,
                                         teacher_hidden, teacher.unembed if teacher is not None else None, mask,
                                         labels, chunk_size=chunk_size, num_real_tokens=n)

    return chunked_mean
