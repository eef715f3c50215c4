"""Cached prefill + token-by-token decode reproduces the full forward pass (fp32, <= 1e-5)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_reference import (
    VARIANTS,
    build_hf_model,
    hf_int8_cache_decode_logits,
    hf_int8_kv_logits,
    hf_logits,
    left_padded_batch,
    max_diff_on_real,
    random_model,
)


@pytest.mark.parametrize("variant", ["gpt2", "opt_post_ln_project", "llama3_rope_scaling",
                                     "mistral_sliding_window", "qwen2"])
def test_prefill_then_decode_matches_full_forward(variant):
    model = random_model(variant)
    ids, mask = left_padded_batch(model.config.vocab_size, batch=3, length=14)
    full = np.asarray(model(ids, mask))

    prompt = 8
    cache = model.init_cache(batch_size=3, max_length=16)
    step = nnx.jit(lambda m, token, c: m.decode_step(token, c))
    logits, cache = nnx.jit(lambda m, i, k, c: m.prefill(i, k, c, empty_cache=variant != "gpt2"))(
        model, ids[:, :prompt], mask[:, :prompt], cache)  # both prefill paths are exercised
    pieces = [np.asarray(logits)]
    for t in range(prompt, ids.shape[1]):
        logits, cache = step(model, ids[:, t], cache)
        pieces.append(np.asarray(logits)[:, None])
    incremental = np.concatenate(pieces, axis=1)
    assert max_diff_on_real(incremental, full, mask) <= 1e-5
    assert int(cache.index) == 14
    np.testing.assert_array_equal(np.asarray(cache.lengths), mask.sum(1))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_decode_over_decode_weights_matches_transformers(variant, tmp_path):
    """Decode steps given Transformer.decode_weights(), with and without split layers (SamplingConfig.
    split_layers: per-layer arrays, the query, key and value weights joined, a gated MLP's gate and up too, the
    layers unrolled), give transformers' logits at every new position, for every family (GQA, biases, sliding
    windows, post-norm, projections, tied embeddings), on a vocabulary of 99 ids whose head the weights pad to
    128 (Transformer.decode_vocab_size: the extra columns come after the real ones); the compiled split step has
    no layer loop left, where the default step has one."""
    from minillm_jax.models import load_pretrained

    hf_model = build_hf_model(variant, vocab_size=99)
    hf_model.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    assert model.config.vocab_size == 99
    ids, mask = left_padded_batch(99, batch=3, length=14)
    expected = hf_logits(hf_model, ids, mask)
    prompt = 6
    graphdef, state = nnx.split(model)
    prefill = nnx.jit(lambda m, i, k, c: m.prefill(i, k, c, empty_cache=True))

    def step(state, token, cache, split):
        m = nnx.merge(graphdef, state)
        return m.decode_step(token, cache, weights=m.decode_weights(split_layers=split))

    for split in (False, True):
        logits, cache = prefill(model, ids[:, :prompt], mask[:, :prompt], model.init_cache(batch_size=3, max_length=16))
        compiled = jax.jit(lambda s, t, c, split=split: step(s, t, c, split))
        pieces = [np.asarray(logits)[:, -1:]]
        for t in range(prompt, ids.shape[1]):
            logits, cache = compiled(state, ids[:, t], cache)
            assert logits.shape == (3, 128)
            pieces.append(np.asarray(logits)[:, None, :99])
        incremental = np.concatenate(pieces, axis=1)
        assert max_diff_on_real(incremental, expected[:, prompt - 1:], mask[:, prompt - 1:]) <= 1e-4, split
    programs = {split: jax.jit(lambda s, t, c, split=split: step(s, t, c, split)).lower(state, ids[:, 0], cache)
                .as_text() for split in (False, True)}
    assert "stablehlo.while" in programs[False] and "stablehlo.while" not in programs[True]


def _assert_reproduces_the_rounding(ours, rounded, unrounded, mask):
    """`ours` sits on `rounded` (transformers over int8-rounded keys and values) at a small fraction of the
    rounding's own effect (`rounded` against `unrounded`, about 1e-2 at these sizes), in the largest and the mean
    difference over real positions: float32 noise between the two programs can move an element across a
    rounding boundary (one int8 step; a few percent of the effect where it happens), a wrong rounding or scale
    moves most of them (a floor in place of rounding: about the effect itself)."""
    def differences(a, b):
        d = np.abs(np.where(mask[..., None] > 0, np.asarray(a) - np.asarray(b), 0.0))
        return d.max(), d.sum() / (mask.sum() * d.shape[-1])

    (error_max, error_mean), (effect_max, effect_mean) = differences(ours, rounded), differences(rounded, unrounded)
    assert effect_max > 2e-3  # the rounding shows at this size
    assert error_max <= 0.25 * effect_max and error_mean <= 0.05 * effect_mean, (error_max, effect_max, error_mean,
                                                                                  effect_mean)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_int8_cache_decodes_as_transformers_over_int8_rounded_keys_and_values(variant, tmp_path):
    """An int8 KV cache (SamplingConfig.kv_cache_dtype "int8": each slot's key and value vector per layer and kv
    head as int8 steps of its largest magnitude / 127) decodes as transformers does over its own cache with the
    prompt in full precision and each decode step's attention over keys and values rounded that way (an SDPA
    attention function that rounds them): every family, with and without split layers (float32 rounding apart,
    ~1e-6, unless an element crosses a rounding boundary: `_assert_reproduces_the_rounding`). A prompt
    prefilled into the int8 cache (not as an empty cache's first tokens) attends over its own rounded keys and
    values, as transformers does with that attention at every position."""
    from minillm_jax.models import load_pretrained

    hf_model = build_hf_model(variant, vocab_size=99)
    hf_model.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    ids, mask = left_padded_batch(99, batch=3, length=12)
    prompt = 6
    expected = hf_int8_cache_decode_logits(hf_model, ids, mask, prompt)
    unrounded = hf_logits(hf_model, ids, mask)
    graphdef, state = nnx.split(model)
    prefill = nnx.jit(lambda m, i, k, c: m.prefill(i, k, c, empty_cache=True))
    for split in (False, True):
        cache = model.init_cache(batch_size=3, max_length=12, dtype="int8")
        assert cache.k.dtype == jnp.int8 and cache.scales.shape == (*cache.k.shape[:3], 2, 12)
        _, cache = prefill(model, ids[:, :prompt], mask[:, :prompt], cache)
        step = jax.jit(lambda s, t, c, split=split: nnx.merge(graphdef, s).decode_step(
            t, c, weights=nnx.merge(graphdef, s).decode_weights(split_layers=split)))
        pieces = []
        for t in range(prompt, ids.shape[1]):
            logits, cache = step(state, ids[:, t], cache)
            pieces.append(np.asarray(logits)[:, None, :99])
        _assert_reproduces_the_rounding(np.concatenate(pieces, axis=1), expected, unrounded[:, prompt:],
                                        mask[:, prompt:])
    logits, _ = nnx.jit(lambda m, i, k, c: m.prefill(i, k, c))(model, ids, mask, model.init_cache(3, 12, dtype="int8"))
    _assert_reproduces_the_rounding(logits, hf_int8_kv_logits(hf_model, ids, mask), unrounded, mask)


def test_last_only_prefill_gives_the_last_position_and_the_same_cache():
    model = random_model("llama_gqa")
    ids, mask = left_padded_batch(model.config.vocab_size, batch=3, length=9)
    full = np.asarray(model(ids, mask))
    logits, cache = model.prefill(ids, mask, model.init_cache(3, 12), empty_cache=True, last_only=True)
    assert logits.shape == (3, 1, model.config.vocab_size)
    np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, -1], atol=1e-5, rtol=0)
    _, reference = model.prefill(ids, mask, model.init_cache(3, 12), empty_cache=True)
    for a, b in zip(jax.tree.leaves(cache), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_left_padding_gives_the_same_logits_as_no_padding():
    model = random_model("llama_gqa")
    ids, _ = left_padded_batch(model.config.vocab_size, batch=1, length=9)
    alone = np.asarray(model(ids))
    padded = np.concatenate([np.zeros((1, 5), np.int32), ids], axis=1)
    mask = np.concatenate([np.zeros((1, 5), np.int32), np.ones((1, 9), np.int32)], axis=1)
    np.testing.assert_allclose(np.asarray(model(padded, mask))[:, 5:], alone, atol=1e-5, rtol=0)

    cache = model.init_cache(1, 16)
    logits, cache = model.prefill(padded, mask, cache)
    np.testing.assert_allclose(np.asarray(logits)[:, 5:], alone, atol=1e-5, rtol=0)


def test_chunked_prefill_equals_one_prefill():
    model = random_model("qwen2")
    ids, mask = left_padded_batch(model.config.vocab_size, batch=2, length=12)
    whole, _ = model.prefill(ids, mask, model.init_cache(2, 12))
    cache = model.init_cache(2, 12)
    first, cache = model.prefill(ids[:, :5], mask[:, :5], cache)
    second, cache = model.prefill(ids[:, 5:], mask[:, 5:], cache)
    assert max_diff_on_real(np.concatenate([first, second], 1), whole, mask) <= 1e-5


def test_remat_changes_nothing_numerically():
    model = random_model("llama_gqa")
    ids, mask = left_padded_batch(model.config.vocab_size)

    def loss(m):
        return jnp.mean(jax.nn.log_softmax(m(ids, mask))[..., 0] * mask)

    value, grads = nnx.value_and_grad(loss)(model)
    model.config = model.config.replace(remat="full")
    value_remat, grads_remat = nnx.value_and_grad(loss)(model)
    np.testing.assert_allclose(value, value_remat, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_remat)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fully_masked_padding_rows_stay_finite(dtype):
    """Left-padding queries see no real key; their outputs (and the gradients through them) must not be
    NaN, or a zero attention weight on their values would still poison the real rows."""
    model = random_model("mistral_sliding_window")
    model.config = model.config.replace(dtype=dtype)
    ids, mask = left_padded_batch(model.config.vocab_size, batch=3, length=12)
    assert (mask == 0).any()
    assert np.isfinite(np.asarray(model(ids, mask))).all()
    grads = nnx.grad(lambda m: jnp.sum(m(ids, mask) * mask[..., None]))(model)
    assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in jax.tree.leaves(grads))
    logits, _ = model.prefill(ids, mask, model.init_cache(3, 16))  # non-empty-cache path: masked slots too
    assert np.isfinite(np.asarray(logits)).all()
