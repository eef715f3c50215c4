"""GKD (Agarwal et al., 2024): the generalised JSD(beta) between teacher and student, token by token, on
gold sequences or, with probability `lmbda` per update, on the same prompts answered by the current
student (sampled inside the compiled update; no gradient through sampling).

Which kind an update trains on is a coin drawn on the host (`OnPolicyFeed`, from the seed and the
update's index, so a resumed run draws what an uninterrupted one would): gold batches keep the run's
width buckets, sampled batches are exactly `max_new_tokens` wide, and neither pays for the other's shape
or for a branch it does not take."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx

from minillm_jax import losses, sampling
from minillm_jax.data.batches import GoldFeed
from minillm_jax.trainers import sft
from minillm_jax.trainers.common import Method, paired_token_values, step_keys

COIN_STREAM = 0x6B6D  # the host coins' own random stream (apart from the data order's)


@dataclasses.dataclass(frozen=True)
class GKDConfig:
    beta: float = 0.5  # 0: forward KL, 1: reverse KL
    lmbda: float = 0.5  # probability that an update trains on the student's own answers
    dropout: bool = False  # GKD (and TRL's trainer) train the student without dropout


def gkd_loss(params, teacher_params, batch, dropout_rng, *, setup, beta: float):
    values = paired_token_values(setup, params, teacher_params, batch, [losses.Term("jsd", beta)],
                                 dropout_rng=dropout_rng, temperature=setup.sampling.temperature)
    loss = losses.masked_mean(values[..., 0], batch["response_mask"])
    return loss, {"loss": loss, "jsd": loss}


def student_answers(setup, params, batch: dict, key) -> dict:
    """`batch` (stacked [A, b, ...]) with its responses replaced by the student's samples to its prompts,
    `max_new_tokens` wide."""
    stacked = batch["prompt"].shape[:-1]
    prompt = batch["prompt"].reshape(-1, batch["prompt"].shape[-1])
    prompt_mask = batch["prompt_mask"].reshape(prompt.shape)
    student = nnx.merge(setup.graphdef, params)
    out = sampling.sample(student, None, prompt, prompt_mask, key, 0.0, config=setup.sampling,
                          num_real=student.config.num_real_tokens, mesh=setup.mesh)
    width = out.tokens.shape[1]
    return {**batch, "response": out.tokens.reshape(*stacked, width),
            "response_mask": out.mask.reshape(*stacked, width)}


def host_coins(seed: int, update: int, count: int = 1) -> np.ndarray:
    """`count` uniform [0, 1) draws for update number `update` of the run seeded `seed`."""
    return np.random.default_rng([seed, COIN_STREAM, update]).random(count)


class OnPolicyFeed(GoldFeed):
    """Each update's input: {"gold": the gold batch} or, with `probability` (a host coin per update),
    {"prompts": the same rows' prompts with empty responses `new_tokens` wide} for the student to answer.
    Prompt batches take the prompt buckets, or `prompt_width` when given."""

    def __init__(self, *args, probability: float, new_tokens: int, prompt_width: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.probability, self.new_tokens, self.prompt_width = probability, new_tokens, prompt_width
        self.seed, self.updates = self.order.seed, 0

    def next(self) -> dict:
        chosen = self.order.next()
        coins = host_coins(self.seed, self.updates, 3)
        self.updates += 1
        if coins[0] >= self.probability:
            return {"gold": self.batch(chosen)}
        return self.sampled(chosen, coins)

    def sampled(self, chosen, coins) -> dict:
        return {"prompts": self.batch(chosen, prompt_width=self.prompt_width, response_width=self.new_tokens)}

    def example(self) -> dict:
        """All-padding inputs of the widths sampled batches have (the largest prompt bucket unless fixed)."""
        return super().example(self.prompt_width, self.new_tokens)

    def state(self) -> dict:
        return {**super().state(), "updates": self.updates}

    def restore(self, saved: dict) -> None:
        super().restore(saved)
        self.updates = int(saved.get("updates", 0))


def build(setup) -> Method:
    config, seed = setup.config.method, setup.config.seed
    inner = sft.supervised_update(
        lambda p, t, b, k: gkd_loss(p, t, b, k, setup=setup, beta=config.beta), setup, dropout=config.dropout)

    def update(state, teacher_params, inputs):  # traced once per kind and shape of `inputs`
        on_policy = "prompts" in inputs
        batch = student_answers(setup, state.params, inputs["prompts"], step_keys(seed, state.step)["sample"]) \
            if on_policy else inputs["gold"]
        state, metrics = inner(state, teacher_params, batch)
        return state, {**metrics, "on_policy": jnp.full((1,), float(on_policy), jnp.float32)}

    c = setup.config
    feed = OnPolicyFeed(setup.train, c.batch_size, c.accumulate_steps, seed, sft.widths(setup),
                        probability=config.lmbda, new_tokens=setup.sampling.max_new_tokens)
    return Method(update=update, steps_per_update=1, feed=feed)
