"""MiniLLM (Gu et al., ICLR 2024): on-policy reverse KL with teacher-mixed sampling, as the reference code
computes it by default (see shared docs minillm.md section 2), with the paper's variants as options.

A round: sample rollouts from (1 - alpha) q + alpha p with both caches in lock-step, fix the rewards
r_t = log p(y_t) - log q_old(y_t) and the advantages, then `ppo_epochs` passes over shuffled
mini-batches of the buffer. Loss per mini-batch: the clipped policy term + the single-step term (full-
vocabulary reverse KL, teacher logits recomputed on the mini-batch) + pt_coef * L_PT on plain text.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from minillm_jax import losses
from minillm_jax.sampling import SamplingConfig, generate
from minillm_jax.trainers.common import StepLayout, apply_gradients, jit_train_step, response_hidden, token_means


@dataclasses.dataclass(frozen=True)
class MiniLLMConfig:
    mix_alpha: float = 0.2
    gamma: float = 0.95
    clip: float | None = 0.2
    length_norm: bool = True
    whiten: bool = True
    masked_whiten: bool = True  # False: the reference's statistics over padding zeros too
    include_current_reward: bool = True  # the code's G_t; False: the paper's R_{t+1}
    single_step: bool = True
    single_step_weights: bool = False  # the paper's w_t on the single-step term (the code has none)
    importance: str = "token"  # "token": w_t as paper and code; "sequence": prod_t w_t (unbiased)
    pt_coef: float = 1.0
    kd_ratio: float = 0.5  # L_PT = (1 - k) CE + k soft CE
    ppo_epochs: int = 4
    minibatch_size: int = 64
    logits_chunk_size: int | None = None  # compute logits a time-chunk at a time

    def __post_init__(self):
        if self.importance not in ("token", "sequence"):
            raise ValueError(f"MiniLLMConfig.importance={self.importance!r}: expected 'token' or 'sequence'")


@flax.struct.dataclass
class Rollouts:
    prompt_tokens: Int[Array, "N P"]
    prompt_mask: Bool[Array, "N P"]
    tokens: Int[Array, "N R"]
    mask: Bool[Array, "N R"]
    old_logprobs: Float[Array, "N R"]
    teacher_logprobs: Float[Array, "N R"]
    weights: Float[Array, "N R"]
    advantages: Float[Array, "N R"]

    def take(self, index) -> "Rollouts":
        return jax.tree.map(lambda x: x[index], self)


def make_rollouts(student, teacher, prompts, sampling: SamplingConfig, rng, config: MiniLLMConfig) -> tuple[
        Rollouts, dict]:
    """Sample with the teacher mixed in and fix rewards, weights and advantages for the PPO epochs."""
    out = generate(student, prompts, sampling, rng, teacher=teacher, mix_alpha=config.mix_alpha)
    mask = out.mask.astype(jnp.float32)
    rewards = out.teacher_logprobs - out.logprobs
    advantages = losses.minillm_advantages(rewards, mask, config.gamma, length_norm=config.length_norm,
                                           whiten=config.whiten, masked_whiten=config.masked_whiten,
                                           include_current_reward=config.include_current_reward)
    weights = jnp.where(out.mask, out.weights, 1.0)
    if config.importance == "sequence":
        weights = jnp.broadcast_to(jnp.prod(weights, axis=1, keepdims=True), weights.shape)
    lengths = out.lengths.astype(jnp.float32)
    stats = {
        "rollout/reverse_kl": jnp.mean(jnp.sum(-rewards * mask, axis=1)),
        "rollout/length_mean": jnp.mean(lengths), "rollout/length_max": jnp.max(lengths),
        "rollout/truncated": jnp.mean(lengths >= sampling.max_new_tokens),
        "rollout/weight_mean": losses.masked_mean(out.weights, mask),
        "rollout/weight_max": jnp.max(jnp.where(out.mask, out.weights, 0.0)),
        "rollout/logprob_gap": losses.masked_mean(rewards, mask),
    }
    rollouts = Rollouts(prompt_tokens=out.prompt_tokens, prompt_mask=out.prompt_mask, tokens=out.tokens,
                        mask=out.mask, old_logprobs=out.logprobs, teacher_logprobs=out.teacher_logprobs,
                        weights=weights, advantages=advantages)
    return rollouts, stats


def _response_token_values(log_q, log_p, tokens):
    """Per response token: log q(y_t), the student's entropy, and KL(q || p) over the full vocabulary."""
    logq = jnp.take_along_axis(log_q, tokens[..., None], axis=-1)[..., 0]
    entropy_tokens = -jnp.sum(jnp.exp(log_q) * log_q, axis=-1)
    return jnp.stack([logq, entropy_tokens, losses.token_divergence("reverse_kl")(log_q, log_p, tokens)], axis=-1)


def minillm_loss(params, graphdef, teacher_graphdef, teacher_params, batch: Rollouts, pt_batch,
                 config: MiniLLMConfig):
    student = nnx.merge(graphdef, params)
    teacher = nnx.merge(teacher_graphdef, teacher_params)
    n = student.config.num_real_tokens
    mask = batch.mask.astype(jnp.float32)
    args = (batch.prompt_tokens, batch.prompt_mask, batch.tokens, batch.mask)
    hidden = response_hidden(student, *args)
    teacher_hidden = jax.lax.stop_gradient(response_hidden(teacher, *args)) if config.single_step else None
    if config.logits_chunk_size:
        values = losses.chunked_token_values(_response_token_values, hidden, student.unembed, teacher_hidden,
                                             teacher.unembed, batch.tokens, chunk_size=config.logits_chunk_size,
                                             num_real_tokens=n)
    else:
        log_q = losses.log_probs(student.unembed(hidden), n)
        log_p = log_q if teacher_hidden is None else losses.log_probs(teacher.unembed(teacher_hidden), n)
        values = _response_token_values(log_q, log_p, batch.tokens)
    logprobs, entropy_tokens, reverse_kl_tokens = values[..., 0], values[..., 1], values[..., 2]

    pg = losses.policy_gradient_loss(logprobs, batch.old_logprobs, batch.advantages, mask, weights=batch.weights,
                                     clip=config.clip)
    metrics = {"pg": pg, "entropy": jax.lax.stop_gradient(losses.masked_mean(entropy_tokens, mask)),
               "ratio_mean": losses.masked_mean(jnp.exp(logprobs - batch.old_logprobs), mask)}
    total = pg
    if config.single_step:
        # the reference has no importance weight here; the paper's w_t is an option
        weights = jax.lax.stop_gradient(batch.weights) if config.single_step_weights else 1.0
        reg = losses.masked_mean(reverse_kl_tokens * weights, mask)
        total = total + reg
        metrics["single_step"] = reg
    if pt_batch is not None and config.pt_coef:
        mean = token_means(student, teacher, pt_batch, config.logits_chunk_size)
        pt = (1.0 - config.kd_ratio) * mean("ce") + config.kd_ratio * mean("soft_ce")
        total = total + config.pt_coef * pt
        metrics["pt"] = pt
    metrics["loss"] = total
    return total, metrics


def make_train_step(graphdef, teacher_graphdef, tx, schedule, config: MiniLLMConfig,
                    layout: StepLayout | None = None, pt_rows: int | None = None):
    """A jitted `train_step(state, teacher_params, rollout_batch, pt_batch) -> (state, metrics)`, the state
    donated. With a `layout`: explicit in/out shardings, rollout mini-batches of `config.minibatch_size`
    rows and L_PT batches of `pt_rows` rows (None: no L_PT batch)."""

    def train_step(state, teacher_params, batch, pt_batch):
        grad_fn = jax.value_and_grad(minillm_loss, has_aux=True)
        (_, metrics), grads = grad_fn(state.params, graphdef, teacher_graphdef, teacher_params, batch, pt_batch,
                                      config)
        state, opt_metrics = apply_gradients(state, grads, tx, schedule)
        return state, {**metrics, **opt_metrics}

    return jit_train_step(train_step, layout, config.minibatch_size, pt_rows)


def train_round(state, graphdef, teacher, prompts, sampling: SamplingConfig, rng, config: MiniLLMConfig,
                train_step, pt_batches=None) -> tuple:
    """One MiniLLM round: rollouts from the current student, then `ppo_epochs` over shuffled mini-batches.
    Returns the new state, the rollout statistics and the last step's metrics."""
    student = nnx.merge(graphdef, state.params)
    sample_key, shuffle_key = jax.random.split(rng)
    rollouts, stats = make_rollouts(student, teacher, prompts, sampling, sample_key, config)
    teacher_params = nnx.state(teacher)
    count = rollouts.tokens.shape[0]
    size = min(config.minibatch_size, count)
    metrics = {}
    for epoch in range(config.ppo_epochs):
        order = np.asarray(jax.random.permutation(jax.random.fold_in(shuffle_key, epoch), count))
        for start in range(0, count - size + 1, size):
            pt_batch = next(pt_batches) if pt_batches is not None else None
            state, metrics = train_step(state, teacher_params, rollouts.take(order[start:start + size]), pt_batch)
    return state, stats, metrics
