"""Logit parity with transformers + torch for every family and variant, both directions of conversion."""

import json

import jax
import numpy as np
import pytest
import torch
import transformers
from hf_reference import VARIANTS, build_hf_model, hf_forward, hf_logits, left_padded_batch, max_diff_on_real
from tokenizers import Tokenizer, models, pre_tokenizers

from minillm_jax.models import load_pretrained, save_pretrained


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_import_and_export_match_transformers(variant, tmp_path):
    hf_model = build_hf_model(variant)
    hf_model.save_pretrained(tmp_path / "hf")
    ids, mask = left_padded_batch(hf_model.config.vocab_size, length=12)
    expected = hf_logits(hf_model, ids, mask)

    model = load_pretrained(tmp_path / "hf")
    ours = np.asarray(model(ids, mask))
    assert ours.shape == expected.shape and ours.dtype == np.float32
    assert max_diff_on_real(ours, expected, mask) <= 1e-4

    save_pretrained(model, tmp_path / "ours")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager")
    assert type(reloaded) is type(hf_model)
    assert max_diff_on_real(hf_logits(reloaded.float().eval(), ids, mask), ours, mask) <= 1e-4
    # Every HF tensor survives the round trip bit for bit in fp32.
    original = hf_model.state_dict()
    for name, value in reloaded.state_dict().items():
        if name in original:
            torch.testing.assert_close(value, original[name], rtol=0, atol=0, msg=name)


def _torch_gradients(variant, directory):
    """The variant's HF model saved to `directory`, a left-padded batch, random weights on the logits of its
    real positions, and torch autograd's gradient of the weighted sum by HF parameter name."""
    hf_model = build_hf_model(variant)
    hf_model.save_pretrained(directory)
    ids, mask = left_padded_batch(hf_model.config.vocab_size, length=12)
    weights = np.random.default_rng(1).normal(size=(*ids.shape, hf_model.config.vocab_size)).astype(np.float32)
    weights *= mask[..., None]
    (hf_forward(hf_model, ids, mask) * torch.from_numpy(weights)).sum().backward()
    return ids, mask, weights, {name: p.grad.numpy() for name, p in hf_model.named_parameters()}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_gradients_match_torch_autograd(variant, tmp_path):
    """Every parameter's gradient of a weighted sum of the logits (real positions) equals torch autograd's
    through the transformers model: the hand-written MLP backward passes and everything autodiff derives.
    Our gradients are written out by save_pretrained (a linear, name-by-name map), so they are compared
    under the HF names, transposes and offsets included."""
    ids, mask, weights, expected = _torch_gradients(variant, tmp_path / "hf")
    _assert_gradients_are_torchs(load_pretrained(tmp_path / "hf"), ids, mask, weights, expected, tmp_path)


def _assert_gradients_are_torchs(model, ids, mask, weights, expected, tmp_path) -> None:
    """Our float32 gradient of sum(logits * weights), written out by save_pretrained under the HF names,
    equals torch autograd's (`expected`, by HF name) parameter by parameter."""
    import jax.numpy as jnp
    from flax import nnx
    from safetensors.numpy import load_file

    grads = nnx.grad(lambda m: jnp.sum(m(ids, mask) * weights))(model)
    graphdef, _ = nnx.split(model, nnx.Param)
    save_pretrained(nnx.merge(graphdef, grads), tmp_path / "grads")
    ours = load_file(tmp_path / "grads" / "model.safetensors")
    assert set(ours) <= set(expected) | {"lm_head.weight"} and len(ours) >= len(expected) - 1
    overall = max(float(np.abs(g).max()) for g in expected.values())
    for name, value in ours.items():
        reference = expected.get(name, expected.get("model.embed_tokens.weight"))
        # per tensor, plus a floor for gradients that are zero in exact arithmetic (key biases: softmax
        # ignores a constant added to every score of a query)
        atol = 2e-5 * float(np.abs(reference).max()) + 1e-6 * overall
        np.testing.assert_allclose(value, reference, rtol=0, atol=atol, err_msg=name)


@pytest.mark.parametrize("variant", ["gpt2", "opt_post_ln_project", "llama_linear_rope_bias_headdim", "smollm2_tied"])
def test_bfloat16_compute_gradients_follow_torch_through_bfloat16_dots(variant, tmp_path):
    """Mixed precision (float32 parameters, bfloat16 compute): every parameter's gradient is torch autograd's
    float32 one to bfloat16 accuracy, and every matmul by a weight in the gradient program (the dots without
    batch dimensions; attention's are XLA's own), backward included, takes bfloat16 operands and accumulates
    in float32: XLA:CPU runs that on its bfloat16 kernels, ~3x faster than the float32 dot it makes of a
    bf16 -> bf16 dot or that autodiff makes of a float32-accumulated one (transformer._dot). Families: plain
    MLP with biases (GPT-2), the projected post-norm OPT, a gated MLP with biases, tied embeddings (SmolLM2)."""
    types = _bfloat16_gradients_and_weight_dots(variant, tmp_path)
    slow = [t for t in types if t.split("->")[0].count("bf16>") != 2 or not t.split("->")[1].strip().endswith("f32>")]
    assert types and not slow, slow


@pytest.mark.parametrize("variant", ["gpt2", "smollm2_tied"])
def test_bfloat16_gradients_off_cpu_keep_the_unembedding_backward_in_bfloat16(variant, tmp_path, monkeypatch):
    """The GPU/TPU path of the same mixed-precision model (XLA's bf16 dots, jax.nn.dot_product_attention;
    forced here): gradients still follow torch to bfloat16 accuracy, and no dot by a weight in the gradient
    program takes float32 operands. The unembedding's float32 logits would otherwise hand their float32
    cotangent to both backward products ([rows, V] x [V, E] and its transpose: on a GPU TF32 matmuls over a
    float32 [rows, V] array; bench/gpu_hlo.py)."""
    from minillm_jax.models import transformer

    monkeypatch.setattr(transformer, "_cpu_low_precision", lambda dtype: False)
    monkeypatch.setattr(transformer, "_explicit_attention", lambda: False)
    types = _bfloat16_gradients_and_weight_dots(variant, tmp_path)
    wide = [t for t in types if t.split("->")[0].count("f32>") == 2]
    assert types and not wide, wide


@pytest.mark.parametrize("variant", ["gpt2", "opt_post_ln_project", "mistral_sliding_window"])
def test_unrolled_layers_match_torch_autograd(variant, tmp_path):
    """ModelConfig.scan_layers False (--config.scan_layers=False): logits and every parameter's gradient are
    torch's as with the layer loop, and the gradient program has no loop left (the layers are inlined, their
    per-layer sliding windows and the post-norm blocks included)."""
    import jax.numpy as jnp
    from flax import nnx

    ids, mask, weights, expected = _torch_gradients(variant, tmp_path / "hf")
    model = load_pretrained(tmp_path / "hf")
    model.config = model.config.replace(scan_layers=False)
    assert max_diff_on_real(np.asarray(model(ids, mask)), hf_logits(build_hf_model(variant), ids, mask), mask) <= 1e-4
    _assert_gradients_are_torchs(model, ids, mask, weights, expected, tmp_path)
    graphdef, params = nnx.split(model, nnx.Param)
    program = jax.jit(jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(ids, mask) * weights))).lower(params).as_text()
    assert "stablehlo.while" not in program


@pytest.mark.parametrize("variant", ["gpt2", "smollm2_tied"])
def test_the_backward_pass_keeps_no_float32_activations(variant, tmp_path, capsys):
    """bfloat16 compute: of what the forward pass keeps for the backward pass, nothing is a float32 array of
    the activations' shape. The norms compute in float32, and autodiff through them would keep two such
    arrays a norm (the centred input and the normalised values: on a GPT-2 124M step, 4 of a layer's ~14 saved
    arrays and 40% of their bytes); they keep their bfloat16 input and two float32 numbers a row instead. Their
    gradients are torch's: the tests above, LayerNorm, RMSNorm and OPT's post-norm included."""
    import jax.ad_checkpoint
    import jax.numpy as jnp
    from flax import nnx

    hf_model = build_hf_model(variant)
    hf_model.save_pretrained(tmp_path)
    ids, mask = left_padded_batch(hf_model.config.vocab_size, length=12)
    model = load_pretrained(tmp_path, compute_dtype="bfloat16")
    graphdef, params = nnx.split(model, nnx.Param)
    width = model.config.hidden_size
    jax.ad_checkpoint.print_saved_residuals(lambda p: jnp.sum(nnx.merge(graphdef, p)(ids, mask)), params)
    saved = capsys.readouterr().out.splitlines()
    activations = [line for line in saved if line.startswith("bf16[") and f"{ids.shape[0]},12,{width}]" in line]
    wide = [line for line in saved if line.startswith("f32[") and f"{ids.shape[0]},12,{width}]" in line]
    assert activations and not wide, wide


def _bfloat16_gradients_and_weight_dots(variant: str, tmp_path) -> list[str]:
    """Mixed precision (float32 parameters, bfloat16 compute): asserts every parameter's gradient is torch
    autograd's float32 one to bfloat16 accuracy, and returns the types of the dots by a weight (no batch
    dimensions) in the gradient program, e.g. " (tensor<..xbf16>, tensor<..xbf16>) -> tensor<..xf32>"."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from safetensors.numpy import load_file

    ids, mask, weights, expected = _torch_gradients(variant, tmp_path / "hf")

    model = load_pretrained(tmp_path / "hf", compute_dtype="bfloat16")
    assert model.layers["q_proj"][...].dtype == np.float32

    def loss(m):
        return jnp.sum(m(ids, mask) * weights)

    grads = nnx.grad(loss)(model)
    graphdef, params = nnx.split(model, nnx.Param)
    assert all(g.dtype == np.float32 for g in jax.tree.leaves(grads))
    save_pretrained(nnx.merge(graphdef, grads), tmp_path / "grads")
    ours = load_file(tmp_path / "grads" / "model.safetensors")
    assert len(ours) >= len(expected) - 1
    overall = max(float(np.linalg.norm(g)) for g in expected.values())
    for name, value in ours.items():
        reference = expected.get(name, expected.get("model.embed_tokens.weight"))
        error = float(np.linalg.norm(value - reference))
        # bf16 accuracy: autodiff of plain bf16 einsums is off by as much (up to 4.7%, OPT's post-norm fc1)
        assert error <= 0.06 * float(np.linalg.norm(reference)) + 1e-3 * overall, (name, error)

    program = jax.jit(jax.grad(lambda p: loss(nnx.merge(graphdef, p)))).lower(params).as_text()
    dots = [line for line in program.splitlines() if "stablehlo.dot_general" in line and "batching_dims" not in line]
    return [line.split(":")[-1] for line in dots]


@pytest.mark.parametrize("attention", ["xla", "cudnn"])
@pytest.mark.parametrize("variant", ["mistral_sliding_window", "gpt2"])
def test_dot_product_attention_path_matches_transformers(variant, attention, tmp_path, monkeypatch):
    """Attention off CPU goes through jax.nn.dot_product_attention (on CPU through the explicit softmax
    attention the other parity tests cover): forced here, the logits still match transformers (GQA with
    sliding windows and left padding; GPT-2's multi-head attention). With ModelConfig.attention "cudnn" the
    model asks for cuDNN first; a refusal at trace time (what jax raises for shapes or dtypes cuDNN lacks,
    stood in for here: this CPU has no cuDNN) is a warning and XLA's attention, with the same logits."""
    import warnings

    from minillm_jax.models import transformer

    asked = []
    real = jax.nn.dot_product_attention

    def dot_product_attention(*args, implementation=None, **kwargs):
        asked.append(implementation)
        if implementation == "cudnn":
            raise NotImplementedError("stand-in: cuDNN refuses")
        return real(*args, implementation=implementation, **kwargs)

    monkeypatch.setattr(transformer, "_explicit_attention", lambda: False)
    monkeypatch.setattr(jax.nn, "dot_product_attention", dot_product_attention)
    hf_model = build_hf_model(variant)
    hf_model.save_pretrained(tmp_path / "hf")
    ids, mask = left_padded_batch(hf_model.config.vocab_size, length=12)
    expected = hf_logits(hf_model, ids, mask)
    model = load_pretrained(tmp_path / "hf")
    model.config = model.config.replace(attention=attention)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = np.asarray(model(ids, mask))
    refusals = [w for w in caught if "cuDNN refuses" in str(w.message)]
    assert asked == (["cudnn", "xla"] if attention == "cudnn" else ["xla"])  # traced once, in the layer scan
    assert len(refusals) == (attention == "cudnn")
    assert max_diff_on_real(ours, expected, mask) <= 1e-4


def test_sliding_window_matters():
    """Guard against a vacuous sliding-window test: the window must change the logits."""
    hf_model = build_hf_model("mistral_sliding_window")
    ids, mask = left_padded_batch(hf_model.config.vocab_size, length=12)
    windowed = hf_logits(hf_model, ids, mask)
    hf_model.config.sliding_window = None
    for layer in hf_model.model.layers:
        layer.self_attn.sliding_window = None
    full = hf_logits(hf_model, ids, mask)
    assert max_diff_on_real(windowed, full, mask) > 1e-3


def _word_tokenizer(size: int) -> transformers.PreTrainedTokenizerFast:
    vocab = {f"w{i}": i for i in range(size - 1)} | {"<eos>": size - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="w0")


def test_padded_vocabulary_keeps_checkpoint_shape(tmp_path):
    hf_model = build_hf_model("qwen2_tied")  # vocab_size 96 in the checkpoint
    hf_model.save_pretrained(tmp_path / "hf")
    tokenizer = _word_tokenizer(90)
    tokenizer.save_pretrained(tmp_path / "hf")

    model = load_pretrained(tmp_path / "hf")
    assert model.config.vocab_size == 96
    assert model.config.real_vocab_size == 90 == model.config.num_real_tokens
    ids, mask = left_padded_batch(90)
    assert model(ids, mask).shape[-1] == 96

    save_pretrained(model, tmp_path / "out", tokenizer=tokenizer)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 96
    again = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path / "out")
    assert again("w3 w5 w7")["input_ids"] == tokenizer("w3 w5 w7")["input_ids"] == [3, 5, 7]
    assert load_pretrained(tmp_path / "out").config.real_vocab_size == 90
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert generation.get("eos_token_id") == hf_model.config.eos_token_id


def test_sharded_safetensors_with_index(tmp_path):
    hf_model = build_hf_model("llama_gqa")
    model = load_pretrained(_save(hf_model, tmp_path / "hf"))
    save_pretrained(model, tmp_path / "sharded", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 2 and all((tmp_path / "sharded" / f).exists() for f in files)
    ids, mask = left_padded_batch(96)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sharded", attn_implementation="eager")
    assert max_diff_on_real(hf_logits(reloaded, ids, mask), hf_logits(hf_model, ids, mask), mask) <= 1e-5
    ours = load_pretrained(tmp_path / "sharded")
    assert max_diff_on_real(np.asarray(ours(ids, mask)), hf_logits(hf_model, ids, mask), mask) <= 1e-4


def test_bfloat16_load_and_export(tmp_path):
    hf_model = build_hf_model("smollm2_tied")
    path = _save(hf_model, tmp_path / "hf")
    ids, mask = left_padded_batch(96)
    model = load_pretrained(path, dtype="bfloat16")
    assert model.layers["q_proj"][...].dtype == np.dtype("bfloat16")
    logits = np.asarray(model(ids, mask))
    assert logits.dtype == np.float32
    reference = hf_logits(hf_model, ids, mask)
    scale = np.abs(reference).max()
    assert max_diff_on_real(logits, reference, mask) <= 0.05 * scale
    save_pretrained(model, tmp_path / "bf16")
    header = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert header.get("dtype", header.get("torch_dtype")) == "bfloat16"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert next(reloaded.parameters()).dtype == torch.bfloat16


def _save(hf_model, path):
    hf_model.save_pretrained(path)
    return path


def test_legacy_names_without_base_prefix(tmp_path):
    """Older hub exports (e.g. the original gpt2 checkpoints) store `h.0.attn...` without `transformer.`."""
    from safetensors.numpy import load_file, save_file

    hf_model = build_hf_model("gpt2")
    hf_model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    legacy = {name.removeprefix("transformer."): value for name, value in tensors.items()}
    legacy["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))  # old causal-mask buffer
    assert "h.0.attn.c_attn.weight" in legacy
    save_file(legacy, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ids, mask = left_padded_batch(96)
    ours = np.asarray(load_pretrained(tmp_path)(ids, mask))
    assert max_diff_on_real(ours, hf_logits(hf_model, ids, mask), mask) <= 1e-4


@pytest.mark.parametrize("variant", ["llama_gqa", "gpt2", "mistral_sliding_window"])
def test_student_from_a_subset_of_teacher_layers(variant, tmp_path):
    """Reference: the transformers model with the other layers deleted."""
    from minillm_jax.models import select_layers

    hf_model = build_hf_model(variant)
    hf_model.save_pretrained(tmp_path)
    teacher = load_pretrained(tmp_path)
    keep = [1] if teacher.config.num_layers == 2 else [0, 2]
    student = select_layers(teacher, keep)
    assert student.config.num_layers == len(keep)

    blocks = hf_model.transformer.h if variant == "gpt2" else hf_model.model.layers
    kept = torch.nn.ModuleList([blocks[i] for i in keep])
    if variant == "gpt2":
        hf_model.transformer.h = kept
    else:
        hf_model.model.layers = kept
    for new_index, layer in enumerate(kept):
        (layer.attn if variant == "gpt2" else layer.self_attn).layer_idx = new_index
    hf_model.config.num_hidden_layers = len(keep)
    if hasattr(hf_model.config, "layer_types") and hf_model.config.layer_types:
        hf_model.config.layer_types = [hf_model.config.layer_types[i] for i in keep]
    ids, mask = left_padded_batch(96)
    assert max_diff_on_real(np.asarray(student(ids, mask)), hf_logits(hf_model, ids, mask), mask) <= 1e-4
    np.testing.assert_array_equal(np.asarray(select_layers(teacher, range(teacher.config.num_layers))(ids, mask)),
                                  np.asarray(teacher(ids, mask)))
    with pytest.raises(ValueError, match="layer indices"):
        select_layers(teacher, [5])
