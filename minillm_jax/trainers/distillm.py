"""DistiLLM (Ko et al., 2024): skew KL or skew reverse KL (alpha = 0.1) with adaptive off-policy use of
student-generated outputs (SGO). SGOs go into a replay buffer and are reused; the probability of
training on them rises whenever the validation loss stops improving."""

from __future__ import annotations

import collections
import dataclasses

import jax
import numpy as np
from flax import nnx

from minillm_jax import sharding
from minillm_jax.trainers.common import StepLayout, apply_gradients, jit_train_step, token_means


@dataclasses.dataclass(frozen=True)
class DistiLLMConfig:
    divergence: str = "skew_reverse_kl"  # or "skew_kl"
    skew_alpha: float = 0.1
    initial_sgo_prob: float = 0.0
    sgo_prob_step: float = 0.1
    max_sgo_prob: float = 0.8
    replay_capacity: int = 64  # batches kept
    replay_reuse: float = 0.5  # chance to replay an old SGO batch instead of generating a new one
    logits_chunk_size: int | None = None  # compute logits a time-chunk at a time

    def __post_init__(self):
        if self.divergence not in ("skew_kl", "skew_reverse_kl"):
            raise ValueError(f"DistiLLMConfig.divergence={self.divergence!r}: expected 'skew_kl' or "
                             "'skew_reverse_kl'")


def distillm_loss(params, graphdef, teacher_graphdef, teacher_params, batch, config: DistiLLMConfig):
    student = nnx.merge(graphdef, params)
    teacher = nnx.merge(teacher_graphdef, teacher_params)
    mean = token_means(student, teacher, batch, config.logits_chunk_size)
    loss = mean(config.divergence, alpha=config.skew_alpha)
    return loss, {"loss": loss, config.divergence: loss}


def make_train_step(graphdef, teacher_graphdef, tx, schedule, config: DistiLLMConfig,
                    layout: StepLayout | None = None, batch_rows: int | None = None):
    def train_step(state, teacher_params, batch):
        grad_fn = jax.value_and_grad(distillm_loss, has_aux=True)
        (_, metrics), grads = grad_fn(state.params, graphdef, teacher_graphdef, teacher_params, batch, config)
        state, opt_metrics = apply_gradients(state, grads, tx, schedule)
        return state, {**metrics, **opt_metrics}

    return jit_train_step(train_step, layout, batch_rows)


class AdaptiveOffPolicy:
    """Host-side state of the adaptive SGO schedule and its replay buffer (numpy batches)."""

    def __init__(self, config: DistiLLMConfig, seed: int = 0):
        self.config = config
        self.sgo_prob = config.initial_sgo_prob
        self.best_validation = float("inf")
        self.buffer: collections.deque = collections.deque(maxlen=config.replay_capacity)
        self.rng = np.random.default_rng(seed)

    def update(self, validation_loss: float) -> float:
        """Raise the SGO probability when validation stops improving; returns the new probability."""
        if validation_loss >= self.best_validation:
            self.sgo_prob = min(self.sgo_prob + self.config.sgo_prob_step, self.config.max_sgo_prob)
        self.best_validation = min(self.best_validation, validation_loss)
        return self.sgo_prob

    def choose(self, gold_batch: dict, generate_batch) -> tuple[dict, str]:
        """'gold', 'replay' or 'fresh' (a new student-generated batch, also stored for replay)."""
        if self.rng.random() >= self.sgo_prob:
            return gold_batch, "gold"
        if self.buffer and self.rng.random() < self.config.replay_reuse:
            return self.buffer[int(self.rng.integers(len(self.buffer)))], "replay"
        batch = {k: sharding.to_host(v) for k, v in generate_batch().items()}
        self.buffer.append(batch)
        return batch, "fresh"

    def get_state(self) -> dict:
        """Everything a resume needs to continue exactly: the schedule, the coin's state and the replay
        buffer (token arrays as lists, for the checkpoint's JSON)."""
        return {"sgo_prob": self.sgo_prob, "best_validation": self.best_validation,
                "rng": self.rng.bit_generator.state,
                "replay": [{k: v.tolist() for k, v in batch.items()} for batch in self.buffer]}

    def set_state(self, saved: dict) -> None:
        self.sgo_prob, self.best_validation = saved["sgo_prob"], saved["best_validation"]
        if "rng" in saved:
            self.rng.bit_generator.state = saved["rng"]
        self.buffer.clear()
        for batch in saved.get("replay", []):
            self.buffer.append({k: np.asarray(v, np.int32) for k, v in batch.items()})
