"""Distillation objectives as pure float32 functions of log-probabilities, one position at a time.

Shapes: B batch, T time, V real vocabulary. `log_q` is the student's log q(.|y<t), `log_p` the teacher's,
both [..., V] from `log_probs` (float32 log-softmax over the tokenizer's ids, at the sampling temperature).
Every divergence returns per-position values [...]; a loss is their `masked_mean` over valid tokens (the
mask's count over the batch it is given: under jit on a sharded global batch, the global count).

Conventions (one fixed choice, tested at the endpoints):
  forward_kl = KL(p || q), reverse_kl = KL(q || p);
  jsd(beta) = beta KL(p || m) + (1 - beta) KL(q || m) with m = beta p + (1 - beta) q, special-cased to
  forward KL at beta = 0 and reverse KL at beta = 1 (GKD; the interior formula itself tends to 0 there);
  skew_kl(alpha) = KL(p || alpha p + (1 - alpha) q), skew_reverse_kl(alpha) = KL(q || alpha q + (1 - alpha) p)
  (DistiLLM; alpha = 0 gives the plain KLs).

Training does not call these on logits: `token_values` computes the same terms (`Term`, by name) from the final
hidden states, fused with the vocabulary projection and with a closed-form backward pass; these functions are
its reference (tests/test_losses.py) and serve sampling and evaluation.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

LogProbs = Float[Array, "*B V"]
Values = Float[Array, "*B"]


def log_probs(logits: Float[Array, "*B V"], num_real_tokens: int | None = None,
              temperature: float = 1.0) -> LogProbs:
    """float32 log-softmax of logits / temperature over the real vocabulary (padded ids sliced off)."""
    logits = logits.astype(jnp.float32)
    if num_real_tokens is not None:
        logits = logits[..., :num_real_tokens]
    if temperature != 1.0:
        logits = logits / temperature
    return jax.nn.log_softmax(logits, axis=-1)


def masked_mean(values: Values, mask) -> Float[Array, ""]:
    mask = mask.astype(jnp.float32)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def token_logprobs(log_q: LogProbs, tokens: Int[Array, "*B"]) -> Values:
    """log q(token) at every position (0 for an id outside the vocabulary). A select over the vocabulary,
    not a gather: its gradient is an elementwise select that fuses into the log-softmax's backward, where a
    gather's is a scatter into a [..., V] array of zeros (XLA:CPU, a 10-layer SmolLM2 train step on one core:
    12.3-13.6 -> 10.9 s with logits at all 1,528 positions; no change, 6.9-7.2 s, with 512 positions)."""
    hit = jnp.arange(log_q.shape[-1]) == tokens[..., None]
    return jnp.sum(jnp.where(hit, log_q, 0.0), axis=-1)


def _xlogy(a, log_a, log_b):
    """a (log a - log b) elementwise, 0 where a is 0."""
    return jnp.where(a > 0, a * (log_a - log_b), 0.0)


def _kl(log_a: LogProbs, log_b: LogProbs) -> Values:
    """KL(a || b) per position; 0 log 0 counts as 0."""
    return jnp.sum(_xlogy(jnp.exp(log_a), log_a, log_b), axis=-1)


def _mixture(log_a: LogProbs, log_b: LogProbs, weight_a: float) -> LogProbs:
    """log(weight_a a + (1 - weight_a) b), stable."""
    return jnp.logaddexp(jnp.log(weight_a) + log_a, jnp.log1p(-weight_a) + log_b)


def cross_entropy(log_q: LogProbs, labels: Int[Array, "*B"]) -> Values:
    """-log q(label)."""
    return -token_logprobs(log_q, labels)


def soft_cross_entropy(log_q: LogProbs, log_p: LogProbs) -> Values:
    """-sum_v p(v) log q(v): forward KL plus the teacher's entropy (word-level KD's soft term, L_PT's)."""
    return -jnp.sum(jnp.exp(log_p) * log_q, axis=-1)


def entropy(log_q: LogProbs) -> Values:
    return -jnp.sum(jnp.exp(log_q) * log_q, axis=-1)


def forward_kl(log_q: LogProbs, log_p: LogProbs) -> Values:
    """KL(p || q)."""
    return _kl(log_p, log_q)


def reverse_kl(log_q: LogProbs, log_p: LogProbs) -> Values:
    """KL(q || p)."""
    return _kl(log_q, log_p)


def tvd(log_q: LogProbs, log_p: LogProbs) -> Values:
    """Total variation distance 0.5 sum_v |p - q|."""
    return 0.5 * jnp.sum(jnp.abs(jnp.exp(log_p) - jnp.exp(log_q)), axis=-1)


def jsd(log_q: LogProbs, log_p: LogProbs, beta: float) -> Values:
    """Generalised Jensen-Shannon divergence (GKD); beta = 0 is forward KL and beta = 1 reverse KL."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta={beta}: expected in [0, 1]")
    if beta == 0.0:
        return forward_kl(log_q, log_p)
    if beta == 1.0:
        return reverse_kl(log_q, log_p)
    log_m = _mixture(log_p, log_q, beta)
    return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)


def skew_kl(log_q: LogProbs, log_p: LogProbs, alpha: float) -> Values:
    """DistiLLM's skew KL: KL(p || alpha p + (1 - alpha) q)."""
    return _kl(log_p, log_q if alpha == 0.0 else _mixture(log_p, log_q, alpha))


def skew_reverse_kl(log_q: LogProbs, log_p: LogProbs, alpha: float) -> Values:
    """DistiLLM's skew reverse KL: KL(q || alpha q + (1 - alpha) p)."""
    return _kl(log_q, log_p if alpha == 0.0 else _mixture(log_q, log_p, alpha))


# ------------------------------------------------------------------------------------------ MiniLLM


def discounted_returns(rewards: Float[Array, "B T"], mask, gamma: float = 0.95, *, length_norm: bool = True,
                       include_current_reward: bool = True) -> Float[Array, "B T"]:
    """MiniLLM's long-term advantage before whitening (no critic): G_t = sum_{t' >= t} gamma^(t'-t) r_t' over
    valid tokens, by a reverse scan in float32 (no gamma**t powers to underflow); with
    `include_current_reward=False` the paper's R_{t+1} (sums from t + 1) instead of the reference code's
    G_t. `length_norm` divides by the number of valid tokens summed over (0 counts as 1). Padding is 0."""
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
    returns, remaining = returns.T, remaining.T
    if not include_current_reward:
        returns = jnp.concatenate([returns[:, 1:], jnp.zeros_like(returns[:, :1])], axis=1)
        remaining = jnp.concatenate([remaining[:, 1:], jnp.zeros_like(remaining[:, :1])], axis=1)
    advantages = returns / jnp.maximum(remaining, 1.0) if length_norm else returns
    return advantages * mask


def whiten(values: Float[Array, "B T"], mask, *, over_padding: bool = True) -> Float[Array, "B T"]:
    """(values - mean) / sqrt(var + 1e-8), population variance, mean not added back; padding stays 0.
    `over_padding=True` takes the statistics over every entry, padding zeros included (the reference
    code); False over the valid entries only."""
    mask = mask.astype(jnp.float32)
    weight = jnp.ones_like(mask) if over_padding else mask
    count = jnp.maximum(jnp.sum(weight), 1.0)
    mean = jnp.sum(values * weight) / count
    var = jnp.sum(((values - mean) ** 2) * weight) / count
    return (values - mean) * jax.lax.rsqrt(var + 1e-8) * mask


def policy_gradient_loss(logprobs: Values, old_logprobs: Values, advantages: Values, mask, *,
                         weights: Values | None = None, clip: float | None = 0.2) -> Float[Array, ""]:
    """PPO-clipped policy term: rho = exp(log q - log q_old) * w, loss max(-A rho, -A clip(rho, 1 +- eps)),
    averaged over valid tokens. `clip=None` drops the clipping."""
    ratio = jnp.exp(logprobs.astype(jnp.float32) - old_logprobs.astype(jnp.float32))
    if weights is not None:
        ratio = ratio * weights.astype(jnp.float32)
    advantages = jax.lax.stop_gradient(advantages.astype(jnp.float32))
    loss = -advantages * ratio
    if clip is not None:
        loss = jnp.maximum(loss, -advantages * jnp.clip(ratio, 1.0 - clip, 1.0 + clip))
    return masked_mean(loss, mask)


# ------------------------------------------------------------------------------------------ fused, from hidden states
#
# Training computes its per-position terms here, straight from the final hidden states: the vocabulary
# projection, log-softmax and divergences of a chunk of positions happen in one custom-VJP function whose
# backward pass writes the gradient with respect to the student's logits in closed form, one elementwise
# pass over [rows, V] from the recomputed logits and a few per-row statistics kept from the forward pass
# (autodiff through the log-softmax and each divergence makes XLA:CPU sweep the float32 logits a dozen
# times). Each term is the logits-level function above, to float32 rounding (tests/test_losses.py checks
# values and gradients against autodiff through them, themselves checked against float64). With
# q = softmax(z), the gradient of any f(q) with respect to the logits z is q * (g - E_q[g]) with g = df/dq;
# the terms below write that out.


@dataclasses.dataclass(frozen=True)
class Term:
    """One per-position quantity of the student's distribution q, the teacher's p and the label:
    "logprob" (log q(label)), "cross_entropy", "entropy", "reverse_kl", "forward_kl", "soft_cross_entropy",
    "tvd", "jsd" (param = beta), "skew_kl", "skew_reverse_kl" (param = alpha); the same conventions as the
    logits-level functions of the same names."""
    name: str
    param: float = 0.0

    def __post_init__(self):
        if self.name not in _TERMS:
            raise ValueError(f"Term {self.name!r}: expected one of {sorted(_TERMS)}")
        skew = self.name in ("skew_kl", "skew_reverse_kl")
        if not 0.0 <= self.param <= 1.0 or (skew and self.param == 1.0):
            raise ValueError(f"Term {self.name!r} param={self.param}: expected in [0, 1] (alpha < 1 for skews)")

    @property
    def plain(self) -> "Term":
        """The plain KL at the endpoints (jsd at beta 0 / 1, the skews at alpha 0), as the functions above."""
        if self.name == "jsd" and self.param in (0.0, 1.0):
            return Term("forward_kl" if self.param == 0.0 else "reverse_kl")
        if self.name in ("skew_kl", "skew_reverse_kl") and self.param == 0.0:
            return Term("forward_kl" if self.name == "skew_kl" else "reverse_kl")
        return self

    @property
    def needs_teacher(self) -> bool:
        return self.name not in ("logprob", "cross_entropy", "entropy")


_TERMS = ("logprob", "cross_entropy", "entropy", "reverse_kl", "forward_kl", "soft_cross_entropy", "tvd", "jsd",
          "skew_kl", "skew_reverse_kl")


class _Row:
    """A chunk's log-probabilities (from its logits and their log-normalisers) and the labels' one-hot mask,
    elementwise expressions that XLA fuses into each pass over [rows, V]."""

    def __init__(self, z, lse_q, zp, lse_p, labels):
        self.z, self.lse_q, self.labels = z, lse_q, labels
        self.lq = z - lse_q[..., None]
        self.q = jnp.exp(self.lq)
        self.lp = None if zp is None else zp - lse_p[..., None]
        self.p = None if zp is None else jnp.exp(self.lp)
        self.hit = jnp.arange(z.shape[-1]) == labels[..., None]

    def inside(self):
        """[rows, 1]: whether the row's label is a real id (log q(label) counts 0 otherwise, with no gradient)."""
        return ((self.labels >= 0) & (self.labels < self.z.shape[-1]))[..., None]

    def label_lq(self):
        """log q(label) per row: one logit gathered a row, not a pass over [rows, V] (a third read of the
        float32 logits after the log-normaliser's two)."""
        V = self.z.shape[-1]
        z = jnp.take_along_axis(self.z, jnp.clip(self.labels, 0, V - 1)[..., None], axis=-1)
        return jnp.where(self.inside(), z - self.lse_q[..., None], 0.0)[..., 0]


def _on_cpu() -> bool:
    """Whether the passes over [rows, V] take their CPU forms (traced on the default backend)."""
    return jax.default_backend() == "cpu"


def _row_sums(*xs):
    """Sums over the last axis of several [..., V] expressions: one variadic reduction, or on CPU one
    matrix-vector product. XLA:CPU fuses the whole elementwise chain (the terms' logs and exps) into a
    reduction and runs it on one thread, unvectorised; as the operand of a dot the chain becomes a parallel
    loop fusion and the sum a matmul (GKD's JSD at 128 rows per chunk, value and gradient: 0.97 -> 0.64 s)."""
    if not _on_cpu():
        return jax.lax.reduce(xs, (jnp.float32(0),) * len(xs), lambda a, b: tuple(x + y for x, y in zip(a, b)),
                              (xs[0].ndim - 1,))
    stacked = jnp.stack(xs, axis=-2)  # [..., K, V]
    sums = jnp.einsum("...kv,v->...k", stacked, jnp.ones(stacked.shape[-1], stacked.dtype),
                      precision=jax.lax.Precision.HIGHEST)
    return tuple(jnp.moveaxis(sums, -1, 0))


def log_normalisers(*zs):
    """logsumexp over the last axis of each of `zs`: on CPU in two passes over all of them together (their
    maxima, then the sums of exponentials), elsewhere in one (`_running_log_normalisers`)."""
    if not _on_cpu():
        return _running_log_normalisers(*zs)
    maxes = jax.lax.reduce(zs, (jnp.float32(-jnp.inf),) * len(zs),
                           lambda a, b: tuple(jnp.maximum(x, y) for x, y in zip(a, b)), (zs[0].ndim - 1,))
    maxes = [jnp.where(jnp.isfinite(m), m, 0.0) for m in maxes]
    sums = _row_sums(*(jnp.exp(z - m[..., None]) for z, m in zip(zs, maxes)))
    return [m + jnp.log(total) for m, total in zip(maxes, sums)]


def _running_log_normalisers(*zs):
    """logsumexp over the last axis of each of `zs` in one pass over them: a reduction whose accumulator is a
    running maximum and the sum of exponentials below it, rescaled when the maximum grows (the float32 logits
    are read once instead of twice: on the GPU train step, one [rows, V] pass fewer; bench/gpu_hlo.py). Each
    element enters as (its value, 1); an accumulator with a sum of 0 or a maximum of -inf adds nothing (a row
    of -inf gives -inf, as the two-pass form does)."""
    n = len(zs)

    def rescaled(top, total, new_top):
        return jnp.where((total == 0) | (top == -jnp.inf), 0.0, total * jnp.exp(top - new_top))

    def combine(a, b):
        maxes = [jnp.maximum(a[i], b[i]) for i in range(n)]
        sums = [rescaled(a[i], a[n + i], maxes[i]) + rescaled(b[i], b[n + i], maxes[i]) for i in range(n)]
        return (*maxes, *sums)

    init = (jnp.float32(-jnp.inf),) * n + (jnp.float32(0),) * n
    reduced = jax.lax.reduce((*zs, *(jnp.ones_like(z) for z in zs)), init, combine, (zs[0].ndim - 1,))
    return [m + jnp.log(total) for m, total in zip(reduced[:n], reduced[n:])]


def _term_parts(term: Term, r: _Row):
    """[rows, V] expressions whose sums over V are the term's value and the per-row statistic its gradient
    needs (None where it needs none but its value); the label terms give their per-row value itself."""
    name, w = term.name, term.param
    if name == "logprob":
        return r.label_lq(), None
    if name == "cross_entropy":
        return -r.label_lq(), None
    if name == "entropy":
        return -r.q * r.lq, None
    if name == "reverse_kl":
        return _xlogy(r.q, r.lq, r.lp), None
    if name == "forward_kl":
        return _xlogy(r.p, r.lp, r.lq), None
    if name == "soft_cross_entropy":
        return -r.p * r.lq, None
    if name == "tvd":
        return 0.5 * jnp.abs(r.p - r.q), 0.5 * r.q * jnp.sign(r.q - r.p)
    if name == "jsd":
        lm = _mixture(r.lp, r.lq, w)
        return w * _xlogy(r.p, r.lp, lm) + (1 - w) * _xlogy(r.q, r.lq, lm), _xlogy(r.q, r.lq, lm)
    if name == "skew_kl":
        lr = _mixture(r.lp, r.lq, w)
        return _xlogy(r.p, r.lp, lr), r.q * jnp.exp(r.lp - lr)
    lr = _mixture(r.lq, r.lp, w)  # skew_reverse_kl
    return _xlogy(r.q, r.lq, lr), r.q * jnp.exp(r.lq - lr)


def _term_dlogits(term: Term, r: _Row, value, stat):
    """d value / d z, [rows, V]; value and stat broadcast per row."""
    name, w = term.name, term.param
    value = value[..., None]
    stat = None if stat is None else stat[..., None]
    if name == "logprob":
        return jnp.where(r.inside(), r.hit - r.q, 0.0)
    if name == "cross_entropy":
        return jnp.where(r.inside(), r.q - r.hit, 0.0)
    if name == "entropy":
        return -r.q * (r.lq + value)
    if name == "reverse_kl":
        return r.q * (r.lq - r.lp - value)
    if name in ("forward_kl", "soft_cross_entropy"):
        return r.q - r.p
    if name == "tvd":
        return r.q * (0.5 * jnp.sign(r.q - r.p) - stat)
    if name == "jsd":
        return (1 - w) * r.q * (r.lq - _mixture(r.lp, r.lq, w) - stat)
    if name == "skew_kl":
        return -(1 - w) * r.q * (jnp.exp(r.lp - _mixture(r.lp, r.lq, w)) - stat)
    lr = _mixture(r.lq, r.lp, w)  # skew_reverse_kl
    return r.q * (r.lq - lr - w * jnp.exp(r.lq - lr) - value + w * stat)


def _scaled(logits, num_real_tokens, temperature):
    logits = logits.astype(jnp.float32)
    if num_real_tokens is not None:
        logits = logits[..., :num_real_tokens]
    return logits / temperature if temperature != 1.0 else logits


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _fused(terms, num_real_tokens, temperature, s_fn, t_fn, s_hidden, s_consts, t_hidden, t_consts, labels):
    return _fused_fwd(terms, num_real_tokens, temperature, s_fn, t_fn, s_hidden, s_consts, t_hidden, t_consts,
                      labels)[0]


def _fused_fwd(terms, num_real_tokens, temperature, s_fn, t_fn, s_hidden, s_consts, t_hidden, t_consts, labels):
    keep = s_hidden.shape[0] == 1  # one chunk: its logits stay for the backward pass (see token_values)

    def chunk(x):
        hidden, t_chunk, chunk_labels = x
        z = _scaled(s_fn(hidden, *s_consts), num_real_tokens, temperature)
        zp = None if t_fn is None else _scaled(t_fn(t_chunk, *t_consts), num_real_tokens, temperature)
        lse_q, lse_p = log_normalisers(z, zp) if zp is not None else (*log_normalisers(z), jnp.zeros(z.shape[:-1]))
        row = _Row(z, lse_q, zp, lse_p, chunk_labels)
        parts = [_term_parts(t, row) for t in terms]
        wide = [v for v, _ in parts if v.ndim == z.ndim] + [s for _, s in parts if s is not None]  # [rows, V]
        sums = iter(_row_sums(*wide) if wide else ())
        values = [next(sums) if v.ndim == z.ndim else v for v, _ in parts]
        stats = [values[i] if s is None else next(sums) for i, (_, s) in enumerate(parts)]
        kept = (z, zp) if keep else (None, None)
        return jnp.stack(values, -1), jnp.stack(stats, -1), jnp.stack([lse_q, lse_p], -1), kept

    values, stats, normalisers, kept = jax.lax.map(chunk, (s_hidden, t_hidden, labels))
    return values, (s_hidden, s_consts, t_hidden, t_consts, labels, values, stats, normalisers, kept)


def _fused_bwd(terms, num_real_tokens, temperature, s_fn, t_fn, residuals, d_values):
    s_hidden, s_consts, t_hidden, t_consts, labels, values, stats, normalisers, kept = residuals

    def chunk(d_consts, x):
        hidden, t_chunk, chunk_labels, chunk_values, chunk_stats, chunk_normalisers, (z, zp), d_chunk = x
        logits, vjp = jax.vjp(s_fn, hidden, *s_consts)  # unused when kept: XLA drops the product
        if z is None:
            z = _scaled(logits, num_real_tokens, temperature)
            zp = None if t_fn is None else _scaled(t_fn(t_chunk, *t_consts), num_real_tokens, temperature)
        row = _Row(z, chunk_normalisers[..., 0], zp, chunk_normalisers[..., 1], chunk_labels)
        dz = sum(d_chunk[..., i, None] * _term_dlogits(t, row, chunk_values[..., i], chunk_stats[..., i])
                 for i, t in enumerate(terms))
        if temperature != 1.0:
            dz = dz / temperature
        if num_real_tokens is not None and num_real_tokens < logits.shape[-1]:
            dz = jnp.pad(dz, [(0, 0)] * (dz.ndim - 1) + [(0, logits.shape[-1] - num_real_tokens)])
        d_hidden, *d_c = vjp(dz.astype(logits.dtype))
        return jax.tree.map(jnp.add, d_consts, tuple(d_c)), d_hidden

    zeros = tuple(jnp.zeros_like(c) for c in s_consts)
    d_consts, d_hidden = jax.lax.scan(chunk, zeros, (s_hidden, t_hidden, labels, values, stats, normalisers, kept,
                                                     d_values))
    return d_hidden, d_consts, None, None, None


_fused.defvjp(_fused_fwd, _fused_bwd)


def token_values(terms, student_hidden: Float[Array, "B T E"], student_unembed,
                 teacher_hidden: Float[Array, "B T E"] | None = None, teacher_unembed=None,
                 labels: Int[Array, "B T"] | None = None, *, num_real_tokens: int | None = None,
                 temperature: float = 1.0, chunk_size: int | None = None) -> Float[Array, "B T K"]:
    """The `terms` (Term or name, K of them) at every position from the final hidden states, [B, T, K]:
    `student_unembed(hidden)` and `teacher_unembed(hidden)` give logits (any dtype; padded ids beyond
    `num_real_tokens` sliced off), divided by `temperature`. Only the student side carries a gradient (to
    its hidden states and whatever its unembed reads). The [B, chunk, V] logits of `chunk_size` positions
    at a time are made in the forward pass and made again in the backward pass, so [B, T, V] float32 logits
    never exist at once; the backward pass of a chunk is one elementwise pass over them. In one chunk (no
    `chunk_size`, or one of at least T), where all [B, T, V] exist at once anyway, the forward pass's logits
    are kept for the backward pass instead of made again (alive until then; one or two vocabulary products
    fewer: XLA merges a single chunk's two products only sometimes)."""
    terms = tuple((Term(t) if isinstance(t, str) else t).plain for t in terms)
    needs_teacher = any(t.needs_teacher for t in terms)
    if needs_teacher and (teacher_hidden is None or teacher_unembed is None):
        raise ValueError(f"token_values: terms {[t.name for t in terms if t.needs_teacher]} need the teacher's "
                         "hidden states and unembedding")
    B, T = student_hidden.shape[:2]
    labels = jnp.zeros((B, T), jnp.int32) if labels is None else labels
    chunk_size = T if not chunk_size or chunk_size >= T else chunk_size
    chunks = -(-T // chunk_size)
    pad = chunks * chunk_size - T

    def split(x):  # [B, T, ...] -> [chunks, B, chunk, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(B, chunks, chunk_size, *x.shape[2:]), 1, 0)

    example = jax.ShapeDtypeStruct((B, chunk_size, student_hidden.shape[-1]), student_hidden.dtype)
    s_fn, s_consts = jax.closure_convert(student_unembed, example)
    t_fn, t_consts, t_hidden = None, (), jnp.zeros((chunks, 0), jnp.float32)
    if needs_teacher:
        teacher_hidden = jax.lax.stop_gradient(teacher_hidden)
        t_example = jax.ShapeDtypeStruct((B, chunk_size, teacher_hidden.shape[-1]), teacher_hidden.dtype)
        t_fn, t_consts = jax.closure_convert(teacher_unembed, t_example)
        t_consts = jax.lax.stop_gradient(t_consts)
        t_hidden = split(teacher_hidden)
    out = _fused(terms, num_real_tokens, temperature, s_fn, t_fn, split(student_hidden), tuple(s_consts), t_hidden,
                 tuple(t_consts), split(labels))  # [chunks, B, chunk, K]
    out = jnp.moveaxis(out, 0, 1)
    return out.reshape(B, chunks * chunk_size, len(terms))[:, :T]
