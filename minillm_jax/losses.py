"""Distillation objectives as pure, masked float32 functions.

Shapes: B batch, T time, V vocabulary. `student_logits` give q, `teacher_logits` give p. Every loss is a
mean over valid tokens: the sum over `mask` divided by the mask's count over the batch it is given
(under jit on a sharded global batch, the global count). `num_real_tokens` slices a padded vocabulary to
the tokenizer's size, so padding ids never carry probability.

Divergence conventions (one fixed choice, tested at the endpoints):
  forward_kl = KL(p || q), reverse_kl = KL(q || p);
  jsd(beta) = beta KL(p || m) + (1 - beta) KL(q || m) with m = beta p + (1 - beta) q, which is
  special-cased to forward KL at beta = 0 and reverse KL at beta = 1 (GKD; the interior formula itself
  tends to 0 there);
  skew_kl(alpha) = KL(p || alpha p + (1 - alpha) q), skew_reverse_kl(alpha) = KL(q || alpha q + (1 - alpha) p)
  (DistiLLM; alpha = 0 gives the plain KLs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

Logits = Float[Array, "B T V"]
Mask = Float[Array, "B T"]


def log_probs(logits: Logits, num_real_tokens: int | None = None) -> Logits:
    """float32 log-softmax over the real vocabulary."""
    logits = logits.astype(jnp.float32)
    if num_real_tokens is not None:
        logits = logits[..., :num_real_tokens]
    return jax.nn.log_softmax(logits, axis=-1)


def masked_mean(values: Float[Array, "B T"], mask: Mask) -> Float[Array, ""]:
    mask = mask.astype(jnp.float32)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def token_logprobs(logits: Logits, tokens: Int[Array, "B T"], num_real_tokens: int | None = None):
    """log q(token) at every position, float32 [B, T]."""
    return jnp.take_along_axis(log_probs(logits, num_real_tokens), tokens[..., None], axis=-1)[..., 0]


def cross_entropy(logits: Logits, labels: Int[Array, "B T"], mask: Mask, *, num_real_tokens=None):
    """Mean negative log-likelihood of `labels` (already shifted to align with `logits`)."""
    return masked_mean(-token_logprobs(logits, labels, num_real_tokens), mask)


def _kl(log_a, log_b):
    """Per-position KL(a || b) from log-probabilities; 0 * log 0 counts as 0."""
    a = jnp.exp(log_a)
    return jnp.sum(jnp.where(a > 0, a * (log_a - log_b), 0.0), axis=-1)


def _mixture(log_a, log_b, weight_a: float):
    """log(weight_a * a + (1 - weight_a) * b), stable."""
    return jnp.logaddexp(jnp.log(weight_a) + log_a, jnp.log1p(-weight_a) + log_b)


def _token_mean(name: str, student_logits: Logits, teacher_logits: Logits, mask: Mask, labels=None, *,
                num_real_tokens=None, **params):
    log_q, log_p = log_probs(student_logits, num_real_tokens), log_probs(teacher_logits, num_real_tokens)
    return masked_mean(token_divergence(name, **params)(log_q, log_p, labels), mask)


def forward_kl(student_logits: Logits, teacher_logits: Logits, mask: Mask, *, num_real_tokens=None):
    """KL(p || q), full vocabulary."""
    return _token_mean("forward_kl", student_logits, teacher_logits, mask, num_real_tokens=num_real_tokens)


def reverse_kl(student_logits: Logits, teacher_logits: Logits, mask: Mask, *, num_real_tokens=None):
    """KL(q || p), full vocabulary."""
    return _token_mean("reverse_kl", student_logits, teacher_logits, mask, num_real_tokens=num_real_tokens)


def soft_cross_entropy(student_logits: Logits, teacher_logits: Logits, mask: Mask, *, num_real_tokens=None):
    """-sum_v p(v) log q(v): forward KL plus the teacher's entropy (word-level KD's soft term)."""
    return _token_mean("soft_ce", student_logits, teacher_logits, mask, num_real_tokens=num_real_tokens)


def jsd(student_logits: Logits, teacher_logits: Logits, mask: Mask, beta: float, *, num_real_tokens=None):
    """Generalised Jensen-Shannon divergence (GKD); beta = 0 is forward KL and beta = 1 reverse KL."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta={beta}: expected in [0, 1]")
    return _token_mean("jsd", student_logits, teacher_logits, mask, num_real_tokens=num_real_tokens, beta=beta)


def skew_kl(student_logits: Logits, teacher_logits: Logits, mask: Mask, alpha: float = 0.1, *,
            num_real_tokens=None):
    """DistiLLM's skew KL: KL(p || alpha p + (1 - alpha) q)."""
    return _token_mean("skew_kl", student_logits, teacher_logits, mask, num_real_tokens=num_real_tokens,
                       alpha=alpha)


def skew_reverse_kl(student_logits: Logits, teacher_logits: Logits, mask: Mask, alpha: float = 0.1, *,
                    num_real_tokens=None):
    """DistiLLM's skew reverse KL: KL(q || alpha q + (1 - alpha) p)."""
    return _token_mean("skew_reverse_kl", student_logits, teacher_logits, mask, num_real_tokens=num_real_tokens,
                       alpha=alpha)


def tvd(student_logits: Logits, teacher_logits: Logits, mask: Mask, *, num_real_tokens=None):
    """Total variation distance 0.5 * sum_v |p - q|."""
    return _token_mean("tvd", student_logits, teacher_logits, mask, num_real_tokens=num_real_tokens)


def kd_loss(student_logits: Logits, teacher_logits: Logits, labels, mask: Mask, *, kd_ratio: float = 0.5,
            num_real_tokens=None):
    """(1 - kd_ratio) * CE(labels) + kd_ratio * soft CE(p || q): word-level KD and MiniLLM's L_PT."""
    ce = cross_entropy(student_logits, labels, mask, num_real_tokens=num_real_tokens)
    soft = soft_cross_entropy(student_logits, teacher_logits, mask, num_real_tokens=num_real_tokens)
    return (1.0 - kd_ratio) * ce + kd_ratio * soft


# ------------------------------------------------------------------------------------------ MiniLLM


def minillm_advantages(rewards: Float[Array, "B T"], mask: Mask, gamma: float = 0.95, *, length_norm: bool = True,
                       whiten: bool = True, masked_whiten: bool = True,
                       include_current_reward: bool = True) -> Float[Array, "B T"]:
    """Per-token advantages for MiniLLM's long-term policy-gradient term (no critic).

    G_t = sum_{t' >= t} gamma^(t'-t) r_t' over valid tokens (a reverse scan in float32: no gamma**t powers
    to underflow); with `include_current_reward=False` the paper's R_{t+1} (sum from t + 1) instead of the
    reference code's G_t. `length_norm` divides by the number of valid tokens from t (or t + 1) to the end
    (0 counts as 1). `whiten` standardises over the batch's valid tokens, or, with `masked_whiten=False`,
    over every entry, padding zeros included, as the reference code does; the mean is not added back.
    Padding positions come out as 0.
    """
    mask = mask.astype(jnp.float32)
    rewards = rewards.astype(jnp.float32) * mask

    def step(carry, x):
        ret, remaining = carry
        reward, valid = x
        ret = reward + gamma * ret
        remaining = remaining + valid
        return (ret, remaining), (ret, remaining)

    zero = jnp.zeros(rewards.shape[0], jnp.float32)
    _, (returns, remaining) = jax.lax.scan(step, (zero, zero), (rewards.T, mask.T), reverse=True)
    returns, remaining = returns.T, remaining.T  # [B, T], sums from t to the end
    if not include_current_reward:  # shift: sums from t + 1
        returns = jnp.concatenate([returns[:, 1:], jnp.zeros_like(returns[:, :1])], axis=1)
        remaining = jnp.concatenate([remaining[:, 1:], jnp.zeros_like(remaining[:, :1])], axis=1)
    advantages = returns / jnp.maximum(remaining, 1.0) if length_norm else returns
    advantages = advantages * mask
    if whiten:
        weight = mask if masked_whiten else jnp.ones_like(mask)
        count = jnp.maximum(jnp.sum(weight), 1.0)
        mean = jnp.sum(advantages * weight) / count
        var = jnp.sum(((advantages - mean) ** 2) * weight) / count
        advantages = (advantages - mean) * jax.lax.rsqrt(var + 1e-8) * mask
    return advantages


def policy_gradient_loss(logprobs: Float[Array, "B T"], old_logprobs: Float[Array, "B T"],
                         advantages: Float[Array, "B T"], mask: Mask, *, weights: Float[Array, "B T"] | None = None,
                         clip: float | None = 0.2) -> Float[Array, ""]:
    """PPO-clipped policy term: rho = exp(log q - log q_old) * w, loss max(-A rho, -A clip(rho, 1 +- eps)).
    `clip=None` drops the clipping (the plain importance-weighted policy gradient)."""
    ratio = jnp.exp(logprobs.astype(jnp.float32) - old_logprobs.astype(jnp.float32))
    if weights is not None:
        ratio = ratio * weights.astype(jnp.float32)
    advantages = jax.lax.stop_gradient(advantages.astype(jnp.float32))
    loss = -advantages * ratio
    if clip is not None:
        loss = jnp.maximum(loss, -advantages * jnp.clip(ratio, 1.0 - clip, 1.0 + clip))
    return masked_mean(loss, mask)


def single_step_loss(student_logits: Logits, teacher_logits: Logits, mask: Mask, *,
                     weights: Float[Array, "B T"] | None = None, num_real_tokens=None) -> Float[Array, ""]:
    """MiniLLM's single-step term: the exact per-position reverse KL(q(.|y<t) || p(.|y<t)) over the full
    vocabulary. The reference code uses no importance weight here; `weights` gives the paper's w_t."""
    log_q, log_p = log_probs(student_logits, num_real_tokens), log_probs(teacher_logits, num_real_tokens)
    per_position = _kl(log_q, jax.lax.stop_gradient(log_p))
    if weights is not None:
        per_position = per_position * jax.lax.stop_gradient(weights.astype(jnp.float32))
    return masked_mean(per_position, mask)


# ------------------------------------------------------------------------------------------ chunked logits


def token_divergence(name: str, **params):
    """A per-token function (log_q [B C V], log_p [B C V], labels [B C]) -> [B C] for `chunked_token_mean`:
    'ce', 'soft_ce', 'forward_kl', 'reverse_kl', 'jsd' (beta), 'skew_kl' / 'skew_reverse_kl' (alpha), 'tvd'."""
    if name == "ce":
        return lambda log_q, log_p, labels: -jnp.take_along_axis(log_q, labels[..., None], -1)[..., 0]
    if name == "soft_ce":
        return lambda log_q, log_p, labels: -jnp.sum(jnp.exp(log_p) * log_q, axis=-1)
    if name == "forward_kl":
        return lambda log_q, log_p, labels: _kl(log_p, log_q)
    if name == "reverse_kl":
        return lambda log_q, log_p, labels: _kl(log_q, log_p)
    if name == "tvd":
        return lambda log_q, log_p, labels: 0.5 * jnp.sum(jnp.abs(jnp.exp(log_p) - jnp.exp(log_q)), axis=-1)
    if name == "jsd":
        beta = params["beta"]
        if beta == 0.0:
            return token_divergence("forward_kl")
        if beta == 1.0:
            return token_divergence("reverse_kl")

        def jsd_tokens(log_q, log_p, labels):
            log_m = _mixture(log_p, log_q, beta)
            return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)

        return jsd_tokens
    if name == "skew_kl":
        alpha = params["alpha"]
        return lambda log_q, log_p, labels: _kl(log_p, log_q if alpha == 0.0 else _mixture(log_p, log_q, alpha))
    if name == "skew_reverse_kl":
        alpha = params["alpha"]
        return lambda log_q, log_p, labels: _kl(log_q, log_p if alpha == 0.0 else _mixture(log_q, log_p, alpha))
    raise ValueError(f"unknown token divergence {name!r}")


def chunked_token_values(token_fn, student_hidden: Float[Array, "B T E"], student_unembed,
                         teacher_hidden: Float[Array, "B T E"] | None, teacher_unembed,
                         labels: Int[Array, "B T"] | None = None, *, chunk_size: int = 128,
                         num_real_tokens: int | None = None):
    """token_fn(log_q, log_p, labels) at every position ([B, T] or [B, T, K]), computing both models'
    [B, chunk, V] logits one chunk at a time and again in the backward pass (jax.checkpoint), so
    [B, T, V] float32 logits never exist at once. The teacher's side is constant (no gradient)."""
    B, T = student_hidden.shape[:2]
    chunks = -(-T // chunk_size)
    pad = chunks * chunk_size - T

    def split(x):  # [B, T, ...] -> [chunks, B, chunk, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(B, chunks, chunk_size, *x.shape[2:]), 1, 0)

    labels = jnp.zeros((B, T), jnp.int32) if labels is None else labels
    xs = (split(student_hidden), split(teacher_hidden) if teacher_hidden is not None else None, split(labels))

    @jax.checkpoint
    def chunk_values(s_hidden, t_hidden, chunk_labels):
        log_q = log_probs(student_unembed(s_hidden), num_real_tokens)
        log_p = log_q if t_hidden is None else jax.lax.stop_gradient(
            log_probs(teacher_unembed(t_hidden), num_real_tokens))
        return token_fn(log_q, log_p, chunk_labels)

    values = jax.lax.map(lambda x: chunk_values(*x), xs)  # [chunks, B, chunk, ...]
    values = jnp.moveaxis(values, 0, 1)
    return values.reshape(B, chunks * chunk_size, *values.shape[3:])[:, :T]


def chunked_token_mean(token_fn, student_hidden: Float[Array, "B T E"], student_unembed,
                       teacher_hidden: Float[Array, "B T E"] | None, teacher_unembed, mask: Mask,
                       labels: Int[Array, "B T"] | None = None, *, chunk_size: int = 128,
                       num_real_tokens: int | None = None) -> Float[Array, ""]:
    """masked_mean of token_fn over time with chunked logits (see `chunked_token_values`)."""
    values = chunked_token_values(token_fn, student_hidden, student_unembed, teacher_hidden, teacher_unembed,
                                  labels, chunk_size=chunk_size, num_real_tokens=num_real_tokens)
    return masked_mean(values, mask)
