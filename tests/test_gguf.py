"""GGUF reading checked against transformers' own GGUF loader (torch, test-only) as the reference."""

import math

import gguf
import numpy as np
import pytest

from minillm_jax.models.gguf import GGUFError, iter_gguf_tensors, read_gguf_config
from minillm_jax.models.gguf_tokenizer import load_gguf_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPTS = [
    "Hello world! How are you today?",
    "12345 3.14 and 1,000,000",
    "def add(a, b):\n    return a  +  b\n\n\nclass X:\n\tpass\n",
    "naïve café, 你好世界, Здравствуй 🙂👍🏽",
    "   leading spaces\n\n\n\nand    runs   of  spaces   ",
    "I'm sure they'll say it's fine; don't you think?",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "Raw <|endoftext|> in the middle <jupyter_code>x = 1",
    "x² + ½ = ١٢٣ (non-ASCII numerals)",
    "",
]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


# ---------------------------------------------------------------------------------------------
# The real SmolLM2 file


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_reference):
    return smollm2_reference[0]


@pytest.fixture(scope="module")
def our_tokenizer(smollm2_gguf):
    # transformers' GGUF pipeline, so every prompt (odd whitespace included) must match it exactly
    return load_gguf_tokenizer(smollm2_gguf, match_original_tokenizer=False)


@pytest.fixture(scope="module")
def hf_model(smollm2_reference):
    return smollm2_reference[1]


@pytest.mark.parametrize("text", PROMPTS + ["<chat>"])
def test_tokenizer_ids_match_transformers(our_tokenizer, hf_tokenizer, text):
    if text == "<chat>":
        text = hf_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    ours, ref = our_tokenizer(text).input_ids, hf_tokenizer(text).input_ids
    assert ours == ref
    assert our_tokenizer.decode(ours) == hf_tokenizer.decode(ref) == text
    assert our_tokenizer.decode(ours, skip_special_tokens=True) == hf_tokenizer.decode(ref, skip_special_tokens=True)


def test_tokenizer_specials_and_chat_template(our_tokenizer, hf_tokenizer):
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "add_bos_token", "add_eos_token"):
        assert getattr(our_tokenizer, attr) == getattr(hf_tokenizer, attr), attr
    assert (our_tokenizer.bos_token_id, our_tokenizer.eos_token_id) == (1, 2)
    assert len(our_tokenizer) == len(hf_tokenizer) == 49152
    assert our_tokenizer.chat_template == hf_tokenizer.chat_template
    rendered = our_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert rendered == hf_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n")
    ids = our_tokenizer(rendered).input_ids
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2  # <|im_start|> / <|im_end|> whole


def test_tokenizer_original_pre_tokenizer_isolates_digits(smollm2_gguf, hf_tokenizer):
    """The default: SmolLM2's own tokenizer.json (Digits -> ByteLevel), which transformers' GGUF loader skips."""
    from tokenizers import pre_tokenizers

    original = load_gguf_tokenizer(smollm2_gguf)
    reference = hf_tokenizer.backend_tokenizer
    saved = reference.pre_tokenizer
    reference.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    try:
        for text in PROMPTS + ["a  2", "x = [1,  2,   3]"]:
            assert original(text).input_ids == reference.encode(text).ids
    finally:
        reference.pre_tokenizer = saved
    # the one visible difference: whitespace before a digit stays one run
    assert original.convert_ids_to_tokens(original("a  2").input_ids) == ["a", "\u0120\u0120", "2"]
    assert hf_tokenizer.convert_ids_to_tokens(hf_tokenizer("a  2").input_ids) == ["a", "\u0120", "\u0120", "2"]


def test_config_matches_transformers(smollm2_gguf, hf_model):
    ours, ref = read_gguf_config(smollm2_gguf), hf_model.config
    for key in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
        "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act", "attention_bias",
    ):  # fmt: skip
        assert ours[key] == getattr(ref, key), key
    assert ours["rope_parameters"] == {"rope_type": "default", "rope_theta": ref.rope_parameters["rope_theta"]}
    assert ours["model_type"] == "llama" and ours["architectures"] == ["LlamaForCausalLM"]
    assert ours["tie_word_embeddings"] is True and ours["rope_parameters"]["rope_theta"] == 100000.0
    # the dict must be a valid HF config on its own
    rebuilt = transformers.AutoConfig.for_model(**ours)
    assert rebuilt.num_key_value_heads == 3


def test_weights_match_transformers(smollm2_gguf, hf_model):
    reference = hf_model.state_dict()
    seen = set()
    for name, array in iter_gguf_tensors(smollm2_gguf):
        assert name in reference, name
        expected = reference[name].numpy()
        assert array.dtype == np.float32 and array.shape == expected.shape, name
        assert np.abs(array - expected).max() <= 1e-6, name
        seen.add(name)
    # tied: lm_head is the embedding, so the file (and we) carry it once
    assert set(reference) - seen == {"lm_head.weight"}
    assert torch.equal(reference["lm_head.weight"], reference["model.embed_tokens.weight"])


def test_iter_streams(smollm2_gguf):
    """A generator that dequantises lazily, not a list of everything."""
    stream = iter_gguf_tensors(smollm2_gguf)
    name, first = next(stream)
    assert name == "model.embed_tokens.weight" and first.shape == (49152, 576)
    assert first.flags.writeable and first.flags.c_contiguous
    stream.close()


def _assert_same_as_the_package_reader(path):
    """Our reader (a plain view of the map) against the `gguf` package's own: every field and tensor."""
    from minillm_jax.models.gguf import _reader

    ours, reference = _reader(path), gguf.GGUFReader(path)
    assert type(reference.data) is np.memmap and type(ours.data) is np.ndarray and not ours.data.flags.writeable
    assert list(ours.fields) == list(reference.fields)
    for key, field in reference.fields.items():
        assert ours.fields[key].types == field.types, key
        assert ours.fields[key].contents() == field.contents(), key
    assert [t.name for t in ours.tensors] == [t.name for t in reference.tensors]
    for mine, theirs in zip(ours.tensors, reference.tensors):
        assert (mine.tensor_type, mine.shape.tolist(), mine.data_offset) == \
            (theirs.tensor_type, theirs.shape.tolist(), theirs.data_offset), mine.name
        assert mine.data.dtype == theirs.data.dtype and np.array_equal(mine.data, theirs.data), mine.name


def test_reader_reads_what_the_gguf_package_reads(smollm2_gguf):
    _assert_same_as_the_package_reader(smollm2_gguf)


def test_loading_a_model_parses_its_file_once(smollm2_gguf, monkeypatch):
    from minillm_jax.models import gguf as ours
    from minillm_jax.models import load_pretrained

    parsed = []
    reader = ours._reader
    monkeypatch.setattr(ours, "_reader", lambda path: parsed.append(path) or reader(path))
    model = load_pretrained(smollm2_gguf)
    assert model.config.num_layers == 30 and len(parsed) == 1


# ---------------------------------------------------------------------------------------------
# Small synthetic files: qwen2 (biases, no permutation), llama (permutation round trip), llama3 rope

def _byte_alphabet():
    """GPT-2's byte -> character table, derived independently of the module under test."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    table = bytes_to_unicode()
    return [table[b] for b in range(256)]


def _gpt2_vocab():
    merges = ["h e", "l l", "he ll", "hell o", "\u0120 w", "o r", "\u0120w or", "l d", "\u0120wor ld", "\u0120 hello"]
    tokens = _byte_alphabet() + ["he", "ll", "hell", "hello", "\u0120w", "or", "\u0120wor", "ld", "\u0120world"]
    tokens += ["\u0120hello", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>"]
    types = [1] * (len(tokens) - 4) + [3, 3, 3, 4]
    return tokens, types, merges


def _permute_like_llama_cpp(w, n_head):
    """convert_hf_to_gguf's Q/K permutation (HF rotate-half rows -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tiny(
    path, arch="qwen2", *, tied=False, skip_keys=(), extra_tensors=None, rope_freqs=None, theta=500000.0, tokenizer=True
):
    """Write a 2-layer model; returns the HF-layout weights (before quantisation) by HF name."""
    rng = np.random.default_rng(0)
    hidden, heads, kv_heads, inter, layers = 64, 4, 2, 96, 2
    head_dim = hidden // heads
    tokens, types, merges = _gpt2_vocab()
    vocab = len(tokens)

    writer = gguf.GGUFWriter(str(path), arch)
    keys = {
        f"{arch}.block_count": layers,
        f"{arch}.context_length": 4096,
        f"{arch}.embedding_length": hidden,
        f"{arch}.feed_forward_length": inter,
        f"{arch}.attention.head_count": heads,
        f"{arch}.attention.head_count_kv": kv_heads,
        f"{arch}.rope.dimension_count": head_dim,
    }
    for key, value in keys.items():
        if key not in skip_keys:
            writer.add_uint32(key, value)
    writer.add_float32(f"{arch}.rope.freq_base", theta)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    if tokenizer:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("qwen2")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_uint32("tokenizer.ggml.bos_token_id", vocab - 3)
        writer.add_uint32("tokenizer.ggml.eos_token_id", vocab - 2)
        template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
        writer.add_string("tokenizer.chat_template", template)
        writer.add_string("tokenizer.chat_template.tool_use", "tools:" + template)
    else:
        writer.add_uint32(f"{arch}.vocab_size", vocab)

    hf = {}
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731

    def add(gguf_name, hf_name, array, stored=None, qtype=None):
        hf[hf_name] = array
        stored = array if stored is None else stored
        if qtype is None:
            writer.add_tensor(gguf_name, stored)
        else:
            writer.add_tensor(gguf_name, gguf.quants.quantize(stored, qtype), raw_dtype=qtype)

    q8 = gguf.GGMLQuantizationType.Q8_0
    add("token_embd.weight", "model.embed_tokens.weight", f32(vocab, hidden), qtype=q8)
    add("output_norm.weight", "model.norm.weight", f32(hidden))
    if not tied:
        add("output.weight", "lm_head.weight", f32(vocab, hidden))
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    for i in range(layers):
        q, k = f32(heads * head_dim, hidden), f32(kv_heads * head_dim, hidden)
        permute = arch == "llama"
        add(f"blk.{i}.attn_norm.weight", f"model.layers.{i}.input_layernorm.weight", f32(hidden))
        add(f"blk.{i}.attn_q.weight", f"model.layers.{i}.self_attn.q_proj.weight", q,
            _permute_like_llama_cpp(q, heads) if permute else q)  # fmt: skip
        add(f"blk.{i}.attn_k.weight", f"model.layers.{i}.self_attn.k_proj.weight", k,
            _permute_like_llama_cpp(k, kv_heads) if permute else k, qtype=q8 if i == 1 else None)  # fmt: skip
        add(f"blk.{i}.attn_v.weight", f"model.layers.{i}.self_attn.v_proj.weight", f32(kv_heads * head_dim, hidden))
        add(f"blk.{i}.attn_output.weight", f"model.layers.{i}.self_attn.o_proj.weight", f32(hidden, heads * head_dim))
        if arch == "qwen2":
            for part, hf_part, rows in (("q", "q_proj", heads), ("k", "k_proj", kv_heads), ("v", "v_proj", kv_heads)):
                add(f"blk.{i}.attn_{part}.bias", f"model.layers.{i}.self_attn.{hf_part}.bias", f32(rows * head_dim))
        add(f"blk.{i}.ffn_norm.weight", f"model.layers.{i}.post_attention_layernorm.weight", f32(hidden))
        add(f"blk.{i}.ffn_gate.weight", f"model.layers.{i}.mlp.gate_proj.weight", f32(inter, hidden), qtype=q8)
        add(f"blk.{i}.ffn_up.weight", f"model.layers.{i}.mlp.up_proj.weight", f32(inter, hidden))
        add(f"blk.{i}.ffn_down.weight", f"model.layers.{i}.mlp.down_proj.weight", f32(hidden, inter))
    for name, array in (extra_tensors or {}).items():
        writer.add_tensor(name, array)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf


QUANTIZED = ("embed_tokens", "gate_proj", "layers.1.self_attn.k_proj")


@pytest.mark.parametrize("arch,tied", [("qwen2", False), ("llama", True)])
def test_tiny_weights_round_trip_and_match_transformers(tmp_path, arch, tied):
    path = tmp_path / f"tiny-{arch}.gguf"
    original = _write_tiny(path, arch, tied=tied)
    _assert_same_as_the_package_reader(path)
    ours = dict(iter_gguf_tensors(path))
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    reference = reference.state_dict()

    assert set(ours) == set(original) and set(reference) - set(ours) == ({"lm_head.weight"} if tied else set())
    for name, array in ours.items():
        assert array.shape == original[name].shape, name
        np.testing.assert_allclose(array, reference[name].numpy(), rtol=0, atol=1e-6, err_msg=name)
        if any(part in name for part in QUANTIZED):  # Q8_0: close to the original, not equal
            np.testing.assert_allclose(array, original[name], rtol=0, atol=0.05, err_msg=name)
        else:  # F32: the exact original weights, so the Q/K un-permutation is right
            np.testing.assert_array_equal(array, original[name], err_msg=name)

    config = read_gguf_config(path)
    hf_config = transformers.AutoConfig.from_pretrained(tmp_path, gguf_file=path.name)
    assert config["model_type"] == hf_config.model_type == arch
    assert config["attention_bias"] is (arch == "qwen2") and config["tie_word_embeddings"] is tied
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "rms_norm_eps", "max_position_embeddings"):  # fmt: skip
        assert config[key] == getattr(hf_config, key), key
    assert config["rope_parameters"]["rope_theta"] == hf_config.rope_parameters["rope_theta"] == 500000.0


def test_tiny_qwen2_tokenizer_matches_transformers(tmp_path):
    path = tmp_path / "tiny.gguf"
    _write_tiny(path)
    ours = load_gguf_tokenizer(path)
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    texts = ["hello world", "hello  world 123\n\nhello", "<|im_start|>hello<|im_end|>", "<think>hello world", "héllo"]
    for text in texts:
        assert ours(text).input_ids == reference(text).input_ids, text
        assert ours.decode(ours(text).input_ids) == text
    assert ours("hello world").input_ids == [259, 264]  # whole merged words
    assert ours("<|im_start|>").input_ids == [len(ours) - 3]
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == ("<|im_start|>", "<|im_end|>", None)
    rendered = "<|im_start|>What is the capital of France?<|im_end|>"
    assert ours.apply_chat_template(CHAT, tokenize=False) == rendered
    assert ours.apply_chat_template(CHAT, tokenize=False, chat_template="tool_use") == "tools:" + rendered


def _write_sentencepiece(path):
    pieces = ["\u2581", "h", "e", "l", "o", "w", "r", "d", "\u2581h", "ll", "\u2581he", "\u2581hell", "\u2581hello",
              "\u2581w", "or", "\u2581wor", "ld", "\u2581world", "lo", "\u2581\u2581"]  # fmt: skip
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores(scores)
    writer.add_uint32("tokenizer.ggml.unknown_token_id", 0)
    writer.add_uint32("tokenizer.ggml.bos_token_id", 1)
    writer.add_uint32("tokenizer.ggml.eos_token_id", 2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_sentencepiece_tokenizer_matches_transformers(tmp_path):
    path = tmp_path / "spm.gguf"
    _write_sentencepiece(path)
    ours = load_gguf_tokenizer(path)
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in ["hello world", "hello  world\nhello", "héllo wörld", "<s>hello</s>", " hello", "lo"]:
        ids = ours(text).input_ids
        assert ids == reference(text).input_ids, text
        assert ours.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)
    assert ours("hello world").input_ids == [1, 271, 276]  # BOS added, whole words via derived merges
    assert ours("é").input_ids == [1, 259, 3 + 0xC3, 3 + 0xA9]  # "▁" then byte fallback
    assert ours.decode(ours("héllo wörld").input_ids, skip_special_tokens=True) == "héllo wörld"


def test_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path):
    """rope_freqs.weight (llama.cpp's per-frequency divisors) -> HF "llama3" parameters."""
    head_dim, theta = 16, 10000.0  # wavelengths 2*pi*10000**(i/8): 6.3, 19.9, 62.8, 199, 628, 1987, 6283, ...
    factor, low, high, old_len = 8.0, 1.0, 4.0, 2000  # so two of them land in the smoothed band (500, 2000)
    inv = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    divisors = []
    for freq in inv:  # as convert_hf_to_gguf computes them
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high:
            divisors.append(1.0)
        elif wavelen > old_len / low:
            divisors.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    divisors = np.array(divisors)
    assert (divisors == 1).any() and (divisors == factor).any() and ((divisors > 1) & (divisors < factor)).sum() >= 2

    path = tmp_path / "llama3.gguf"
    _write_tiny(path, "llama", rope_freqs=divisors, theta=theta)
    params = read_gguf_config(path)["rope_parameters"]
    assert params["rope_type"] == "llama3" and params["original_max_position_embeddings"] == old_len
    assert params["factor"] == pytest.approx(factor) and params["high_freq_factor"] == pytest.approx(high)

    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=head_dim, rope_parameters=params)
    hf_inv, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    np.testing.assert_allclose(hf_inv.double().numpy(), inv / divisors, rtol=1e-5)
    assert "rope_freqs.weight" not in dict(iter_gguf_tensors(path))


# ---------------------------------------------------------------------------------------------
# Errors


READERS = [read_gguf_config, iter_gguf_tensors, load_gguf_tokenizer]


@pytest.mark.parametrize("reader", READERS, ids=lambda f: f.__name__)
def test_missing_file(tmp_path, reader):
    with pytest.raises(GGUFError, match="no-such-model.gguf.*no such GGUF file"):
        reader(tmp_path / "no-such-model.gguf")


@pytest.mark.parametrize("reader", READERS, ids=lambda f: f.__name__)
def test_truncated_file(tmp_path, smollm2_gguf, reader):
    truncated = tmp_path / "cut-short.gguf"
    with open(smollm2_gguf, "rb") as source:
        truncated.write_bytes(source.read(1 << 20))
    with pytest.raises(GGUFError, match="cut-short.gguf.*truncated or corrupt"):
        reader(truncated)


def test_truncated_tensor_data_and_not_gguf(tmp_path):
    path = tmp_path / "tail-cut.gguf"
    _write_tiny(path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(GGUFError, match="tail-cut.gguf"):
        read_gguf_config(path)
    text = tmp_path / "notes.gguf"
    text.write_text("not a model")
    with pytest.raises(GGUFError, match="notes.gguf"):
        read_gguf_config(text)


def test_bad_metadata_errors_name_the_field(tmp_path):
    other = tmp_path / "phi.gguf"
    writer = gguf.GGUFWriter(str(other), "phi3")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFError, match=r"phi.gguf.*unsupported architecture 'phi3'"):
        read_gguf_config(other)

    missing = tmp_path / "no-width.gguf"
    _write_tiny(missing, "llama", skip_keys=("llama.embedding_length",), tokenizer=False)
    with pytest.raises(GGUFError, match=r"no-width.gguf.*'llama.embedding_length'"):
        read_gguf_config(missing)
    with pytest.raises(GGUFError, match=r"'tokenizer.ggml.model'"):
        load_gguf_tokenizer(missing)

    extra = tmp_path / "moe.gguf"
    _write_tiny(extra, "llama", extra_tensors={"blk.0.ffn_gate_exps.weight": np.zeros((2, 96, 64), np.float32)})
    with pytest.raises(GGUFError, match=r"moe.gguf.*unexpected tensor 'blk.0.ffn_gate_exps.weight'"):
        iter_gguf_tensors(extra)  # validated before the first tensor is yielded


def test_unsupported_tokenizer_model(tmp_path):
    path = tmp_path / "bert.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("bert")
    writer.add_token_list(["[PAD]", "[UNK]"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFError, match=r"bert.gguf.*unsupported tokenizer model 'bert'"):
        load_gguf_tokenizer(path)
