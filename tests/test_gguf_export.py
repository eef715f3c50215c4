"""GGUF export checked by independent readers: transformers' GGUF loader (torch, test-only), llama.cpp's own
converter output for SmolLM2 (its metadata), our GGUF import (bit-exact round trip), and llama.cpp itself
through llama-cpp-python (slow; see bench/llamacpp.py for building it)."""

import gguf
import jax
import numpy as np
import pytest
from flax import nnx
from hf_reference import hf_logits, left_padded_batch, max_diff_on_real

from minillm_jax.models import UnsupportedModelError, load_pretrained, load_tokenizer, select_layers
from minillm_jax.models.config import rope_inverse_frequencies
from minillm_jax.models.gguf_export import export_gguf, export_gguf_from_hf
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
def test_transformers_and_our_import_read_our_export(family, tmp_path):
    """f32 and f16 exports in transformers' GGUF loader (logits), and the f32 one back through our import:
    every parameter bit-exact and the tokenizer the same (our import reads llama and qwen2, not gpt2)."""
    model = tiny_model(family)
    ids, mask = left_padded_batch(BYTE_VOCAB_SIZE, length=12)
    ours = np.asarray(model(ids, mask))
    for type, tolerance in (("f32", 1e-3), ("f16", 2e-2)):
        path = export_gguf(model, byte_tokenizer(), tmp_path / f"{family}-{type}.gguf", type=type)
        theirs = hf_logits(transformers_model(path), ids, mask)
        assert max_diff_on_real(theirs, ours, mask) <= tolerance, type
    path = tmp_path / f"{family}-f32.gguf"
    _, tensors = reader_fields(path)
    assert ("output.weight" in tensors) is (not model.config.tie_word_embeddings)
    if family == "gpt2":
        return
    again = load_pretrained(path)
    original, reloaded = flat_params(model), flat_params(again)
    assert set(original) == set(reloaded)
    for name, value in original.items():
        np.testing.assert_array_equal(reloaded[name], value, err_msg=name)
    c, r = model.config, again.config
    assert (r.model_type, r.num_layers, r.num_heads, r.num_kv_heads, r.tie_word_embeddings, r.rope_theta,
            r.max_position_embeddings) == (c.model_type, c.num_layers, c.num_heads, c.num_kv_heads,
                                           c.tie_word_embeddings, c.rope_theta, c.max_position_embeddings)
    tokenizer, reference = load_tokenizer(path), byte_tokenizer()
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == reference(text)["input_ids"], text
    chat = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == reference.apply_chat_template(chat, tokenize=False)


def test_quantized_layouts_read_alike(tmp_path):
    """transformers and our importer dequantise the same file to the same model (so every quantised tensor
    went in with the layout both readers expect), and that model is near the original. q4_1/q5_0/q5_1 take
    q4_0's path with other block formats."""
    model = tiny_model("llama_untied_gqa")
    ids, mask = left_padded_batch(BYTE_VOCAB_SIZE, length=12)
    original = np.asarray(model(ids, mask))
    for type, bound in (("bf16", 0.05), ("q8_0", 0.2), ("q4_0", 1.5)):
        path = export_gguf(model, byte_tokenizer(), tmp_path / f"m-{type}.gguf", type=type)
        ours_reloaded = np.asarray(load_pretrained(path)(ids, mask))
        assert max_diff_on_real(hf_logits(transformers_model(path), ids, mask), ours_reloaded, mask) <= 1e-3, type
        assert max_diff_on_real(ours_reloaded, original, mask) <= bound, type
        _, tensors = reader_fields(path)
        kinds = {name: t.tensor_type.name for name, t in tensors.items()}
        assert kinds["blk.0.attn_q.weight"] == type.upper() and kinds["blk.0.attn_norm.weight"] == "F32"
        assert kinds["token_embd.weight"] == kinds["output.weight"] == ("Q8_0" if type == "q4_0" else type.upper())


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


@pytest.mark.slow  # >= 12 s on the 2-core machine; CI's second step
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

    # the vocabulary, merges, token types, specials and template equal llama.cpp's own conversion of SmolLM2, so
    # every GGUF reader builds the tokenizer it builds from the original file
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


def test_workdir_export_from_the_command_line(tmp_path, capsys):
    """A run's workdir (student/ + an Orbax checkpoint) -> `convert to-gguf --workdir` -> transformers."""
    from minillm_jax import convert
    from minillm_jax.checkpoint import Checkpointer
    from minillm_jax.models import save_pretrained
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
    command = ["to-gguf", "--workdir", str(tmp_path / "run"), "--output", str(out), "--type", "f32"]
    assert convert.main(command) == 0
    assert f"wrote {out} (f32" in capsys.readouterr().out
    ids, mask = left_padded_batch(BYTE_VOCAB_SIZE, length=12)
    assert max_diff_on_real(hf_logits(transformers_model(out), ids, mask), np.asarray(model(ids, mask)), mask) <= 1e-3
    with pytest.raises(SystemExit):
        convert.main(command)
    assert "exists; add --force" in capsys.readouterr().err
    hf_dir = save_pretrained(model, tmp_path / "hf", tokenizer=byte_tokenizer())
    assert convert.main(["to-gguf", "--hf", str(hf_dir), "--output", str(tmp_path / "from-hf.gguf"), "--type",
                         "f32"]) == 0
    assert (tmp_path / "from-hf.gguf").read_bytes() == out.read_bytes()  # both routes write the same file
    with pytest.raises(SystemExit):
        convert.main(["to-gguf", "--hf", str(tmp_path), "--step", "3", "--output", str(tmp_path / "x.gguf")])
    assert "--step goes with --workdir" in capsys.readouterr().err


@pytest.mark.slow  # >= 12 s on the 2-core machine; CI's second step
def test_a_run_writes_its_gguf_with_export_format_both(tmp_path):
    """export.format=both: the run's end writes hf/ and student.gguf of the same state; our GGUF import of
    the f32 file equals the HF export exactly."""
    from configs.demo import get_config
    from minillm_jax import loop
    from minillm_jax.config import RunConfig

    c = get_config("tiny")
    c.task, c.teacher, c.steps, c.eval_every, c.best_metric = "sft", "", 2, 0, ""
    c.export.format, c.export.gguf_type = "both", "f32"
    loop.run(RunConfig.from_dict(c), str(tmp_path))
    from_gguf, from_hf = load_pretrained(tmp_path / "student.gguf"), load_pretrained(tmp_path / "hf")
    for a, b in zip(jax.tree.leaves(nnx.state(from_gguf)), jax.tree.leaves(nnx.state(from_hf))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------------------------------------- llama.cpp


@pytest.mark.slow
@pytest.mark.llamacpp
def test_llama_cpp_matches_our_sampler_on_the_smollm2_student(smollm2_gguf, tmp_path):
    """llama.cpp itself (llama-cpp-python, built from source: `python bench/llamacpp.py build`) on our f32
    export of the 10-layer SmolLM2 student: the same greedy tokens as our sampler on 3 prompts, and prompt
    logits within 1e-3 with an f32 KV cache (measured 1.7e-4 to 1.9e-4, logits up to 29; bench/GGUF_RESULTS.md)."""
    import jax

    from minillm_jax.sampling import SamplingConfig, generate

    try:
        from llama_cpp import GGML_TYPE_F32, Llama
    except ImportError:
        pytest.fail("llama-cpp-python is not installed: python bench/llamacpp.py build (compiles llama.cpp)")
    tokenizer = load_tokenizer(smollm2_gguf)
    student = select_layers(load_pretrained(smollm2_gguf), (0, 3, 6, 9, 12, 15, 18, 21, 24, 29))
    path = export_gguf(student, tokenizer, tmp_path / "student.gguf", type="f32")
    llm = Llama(model_path=str(path), n_ctx=256, n_threads=2, logits_all=True, verbose=False,
                type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)  # llama.cpp's default f16 KV cache moves logits ~5e-2
    config = SamplingConfig(max_new_tokens=24, greedy=True, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    for prompt in ("What is the capital of France?", "Write a haiku about the sea.",
                   "Give three tips for staying healthy."):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_dict=True)["input_ids"]
        assert llm.tokenize(tokenizer.decode(ids).encode(), add_bos=False, special=True) == ids  # same tokenizer
        out = generate(student, [ids], config, jax.random.key(0))
        ours = [int(t) for t in np.asarray(out.tokens[0, : int(out.lengths[0])])]
        theirs = []
        for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            theirs.append(int(token))
            if token == tokenizer.eos_token_id or len(theirs) == len(ours):
                break
        assert theirs == ours, prompt
        llm.reset()
        llm.eval(ids)
        reference = np.asarray(student(np.asarray([ids], np.int32)))[0]
        np.testing.assert_allclose(np.asarray(llm.scores[: len(ids)]), reference, rtol=0, atol=1e-3, err_msg=prompt)


LLAMA_CPP_VARIANTS = {  # name -> (family, overrides): every layout the writer produces
    **{family: (family, {}) for family in FAMILIES},
    "llama_biases": ("llama_untied_gqa", dict(qkv_bias=True, out_bias=True, mlp_bias=True)),
    "llama_head_dim_32": ("llama_untied_gqa", dict(head_dim=32)),
    "llama_linear_rope": ("llama_untied_gqa", dict(rope_scaling=(("factor", 4.0), ("rope_type", "linear")))),
    "llama3_rope": ("llama_untied_gqa", dict(rope_theta=10000.0, rope_scaling=(
        ("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
        ("original_max_position_embeddings", 64), ("rope_type", "llama3")))),
    "gpt2_narrow_mlp": ("gpt2", dict(intermediate_size=96)),  # feed_forward_length that transformers ignores
}


@pytest.mark.llamacpp
@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(LLAMA_CPP_VARIANTS))
def test_llama_cpp_logits_on_tiny_models(variant, tmp_path):
    try:
        from llama_cpp import GGML_TYPE_F32, Llama
    except ImportError:
        pytest.fail("llama-cpp-python is not installed: python bench/llamacpp.py build (compiles llama.cpp)")
    family, overrides = LLAMA_CPP_VARIANTS[variant]
    model = tiny_model(family, **overrides)
    path = export_gguf(model, byte_tokenizer(), tmp_path / "m.gguf", type="f32")
    ids = list(b"Hello there! How are you doing today, my friend?")
    llm = Llama(model_path=str(path), n_ctx=64, n_threads=2, logits_all=True, verbose=False,
                type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
    llm.eval(ids)
    reference = np.asarray(model(np.asarray([ids], np.int32)))[0]
    # measured: llama/qwen2 2e-6-3e-6; gpt2 1.3e-3 (ggml's GELU reads an f16 table)
    tolerance = 5e-3 if family == "gpt2" else 1e-4
    np.testing.assert_allclose(np.asarray(llm.scores[: len(ids)]), reference, rtol=0, atol=tolerance)
