"""Objectives against float64 numpy, and MiniLLM's gradient estimators against exact enumeration."""

import functools
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minillm_jax import losses

# ------------------------------------------------------------------------------------ numpy references


def _np_log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_kl(a, b):
    return np.sum(np.where(a > 0, a * (np.log(a) - np.log(b)), 0.0), -1)


def _np_mean(values, mask):
    return float((values * mask).sum() / mask.sum())


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    student = rng.normal(size=(3, 5, 11)).astype(np.float32) * 2
    teacher = rng.normal(size=(3, 5, 11)).astype(np.float32) * 2
    student[..., 9:] = 50.0  # padded vocabulary ids with huge logits: must be ignored when sliced
    teacher[..., 9:] = 50.0
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 1, 1, 1, 0]], np.float32)
    labels = rng.integers(0, 9, size=(3, 5))
    q = np.exp(_np_log_softmax(student[..., :9]))
    p = np.exp(_np_log_softmax(teacher[..., :9]))
    return dict(student=student, teacher=teacher, mask=mask, labels=labels, q=q, p=p)


def _mean(fn, batch, *args, num_real=9):
    log_q = losses.log_probs(batch["student"], num_real)
    log_p = losses.log_probs(batch["teacher"], num_real)
    return float(losses.masked_mean(fn(log_q, log_p, *args), batch["mask"]))


def test_divergences_match_float64(batch):
    m, q, p = batch["mask"], batch["q"], batch["p"]
    close = dict(rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_mean(losses.forward_kl, batch), _np_mean(_np_kl(p, q), m), **close)
    np.testing.assert_allclose(_mean(losses.reverse_kl, batch), _np_mean(_np_kl(q, p), m), **close)
    np.testing.assert_allclose(_mean(losses.soft_cross_entropy, batch), _np_mean(-(p * np.log(q)).sum(-1), m), **close)
    np.testing.assert_allclose(_mean(losses.tvd, batch), _np_mean(0.5 * np.abs(p - q).sum(-1), m), **close)
    np.testing.assert_allclose(_mean(lambda lq, lp: losses.entropy(lq), batch), _np_mean(-(q * np.log(q)).sum(-1), m),
                               **close)
    for beta in (0.1, 0.5, 0.9):
        mix = beta * p + (1 - beta) * q
        expected = _np_mean(beta * _np_kl(p, mix) + (1 - beta) * _np_kl(q, mix), m)
        np.testing.assert_allclose(_mean(losses.jsd, batch, beta), expected, **close)
    for alpha in (0.1, 0.3):
        np.testing.assert_allclose(_mean(losses.skew_kl, batch, alpha),
                                   _np_mean(_np_kl(p, alpha * p + (1 - alpha) * q), m), **close)
        np.testing.assert_allclose(_mean(losses.skew_reverse_kl, batch, alpha),
                                   _np_mean(_np_kl(q, alpha * q + (1 - alpha) * p), m), **close)
    nll = -np.log(np.take_along_axis(q, batch["labels"][..., None], -1)[..., 0])
    np.testing.assert_allclose(_mean(lambda lq, lp: losses.cross_entropy(lq, batch["labels"]), batch),
                               _np_mean(nll, m), **close)


def test_endpoints_are_the_plain_kls(batch):
    """jsd(0) and skew_kl(0) are KL(p || q); jsd(1) and skew_reverse_kl(0) are KL(q || p) (float64 references);
    the interior formula itself vanishes near the endpoints, hence the special case."""
    m, q, p = batch["mask"], batch["q"], batch["p"]
    forward, reverse = _np_mean(_np_kl(p, q), m), _np_mean(_np_kl(q, p), m)
    close = dict(rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_mean(losses.jsd, batch, 0.0), forward, **close)
    np.testing.assert_allclose(_mean(losses.jsd, batch, 1.0), reverse, **close)
    np.testing.assert_allclose(_mean(losses.skew_kl, batch, 0.0), forward, **close)
    np.testing.assert_allclose(_mean(losses.skew_reverse_kl, batch, 0.0), reverse, **close)
    assert _mean(losses.jsd, batch, 1e-6) < 1e-3 * forward
    with pytest.raises(ValueError, match="beta"):
        losses.jsd(jnp.zeros((1, 3)), jnp.zeros((1, 3)), 1.5)


def test_padded_vocabulary_is_masked(batch):
    sliced = _mean(losses.reverse_kl, batch, num_real=9)
    unsliced = _mean(losses.reverse_kl, batch, num_real=None)
    assert sliced != pytest.approx(unsliced)  # the padding ids would dominate otherwise


def test_temperature_divides_the_logits(batch):
    expected = _np_log_softmax(batch["student"][..., :9] / 0.7)
    np.testing.assert_allclose(np.asarray(losses.log_probs(batch["student"], 9, temperature=0.7)), expected,
                               rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ advantages


def _np_advantages(rewards, mask, gamma, length_norm, whiten, masked_whiten, include_current):
    rewards = np.asarray(rewards, np.float64) * mask
    B, T = rewards.shape
    adv = np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            start = t if include_current else t + 1
            ret = sum(gamma ** (k - start) * rewards[b, k] for k in range(start, T))
            count = max(mask[b, start:].sum(), 1)
            adv[b, t] = ret / count if length_norm else ret
    adv *= mask
    if whiten:
        weight = mask if masked_whiten else np.ones_like(mask)
        mean = (adv * weight).sum() / weight.sum()
        var = (((adv - mean) ** 2) * weight).sum() / weight.sum()
        adv = (adv - mean) / np.sqrt(var + 1e-8) * mask
    return adv


@pytest.mark.parametrize("gamma", [0.95, 1.0])
@pytest.mark.parametrize("length_norm,whiten,masked_whiten,include_current", [
    (True, True, True, True), (True, True, False, True), (False, False, True, True), (True, False, True, False),
    (False, True, True, False)])
def test_advantages_match_float64(gamma, length_norm, whiten, masked_whiten, include_current):
    rng = np.random.default_rng(1)
    rewards = rng.normal(size=(4, 7)) * 3
    mask = np.array([[1] * 7, [1] * 4 + [0] * 3, [1] * 1 + [0] * 6, [0] * 7], np.float32)
    ours = losses.discounted_returns(rewards, mask, gamma, length_norm=length_norm,
                                     include_current_reward=include_current)
    if whiten:
        ours = losses.whiten(ours, mask, over_padding=not masked_whiten)
    expected = _np_advantages(rewards, mask, gamma, length_norm, whiten, masked_whiten, include_current)
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=2e-5, atol=2e-5)


def test_long_responses_with_large_rewards_stay_finite():
    rng = np.random.default_rng(2)
    rewards = rng.choice([-100.0, 100.0], size=(8, 256))
    mask = (np.arange(256)[None, :] < rng.integers(1, 257, size=(8, 1))).astype(np.float32)
    for gamma in (0.95, 1.0):
        adv = losses.whiten(losses.discounted_returns(rewards, mask, gamma), mask, over_padding=False)
        assert np.isfinite(np.asarray(adv)).all()
        expected = _np_advantages(rewards, mask, gamma, True, True, True, True)
        np.testing.assert_allclose(np.asarray(adv), expected, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------ brute force

# A tabular policy: vocabulary {0 = EOS, 1, 2}, responses of at most 3 tokens. The next-token logits
# depend on the prefix (which holds no EOS); 7 prefixes in all.
VOCAB, MAX_LEN = 3, 3
PREFIXES = [()] + [(a,) for a in (1, 2)] + [(a, b) for a in (1, 2) for b in (1, 2)]
PREFIX_INDEX = {prefix: i for i, prefix in enumerate(PREFIXES)}


def _responses():
    out = [(0,)]
    out += [(a, 0) for a in (1, 2)]
    out += [(a, b, c) for a in (1, 2) for b in (1, 2) for c in range(VOCAB)]
    return out


def _as_batch(responses):
    """Token ids [N, 3], mask [N, 3] and the prefix index of each position [N, 3]."""
    n = len(responses)
    tokens = np.zeros((n, MAX_LEN), np.int32)
    mask = np.zeros((n, MAX_LEN), np.float32)
    prefix = np.zeros((n, MAX_LEN), np.int32)
    for i, y in enumerate(responses):
        for t, token in enumerate(y):
            tokens[i, t], mask[i, t], prefix[i, t] = token, 1.0, PREFIX_INDEX[tuple(y[:t])]
    return tokens, mask, prefix


def _sequence_logprob(table, tokens, mask, prefix):
    logp = jax.nn.log_softmax(table[prefix], axis=-1)
    return jnp.sum(jnp.take_along_axis(logp, tokens[..., None], -1)[..., 0] * mask, axis=-1)


def _exact_reverse_kl(theta_q, theta_p):
    tokens, mask, prefix = _as_batch(_responses())
    log_q = _sequence_logprob(theta_q, tokens, mask, prefix)
    log_p = _sequence_logprob(theta_p, tokens, mask, prefix)
    return jnp.sum(jnp.exp(log_q) * (log_q - log_p))


def _sample(table_probs, n, rng):
    """n responses from a tabular policy given next-token probabilities per prefix [7, 3] (float64)."""
    table_probs = np.asarray(table_probs, np.float64)
    table_probs = table_probs / table_probs.sum(-1, keepdims=True)
    cumulative = np.cumsum(table_probs, -1)
    tokens = np.zeros((n, MAX_LEN), np.int64)
    alive = np.ones(n, bool)
    prefix = np.zeros(n, np.int64)  # index into PREFIXES
    for t in range(MAX_LEN):
        u = rng.random(n)
        drawn = (u[:, None] > cumulative[prefix]).sum(-1)
        tokens[:, t] = np.where(alive, drawn, -1)
        alive &= drawn != 0
        if t + 1 < MAX_LEN:
            prefix = np.array([PREFIX_INDEX.get(tuple(row[: t + 1]), 0) for row in tokens])
    return [tuple(int(x) for x in row if x >= 0) for row in tokens]


def _softmax64(theta):
    return np.asarray(jax.nn.softmax(jnp.asarray(theta, jnp.float32), -1), np.float64)


@pytest.fixture(scope="module")
def tables():
    rng = np.random.default_rng(3)
    theta_q = jnp.asarray(rng.normal(size=(len(PREFIXES), VOCAB)), jnp.float32)
    theta_p = jnp.asarray(rng.normal(size=(len(PREFIXES), VOCAB)) * 1.5, jnp.float32)
    return theta_q, theta_p


def _check_responses_cover_everything(theta_q):
    tokens, mask, prefix = _as_batch(_responses())
    total = float(jnp.sum(jnp.exp(_sequence_logprob(theta_q, tokens, mask, prefix))))
    assert total == pytest.approx(1.0, abs=1e-6)


def _estimator_gradient(theta_q, theta_p, responses, *, alpha=0.0, include_current=True, add_single_step=False,
                        weights_mode="sequence"):
    """The MiniLLM estimator's gradient, averaged over the sampled responses (gamma = 1, no clip, no length
    normalisation, no whitening). The loss is a token mean; multiplying by tokens / responses turns it
    into a per-response average, which is what estimates the gradient of the sequence-level KL."""
    tokens, mask, prefix = _as_batch(responses)
    tokens, mask, prefix = jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(prefix)
    log_p_table = jax.nn.log_softmax(theta_p, axis=-1)
    log_p = jnp.take_along_axis(log_p_table[prefix], tokens[..., None], -1)[..., 0]
    old = jnp.take_along_axis(jax.nn.log_softmax(theta_q, -1)[prefix], tokens[..., None], -1)[..., 0]
    rewards = log_p - old
    advantages = losses.discounted_returns(rewards, mask, 1.0, length_norm=False,
                                           include_current_reward=include_current)
    weights = None
    if alpha and weights_mode != "none":
        token_w = jnp.exp(old) / ((1 - alpha) * jnp.exp(old) + alpha * jnp.exp(log_p))
        token_w = jnp.where(mask > 0, token_w, 1.0)
        weights = jnp.broadcast_to(jnp.prod(token_w, axis=1, keepdims=True), token_w.shape) \
            if weights_mode == "sequence" else token_w
    scale = jnp.sum(mask) / len(responses)

    def loss(theta):
        logq = jnp.take_along_axis(jax.nn.log_softmax(theta, -1)[prefix], tokens[..., None], -1)[..., 0]
        value = losses.policy_gradient_loss(logq, old, advantages, mask, weights=weights, clip=None)
        if add_single_step:
            value = value + _single_step(theta[prefix], theta_p[prefix], mask, weights)
        return value * scale

    return jax.grad(loss)(theta_q)


def _single_step(student_logits, teacher_logits, mask, weights=None):
    """MiniLLM's single-step term as the round computes it: the per-position KL(q || p), teacher fixed."""
    values = losses.reverse_kl(losses.log_probs(student_logits),
                               jax.lax.stop_gradient(losses.log_probs(teacher_logits)))
    if weights is not None:
        values = values * jax.lax.stop_gradient(weights)
    return losses.masked_mean(values, mask)


def _relative_error(estimate, exact):
    return float(jnp.max(jnp.abs(estimate - exact)) / jnp.max(jnp.abs(exact)))


def test_single_step_term_equals_exact_per_position_gradient(tables):
    """Summed over every response weighted by its (fixed) probability, the single-step loss's gradient is
    sum_t E_{y<t}[grad KL(q(.|y<t) || p(.|y<t))], computed here by brute force over the prefixes."""
    theta_q, theta_p = tables
    _check_responses_cover_everything(theta_q)
    responses = _responses()
    tokens, mask, prefix = (jnp.asarray(a) for a in _as_batch(responses))
    prob = jax.lax.stop_gradient(jnp.exp(_sequence_logprob(theta_q, tokens, mask, prefix)))

    def ours(theta):
        per_response = jax.vmap(lambda pr, m: _single_step(theta[pr][None], theta_p[pr][None], m[None]))(prefix, mask)
        return jnp.sum(prob * per_response * mask.sum(1))

    def brute(theta):
        total = 0.0
        q_fixed = jax.nn.softmax(jax.lax.stop_gradient(theta), -1)
        for prefix_tokens in PREFIXES:  # probability of reaching the prefix (no EOS in it)
            reach = 1.0
            for t, token in enumerate(prefix_tokens):
                reach = reach * q_fixed[PREFIX_INDEX[tuple(prefix_tokens[:t])], token]
            log_q = jax.nn.log_softmax(theta[PREFIX_INDEX[prefix_tokens]])
            log_p = jax.nn.log_softmax(theta_p[PREFIX_INDEX[prefix_tokens]])
            total = total + reach * jnp.sum(jnp.exp(log_q) * (log_q - log_p))
        return total

    np.testing.assert_allclose(jax.grad(ours)(theta_q), jax.grad(brute)(theta_q), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def on_policy_samples(tables):
    theta_q, _ = tables
    return _sample(_softmax64(theta_q), 40_000, np.random.default_rng(4))


def test_policy_gradient_estimator_is_unbiased(tables, on_policy_samples):
    theta_q, theta_p = tables
    exact = jax.grad(_exact_reverse_kl)(theta_q, theta_p)
    code_variant = _estimator_gradient(theta_q, theta_p, on_policy_samples)  # G_t includes r_t
    assert _relative_error(code_variant, exact) < 0.05
    paper_variant = _estimator_gradient(theta_q, theta_p, on_policy_samples, include_current=False,
                                        add_single_step=True)  # R_{t+1} plus the exact single-step term
    assert _relative_error(paper_variant, exact) < 0.05
    # The test has the power to catch the classic mistakes:
    off_by_one = _estimator_gradient(theta_q, theta_p, on_policy_samples, include_current=False)
    assert _relative_error(off_by_one, exact) > 0.2
    assert _relative_error(-code_variant, exact) > 1.0


@pytest.mark.parametrize("alpha", [0.2, 0.5])
def test_teacher_mixed_importance_weighted_estimator(tables, alpha):
    theta_q, theta_p = tables
    q_table, p_table = _softmax64(theta_q), _softmax64(theta_p)
    mixed = _sample((1 - alpha) * q_table + alpha * p_table, 40_000, np.random.default_rng(5))
    exact = jax.grad(_exact_reverse_kl)(theta_q, theta_p)
    sequence_weighted = _estimator_gradient(theta_q, theta_p, mixed, alpha=alpha)
    assert _relative_error(sequence_weighted, exact) < 0.06
    unweighted = _estimator_gradient(theta_q, theta_p, mixed, alpha=alpha, weights_mode="none")
    assert _relative_error(unweighted, exact) > 0.1  # the weights are what removes the mixture's bias


def test_clipping_bounds_the_ratio():
    adv = jnp.array([[1.0, -1.0]])
    mask = jnp.ones((1, 2))
    old = jnp.zeros((1, 2))
    far = jnp.log(jnp.array([[2.0, 0.1]]))  # ratios 2 and 0.1
    clipped = losses.policy_gradient_loss(far, old, adv, mask, clip=0.2)
    # token 0: max(-1*2, -1*1.2) = -1.2; token 1: max(1*0.1, 1*0.8) = 0.8
    np.testing.assert_allclose(clipped, (-1.2 + 0.8) / 2, rtol=1e-6)
    np.testing.assert_allclose(losses.policy_gradient_loss(far, old, adv, mask, clip=None), (-2.0 + 0.1) / 2, rtol=1e-6)


def test_enumeration_is_complete():
    assert len(_responses()) == 15 and len(set(itertools.chain(_responses()))) == 15


_REFERENCES = {  # the logits-level functions (tested against float64 above), by term
    "logprob": lambda log_q, log_p, labels, w: losses.token_logprobs(log_q, labels),
    "cross_entropy": lambda log_q, log_p, labels, w: losses.cross_entropy(log_q, labels),
    "entropy": lambda log_q, log_p, labels, w: losses.entropy(log_q),
    "reverse_kl": lambda log_q, log_p, labels, w: losses.reverse_kl(log_q, log_p),
    "forward_kl": lambda log_q, log_p, labels, w: losses.forward_kl(log_q, log_p),
    "soft_cross_entropy": lambda log_q, log_p, labels, w: losses.soft_cross_entropy(log_q, log_p),
    "tvd": lambda log_q, log_p, labels, w: losses.tvd(log_q, log_p),
    "jsd": lambda log_q, log_p, labels, w: losses.jsd(log_q, log_p, w),
    "skew_kl": lambda log_q, log_p, labels, w: losses.skew_kl(log_q, log_p, w),
    "skew_reverse_kl": lambda log_q, log_p, labels, w: losses.skew_reverse_kl(log_q, log_p, w),
}
_TERMS = [("logprob", 0.0), ("cross_entropy", 0.0), ("entropy", 0.0), ("reverse_kl", 0.0), ("forward_kl", 0.0),
          ("soft_cross_entropy", 0.0), ("tvd", 0.0), ("jsd", 0.3), ("jsd", 0.0), ("jsd", 1.0), ("skew_kl", 0.1),
          ("skew_kl", 0.0), ("skew_reverse_kl", 0.1), ("skew_reverse_kl", 0.0)]


def _fused_case(seed=4, B=2, T=11, E=6, V=13):
    rng = np.random.default_rng(seed)
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    return dict(student_hidden=f32(rng.normal(size=(B, T, E))), teacher_hidden=f32(rng.normal(size=(B, T, E))),
                w_student=f32(rng.normal(size=(E, V))), w_teacher=f32(rng.normal(size=(E, V))),
                labels=jnp.asarray(rng.integers(-1, V, (B, T)), jnp.int32))  # -1 and the padded ids: outside


@pytest.mark.parametrize("terms", [[t] for t in _TERMS] + [[("logprob", 0.0), ("entropy", 0.0), ("reverse_kl", 0.0)],
                                                           [("cross_entropy", 0.0), ("soft_cross_entropy", 0.0)]],
                         ids=lambda terms: "+".join(f"{n}{w or ''}" for n, w in terms))
@pytest.mark.parametrize("chunk", [None, 4])
def test_token_values_and_their_hand_written_gradient_match_autodiff_of_the_logits_level_functions(terms, chunk):
    """Values and the gradients to the student's weights and hidden states (the closed-form backward pass) equal
    JAX autodiff through the logits-level functions on full [B, T, V] logits; T = 11 is no multiple of the
    chunk (padding), 11 real ids of V = 13 (padded vocabulary), labels among them outside the real ids (log q
    counts 0 there), temperature 0.8, a random weight per position and term so every term's gradient counts."""
    _check_token_values(terms, chunk)


@pytest.mark.parametrize("terms, scale", [(_TERMS, 1.0), ([("cross_entropy", 0.0)], 30.0)],
                         ids=["every term", "cross_entropy, logits x 30"])
@pytest.mark.parametrize("chunk", [None, 4])
def test_token_values_off_cpu_match_autodiff_too(terms, scale, chunk, monkeypatch):
    """The same on the GPU/TPU forms of the passes over [rows, V] (forced here): the log-normalisers in one
    pass with a running maximum, the row sums as one variadic reduction; and with logits large enough (x 30:
    up to ~200) that a running sum without its rescaling would overflow."""
    monkeypatch.setattr(losses, "_on_cpu", lambda: False)
    _check_token_values(terms, chunk, scale)


def _check_token_values(terms, chunk, scale=1.0):
    case = _fused_case()
    case["w_student"] = case["w_student"] * scale
    assert np.any(case["labels"] < 0) and np.any(case["labels"] >= 11) and np.any(case["labels"] < 11)
    n, temperature = 11, 0.8
    cotangent = jnp.asarray(np.random.default_rng(5).normal(size=(2, 11, len(terms))), jnp.float32)

    def fused(w, hidden):
        values = losses.token_values([losses.Term(name, weight) for name, weight in terms], hidden,
                                     lambda h: h @ w, case["teacher_hidden"], lambda h: h @ case["w_teacher"],
                                     case["labels"], num_real_tokens=n, temperature=temperature, chunk_size=chunk)
        return jnp.sum(values * cotangent), values

    def reference(w, hidden):
        log_q = losses.log_probs(hidden @ w, n, temperature)
        log_p = losses.log_probs(case["teacher_hidden"] @ case["w_teacher"], n, temperature)
        values = jnp.stack([_REFERENCES[name](log_q, log_p, case["labels"], weight) for name, weight in terms], -1)
        return jnp.sum(values * cotangent), values

    (_, got), got_grads = jax.value_and_grad(fused, argnums=(0, 1), has_aux=True)(case["w_student"],
                                                                                 case["student_hidden"])
    (_, want), want_grads = jax.value_and_grad(reference, argnums=(0, 1), has_aux=True)(case["w_student"],
                                                                                       case["student_hidden"])
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6 * scale)  # float32 rounding grows with the logits
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * scale)


def test_token_values_under_jit_with_the_weights_closed_over():
    """The unembedding may close over traced weights (a model's bound method under jit): gradients still reach
    them, and jitted values equal eager ones."""
    case = _fused_case(seed=7)

    def loss(w, hidden):
        values = losses.token_values(["cross_entropy", "reverse_kl"], hidden, lambda h: jnp.tanh(h) @ w,
                                     case["teacher_hidden"], lambda h: h @ case["w_teacher"], case["labels"],
                                     num_real_tokens=11, chunk_size=3)
        return jnp.mean(values[..., 0]) + 0.5 * jnp.mean(values[..., 1])

    def reference(w, hidden):
        log_q = losses.log_probs(jnp.tanh(hidden) @ w, 11)
        log_p = losses.log_probs(case["teacher_hidden"] @ case["w_teacher"], 11)
        return jnp.mean(losses.cross_entropy(log_q, case["labels"])) + 0.5 * jnp.mean(losses.reverse_kl(log_q, log_p))

    args = (case["w_student"], case["student_hidden"])
    np.testing.assert_allclose(jax.jit(loss)(*args), reference(*args), rtol=1e-5)
    for g, w in zip(jax.jit(jax.grad(loss, argnums=(0, 1)))(*args), jax.grad(reference, argnums=(0, 1))(*args)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def test_token_values_say_what_is_wrong():
    case = _fused_case()
    with pytest.raises(ValueError, match="reverse_kl.*teacher"):
        losses.token_values(["logprob", "reverse_kl"], case["student_hidden"], lambda h: h @ case["w_student"])
    with pytest.raises(ValueError, match="'kl'.*expected one of"):
        losses.Term("kl")
    with pytest.raises(ValueError, match="jsd.*1.5"):
        losses.Term("jsd", 1.5)
    with pytest.raises(ValueError, match="skew_kl.*alpha < 1"):
        losses.Term("skew_kl", 1.0)
    values = losses.token_values(["entropy"], case["student_hidden"], lambda h: h @ case["w_student"])
    want = losses.entropy(losses.log_probs(case["student_hidden"] @ case["w_student"]))
    np.testing.assert_allclose(values[..., 0], want, rtol=1e-5)


def test_row_sums_match_float64_and_run_as_a_matmul_on_cpu():
    """The fused terms' row sums: several [..., V] expressions summed over V, against float64 numpy. On CPU
    they must compile to a dot (XLA:CPU runs a reduction with the terms' elementwise chain fused into it on one
    thread, unvectorised: GKD's vocabulary work 0.97 -> 0.64 s), with no reduction over the vocabulary axis."""
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((2, 5, 1000)).astype(np.float32) for _ in range(3)]

    def sums(a, b, c):
        return losses._row_sums(jnp.exp(a), a * b, jnp.log1p(c * c))

    jitted = jax.jit(sums)
    got = jitted(*xs)
    a, b, c = (x.astype(np.float64) for x in xs)
    for g, w in zip(got, (np.exp(a).sum(-1), (a * b).sum(-1), np.log1p(c * c).sum(-1))):
        np.testing.assert_allclose(g, w, rtol=2e-6, atol=1e-4)
    if jax.default_backend() == "cpu":
        hlo = jitted.lower(*xs).compile().as_text()
        assert " dot(" in hlo or "dot_general" in hlo, "expected the row sums as a matmul on CPU"
        vocab_reductions = [line for line in hlo.splitlines() if re.search(r" reduce\(.*dimensions=\{2\}", line)]
        assert not vocab_reductions, vocab_reductions
