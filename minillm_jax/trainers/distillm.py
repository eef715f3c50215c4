"""DistiLLM (Ko et al., 2024): skew KL or skew reverse KL (alpha = 0.1) with adaptive off-policy use of
student-generated outputs (SGO). Each update trains on the gold batch or, with the current SGO
probability, on the student's answers to its prompts: a fresh sample (also stored in a replay buffer) or,
with probability `replay_reuse`, one replayed from the buffer. The choices are host coins (per update,
from the seed and the update's index: resumable); the sampling and the buffer live inside the compiled
update (the buffer in the train state, so it is checkpointed); the SGO probability rises on the host
whenever the validation loss stops improving.

Gold batches keep the run's width buckets; student-generated batches, fresh or replayed, all have the
largest prompt width and `max_new_tokens` responses (a replayed batch must fit any SGO update)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from minillm_jax import losses
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
    values = paired_token_values(setup, params, teacher_params, batch,
                                 [losses.Term(config.divergence, config.skew_alpha)],
                                 dropout_rng=dropout_rng, temperature=setup.sampling.temperature)
    loss = losses.masked_mean(values[..., 0], batch["response_mask"])
    return loss, {"loss": loss, config.divergence: loss}


class AdaptiveFeed(gkd.OnPolicyFeed):
    """Gold batches or, with the current SGO probability, student-generated ones: {"sgo": prompts,
    "slot": the replay-buffer slot to train on, or -1 for a fresh sample}. The probability rises by
    `sgo_prob_step` (up to `max_sgo_prob`) after each validation whose loss is no better than the best so
    far. The feed keeps count of the buffer's filling as the update does, so it only replays stored slots."""

    def __init__(self, *args, config: DistiLLMConfig, **kwargs):
        super().__init__(*args, probability=config.initial_sgo_prob, **kwargs)
        self.config = config
        self.best_validation, self.stored = math.inf, 0

    @property
    def sgo_prob(self) -> float:
        return self.probability

    def next(self) -> dict:
        return {**super().next(), "sgo_prob": np.float32(self.probability)}

    def sampled(self, chosen, coins) -> dict:
        prompts = super().sampled(chosen, coins)["prompts"]
        if self.stored and coins[1] < self.config.replay_reuse:
            return {"sgo": prompts, "slot": np.int32(min(int(coins[2] * self.stored), self.stored - 1))}
        self.stored = min(self.stored + 1, self.config.replay_capacity)
        return {"sgo": prompts, "slot": np.int32(-1)}

    def after_validation(self, metrics: dict) -> None:
        if "valid/loss" not in metrics:
            return
        loss = float(metrics["valid/loss"])
        if loss >= self.best_validation:
            self.probability = min(self.probability + self.config.sgo_prob_step, self.config.max_sgo_prob)
        self.best_validation = min(self.best_validation, loss)

    def state(self) -> dict:
        return {**super().state(), "sgo_prob": self.probability, "best_validation": self.best_validation,
                "stored": self.stored}

    def restore(self, saved: dict) -> None:
        super().restore(saved)
        self.probability, self.best_validation = float(saved["sgo_prob"]), float(saved["best_validation"])
        self.stored = int(saved.get("stored", 0))


def empty_replay(example: dict, capacity: int) -> dict:
    """The replay buffer for batches shaped like `example` (numpy, stacked [A, b, ...])."""
    return {"batches": {k: np.zeros((capacity, *v.shape), v.dtype) for k, v in example.items()},
            "stored": np.int32(0), "next": np.int32(0)}


def sgo_batch(setup, config: DistiLLMConfig, params, replay: dict, prompts: dict, slot, key):
    """(the batch, new replay buffer): the student's fresh answers to `prompts` (stored in the buffer) when
    `slot` < 0, else the buffer's batch at `slot`."""
    fresh = slot < 0

    def sample(replay):
        batch = gkd.student_answers(setup, params, prompts, key)
        batches = jax.tree.map(lambda buffer, x: jax.lax.dynamic_update_index_in_dim(buffer, x, replay["next"], 0),
                               replay["batches"], batch)
        return batch, {"batches": batches, "stored": jnp.minimum(replay["stored"] + 1, config.replay_capacity),
                       "next": (replay["next"] + 1) % config.replay_capacity}

    def replayed(replay):
        return jax.tree.map(lambda buffer: buffer[jnp.maximum(slot, 0)], replay["batches"]), replay

    return jax.lax.cond(fresh, sample, replayed, replay)


def build(setup) -> Method:
    config, run = setup.config.method, setup.config
    inner = sft.supervised_update(lambda p, t, b, k: distillm_loss(p, t, b, k, setup=setup, config=config), setup,
                                  dropout=config.dropout)

    def update(state, teacher_params, inputs):  # traced once per kind and shape of `inputs`
        if "sgo" in inputs:
            batch, replay = sgo_batch(setup, config, state.params, state.extra, inputs["sgo"], inputs["slot"],
                                      step_keys(run.seed, state.step)["sample"])
            source = jnp.where(inputs["slot"] < 0, 2, 1)
        else:
            batch, replay, source = inputs["gold"], state.extra, jnp.int32(0)
        state, metrics = inner(state.replace(extra=replay), teacher_params, batch)
        return state, {**metrics, "student_generated": (source > 0).astype(jnp.float32)[None],
                       "replayed": (source == 1).astype(jnp.float32)[None], "sgo_prob": inputs["sgo_prob"][None]}

    widths = sft.widths(setup)
    feed = AdaptiveFeed(setup.train, run.batch_size, run.accumulate_steps, run.seed, widths, config=config,
                        new_tokens=setup.sampling.max_new_tokens, prompt_width=widths.prompt[-1])
    extra = empty_replay(feed.example(), config.replay_capacity)
    return Method(update=update, steps_per_update=1, feed=feed, extra=extra)
