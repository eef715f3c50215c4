"""GGUF export checked by independent readers: transformers' GGUF loader (torch, test-only), llama.cpp's own
converter output for SmolLM2 (its metadata), our GGUF import (bit-exact round trip), and llama.cpp itself
through llama-cpp-python (slow; see bench/llamacpp.py for building it)."""

import os
import subprocess
import sys

import gguf
import jax
import numpy as np
import pytest
from flax import nnx
from hf_reference import hf_logits, left_padded_batch, max_diff_on_real

from minillm_jax.models import UnsupportedModelError, load_pretrained, load_tokenizer, select_layers
from minillm_jax.models.config import rope_inverse_frequencies
from minillm_jax.models.gguf_export import TYPES, export_gguf, export_gguf_from_hf, export_gguf_from_workdir
from minillm_jax.models.tiny import BYTE_VOCAB_SIZE, byte_tokenizer, parse_random_spec

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TEXTS = ["Hello world! How are you today?", "12345 3.14 and 1,000,000", "naïve café, 你好 🙂",
         "<|im_start|>user\nHi<|im_end|>\n", "def f(x):\n    return x  +  1\n"]

# name -> (tiny spec, overrides). transformers' GGUF loader ignores gpt2.feed_forward_length (it assumes
# 4 * n_embd), so the gpt2 model uses that width here.
FAMILIES = {
    "llama_untied_gqa": ("random:llama:kv_heads=2", {}),
    "smollm2_tied_mqa": ("random:llama:heads=4,kv_heads=1", dict(tie_word_embeddings=True, rope_theta=100000.0)),
    "qwen2_tied": ("random:qwen2:kv_heads=2", {}),
    "qwen2_untied": ("random:qwen2:kv_heads=1", dict(tie_word_embeddings=False)),
    "gpt2": ("random:gpt2:mlp=256", {}),
}


def tiny_model(family: str, seed: int = 0, **overrides):
    """Our model over the byte tokenizer, every parameter (norms, biases) perturbed so each one matters."""
    from minillm_jax.models import Transformer

    spec, changes = FAMILIES[family]
    config = parse_random_spec(spec, BYTE_VOCAB_SIZE).replace(**changes, **overrides)
    graphdef, state = nnx.split(Transformer(config, rngs=nnx.Rngs(seed)))
    keys = iter(jax.random.split(jax.random.key(seed + 1), 64))
    state = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape, x.dtype), state)
    return nnx.merge(graphdef, state)


def transformers_model(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()


def flat_params(model) -> dict:
    return {".".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def reader_fields(path) -> dict:
    reader = gguf.GGUFReader(path)
    return {key: field.contents() for key, field in reader.fields.items()}, {t.name: t for t in reader.tensors}


# ---------------------------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_transformers_reads_our_export(family, tmp_path):
    model = tiny_model(family)
    ids, mask = left_padded_batch(BYTE_VOCAB_SIZE, length=12)
    ours = np.asarray(model(ids, mask))
    for type, tolerance in (("f32", 1e-3), ("f16", 2e-2)):
        path = export_gguf(model, byte_tokenizer(), tmp_path / f"{family}-{type}.gguf", type=type)
        theirs = hf_logits(transformers_model(path), ids, mask)
        assert max_diff_on_real(theirs, ours, mask) <= tolerance, type
    fields, tensors = reader_fields(tmp_path / f"{family}-f32.gguf")
    assert ("output.weight" in tensors) is (not model.config.tie_word_embeddings)


@pytest.mark.parametrize("type", [t for t in TYPES if t not in ("f32", "f16")])
def test_quantized_layouts_read_alike(type, tmp_path):
    """transformers and our importer dequantise the same file to the same model (so every quantised tensor
    went in with the layout both readers expect), and that model is near the original."""
    model = tiny_model("llama_untied_gqa")
    path = export_gguf(model, byte_tokenizer(), tmp_path / f"m-{type}.gguf", type=type)
    ids, mask = left_padded_batch(BYTE_VOCAB_SIZE, length=12)
    ours_reloaded = np.asarray(load_pretrained(path)(ids, mask))
    assert max_diff_on_real(hf_logits(transformers_model(path), ids, mask), ours_reloaded, mask) <= 1e-3
    error = max_diff_on_real(ours_reloaded, np.asarray(model(ids, mask)), mask)
    assert error <= {"bf16": 0.05, "q8_0": 0.2}.get(type, 1.5), error
    _, tensors = reader_fields(path)
    kinds = {name: t.tensor_type.name for name, t in tensors.items()}
    low_bit = type in ("q4_0", "q4_1", "q5_0", "q5_1")
    assert kinds["blk.0.attn_q.weight"] == type.upper() and kinds["blk.0.attn_norm.weight"] == "F32"
    assert kinds["token_embd.weight"] == kinds["output.weight"] == ("Q8_0" if low_bit else type.upper())


@pytest.mark.parametrize("family", ["llama_untied_gqa", "smollm2_tied_mqa", "qwen2_tied", "qwen2_untied"])
def test_f32_round_trip_through_our_import_is_exact(family, tmp_path):
    model = tiny_model(family)
    path = export_gguf(model, byte_tokenizer(), tmp_path / "m.gguf", type="f32")
    again = load_pretrained(path)
    original, reloaded = flat_params(model), flat_params(again)
    assert set(original) == set(reloaded)
    for name, value in original.items():
        np.testing.assert_array_equal(reloaded[name], value, err_msg=name)
    c, r = model.config, again.config
    assert (r.model_type, r.num_layers, r.num_heads, r.num_kv_heads, r.tie_word_embeddings) == \
        (c.model_type, c.num_layers, c.num_heads, c.num_kv_heads, c.tie_word_embeddings)
    assert r.rope_theta == c.rope_theta and r.max_position_embeddings == c.max_position_embeddings
    tokenizer = load_tokenizer(path)
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == byte_tokenizer()(text)["input_ids"], text
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == \
        byte_tokenizer().apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


@pytest.mark.parametrize("scaling", [
    (("factor", 4.0), ("rope_type", "linear")),
    # wavelengths 2*pi*10000**(i/8) put two frequencies in llama3's smoothed band (500, 2000), as our import needs
    (("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
     ("original_max_position_embeddings", 2000), ("rope_type", "llama3"))])
def test_rope_scaling_survives_the_round_trip(scaling, tmp_path):
    model = tiny_model("llama_untied_gqa", rope_scaling=scaling, rope_theta=10000.0)
    path = export_gguf(model, byte_tokenizer(), tmp_path / "m.gguf", type="f32")
    again = load_pretrained(path)
    np.testing.assert_allclose(rope_inverse_frequencies(again.config), rope_inverse_frequencies(model.config),
                               rtol=1e-6)
    ids, mask = left_padded_batch(BYTE_VOCAB_SIZE, length=12)
    assert max_diff_on_real(np.asarray(again(ids, mask)), np.asarray(model(ids, mask)), mask) <= 1e-4


# ---------------------------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smollm2_cut(smollm2_gguf):
    """Four of the real SmolLM2's 30 layers (its embedding, head and tokenizer whole): a fast real model."""
    return select_layers(load_pretrained(smollm2_gguf), (0, 9, 19, 29)), load_tokenizer(smollm2_gguf)


def test_smollm2_export_matches_transformers_and_llama_cpp_metadata(smollm2_cut, smollm2_gguf, tmp_path):
    model, tokenizer = smollm2_cut
    path = export_gguf(model, tokenizer, tmp_path / "smollm2-cut.gguf", type="f32")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_dict=True)["input_ids"]
    ids = np.asarray([prompt], np.int32)
    mask = np.ones_like(ids)
    reference = transformers_model(path)
    assert max_diff_on_real(hf_logits(reference, ids, mask), np.asarray(model(ids, mask)), mask) <= 1e-3
    assert reference.config.tie_word_embeddings and reference.config.num_key_value_heads == 3

    ours, tensors = reader_fields(path)
    original, _ = reader_fields(smollm2_gguf)  # written by llama.cpp's convert_hf_to_gguf
    assert "output.weight" not in tensors and ours["llama.block_count"] == 4
    for key in ("llama.context_length", "llama.embedding_length", "llama.feed_forward_length",
                "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.freq_base",
                "llama.attention.layer_norm_rms_epsilon", "llama.rope.dimension_count", "llama.vocab_size",
                "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id",
                "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"):
        assert ours[key] == original[key], key

    again = load_tokenizer(path)
    for text in TEXTS:
        assert again(text)["input_ids"] == tokenizer(text)["input_ids"], text
    # transformers' GGUF tokenizer differs from SmolLM2's own on whitespace runs (see test_gguf.py): plain text here
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS[:4]:
        assert hf_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"], text


# ---------------------------------------------------------------------------------------------- tokenizers


def _sentencepiece_gguf(path):
    """A small SentencePiece-style vocabulary as llama.cpp stores one (byte tokens, scores, no merges)."""
    pieces = ["\u2581", "h", "e", "l", "o", "w", "r", "d", "\u2581h", "ll", "\u2581he", "\u2581hell", "\u2581hello",
              "\u2581w", "or", "\u2581wor", "ld", "\u2581world", "lo", "\u2581\u2581"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(pieces))
    writer.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(pieces))])
    for key, value in (("unknown", 0), ("bos", 1), ("eos", 2)):
        writer.add_uint32(f"tokenizer.ggml.{key}_token_id", value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return len(tokens)


def test_sentencepiece_style_tokenizer(tmp_path):
    size = _sentencepiece_gguf(tmp_path / "spm.gguf")
    source = load_tokenizer(tmp_path / "spm.gguf")
    model = tiny_model("llama_untied_gqa", vocab_size=size)
    (tmp_path / "out").mkdir()  # transformers reads every .gguf's directory: keep the source file apart
    path = export_gguf(model, source, tmp_path / "out" / "m.gguf", type="f32")
    fields, _ = reader_fields(path)
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.add_bos_token"] is True
    assert fields["tokenizer.ggml.token_type"][3] == 6 and fields["tokenizer.ggml.add_space_prefix"] is True
    ours = load_tokenizer(path)
    reference = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in ["hello world", "hello  world\nhello", "héllo wörld", " hello", "lo"]:
        expected = source(text)["input_ids"]
        assert ours(text)["input_ids"] == expected == reference(text)["input_ids"], text


def test_padded_vocabulary_gets_placeholder_tokens(tmp_path):
    model = tiny_model("qwen2_tied", vocab_size=BYTE_VOCAB_SIZE + 7)
    path = export_gguf(model, byte_tokenizer(), tmp_path / "m.gguf", type="f32")
    fields, _ = reader_fields(path)
    assert len(fields["tokenizer.ggml.tokens"]) == BYTE_VOCAB_SIZE + 7
    assert fields["tokenizer.ggml.tokens"][-1] == f"[PAD{BYTE_VOCAB_SIZE + 6}]"
    assert fields["tokenizer.ggml.token_type"][-1] == gguf.TokenType.USER_DEFINED
    assert fields["tokenizer.ggml.token_type"][256] == gguf.TokenType.CONTROL  # <|endoftext|>
    assert fields["tokenizer.ggml.pre"] == "gpt-2" and fields["tokenizer.ggml.eos_token_id"] == 256


# ---------------------------------------------------------------------------------------------- files and errors


def test_refuses_to_overwrite_and_leaves_no_partial_file(tmp_path, monkeypatch):
    model = tiny_model("qwen2_tied")
    path = export_gguf(model, byte_tokenizer(), tmp_path / "m.gguf", type="f16")
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="m.gguf exists"):
        export_gguf(model, byte_tokenizer(), path, type="f32")

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(gguf.quants, "quantize", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        export_gguf(model, byte_tokenizer(), path, type="q8_0", force=True)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    monkeypatch.undo()
    export_gguf(model, byte_tokenizer(), path, type="f32", force=True)
    assert path.stat().st_size > len(before)


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="q3_k.*f32, f16, bf16, q8_0"):
        export_gguf(tiny_model("gpt2"), byte_tokenizer(), tmp_path / "m.gguf", type="q3_k")
    opt = tiny_model("gpt2", model_type="opt", position_offset=2)
    with pytest.raises(UnsupportedModelError, match="model_type 'opt'"):
        export_gguf(opt, byte_tokenizer(), tmp_path / "m.gguf")
    windowed = tiny_model("llama_untied_gqa", sliding_windows=(4, 0))
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        export_gguf(windowed, byte_tokenizer(), tmp_path / "m.gguf")
    with pytest.raises(UnsupportedModelError, match="vocab_size is 200"):
        export_gguf(tiny_model("qwen2_tied", vocab_size=200), byte_tokenizer(), tmp_path / "m.gguf")
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        from minillm_jax.models import save_pretrained

        export_gguf_from_hf(save_pretrained(tiny_model("gpt2"), tmp_path / "hf"), tmp_path / "m.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp"))


def test_workdir_export_from_the_command_line(tmp_path):
    """A run's workdir (student/ + an Orbax checkpoint) -> `convert to-gguf --workdir` -> transformers."""
    from minillm_jax.checkpoint import Checkpointer
    from minillm_jax.models.hf import save_config
    from minillm_jax.trainers.common import create_train_state, make_optimizer

    model = tiny_model("smollm2_tied_mqa")
    save_config(model.config, tmp_path / "run" / "student")
    byte_tokenizer().save_pretrained(tmp_path / "run" / "student")
    _, state = create_train_state(model, make_optimizer(learning_rate=1e-3)[0])
    checkpoints = Checkpointer(tmp_path / "run" / "checkpoints")
    checkpoints.save(7, state, {"step": 7})
    checkpoints.wait()
    checkpoints.close()

    out = tmp_path / "student.gguf"
    command = [sys.executable, "-m", "minillm_jax.convert", "to-gguf", "--workdir", str(tmp_path / "run"),
               "--output", str(out), "--type", "f32"]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"wrote {out} (f32" in result.stdout
    ids, mask = left_padded_batch(BYTE_VOCAB_SIZE, length=12)
    assert max_diff_on_real(hf_logits(transformers_model(out), ids, mask), np.asarray(model(ids, mask)), mask) <= 1e-3

    again = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                           timeout=300)
    assert again.returncode != 0 and "exists; add --force" in again.stderr
    direct = export_gguf_from_workdir(tmp_path / "run", 7, tmp_path / "direct.gguf", type="f32")
    assert direct.read_bytes() == out.read_bytes()
