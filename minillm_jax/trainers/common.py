"""What every method shares: the train state, the optimizer, one optimizer update over stacked
micro-batches, the teacher-forced response forward, named key streams, and the `Method` record the
generic loop runs.

The teacher never enters the train state: it is a read-only argument of the updates that need it, so it
is neither optimised nor checkpointed. A method's update is pure and compiled once per input shape:
`update(state, teacher_params, inputs) -> (state, metrics)`, the state donated, the metrics stacked over
the optimizer steps the update made ([S] each). Its random keys come from the run's seed and the state's
own step counter (`step_keys`), so an update is a function of its arguments alone and a resumed run draws
what an uninterrupted one would.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import pathlib
from typing import Any, Callable, Protocol

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jaxtyping import Array, Int

from minillm_jax import losses, sharding

# "coin" is no longer drawn from (GKD's and DistiLLM's coins are host coins now), but it stays in the split:
# removing it would change every other stream's keys, so runs would no longer reproduce earlier ones.
KEY_STREAMS = ("sample", "shuffle", "dropout", "coin")


@flax.struct.dataclass
class TrainState:
    step: Int[Array, ""]
    params: nnx.State
    opt_state: optax.OptState
    extra: Any = flax.struct.field(default_factory=dict)  # a method's own carried arrays (DistiLLM's replay)


def make_optimizer(*, learning_rate: float, warmup_steps: int = 0, total_steps: int | None = None,
                   schedule: str = "constant", end_learning_rate: float = 1e-7, weight_decay: float = 0.0,
                   b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8, max_grad_norm: float | None = 1.0
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW after global-norm clipping; linear warm-up, then constant or cosine decay to
    `end_learning_rate`. Gradient accumulation happens inside the update (`accumulated_gradients`)."""
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
    return optax.chain(*chain), lr


def train_state_shardings(params: nnx.State, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh,
                          rules: sharding.Rules = sharding.TRAIN_RULES, extra: Any = None) -> TrainState:
    """Where each part of the train state lives: parameters by the training rules, every optimizer
    moment like its parameter (`optax.tree_map_params`), counters and a method's extra arrays replicated.
    A prefix tree of NamedShardings, usable as jit in/out shardings."""
    params_layout = sharding.state_shardings(params, mesh, rules)
    replicated = sharding.replicated(mesh)
    opt_layout = optax.tree_map_params(tx, lambda _, layout: layout, jax.eval_shape(tx.init, params), params_layout,
                                       transform_non_params=lambda _: replicated,
                                       is_leaf=lambda x: isinstance(x, nnx.Variable))
    return TrainState(step=replicated, params=params_layout, opt_state=opt_layout,
                      extra=jax.tree.map(lambda _: replicated, extra if extra is not None else {}))


def create_train_state(model: nnx.Module, tx: optax.GradientTransformation, extra: Any = None
                       ) -> tuple[nnx.GraphDef, TrainState]:
    graphdef, params = nnx.split(model)
    return graphdef, TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                                extra=jax.tree.map(jnp.asarray, extra if extra is not None else {}))


def sharded_train_state(model: nnx.Module, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh,
                        extra: Any = None) -> tuple[nnx.GraphDef, TrainState, TrainState]:
    """The student's initial train state on the mesh (the optimizer state created straight into its
    shardings) and its layout (`train_state_shardings`)."""
    graphdef, params = nnx.split(model)
    layout = train_state_shardings(params, tx, mesh, extra=extra)
    params = jax.device_put(params, layout.params)  # a no-op for a model placed by the same rules
    opt_state = jax.jit(tx.init, out_shardings=layout.opt_state)(params)
    state = TrainState(step=sharding.from_host(np.int32(0), layout.step), params=params, opt_state=opt_state,
                       extra=jax.tree.map(sharding.from_host, extra if extra is not None else {}, layout.extra))
    return graphdef, state, layout


def step_keys(seed: int, step) -> dict[str, jax.Array]:
    """The run's named key streams (split once from the seed), each folded with the step."""
    streams = jax.random.split(jax.random.key(seed), len(KEY_STREAMS))
    return {name: jax.random.fold_in(stream, step) for name, stream in zip(KEY_STREAMS, streams)}


def apply_gradients(state: TrainState, grads, tx: optax.GradientTransformation, schedule) -> tuple[TrainState, dict]:
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def accumulated_gradients(loss_fn: Callable, params, micro_batches, key=None) -> tuple[Any, dict]:
    """Mean gradients and metrics of `loss_fn(params, batch, key) -> (loss, metrics)` over micro-batches
    stacked on a leading axis [A, ...]: one micro-batch at a time (`lax.scan`), so activations of only one
    exist at once. Each micro-batch gets `fold_in(key, index)`."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    count = jax.tree.leaves(micro_batches)[0].shape[0]
    keys = None if key is None else jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(count))
    if count == 1:
        (_, metrics), grads = grad_fn(params, jax.tree.map(lambda x: x[0], micro_batches),
                                      None if keys is None else keys[0])
        return grads, metrics

    def micro(total, xs):
        batch, micro_key = xs
        (_, metrics), grads = grad_fn(params, batch, micro_key)
        return jax.tree.map(jnp.add, total, (grads, metrics)), None

    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: grad_fn(
        params, jax.tree.map(lambda x: x[0], micro_batches), None if keys is None else keys[0])))
    zero_grads, zero_metrics = zeros[1], zeros[0][1]
    (grads, metrics), _ = jax.lax.scan(micro, (zero_grads, zero_metrics), (micro_batches, keys))
    return jax.tree.map(lambda x: x / count, (grads, metrics))


def response_hidden(model, batch: dict, *, dropout_rng=None):
    """Teacher-forced final hidden states aligned with the response tokens [B, R, E]: position t holds the
    state that predicts response token t (left-padded prompt, then the response).

    The model runs over all P + R positions although the last one predicts nothing: P and R are bucket
    widths (multiples of 8), and P + R - 1 positions would give every matmul and attention an odd length,
    which costs a GPU padding copies around each batched matmul and rules out cuDNN's fused attention in
    training (it wants even lengths). Causal attention keeps the other positions' states unchanged."""
    P, R = batch["prompt"].shape[-1], batch["response"].shape[-1]
    tokens = jnp.concatenate([batch["prompt"], batch["response"]], axis=1)
    mask = jnp.concatenate([batch["prompt_mask"], batch["response_mask"]], axis=1)
    kwargs = {} if dropout_rng is None else {"dropout_rng": dropout_rng}
    return model.hidden_states(tokens, mask, **kwargs)[:, P - 1:P + R - 1]


def batch_tokens(batch: dict):
    """Real tokens of a sequence batch (counted inside the compiled update, never eagerly on the host)."""
    return jnp.sum(batch["prompt_mask"], dtype=jnp.int32) + jnp.sum(batch["response_mask"], dtype=jnp.int32)


class Feed(Protocol):
    """Host inputs of a method's updates, resumable: `next()` the next update's numpy inputs, `state()`
    and `restore()` its position (JSON), `after_validation(metrics)` a hook for schedules that follow the
    validation figures."""

    def next(self) -> dict: ...

    def state(self) -> dict: ...

    def restore(self, saved: dict) -> None: ...

    def after_validation(self, metrics: dict) -> None: ...


@dataclasses.dataclass
class Method:
    """What the generic loop runs: the `update` (pure; the loop compiles it with the state's layout), how
    many optimizer steps one update makes, the feed of its inputs, and the initial extra state (carried in
    TrainState.extra)."""

    update: Callable  # (state, teacher_params, inputs) -> (state, metrics stacked [steps_per_update])
    steps_per_update: int
    feed: Feed
    extra: Any = None


# XLA may skip the rounding of a bf16/f16 intermediate where a fusion keeps it in float32 ("excess
# precision"), and fuses a forward differently inside a gradient than alone: the same forward then gives
# different numbers in MiniLLM's rescoring and in its loss (SmolLM2-135M in bf16: policy ratio off by 5.7%
# on average before any update). Updates are compiled with every rounding kept, so a forward computes the
# same numbers wherever it runs. No effect in float32.
EXACT_PRECISION = {"xla_allow_excess_precision": False}

# Incremented each time an update is traced (compiled): tests bound the number of compiles with it.
TRACE_COUNTS: collections.Counter = collections.Counter()


def jit_update(update: Callable, layout: TrainState | None, teacher_layout=None, name: str = "update") -> Callable:
    """jit `update(state, teacher_params, inputs)` with the state donated. With a layout: the state in
    and out by its shardings, the teacher's parameters as placed, inputs as `sharding.place_batch` laid
    them out, metrics replicated, and on several processes each new program started on all together
    (`sharding.StartedTogether`). Each trace counts in TRACE_COUNTS[name]."""
    def counted(*args):
        TRACE_COUNTS[name] += 1
        return update(*args)

    if layout is None:
        return jax.jit(counted, donate_argnums=0, compiler_options=EXACT_PRECISION)
    mesh = jax.tree.leaves(layout)[0].mesh
    replicated = sharding.replicated(mesh)
    return sharding.StartedTogether(jax.jit(counted, in_shardings=(layout, teacher_layout, None),
                                            out_shardings=(layout, replicated), donate_argnums=0,
                                            compiler_options=EXACT_PRECISION), name)


def jit_eval(fn: Callable, layout: TrainState | None) -> Callable:
    """jit `fn(params, inputs) -> metrics` (a scoring step: nothing donated), replicated results out."""
    if layout is None:
        return jax.jit(fn)
    mesh = jax.tree.leaves(layout)[0].mesh
    return sharding.StartedTogether(jax.jit(fn, in_shardings=(layout.params, None),
                                            out_shardings=sharding.replicated(mesh)), "eval")


@dataclasses.dataclass(frozen=True)
class Setup:
    """The fixed ingredients a method's `build` combines: the typed run config (`config.RunConfig`), the
    student's graph and optimizer, the teacher, the mesh, the training data, the sampling settings."""

    config: Any
    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    teacher: nnx.Module | None
    mesh: jax.sharding.Mesh | None
    train: Any  # data.InstructionData
    tokenizer: Any
    workdir: pathlib.Path
    sampling: Any  # sampling.SamplingConfig of the rollouts / on-policy samples

    @functools.cached_property
    def teacher_graphdef(self):
        return None if self.teacher is None else nnx.graphdef(self.teacher)

    @functools.cached_property
    def teacher_layout(self):
        return None if self.teacher is None or self.mesh is None else \
            jax.tree.map(lambda x: x.sharding, nnx.state(self.teacher))


def paired_token_values(setup: Setup, params, teacher_params, batch: dict, terms, *, dropout_rng=None,
                        temperature: float = 1.0, teacher_hidden=None):
    """`losses.token_values(terms)` at every response position of `batch`, [B, T, K]: the student forward
    (with dropout when a key is given) and the teacher's (no gradient; or its precomputed `teacher_hidden`)."""
    student = nnx.merge(setup.graphdef, params)
    teacher = nnx.merge(setup.teacher_graphdef, teacher_params)
    hidden = response_hidden(student, batch, dropout_rng=dropout_rng)
    if teacher_hidden is None:
        teacher_hidden = jax.lax.stop_gradient(response_hidden(teacher, batch))
    return losses.token_values(terms, hidden, student.unembed, teacher_hidden, teacher.unembed,
                               labels=batch["response"], num_real_tokens=student.config.num_real_tokens,
                               temperature=temperature, chunk_size=setup.config.logits_chunk_size or None)


__all__ = ["Feed", "KEY_STREAMS", "Method", "Setup", "TrainState", "accumulated_gradients", "apply_gradients",
           "batch_tokens", "create_train_state", "jit_eval", "jit_update", "make_optimizer", "paired_token_values",
           "response_hidden", "sharded_train_state", "step_keys", "train_state_shardings", "TRACE_COUNTS"]
