"""DistiLLM (Ko et al., 2024): skew KL or skew reverse KL (alpha = 0.1) with adaptive off-policy use of
student-generated outputs (SGO). Each update trains on the gold batch or, with the current SGO
probability, on the student's answers to its prompts: a fresh sample (also stored in a replay buffer) or,
with probability `replay_reuse`, one replayed from the buffer. The choice, the sampling and the buffer
live inside the compiled update (the buffer in the train state, so it is checkpointed); the SGO
probability rises on the host whenever the validation loss stops improving.

Every batch has one prompt and one response width (replayed batches must fit any update)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from minillm_jax import losses
from minillm_jax.data.batches import GoldFeed
from minillm_jax.trainers import gkd, sft
from minillm_jax.trainers.common import Method, paired_token_values, step_keys


@dataclasses.dataclass(frozen=True)
class DistiLLMConfig:
    divergence: str = "skew_reverse_kl"  # or "skew_kl"
    skew_alpha: float = 0.1
    initial_sgo_prob: float = 0.0
    sgo_prob_step: float = 0.1
    max_sgo_prob: float = 0.8
    replay_capacity: int = 64  # batches kept
    replay_reuse: float = 0.5  # chance to replay a stored SGO batch instead of sampling a new one
    dropout: bool = True

    def __post_init__(self):
        if self.divergence not in ("skew_kl", "skew_reverse_kl"):
            raise ValueError(f"DistiLLMConfig.divergence={self.divergence!r}: expected 'skew_kl' or "
                             "'skew_reverse_kl'")


def distillm_loss(params, teacher_params, batch, dropout_rng, *, setup, config: DistiLLMConfig):
    divergence = losses.DIVERGENCES[config.divergence]
    values = paired_token_values(setup, params, teacher_params, batch,
                                 lambda log_q, log_p, labels: divergence(log_q, log_p, config.skew_alpha),
                                 dropout_rng=dropout_rng, temperature=setup.sampling.temperature)
    loss = losses.masked_mean(values, batch["response_mask"])
    return loss, {"loss": loss, config.divergence: loss}


class AdaptiveFeed(GoldFeed):
    """Gold batches plus the current SGO probability, which rises by `sgo_prob_step` (up to
    `max_sgo_prob`) after each validation whose loss is no better than the best so far."""

    def __init__(self, *args, config: DistiLLMConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.config = config
        self.sgo_prob, self.best_validation = config.initial_sgo_prob, math.inf

    def next(self) -> dict:
        return {"gold": super().next(), "sgo_prob": np.float32(self.sgo_prob)}

    def after_validation(self, metrics: dict) -> None:
        if "valid/loss" not in metrics:
            return
        loss = float(metrics["valid/loss"])
        if loss >= self.best_validation:
            self.sgo_prob = min(self.sgo_prob + self.config.sgo_prob_step, self.config.max_sgo_prob)
        self.best_validation = min(self.best_validation, loss)

    def state(self) -> dict:
        return {**super().state(), "sgo_prob": self.sgo_prob, "best_validation": self.best_validation}

    def restore(self, saved: dict) -> None:
        super().restore(saved)
        self.sgo_prob, self.best_validation = float(saved["sgo_prob"]), float(saved["best_validation"])


def empty_replay(example: dict, capacity: int) -> dict:
    """The replay buffer for batches shaped like `example` (numpy, stacked [A, b, ...])."""
    return {"batches": {k: np.zeros((capacity, *v.shape), v.dtype) for k, v in example.items()},
            "stored": np.int32(0), "next": np.int32(0)}


def choose_batch(setup, config: DistiLLMConfig, params, replay: dict, gold: dict, sgo_prob, keys: dict):
    """(batch, source 0 gold / 1 replayed / 2 fresh, new replay buffer)."""
    coin = jax.random.uniform(keys["coin"], (3,))
    use_sgo = coin[0] < sgo_prob
    replayed = use_sgo & (replay["stored"] > 0) & (coin[1] < config.replay_reuse)
    fresh = use_sgo & ~replayed
    slot = jnp.minimum((coin[2] * replay["stored"]).astype(jnp.int32), jnp.maximum(replay["stored"] - 1, 0))
    sampled = jax.lax.cond(fresh, lambda: gkd.student_answers(setup, params, gold, keys["sample"]), lambda: gold)
    batch = jax.tree.map(lambda stored, current: jnp.where(replayed, stored[slot], current), replay["batches"],
                         sampled)

    def store(replay):
        batches = jax.tree.map(lambda buffer, x: jax.lax.dynamic_update_index_in_dim(buffer, x, replay["next"], 0),
                               replay["batches"], sampled)
        return {"batches": batches, "stored": jnp.minimum(replay["stored"] + 1, config.replay_capacity),
                "next": (replay["next"] + 1) % config.replay_capacity}

    replay = jax.lax.cond(fresh, store, lambda r: r, replay)
    source = jnp.where(fresh, 2, jnp.where(replayed, 1, 0))
    return batch, source, replay


def build(setup) -> Method:
    config, run = setup.config.method, setup.config
    inner = sft.supervised_update(lambda p, t, b, k: distillm_loss(p, t, b, k, setup=setup, config=config), setup,
                                  dropout=config.dropout)

    def update(state, teacher_params, inputs):
        batch, source, replay = choose_batch(setup, config, state.params, state.extra, inputs["gold"],
                                             inputs["sgo_prob"], step_keys(run.seed, state.step))
        state, metrics = inner(state.replace(extra=replay), teacher_params, batch)
        return state, {**metrics, "student_generated": (source > 0).astype(jnp.float32)[None],
                       "sgo_prob": inputs["sgo_prob"][None]}

    feed = AdaptiveFeed(setup.train, run.batch_size, run.accumulate_steps, run.seed,
                        sft.widths(setup, fixed_prompt=True, fixed_response=True,
                                   min_response=setup.sampling.max_new_tokens), config=config)
    extra = empty_replay(feed.example(), config.replay_capacity)
    return Method(update=update, steps_per_update=1, feed=feed, extra=extra)
