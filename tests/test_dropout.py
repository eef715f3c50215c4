"""Training-time dropout: rates read from and written to HF configs, applied where transformers applies
them (checked against transformers in train mode at rate 1, where its dropout is deterministic), inverted
scaling, and off without a key (evaluation, sampling)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from hf_reference import VARIANTS, build_hf_model, hf_logits, left_padded_batch, max_diff_on_real, random_model

from minillm_jax.models import load_pretrained, select_layers
from minillm_jax.models import transformer as transformer_lib
from minillm_jax.models.families import config_from_hf, config_to_hf

ALMOST_ONE = 1.0 - 1e-9  # our rates must be < 1; every element is dropped at this rate with a fixed key
RATES = ("embed_dropout", "residual_dropout", "attention_dropout")


def _with_rates(model, **rates):
    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, state)
    model.config = model.config.replace(**{name: rates.get(name, 0.0) for name in RATES})
    return model


# ------------------------------------------------------------------------------- placement against HF

# (variant, HF config field set to 1.0, our rate): every dropout site transformers has in these families
SITES = [("gpt2", "embd_pdrop", "embed_dropout"), ("gpt2", "resid_pdrop", "residual_dropout"),
         ("gpt2", "attn_pdrop", "attention_dropout"), ("opt_pre_ln", "dropout", "residual_dropout"),
         ("opt_post_ln_project", "dropout", "residual_dropout"),
         ("opt_post_ln_project", "attention_dropout", "attention_dropout"),
         ("llama_gqa", "attention_dropout", "attention_dropout"),
         ("mistral_sliding_window", "attention_dropout", "attention_dropout"),
         ("qwen2", "attention_dropout", "attention_dropout")]


@pytest.mark.parametrize("variant,hf_field,rate", SITES, ids=[f"{v}-{f}" for v, f, _ in SITES])
def test_dropout_sites_match_transformers_train_mode(variant, hf_field, rate, tmp_path):
    hf_model = build_hf_model(variant)
    for field in ("embd_pdrop", "resid_pdrop", "attn_pdrop", "dropout", "attention_dropout"):
        if hasattr(hf_model.config, field):
            setattr(hf_model.config, field, 0.0)
    setattr(hf_model.config, hf_field, 0.5)
    hf_model.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    assert getattr(model.config, rate) == 0.5 and sum(getattr(model.config, r) for r in RATES) == 0.5

    # transformers' dropout modules read the rate at construction: rebuild at rate 1 (all dropped)
    config = hf_model.config
    setattr(config, hf_field, 1.0)
    dropped = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    dropped.load_state_dict(hf_model.state_dict())
    dropped.train()
    ids, mask = left_padded_batch(96, length=10)
    torch.manual_seed(0)
    expected = hf_logits(dropped, ids, mask)
    ours = np.asarray(_with_rates(model, **{rate: ALMOST_ONE})(ids, mask, dropout_rng=jax.random.key(0)))
    assert max_diff_on_real(ours, expected, mask) <= 1e-4
    assert max_diff_on_real(ours, hf_logits(hf_model, ids, mask), mask) > 1e-2  # dropout changed something


# ------------------------------------------------------------------------------- behaviour


def test_no_key_or_zero_rates_is_evaluation_exactly():
    model = random_model("gpt2")
    ids, mask = left_padded_batch(96)
    plain = np.asarray(_with_rates(model)(ids, mask))
    noisy = _with_rates(model, embed_dropout=0.1, residual_dropout=0.2, attention_dropout=0.3)
    np.testing.assert_array_equal(np.asarray(noisy(ids, mask)), plain)  # no key: evaluation
    np.testing.assert_array_equal(np.asarray(_with_rates(model)(ids, mask, dropout_rng=jax.random.key(0))), plain)
    assert not np.array_equal(np.asarray(noisy(ids, mask, dropout_rng=jax.random.key(0))), plain)


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_inverted_dropout_fraction_and_scale(rate):
    x = jnp.full((1000, 1000), 3.0, jnp.float32)
    y = np.asarray(transformer_lib._Dropout(jax.random.key(1)).apply(x, rate, "embed"))
    dropped = (y == 0).mean()
    assert abs(dropped - rate) < 5 * np.sqrt(rate * (1 - rate) / x.size)  # 5 sigma
    np.testing.assert_allclose(y[y != 0], 3.0 / (1 - rate), rtol=1e-6)  # survivors scaled by 1 / (1 - p)
    assert abs(y.mean() - 3.0) < 5 * 3.0 * np.sqrt(rate / (1 - rate) / x.size)  # expectation kept


def test_attention_dropout_keeps_the_expected_output():
    """Averaged over keys, attention with dropout on the probabilities equals attention without it (the
    output is linear in the probabilities), and its rate-0 path equals jax.nn.dot_product_attention."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 5, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 5, 2, 8)), jnp.float32) for _ in range(2))
    key_is_real = jnp.asarray([[True] * 5, [False] * 2 + [True] * 3])  # row 1 left-padded by 2
    allowed = key_is_real[:, None, :] & jnp.tril(jnp.ones((5, 5), bool))[None]  # its first 2 queries: none
    reference = jax.nn.dot_product_attention(q, k, v, mask=allowed[:, None])
    k_heads, v_heads = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # its layout: [B K S Dh]
    exact = transformer_lib._softmax_attention(q, k_heads, v_heads, allowed, transformer_lib._Dropout(None), 0.3)
    np.testing.assert_allclose(np.asarray(exact), np.asarray(reference), atol=1e-5)

    def one(key):
        return transformer_lib._softmax_attention(q, k_heads, v_heads, allowed, transformer_lib._Dropout(key), 0.3)

    samples = jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(0), 4000))
    mean, spread = np.asarray(samples.mean(0)), np.asarray(samples.std(0))
    assert (spread.max() > 0.1) and np.all(np.abs(mean - np.asarray(reference)) <= 5 * spread / np.sqrt(4000) + 1e-6)


@pytest.mark.slow  # >= 12 s on the 2-core machine; CI's second step
def test_traced_keys_under_jit_and_different_keys_differ():
    model = _with_rates(random_model("qwen2"), attention_dropout=0.2)
    graphdef, state = nnx.split(model)
    ids, mask = left_padded_batch(96)
    forward = jax.jit(lambda state, key: nnx.merge(graphdef, state)(ids, mask, dropout_rng=key))
    a, b = forward(state, jax.random.key(1)), forward(state, jax.random.key(2))
    assert not np.allclose(np.asarray(a), np.asarray(b), atol=1e-3)
    np.testing.assert_array_equal(np.asarray(forward(state, jax.random.key(1))), np.asarray(a))
    np.testing.assert_allclose(np.asarray(model(ids, mask, dropout_rng=jax.random.key(1))), np.asarray(a), atol=1e-5)
    hidden = jax.jit(lambda state, key: nnx.merge(graphdef, state).hidden_states(ids, mask, dropout_rng=key))
    np.testing.assert_allclose(np.asarray(model.unembed(hidden(state, jax.random.key(1)))), np.asarray(a), atol=1e-5)


@pytest.mark.slow  # >= 12 s on the 2-core machine; CI's second step
def test_gradients_with_dropout_are_the_same_under_remat():
    model = _with_rates(random_model("gpt2"), embed_dropout=0.1, residual_dropout=0.1, attention_dropout=0.1)
    ids, mask = left_padded_batch(96)

    def loss(m):
        return jnp.mean(jax.nn.log_softmax(m(ids, mask, dropout_rng=jax.random.key(3)))[..., 0] * mask)

    value, grads = nnx.value_and_grad(loss)(model)
    model.config = model.config.replace(remat="full")
    value_remat, grads_remat = nnx.value_and_grad(loss)(model)
    np.testing.assert_allclose(value, value_remat, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_remat)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_cached_decoding_never_drops():
    model = _with_rates(random_model("gpt2"), embed_dropout=0.5, residual_dropout=0.5, attention_dropout=0.5)
    ids, mask = left_padded_batch(96)
    logits, _ = model.prefill(ids, mask, model.init_cache(3, 16), empty_cache=True)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(model(ids, mask)), atol=1e-5)


# ------------------------------------------------------------------------------- configs


HF_RATES = [("gpt2", dict(embd_pdrop=0.05, resid_pdrop=0.2, attn_pdrop=0.15),
             dict(embed_dropout=0.05, residual_dropout=0.2, attention_dropout=0.15)),
            ("opt_pre_ln", dict(dropout=0.25, attention_dropout=0.05),
             dict(embed_dropout=0.0, residual_dropout=0.25, attention_dropout=0.05)),
            ("llama_gqa", dict(attention_dropout=0.1), dict(attention_dropout=0.1)),
            ("mistral_sliding_window", dict(attention_dropout=0.1), dict(attention_dropout=0.1)),
            ("qwen2", dict(attention_dropout=0.1), dict(attention_dropout=0.1))]


@pytest.mark.parametrize("variant,hf_rates,ours", HF_RATES, ids=[v for v, _, _ in HF_RATES])
def test_rates_round_trip_through_hf_configs(variant, hf_rates, ours, tmp_path):
    config_cls, kwargs = VARIANTS[variant]
    config = config_from_hf(config_cls(**kwargs, **hf_rates))
    assert {name: getattr(config, name) for name in RATES} == {name: ours.get(name, 0.0) for name in RATES}
    written = config_to_hf(config)
    again = config_cls(**{k: v for k, v in written.items() if k != "model_type"})
    for field, value in hf_rates.items():
        assert getattr(again, field) == value, field
    assert config_from_hf(again) == config


def test_select_layers_keeps_the_rates():
    model = _with_rates(random_model("gpt2"), embed_dropout=0.1, residual_dropout=0.2, attention_dropout=0.3)
    student = select_layers(model, [1])
    assert [getattr(student.config, name) for name in RATES] == [0.1, 0.2, 0.3]


def test_defaults_and_unexportable_rates():
    assert config_from_hf(transformers.GPT2Config()).residual_dropout == 0.1  # GPT-2 trains with 0.1 everywhere
    assert config_from_hf(transformers.LlamaConfig()).attention_dropout == 0.0
    llama = config_from_hf(VARIANTS["llama_gqa"][0](**VARIANTS["llama_gqa"][1]))
    with pytest.raises(ValueError, match="residual_dropout"):
        config_to_hf(llama.replace(residual_dropout=0.1))
    with pytest.raises(ValueError, match="attention_dropout"):
        llama.replace(attention_dropout=1.0)
