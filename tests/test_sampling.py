"""The compiled sampler against transformers' generate, the full forward pass, and exact distributions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
from flax import nnx
from hf_reference import VARIANTS, build_hf_model, random_model

from minillm_jax import sampling
from minillm_jax.models import ModelConfig, Transformer, load_pretrained
from minillm_jax.sampling import SamplingConfig, generate

# ------------------------------------------------------------------------------------ helpers


def _hf_greedy(hf_model, prompts, max_new_tokens, pad_id=0, **kwargs):
    """transformers' greedy generate on left-padded prompts; returns the new tokens [B, <=R]."""
    ids, mask = sampling.pad_prompts(prompts, (max(map(len, prompts)),), pad_id)
    with torch.no_grad():
        out = hf_model.generate(input_ids=torch.from_numpy(ids.astype(np.int64)),
                                attention_mask=torch.from_numpy(mask.astype(np.int64)), do_sample=False,
                                max_new_tokens=max_new_tokens, pad_token_id=pad_id, **kwargs)
    return out[:, ids.shape[1]:].numpy()


def _compare_greedy(ours, hf_tokens, pad_id=0):
    tokens, mask = np.asarray(ours.tokens), np.asarray(ours.mask)
    width = hf_tokens.shape[1]
    np.testing.assert_array_equal(np.where(mask[:, :width], tokens[:, :width], pad_id), hf_tokens)
    assert not mask[:, width:].any()


def _peaked_model(real_vocab=10, vocab=12, seed=0, spread=1.3) -> Transformer:
    """A tiny Llama whose next-token logits after PROMPT have standard deviation `spread`: far from
    uniform (so temperature matters) without being one-hot."""
    config = ModelConfig(model_type="llama", vocab_size=vocab, real_vocab_size=real_vocab, hidden_size=16,
                         num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, intermediate_size=24,
                         max_position_embeddings=64, tie_word_embeddings=False)
    model = Transformer(config, rngs=nnx.Rngs(seed))
    logits = np.asarray(model(np.asarray([PROMPT], np.int32)))[0, -1, :real_vocab]
    model.lm_head[...] = model.lm_head[...] * (spread / logits.std())
    return model


def _next_token_probs(model, prompt, temperature=1.0) -> np.ndarray:
    """float64 softmax over the real vocabulary from the plain forward pass."""
    logits = np.asarray(model(np.asarray([prompt], np.int32)), np.float64)[0, -1, : model.config.num_real_tokens]
    z = logits / temperature
    z -= z.max()
    return np.exp(z) / np.exp(z).sum()


def _chi2_pvalue(samples: np.ndarray, probs: np.ndarray) -> float:
    counts = np.bincount(samples, minlength=len(probs))
    assert counts[probs == 0].sum() == 0, "an id with probability 0 was sampled"
    keep = probs > 0
    expected = probs[keep] * len(samples)
    stat = ((counts[keep] - expected) ** 2 / expected).sum()
    return float(scipy.stats.chi2.sf(stat, df=keep.sum() - 1))


def _first_tokens(model, prompt, config, n=4000, seed=0, **kwargs):
    out = generate(model, [prompt] * n, config, jax.random.key(seed), **kwargs)
    return out, np.asarray(out.tokens[:, 0])


PROMPT = [1, 2, 3, 4]

# ------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_equals_transformers_generate(variant, tmp_path):
    hf_model = build_hf_model(variant)
    hf_model.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    prompts = [[5, 17, 3, 9, 44, 2, 8], [7, 1, 30], [11, 12, 13, 14, 15]]
    eos = hf_model.generation_config.eos_token_id
    ours = generate(model, prompts, SamplingConfig(max_new_tokens=16, greedy=True, eos_token_id=eos),
                    jax.random.key(0))
    _compare_greedy(ours, _hf_greedy(hf_model, prompts, 16))


@pytest.mark.slow  # >= 12 s on the 2-core machine; CI's second step
def test_smollm2_greedy_chat_equals_transformers(smollm2_gguf, smollm2_reference):
    tokenizer, hf_model = smollm2_reference
    model = load_pretrained(smollm2_gguf)
    texts = ["What is the capital of France?", "Give me two tips for staying focused while studying.",
             "Write a short poem about autumn leaves."]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                             return_dict=True)["input_ids"] for t in texts]
    config = SamplingConfig(max_new_tokens=40, greedy=True, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    ours = generate(model, prompts, config, jax.random.key(0))
    hf_tokens = _hf_greedy(hf_model, prompts, 40, pad_id=tokenizer.pad_token_id,
                           eos_token_id=tokenizer.eos_token_id)
    _compare_greedy(ours, hf_tokens, pad_id=tokenizer.pad_token_id)
    assert sorted(np.asarray(ours.lengths).tolist())[1:] == [40, 40]  # two long answers compared in full
    assert tokenizer.decode(np.asarray(ours.tokens[0])).startswith("The capital of France is Paris")


def test_no_repeat_ngram_equals_transformers(tmp_path):
    hf_model = build_hf_model("llama_gqa", seed=3)
    prompts = [[5, 6, 5, 6, 7, 5], [9, 9, 8, 9, 9, 8]]
    hf_model.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    config = SamplingConfig(max_new_tokens=24, greedy=True, no_repeat_ngram_size=2)
    ours = generate(model, prompts, config, jax.random.key(0))
    _compare_greedy(ours, _hf_greedy(hf_model, prompts, 24, no_repeat_ngram_size=2, eos_token_id=None))
    for prompt, row in zip(prompts, np.asarray(ours.tokens)):
        sequence = prompt + row.tolist()
        for end in range(len(prompt), len(sequence)):  # every generated token completes a new bigram
            earlier = set(zip(sequence[: end - 1], sequence[1:end]))
            assert (sequence[end - 1], sequence[end]) not in earlier


# ------------------------------------------------------------------------------------ cache and masks


@pytest.mark.parametrize("variant", ["gpt2", "mistral_sliding_window", "qwen2"])
def test_logprobs_at_every_step_equal_full_forward(variant):
    student, teacher = random_model(variant, seed=0), random_model(variant, seed=1)
    prompts = [[3, 4, 5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15]]
    out = generate(student, prompts, SamplingConfig(max_new_tokens=12), jax.random.key(1), teacher=teacher,
                   mix_alpha=0.3)
    ids = np.concatenate([out.prompt_tokens, out.tokens], 1)
    mask = np.concatenate([out.prompt_mask, out.mask], 1)
    P = out.prompt_tokens.shape[1]
    gen_mask = np.asarray(out.mask)
    log_softmax = {}
    for model, returned in ((student, out.logprobs), (teacher, out.teacher_logprobs)):
        logits = np.asarray(model(ids, mask)[:, P - 1:-1], np.float64)
        log_softmax[model] = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        expected = np.take_along_axis(log_softmax[model], np.asarray(out.tokens)[..., None], -1)[..., 0]
        np.testing.assert_allclose(np.where(gen_mask, returned, 0), np.where(gen_mask, expected, 0), atol=1e-5)
    log_q, log_p = log_softmax[student], log_softmax[teacher]  # each step's KL(q || p), float64 over the vocabulary
    kl = np.sum(np.exp(log_q) * (log_q - log_p), axis=-1)
    np.testing.assert_allclose(np.where(gen_mask, out.reverse_kl, 0), np.where(gen_mask, kl, 0), rtol=1e-4, atol=1e-5)
    assert (kl[gen_mask] > 0.01).all()  # two random models: far apart, so the comparison means something


def test_bfloat16_models_decode_with_float32_activations_over_bfloat16_weights_on_cpu():
    """On CPU a bf16-compute model decodes through transformer.decoding_twin: float32 activations and cache,
    bfloat16 copies of the matmul weights (the model keeps its own arrays and config; norms are shared), a
    float32 model is its own twin; and what such a model samples is scored like the float32 model's full
    forward to bfloat16 accuracy (the prompt is prefilled in bf16)."""
    from minillm_jax.models.transformer import decoding_twin

    model = random_model("qwen2", seed=0)
    assert decoding_twin(model) is model
    full = nnx.merge(*nnx.split(model))  # the float32 model, for the expected scores
    model.config = model.config.replace(dtype="bfloat16")
    twin = decoding_twin(model)
    assert twin.config.dtype == "float32" and twin.config.matmul_dtype == "bfloat16"
    assert model.config.dtype == "bfloat16" and model.config.matmul_dtype == ""
    assert model.layers["q_proj"][...].dtype == jnp.float32 and twin.layers["q_proj"][...].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(twin.embed_tokens[...]),
                                  np.asarray(model.embed_tokens[...].astype(jnp.bfloat16)))
    assert twin.layers["attn_norm_scale"][...] is model.layers["attn_norm_scale"][...]

    prompts = [[3, 4, 5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15]]
    out = generate(model, prompts, SamplingConfig(max_new_tokens=12), jax.random.key(1))
    ids = np.concatenate([out.prompt_tokens, out.tokens], 1)
    mask = np.concatenate([out.prompt_mask, out.mask], 1)
    P = out.prompt_tokens.shape[1]
    logits = np.asarray(full(ids, mask)[:, P - 1:-1], np.float64)
    expected = np.take_along_axis(logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True),
                                  np.asarray(out.tokens)[..., None], -1)[..., 0]
    gen_mask = np.asarray(out.mask)
    assert gen_mask.sum() > 20
    np.testing.assert_allclose(np.where(gen_mask, out.logprobs, 0), np.where(gen_mask, expected, 0), atol=3e-2)


def test_bfloat16_twin_decode_step_slices_its_weights_without_widening_them():
    """XLA:CPU widens a bfloat16 array to float32 before slicing it: a layer scan over the twin's stacked
    bfloat16 weights would convert every layer's weights at every decode step. The compiled decode step
    slices them as they are (as bit patterns), and its logits are those of the same step without the scan
    trick's bitcasts (an unrolled reference below: the twin's layers one at a time)."""
    from minillm_jax.models.transformer import decoding_twin

    model = random_model("llama_gqa", seed=0)
    model.config = model.config.replace(dtype="bfloat16")
    twin = decoding_twin(model)
    cache = twin.init_cache(2, 8)
    _, cache = twin.prefill(jnp.asarray([[3, 4, 5], [6, 7, 8]]), None, cache)
    graphdef, state = nnx.split(twin)
    step = jax.jit(lambda state, tokens, cache: nnx.merge(graphdef, state).decode_step(tokens, cache))
    tokens = jnp.asarray([9, 10])
    hlo = step.lower(state, tokens, cache).compile().as_text()
    widened = [line for line in hlo.splitlines() if "dynamic-slice(" in line and "f32[1," in line
               and any(f"f32[1,{a},{b}]" in line for a, b in
                       [w.shape[1:3] for w in (twin.layers["gate_proj"][...], twin.layers["down_proj"][...])])]
    assert not widened, widened[:2]
    logits, _ = step(state, tokens, cache)
    rounded = nnx.merge(*nnx.split(model))  # float32 throughout, over the twin's rounded weights
    rounded.config = model.config.replace(dtype="float32")
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        rounded.layers[name].set_value(twin.layers[name][...].astype(jnp.float32))
    for name in ("embed_tokens", "lm_head"):
        if hasattr(twin, name):
            getattr(rounded, name).set_value(getattr(twin, name)[...].astype(jnp.float32))
    ref_cache = rounded.init_cache(2, 8)
    _, ref_cache = rounded.prefill(jnp.asarray([[3, 4, 5], [6, 7, 8]]), None, ref_cache)
    expected, _ = rounded.decode_step(tokens, ref_cache)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), atol=2e-2)


def test_float16_compute_on_cpu_says_which_dtypes_work():
    model = random_model("gpt2", seed=0)
    model.config = model.config.replace(dtype="float16")
    with pytest.raises(ValueError, match="compute dtype float16.*bfloat16.*float32"):
        generate(model, [[3, 4, 5]], SamplingConfig(max_new_tokens=2), jax.random.key(0))


def test_eos_masks_lengths_and_padding():
    model = random_model("llama_gqa", noise=0.3)
    eos = tuple(range(0, 96, 2))  # half the vocabulary ends a row
    config = SamplingConfig(max_new_tokens=20, eos_token_id=eos, pad_token_id=95)
    out = generate(model, [[1, 3, 5], [7, 9, 11, 13], [15]] * 4, config, jax.random.key(2))
    tokens, mask, lengths = np.asarray(out.tokens), np.asarray(out.mask), np.asarray(out.lengths)
    assert (lengths < 20).any()
    for row_tokens, row_mask, length in zip(tokens, mask, lengths):
        is_eos = np.isin(row_tokens, eos)
        first = int(np.argmax(is_eos)) + 1 if is_eos[:length].any() else 20
        assert length == first == row_mask.sum()
        assert row_mask[:length].all() and not row_mask[length:].any()
        assert (row_tokens[length:] == 95).all()
        assert not is_eos[: length - 1].any()
    assert (np.asarray(out.logprobs)[~mask] == 0).all()


def test_alone_and_in_padded_batch_give_same_greedy_tokens():
    model = random_model("qwen2")
    config = SamplingConfig(max_new_tokens=10, greedy=True)
    alone = generate(model, [[4, 8, 15]], config, jax.random.key(0))
    batch = generate(model, [[16, 23, 42, 7, 7, 7, 1, 2, 3], [4, 8, 15], [9] * 20], config, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(batch.tokens[1]), np.asarray(alone.tokens[0]))


def test_one_compile_per_bucket():
    model = random_model("smollm2_tied")
    config = SamplingConfig(max_new_tokens=4, prompt_buckets=(16, 32))
    before = sampling.TRACE_COUNTS["generate"]
    for length in (5, 9, 13):
        generate(model, [list(range(1, length + 1))] * 2, config, jax.random.key(length))
    assert sampling.TRACE_COUNTS["generate"] - before == 1
    generate(model, [list(range(1, 20))] * 2, config, jax.random.key(0))  # next bucket: one more
    assert sampling.TRACE_COUNTS["generate"] - before == 2


def test_chunked_sampler_compiles_once_per_bucket_and_batch_size():
    model = random_model("smollm2_tied")
    config = SamplingConfig(max_new_tokens=5, prompt_buckets=(16, 32), decode_chunk=2)
    before = dict(sampling.TRACE_COUNTS)

    def traces(name):
        return sampling.TRACE_COUNTS[name] - before.get(name, 0)

    for batch in (2, 3):
        for length in (5, 13):
            generate(model, [list(range(1, length + 1))] * batch, config, jax.random.key(length))
    assert traces("generate") == 2 and traces("sample") == 2
    assert traces("decode_chunk") == 2  # one decode body per compile, whatever the number of chunks run
    generate(model, [list(range(1, 20))] * 3, config, jax.random.key(0))  # next bucket: one more
    assert traces("generate") == 3


@pytest.mark.parametrize("eos", [(), tuple(range(0, 96, 12))], ids=["no_eos", "eos"])
def test_decode_chunks_and_cache_segments_do_not_change_samples(eos):
    """Step t draws with fold_in(rng, t) whatever the chunking; a last chunk that runs past
    max_new_tokens (11 = 2 * 4 + 3) leaves no trace; rows done mid-chunk stay padded. Cache segments (the
    steps in loops that attend over the slots filled so far only: chunks of 2 in 3 loops, of 4 in 2) give
    the same samples, student and teacher caches alike; so do decode steps over split layers
    (SamplingConfig.split_layers: per-layer weights, the layers unrolled), alone and with cache segments; and
    with int8 KV caches (SamplingConfig.kv_cache_dtype), each of those gives the int8 caches' samples."""
    student, teacher = random_model("qwen2", seed=0, noise=0.3), random_model("qwen2", seed=1, noise=0.3)
    prompts = [[3, 4, 5, 6, 7], [10, 11], [12, 13, 14, 15]] * 2
    layouts = ((1, 1, False), (4, 1, False), (16, 1, False), (2, 3, False), (4, 2, False), (4, 1, True), (2, 3, True))
    for kv_cache_dtype, cases in (("auto", layouts), ("int8", layouts[1:2] + layouts[3:4] + layouts[6:])):
        outs = [generate(student, prompts,
                         SamplingConfig(max_new_tokens=11, eos_token_id=eos, no_repeat_ngram_size=3,
                                        decode_chunk=chunk, pad_token_id=95, cache_segments=segments,
                                        split_layers=split, kv_cache_dtype=kv_cache_dtype),
                         jax.random.key(4), teacher=teacher, mix_alpha=0.4)
                for chunk, segments, split in cases]
        reference = jax.tree.map(np.asarray, outs[0])
        assert reference.tokens.shape == (6, 11)
        if eos:
            assert reference.lengths.min() < 11 and reference.lengths.max() > 4  # ends within and after chunk 1
        for out in outs[1:]:
            for name in ("tokens", "mask", "lengths"):
                np.testing.assert_array_equal(np.asarray(getattr(out, name)), getattr(reference, name),
                                              err_msg=f"{kv_cache_dtype} {name}")
            # int8: float32 noise between programs (split layers or not) can move a key or value element across a
            # rounding boundary, one int8 step: log-probabilities within 1e-2 (against 0.1 and more apart from
            # the float caches' below), tokens the same
            tolerance = 1e-6 if kv_cache_dtype == "auto" else 1e-2
            for name in ("logprobs", "teacher_logprobs", "weights"):
                np.testing.assert_allclose(np.asarray(getattr(out, name)), getattr(reference, name), rtol=tolerance,
                                           atol=tolerance, err_msg=f"{kv_cache_dtype} {name}")
        if kv_cache_dtype == "auto":
            floats = reference
    # the int8 caches' own samples: their log-probabilities are not the float caches' (the same draws would
    # otherwise hide a cache that was never used)
    assert np.abs(np.where(floats.mask & reference.mask, floats.logprobs - reference.logprobs, 0)).max() > 0.1


def test_sample_is_traceable_inside_another_jitted_function():
    student, teacher = random_model("gpt2", seed=0), random_model("gpt2", seed=1)
    config = SamplingConfig(max_new_tokens=6, decode_chunk=4)
    ids, mask = sampling.pad_prompts([[1, 2, 3], [4, 5]], config.prompt_buckets, config.pad_token_id)
    (student_def, student_state), (teacher_def, teacher_state) = nnx.split(student), nnx.split(teacher)

    @jax.jit
    def round_like(student_state, teacher_state, ids, mask, key, alpha):  # e.g. a MiniLLM round's first part
        out = sampling.sample(nnx.merge(student_def, student_state), nnx.merge(teacher_def, teacher_state), ids,
                              mask, key, alpha, config=config, num_real=student.config.num_real_tokens)
        return out, jnp.sum(out.logprobs * out.mask)

    out, total = round_like(student_state, teacher_state, ids, mask, jax.random.key(2), jnp.float32(0.25))
    expected = generate(student, [[1, 2, 3], [4, 5]], config, jax.random.key(2), teacher=teacher, mix_alpha=0.25)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(expected.tokens))
    np.testing.assert_allclose(np.asarray(out.weights), np.asarray(expected.weights), rtol=1e-6)
    np.testing.assert_allclose(float(total), float(jnp.sum(expected.logprobs * expected.mask)), rtol=1e-6)


def test_reproducible_with_the_same_key():
    model = random_model("gpt2")
    config = SamplingConfig(max_new_tokens=8)
    a = generate(model, [[1, 2, 3]] * 4, config, jax.random.key(7))
    b = generate(model, [[1, 2, 3]] * 4, config, jax.random.key(7))
    c = generate(model, [[1, 2, 3]] * 4, config, jax.random.key(8))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))


# ------------------------------------------------------------------------------------ distributions


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_samples_follow_softmax_with_temperature(temperature):
    model = _peaked_model()
    probs = _next_token_probs(model, PROMPT, temperature)
    assert probs.max() < 0.9 and np.sort(probs)[-3] > 0.01  # informative, not degenerate
    _, first = _first_tokens(model, PROMPT, SamplingConfig(max_new_tokens=1, temperature=temperature))
    assert first.max() < 10  # padded vocabulary ids never drawn
    assert _chi2_pvalue(first, probs) > 1e-3
    wrong = _next_token_probs(model, PROMPT, 1.6 - temperature)  # the other temperature: must be rejected
    assert _chi2_pvalue(first, wrong) < 1e-6


def test_top_k_and_top_p_exclude_and_renormalise():
    model = _peaked_model(seed=1)
    probs = _next_token_probs(model, PROMPT)
    order = np.argsort(-probs)

    top_k = np.zeros_like(probs)
    top_k[order[:3]] = probs[order[:3]]
    _, first = _first_tokens(model, PROMPT, SamplingConfig(max_new_tokens=1, top_k=3))
    assert set(first.tolist()) <= set(order[:3].tolist())
    assert _chi2_pvalue(first, top_k / top_k.sum()) > 1e-3

    top_p = 0.8
    mass_before = np.cumsum(probs[order]) - probs[order]
    kept = order[mass_before < top_p]
    assert 1 < len(kept) < len(probs) - 1
    nucleus = np.zeros_like(probs)
    nucleus[kept] = probs[kept]
    _, first = _first_tokens(model, PROMPT, SamplingConfig(max_new_tokens=1, top_p=top_p), seed=1)
    assert set(first.tolist()) <= set(kept.tolist())
    assert _chi2_pvalue(first, nucleus / nucleus.sum()) > 1e-3
    assert _chi2_pvalue(first, probs) < 1e-6  # unfiltered sampling would be caught


@pytest.mark.parametrize("alpha", [0.2, 0.5])
def test_teacher_mixture_distribution_and_weights(alpha):
    student, teacher = _peaked_model(seed=2), _peaked_model(seed=3)
    q, p = _next_token_probs(student, PROMPT), _next_token_probs(teacher, PROMPT)
    mixture = (1 - alpha) * q + alpha * p
    out, first = _first_tokens(student, PROMPT, SamplingConfig(max_new_tokens=1), teacher=teacher,
                               mix_alpha=alpha)
    assert _chi2_pvalue(first, mixture) > 1e-3
    assert _chi2_pvalue(first, q) < 1e-6 and _chi2_pvalue(first, p) < 1e-6
    np.testing.assert_allclose(np.asarray(out.weights[:, 0]), (q / mixture)[first], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out.logprobs[:, 0]), np.log(q[first]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.teacher_logprobs[:, 0]), np.log(p[first]), atol=1e-5)
    assert float(jnp.max(out.weights)) <= 1 / (1 - alpha) + 1e-6


def test_the_inverse_cdf_never_picks_an_id_without_mass():
    """Every draw (the filtered path's sample_categorical and both levels of _block_draw) inverts a CDF with
    sampling._inverse_cdf. At every point from 0 to the total, the ids without mass in the middle and at the end
    of a row included, it picks what a float64 scan picks: the first id whose cumulative mass passes the point,
    or at the total (where float32 rounding of u x total can land) the last id with mass, never an id after it."""
    mass = np.array([[0.0, 0.25, 0.0, 0.5, 0.25, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0, 0.5, 0.0, 0.0]], np.float32)
    cdf = np.cumsum(mass.astype(np.float64), axis=-1)
    points = np.concatenate([np.linspace(0.0, 1.0, 41), cdf[0], cdf[1]])

    def reference(row, at):
        for i in range(mass.shape[1]):
            if cdf[row, i] > at and mass[row, i] > 0:
                return i
        return int(np.flatnonzero(mass[row])[-1])

    for at in points:
        got = sampling._inverse_cdf(jnp.asarray(cdf, jnp.float32), jnp.asarray(mass), jnp.full((2,), at, jnp.float32))
        assert got.tolist() == [reference(0, at), reference(1, at)], at


def _inverse_cdf_reference(x, y, alpha, temperature, num_real, u, banned=None):
    """float64: q and p over the real ids, the mixture, and each u's id by inverting the CDF of the mixture over
    the ids not banned; with how close u * total lies to the nearest CDF step (relative), so float32 rounding can
    be told from a wrong id."""
    def softmax(z):
        z = z[:, :num_real].astype(np.float64) / temperature
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    q = softmax(x)
    p = softmax(y) if y is not None else q
    mix = (1 - alpha) * q + alpha * p if y is not None else q
    cdf = np.cumsum(mix if banned is None else np.where(banned[:, :num_real], 0.0, mix), axis=-1)
    target = u[:, None] * cdf[:, -1:]
    token = np.minimum((cdf <= target).sum(-1), num_real - 1)
    margin = np.abs(cdf - target).min(-1) / cdf[:, -1]
    return q, p, mix, token, margin


@pytest.mark.parametrize("teacher,ban", [(False, False), (True, False), (True, True)])
def test_block_draw_inverts_the_mixture_cdf_as_float64_does(teacher, ban):
    """The unfiltered draw (two levels: a block of 128 ids, then an id in it) picks, for every u on a grid from 0
    to just below 1, the id that inverting the float64 CDF of the (teacher-mixed) distribution picks, and its
    log q, log p, importance weight and KL(q || p) are float64's. The logits have 300 real ids in arrays 384
    (student) and 512 (teacher) wide whose extra ids hold the largest logits (never drawn), and a block whose
    ids have ~no mass (exp underflows: never drawn, even for u next to 1). With banned ids (n-gram blocking: here
    the 10 most likely of each row and a whole block of 128), the draw inverts the CDF over the others while
    log q, log p, the weight and the KL stay the unfiltered distributions'."""
    rng = np.random.default_rng(0)
    num_real, rows, alpha, temperature = 300, 3, 0.3, 0.7
    x = rng.normal(0, 3, (rows, 384)).astype(np.float32)
    y = rng.normal(0, 3, (rows, 512)).astype(np.float32)
    x[:, num_real:], y[:, num_real:] = 40.0, 40.0
    x[0, 256:num_real] = -200.0  # row 0's last block: the tail of its distribution, mass ~1e-120
    u = np.concatenate([np.linspace(0, 1, 400, endpoint=False), [np.nextafter(np.float32(1), np.float32(0))]])
    x, y = np.repeat(x, len(u), axis=0), np.repeat(y, len(u), axis=0)
    u = np.tile(u, rows).astype(np.float32)
    banned = None
    if ban:
        banned = np.zeros((len(u), 384), bool)
        np.put_along_axis(banned, np.argsort(-x[:, :num_real], axis=-1)[:, :10], True, axis=-1)
        banned[:, 128:256] = True
    draw = jax.jit(lambda x, y, u, b: sampling._block_draw(x, y, u, alpha, temperature, num_real, b))
    token, logq, logp, weight, kl = map(np.asarray, draw(x, y if teacher else None, u, banned))
    q, p, mix, expected, margin = _inverse_cdf_reference(x, y if teacher else None, alpha, temperature, num_real, u,
                                                         banned)
    rows_ = np.arange(len(u))
    assert (token < num_real).all() and (mix[rows_, token] > 1e-30).all()
    if ban:
        assert not banned[rows_, token].any()
    differ = token != expected
    assert (margin[differ] < 1e-5).all(), (token[differ], expected[differ], margin[differ])
    assert differ.mean() < 0.01
    np.testing.assert_allclose(logq, np.log(q[rows_, token]), atol=1e-5)
    np.testing.assert_allclose(logp, np.log(p[rows_, token]), atol=1e-5)
    np.testing.assert_allclose(weight, q[rows_, token] / mix[rows_, token], rtol=1e-5, atol=1e-7)
    reference_kl = (q * (np.log(q) - np.log(p))).sum(-1) if teacher else np.zeros(len(u))
    np.testing.assert_allclose(kl, reference_kl, atol=1e-5)


def test_unfiltered_draws_equal_the_filtered_paths_over_the_same_uniforms():
    """MiniLLM's rollouts (no filter) and n-gram blocked sampling take the two-level draw; a top-k filter keeping
    every id takes the filtered path (log-softmax, mixture, CDF over the whole vocabulary) with the same
    distribution and the same uniform per row and step: the whole sampler gives the same tokens and
    log-probabilities either way, alone, with a teacher mixed in, and with bigrams blocked (24 steps of models
    peaked enough to repeat bigrams unblocked), on a padded checkpoint vocabulary (99 real ids in 104; decode
    steps give 128 logits)."""
    student, teacher = _peaked_model(99, 104, seed=6, spread=4.0), _peaked_model(99, 104, seed=7, spread=4.0)
    vocab = student.config.vocab_size
    prompts = [[1, 2, 3, 4], [5, 6], [7, 8, 9]]

    def run(top_k, ngram, **kwargs):
        config = SamplingConfig(max_new_tokens=24, top_k=top_k, no_repeat_ngram_size=ngram)
        return generate(student, prompts, config, jax.random.key(3), **kwargs)

    def repeated_bigrams(out):
        rows = [p + row.tolist() for p, row in zip(prompts, np.asarray(out.tokens))]
        return sum(len(s) - 1 - len(set(zip(s[:-1], s[1:]))) for s in rows)

    mixed = dict(teacher=teacher, mix_alpha=0.3)
    assert repeated_bigrams(run(0, 0, **mixed)) > 0  # so that blocking them changes the draws
    for kwargs, ngram in ((dict(), 0), (mixed, 0), (mixed, 2)):
        outs = [run(k, ngram, **kwargs) for k in (0, vocab)]
        np.testing.assert_array_equal(np.asarray(outs[0].tokens), np.asarray(outs[1].tokens))
        for name in ("logprobs", "teacher_logprobs", "weights", "reverse_kl"):
            a, b = getattr(outs[0], name), getattr(outs[1], name)
            if a is not None:
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, err_msg=name)
        if ngram:
            assert repeated_bigrams(outs[0]) == 0


def test_pure_teacher_and_pure_student_endpoints():
    student, teacher = _peaked_model(seed=4), _peaked_model(seed=5)
    config = SamplingConfig(max_new_tokens=1, greedy=True)
    q, p = _next_token_probs(student, PROMPT), _next_token_probs(teacher, PROMPT)
    assert q.argmax() != p.argmax()
    assert int(generate(student, [PROMPT], config, jax.random.key(0), teacher=teacher).tokens[0, 0]) == q.argmax()
    out = generate(student, [PROMPT], config, jax.random.key(0), teacher=teacher, mix_alpha=1.0)
    assert int(out.tokens[0, 0]) == p.argmax()


# ------------------------------------------------------------------------------------ bad input


def test_bad_input_is_refused():
    student = _peaked_model()
    config = SamplingConfig(max_new_tokens=2, prompt_buckets=(8,))
    with pytest.raises(ValueError, match="real vocabulary sizes differ"):
        generate(student, [PROMPT], config, jax.random.key(0), teacher=_peaked_model(real_vocab=11))
    with pytest.raises(ValueError, match="exceeds the largest bucket 8"):
        generate(student, [list(range(9))], config, jax.random.key(0))
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(student, [PROMPT, []], config, jax.random.key(0))
    with pytest.raises(ValueError, match="left-padded"):
        generate(student, (np.ones((1, 4)), np.array([[1, 1, 1, 0]])), config, jax.random.key(0))
    with pytest.raises(ValueError, match="needs a teacher"):
        generate(student, [PROMPT], config, jax.random.key(0), mix_alpha=0.2)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(max_new_tokens=2, top_p=0.0)
    with pytest.raises(ValueError, match="decode_chunk"):
        SamplingConfig(max_new_tokens=2, decode_chunk=0)
    with pytest.raises(ValueError, match="cache_segments"):
        SamplingConfig(max_new_tokens=2, cache_segments=0)
    with pytest.raises(ValueError, match="split_layers"):
        SamplingConfig(max_new_tokens=2, split_layers=1)
    gpt2 = random_model("gpt2")  # learned positions: 64
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        generate(gpt2, [list(range(1, 40))], SamplingConfig(max_new_tokens=30), jax.random.key(0))
