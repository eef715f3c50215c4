"""MiniLLM (Gu et al., ICLR 2024): on-policy reverse KL with teacher-mixed sampling, as the reference code
computes it by default (see shared docs minillm.md section 2), with the paper's variants as options.

A round: sample rollouts from (1 - alpha) q + alpha p with both caches in lock-step, fix the rewards
r_t = log p(y_t) - log q_old(y_t) and the advantages, then `ppo_epochs` passes over shuffled
mini-batches of the buffer. Loss per mini-batch: the clipped policy term + the single-step term (full-
vocabulary reverse KL, teacher logits recomputed on the mini-batch) + pt_coef * L_PT on plain text.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from minillm_jax import losses
from minillm_jax.sampling import SamplingConfig, generate
from minillm_jax.trainers.common import apply_gradients, entropy, response_logits, shifted_logits


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


def minillm_loss(params, graphdef, teacher_graphdef, teacher_params, batch: Rollouts, pt_batch,
                 config: MiniLLMConfig):
    student = nnx.merge(graphdef, params)
    teacher = nnx.merge(teacher_graphdef, teacher_params)
    n = student.config.num_real_tokens
    mask = batch.mask.astype(jnp.float32)
    args = (batch.prompt_tokens, batch.prompt_mask, batch.tokens, batch.mask)
    logits = response_logits(student, *args)
    logprobs = losses.token_logprobs(logits, batch.tokens, n)
    pg = losses.policy_gradient_loss(logprobs, batch.old_logprobs, batch.advantages, mask, weights=batch.weights,
                                     clip=config.clip)
    metrics = {"pg": pg, "entropy": entropy(logits, mask, n),
               "ratio_mean": losses.masked_mean(jnp.exp(logprobs - batch.old_logprobs), mask)}
    total = pg
    if config.single_step:
        teacher_logits = jax.lax.stop_gradient(response_logits(teacher, *args))
        reg = losses.single_step_loss(logits, teacher_logits, mask, num_real_tokens=n,
                                      weights=batch.weights if config.single_step_weights else None)
        total = total + reg
        metrics["single_step"] = reg
    if pt_batch is not None and config.pt_coef:
        pt_logits = shifted_logits(student, pt_batch["tokens"], pt_batch["attention_mask"])
        pt_teacher = jax.lax.stop_gradient(shifted_logits(teacher, pt_batch["tokens"], pt_batch["attention_mask"]))
        pt = losses.kd_loss(pt_logits, pt_teacher, pt_batch["tokens"][:, 1:], pt_batch["loss_mask"][:, 1:],
                            kd_ratio=config.kd_ratio, num_real_tokens=n)
        total = total + config.pt_coef * pt
        metrics["pt"] = pt
    metrics["loss"] = total
    return total, metrics


def make_train_step(graphdef, teacher_graphdef, tx, schedule, config: MiniLLMConfig):
    """A jitted `train_step(state, teacher_params, rollout_batch, pt_batch) -> (state, metrics)`."""

    @functools.partial(jax.jit, donate_argnums=0)
    def train_step(state, teacher_params, batch, pt_batch):
        grad_fn = jax.value_and_grad(minillm_loss, has_aux=True)
        (_, metrics), grads = grad_fn(state.params, graphdef, teacher_graphdef, teacher_params, batch, pt_batch,
                                      config)
        state, opt_metrics = apply_gradients(state, grads, tx, schedule)
        return state, {**metrics, **opt_metrics}

    return train_step


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
