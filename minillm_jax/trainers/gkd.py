"""GKD (Agarwal et al., 2024): the generalised JSD(beta) between teacher and student, token by token, on
gold sequences or, with probability `lmbda` per update, on the same prompts answered by the current
student (sampled inside the compiled update; no gradient through sampling). Gold and sampled batches
share one response width, so both kinds run through the same compiled update: the longest gold answer's
(at least `max_new_tokens`) when `lmbda` < 1, `max_new_tokens` when every update is on-policy."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from minillm_jax import losses, sampling
from minillm_jax.trainers import sft
from minillm_jax.trainers.common import Method, paired_token_values, step_keys


@dataclasses.dataclass(frozen=True)
class GKDConfig:
    beta: float = 0.5  # 0: forward KL, 1: reverse KL
    lmbda: float = 0.5  # probability that an update trains on the student's own answers
    dropout: bool = False  # GKD (and TRL's trainer) train the student without dropout


def gkd_loss(params, teacher_params, batch, dropout_rng, *, setup, beta: float):
    values = paired_token_values(setup, params, teacher_params, batch,
                                 lambda log_q, log_p, labels: losses.jsd(log_q, log_p, beta),
                                 dropout_rng=dropout_rng, temperature=setup.sampling.temperature)
    loss = losses.masked_mean(values, batch["response_mask"])
    return loss, {"loss": loss, "jsd": loss}


def student_answers(setup, params, batch: dict, key) -> dict:
    """`batch` (stacked [A, b, ...]) with its responses replaced by the student's samples to its prompts,
    padded to the batch's response width."""
    stacked = batch["prompt"].shape[:-1]
    prompt = batch["prompt"].reshape(-1, batch["prompt"].shape[-1])
    prompt_mask = batch["prompt_mask"].reshape(prompt.shape)
    student = nnx.merge(setup.graphdef, params)
    out = sampling.sample(student, None, prompt, prompt_mask, key, 0.0, config=setup.sampling,
                          num_real=student.config.num_real_tokens, mesh=setup.mesh)
    width = batch["response"].shape[-1]
    pad = width - out.tokens.shape[1]
    response = jnp.pad(out.tokens, ((0, 0), (0, pad)), constant_values=setup.sampling.pad_token_id)
    response_mask = jnp.pad(out.mask, ((0, 0), (0, pad)))
    return {**batch, "response": response.reshape(*stacked, width),
            "response_mask": response_mask.reshape(*stacked, width)}


def on_policy_batch(setup, params, gold: dict, keys: dict, probability: float):
    """(batch, chose the student's answers): the gold batch, or with `probability` (a coin from the `coin`
    stream) the student's answers (the `sample` stream); a static 0 or 1 compiles only its branch."""
    sample_key, coin_key = keys["sample"], keys["coin"]
    if probability >= 1.0:
        return student_answers(setup, params, gold, sample_key), jnp.bool_(True)
    if probability <= 0.0:
        return gold, jnp.bool_(False)
    chosen = jax.random.bernoulli(coin_key, probability)
    batch = jax.lax.cond(chosen, lambda: student_answers(setup, params, gold, sample_key), lambda: gold)
    return batch, chosen


def build(setup) -> Method:
    config, seed = setup.config.method, setup.config.seed
    inner = sft.supervised_update(
        lambda p, t, b, k: gkd_loss(p, t, b, k, setup=setup, beta=config.beta), setup, dropout=config.dropout)

    def update(state, teacher_params, inputs):
        batch, on_policy = on_policy_batch(setup, state.params, inputs, step_keys(seed, state.step),
                                           config.lmbda)
        state, metrics = inner(state, teacher_params, batch)
        return state, {**metrics, "on_policy": on_policy.astype(jnp.float32)[None]}

    data = setup.train
    if config.lmbda >= 1.0:  # every update answers its prompts itself: gold answers are never read, nor sized
        data = dataclasses.replace(data, responses=[[] for _ in data.responses])
    feed = sft.gold_feed(setup, data, fixed_response=True, min_response=setup.sampling.max_new_tokens)
    return Method(update=update, steps_per_update=1, feed=feed)
