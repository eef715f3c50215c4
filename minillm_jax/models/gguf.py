"""Read a GGUF checkpoint (llama.cpp's format) in Hugging Face terms, with numpy only.

Three entry points: `read_gguf_config` (an HF `config.json` dict), `iter_gguf_tensors` (HF-named
float32 weights, one at a time) and `load_gguf_tokenizer` (a fast tokenizer). Tensors are
dequantised with the `gguf` package's numpy code, so neither torch nor transformers' GGUF loader
is needed.
"""

from __future__ import annotations

import logging
import math
import os
import pathlib
import re
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import transformers

logger = logging.getLogger(__name__)

__all__ = ["GGUFError", "read_gguf_config", "iter_gguf_tensors", "load_gguf_tokenizer"]


class GGUFError(ValueError):
    """A GGUF file that is missing, unreadable, or describes something this loader does not support."""


# GGUF architecture -> (HF model_type, HF class, has q/k/v biases)
_ARCHS = {
    "llama": ("llama", "LlamaForCausalLM", False),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", True),
}

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

_LAYER_NAME = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")

# GGUF token types (llama.cpp's llama_token_type)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4

_MISSING = object()


# ---------------------------------------------------------------------------------------------
# Opening the file


class _File:
    """An opened GGUF: metadata access that names the file and key on every error."""

    def __init__(self, path: str | os.PathLike):
        from gguf import GGUFReader

        self.path = pathlib.Path(path)
        if not self.path.exists():
            raise GGUFError(f"{self.path}: no such GGUF file")
        if not self.path.is_file():
            raise GGUFError(f"{self.path}: not a regular file, so not a GGUF file")
        try:
            self.reader = GGUFReader(self.path)
        except Exception as err:  # the reader fails in many ways (IndexError, ValueError...) on bad bytes
            raise GGUFError(
                f"{self.path}: cannot read the GGUF file (truncated or corrupt?): {type(err).__name__}: {err}"
            ) from err
        self.tensors = {tensor.name: tensor for tensor in self.reader.tensors}

    def get(self, key: str, default: Any = _MISSING) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            if default is _MISSING:
                raise GGUFError(f"{self.path}: required metadata key {key!r} is missing")
            return default
        try:
            return field.contents()
        except Exception as err:  # e.g. a string field that is not valid UTF-8
            raise GGUFError(f"{self.path}: cannot decode metadata key {key!r}: {err}") from err

    def get_int(self, key: str, default: Any = _MISSING) -> Any:
        value = self.get(key, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise GGUFError(f"{self.path}: metadata key {key!r} should be an integer, got {value!r}")
        return value

    def get_float(self, key: str, default: Any = _MISSING) -> Any:
        value = self.get(key, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise GGUFError(f"{self.path}: metadata key {key!r} should be a number, got {value!r}")
        return float(value)

    def hf_shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape in numpy/HF order (GGUF lists dimensions fastest-moving first)."""
        return tuple(int(n) for n in reversed(self.tensors[name].shape.tolist()))

    def dequantize(self, name: str) -> np.ndarray:
        """One tensor as a fresh float32 array in HF layout."""
        from gguf.quants import dequantize

        tensor = self.tensors[name]
        try:
            values = dequantize(tensor.data, tensor.tensor_type)
        except Exception as err:
            raise GGUFError(
                f"{self.path}: cannot dequantize tensor {name!r} of type {tensor.tensor_type.name}: {err}"
            ) from err
        # copy: F32 tensors come back as views of the file's memory map
        return np.array(values, dtype=np.float32, copy=True).reshape(self.hf_shape(name))


# ---------------------------------------------------------------------------------------------
# Config


def read_gguf_config(path: str | os.PathLike) -> dict:
    """An HF `config.json` dict (model_type "llama" or "qwen2") for the GGUF file at `path`."""
    return _config(_File(path))


def _config(g: _File) -> dict:
    arch = g.get("general.architecture")
    if arch not in _ARCHS:
        raise GGUFError(
            f"{g.path}: unsupported architecture {arch!r} (general.architecture); supported: {sorted(_ARCHS)}"
        )
    model_type, hf_class, qkv_bias = _ARCHS[arch]

    if g.get_int(f"{arch}.expert_count", 0) > 0:
        raise GGUFError(f"{g.path}: mixture-of-experts models ({arch}.expert_count > 0) are not supported")

    hidden = g.get_int(f"{arch}.embedding_length")
    for key in (f"{arch}.attention.head_count", f"{arch}.attention.head_count_kv"):
        if isinstance(g.get(key, None), list):
            raise GGUFError(f"{g.path}: per-layer head counts ({key}) are not supported")
    heads = g.get_int(f"{arch}.attention.head_count")
    kv_heads = g.get_int(f"{arch}.attention.head_count_kv", heads)
    if heads <= 0 or kv_heads <= 0 or heads % kv_heads:
        raise GGUFError(
            f"{g.path}: {arch}.attention.head_count={heads} is not a positive multiple of "
            f"{arch}.attention.head_count_kv={kv_heads}"
        )
    if f"{arch}.attention.key_length" in g.reader.fields:
        head_dim = g.get_int(f"{arch}.attention.key_length")
    elif hidden % heads:
        raise GGUFError(f"{g.path}: {arch}.embedding_length={hidden} is not divisible by head_count={heads}")
    else:
        head_dim = hidden // heads
    value_dim = g.get_int(f"{arch}.attention.value_length", head_dim)
    if value_dim != head_dim:
        raise GGUFError(f"{g.path}: {arch}.attention.value_length={value_dim} differs from key_length={head_dim}")
    rope_dim = g.get_int(f"{arch}.rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise GGUFError(
            f"{g.path}: partial rotary embeddings ({arch}.rope.dimension_count={rope_dim}, head_dim={head_dim}) "
            "are not supported"
        )

    config = {
        "model_type": model_type,
        "architectures": [hf_class],
        "vocab_size": _vocab_size(g, arch),
        "hidden_size": hidden,
        "intermediate_size": g.get_int(f"{arch}.feed_forward_length"),
        "num_hidden_layers": g.get_int(f"{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": g.get_int(f"{arch}.context_length"),
        "rms_norm_eps": g.get_float(f"{arch}.attention.layer_norm_rms_epsilon"),
        "rope_parameters": _rope_parameters(g, arch, head_dim),
        # llama.cpp writes output.weight only when it is not the embedding matrix
        "tie_word_embeddings": "output.weight" not in g.tensors,
        "bos_token_id": g.get_int("tokenizer.ggml.bos_token_id", None),
        "eos_token_id": g.get_int("tokenizer.ggml.eos_token_id", None),
        "pad_token_id": g.get_int("tokenizer.ggml.padding_token_id", None),
        "hidden_act": "silu",
        "attention_bias": qkv_bias,
        "torch_dtype": "float32",
    }
    if model_type == "llama":
        config["mlp_bias"] = False
    return config


def _vocab_size(g: _File, arch: str) -> int:
    # the embedding's row count is what the weights need; the token list and key are fallbacks
    if "token_embd.weight" in g.tensors:
        return g.hf_shape("token_embd.weight")[0]
    if "tokenizer.ggml.tokens" in g.reader.fields:
        return len(g.reader.fields["tokenizer.ggml.tokens"].data)
    return g.get_int(f"{arch}.vocab_size")


def _rope_parameters(g: _File, arch: str, head_dim: int) -> dict:
    """HF `rope_parameters` from `{arch}.rope.*` keys and, for Llama 3 scaling, `rope_freqs.weight`."""
    theta = g.get_float(f"{arch}.rope.freq_base", 10000.0)  # llama.cpp's default base
    prefix = f"{arch}.rope.scaling."
    scaling = {key[len(prefix):]: g.get(key) for key in g.reader.fields if key.startswith(prefix)}
    scaling.pop("finetuned", None)  # informational only
    kind = scaling.pop("type", "none" if not scaling else None)
    if kind is None:
        raise GGUFError(f"{g.path}: {prefix}* keys are present but {prefix}type is missing")

    if kind == "none":
        params = {"rope_type": "default", "rope_theta": theta}
    elif kind == "linear":
        params = {"rope_type": "linear", "rope_theta": theta, "factor": _scaling_float(g, prefix, scaling, "factor")}
    elif kind == "yarn":
        params = {
            "rope_type": "yarn",
            "rope_theta": theta,
            "factor": _scaling_float(g, prefix, scaling, "factor"),
            "original_max_position_embeddings": int(_scaling_float(g, prefix, scaling, "original_context_length")),
        }
        for gguf_key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if gguf_key in scaling:
                params[hf_key] = _scaling_float(g, prefix, scaling, gguf_key)
        # llama.cpp's attn_factor multiplies YaRN's own scale; only the neutral value maps cleanly
        if "attn_factor" in scaling and _scaling_float(g, prefix, scaling, "attn_factor") != 1.0:
            raise GGUFError(f"{g.path}: {prefix}attn_factor other than 1.0 is not supported")
    else:
        raise GGUFError(f"{g.path}: unsupported rope scaling type {kind!r} ({prefix}type)")
    if scaling:
        unknown = sorted(prefix + key for key in scaling)
        raise GGUFError(f"{g.path}: unsupported rope scaling key(s) for type {kind!r}: {unknown}")

    if "rope_freqs.weight" in g.tensors:
        if params["rope_type"] != "default":
            raise GGUFError(f"{g.path}: rope_freqs.weight together with {prefix}type={kind!r} is not supported")
        params = _llama3_from_rope_freqs(g, theta, head_dim)
    return params


def _scaling_float(g: _File, prefix: str, scaling: dict, key: str) -> float:
    if key not in scaling:
        raise GGUFError(f"{g.path}: required metadata key {prefix + key!r} is missing")
    value = scaling.pop(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise GGUFError(f"{g.path}: metadata key {prefix + key!r} should be a number, got {value!r}")
    return float(value)


def _llama3_inv_freq(theta: float, dim: int, params: dict) -> np.ndarray:
    """HF's "llama3" rope frequencies, in float64."""
    inv = theta ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
    wavelen = 2 * math.pi / inv
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    old_len = params["original_max_position_embeddings"]
    smooth = np.clip((old_len / wavelen - low) / (high - low), 0.0, 1.0)
    return inv * ((1 - smooth) / factor + smooth)


def _llama3_from_rope_freqs(g: _File, theta: float, head_dim: int) -> dict:
    """Recover HF "llama3" rope parameters from the per-frequency divisors llama.cpp stores.

    llama.cpp divides frequency i by rope_freqs[i] = 1 / ((1 - s_i) / factor + s_i), with
    s_i = (L / wavelen_i - low) / (high - low) clipped to [0, 1]. Only L / (high - low) and
    low / (high - low) are observable, so low_freq_factor is pinned to 1 (Llama 3.x's value) and the
    rest solved for; any choice with the same two ratios gives identical frequencies.
    """
    name = "rope_freqs.weight"
    divisors = g.dequantize(name).astype(np.float64).reshape(-1)
    if divisors.shape != (head_dim // 2,):
        raise GGUFError(
            f"{g.path}: tensor {name!r} has {divisors.size} entries, expected head_dim/2={head_dim // 2}"
        )
    if np.allclose(divisors, 1.0):
        return {"rope_type": "default", "rope_theta": theta}
    factor = float(divisors.max())
    inv = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    smooth = (1 / divisors - 1 / factor) / (1 - 1 / factor)
    between = (divisors > 1 + 1e-5) & (divisors < factor * (1 - 1e-5))
    if factor <= 1 or between.sum() < 2:
        raise GGUFError(f"{g.path}: tensor {name!r} does not look like Llama 3 rope scaling")
    slope, intercept = np.polyfit(inv[between] / (2 * math.pi), smooth[between], 1)
    if slope <= 0 or intercept >= 0:
        raise GGUFError(f"{g.path}: tensor {name!r} does not look like Llama 3 rope scaling")
    old_len = int(round(-slope / intercept))
    span = old_len / slope  # high - low
    low = -intercept * span
    params = {
        "rope_type": "llama3",
        "rope_theta": theta,
        "factor": round(factor, 6),
        "low_freq_factor": round(low, 6),
        "high_freq_factor": round(low + span, 6),
        "original_max_position_embeddings": old_len,
    }
    if not np.allclose(_llama3_inv_freq(theta, head_dim, params), inv / divisors, rtol=1e-4, atol=0):
        raise GGUFError(f"{g.path}: tensor {name!r} does not match any Llama 3 rope scaling")
    return params


# ---------------------------------------------------------------------------------------------
# Tensors


def iter_gguf_tensors(path: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
    """Yield `(hf_name, float32 array in HF layout)` for every weight, one tensor at a time.

    The file is validated (names, shapes, missing tensors) before anything is yielded; each array
    is dequantised only when its turn comes, so at most one lives here at a time.
    """
    g = _File(path)
    config = _config(g)
    plan = _tensor_plan(g, config)
    return _stream(g, plan)


class GGUFTensors:
    """Random access to a GGUF file's weights under their HF names, each dequantised when asked for."""

    def __init__(self, path: str | os.PathLike):
        self._file = _File(path)
        plan = _tensor_plan(self._file, _config(self._file))
        self._plan = {hf_name: (gguf_name, transform) for gguf_name, hf_name, transform in plan}

    def names(self) -> list[str]:
        return list(self._plan)

    def get(self, hf_name: str) -> np.ndarray:
        gguf_name, transform = self._plan[hf_name]
        array = self._file.dequantize(gguf_name)
        return transform(array) if transform is not None else array


def _stream(g: _File, plan: list[tuple[str, str, Callable | None]]) -> Iterator[tuple[str, np.ndarray]]:
    for gguf_name, hf_name, transform in plan:
        array = g.dequantize(gguf_name)
        yield hf_name, (transform(array) if transform is not None else array)


def _unpermute(n_head: int) -> Callable[[np.ndarray], np.ndarray]:
    """Undo convert_hf_to_gguf's Q/K row permutation (rotate-half pairs -> interleaved pairs)."""

    def apply(w: np.ndarray) -> np.ndarray:
        # llama.cpp stored rows per head as (head_dim/2, 2); HF wants (2, head_dim/2)
        rest = w.shape[1:]
        return np.ascontiguousarray(w.reshape(n_head, -1, 2, *rest).swapaxes(1, 2).reshape(w.shape))

    return apply


def _tensor_plan(g: _File, config: dict) -> list[tuple[str, str, Callable | None]]:
    """`[(gguf_name, hf_name, transform)]` in file order, after checking names and shapes."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads, head_dim = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    layers, vocab = config["num_hidden_layers"], config["vocab_size"]
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    permuted = config["model_type"] == "llama"  # llama.cpp permutes Q/K for llama only, not qwen2

    expected = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
    }
    if not config["tie_word_embeddings"]:
        expected["lm_head.weight"] = (vocab, hidden)
    per_layer = {
        "input_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (q_dim, hidden),
        "self_attn.k_proj.weight": (kv_dim, hidden),
        "self_attn.v_proj.weight": (kv_dim, hidden),
        "self_attn.o_proj.weight": (hidden, q_dim),
        "post_attention_layernorm.weight": (hidden,),
        "mlp.gate_proj.weight": (inter, hidden),
        "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
    }
    if config["attention_bias"]:
        per_layer |= {
            "self_attn.q_proj.bias": (q_dim,),
            "self_attn.k_proj.bias": (kv_dim,),
            "self_attn.v_proj.bias": (kv_dim,),
        }
    for i in range(layers):
        expected |= {f"model.layers.{i}.{key}": shape for key, shape in per_layer.items()}

    plan = []
    for gguf_name in g.tensors:
        if gguf_name == "rope_freqs.weight":
            continue  # folded into rope_parameters by read_gguf_config
        hf_name = _hf_name(gguf_name)
        if hf_name is None or hf_name not in expected:
            raise GGUFError(f"{g.path}: unexpected tensor {gguf_name!r} for a {config['model_type']} model")
        if g.hf_shape(gguf_name) != expected[hf_name]:
            raise GGUFError(
                f"{g.path}: tensor {gguf_name!r} has shape {g.hf_shape(gguf_name)} (HF order), "
                f"expected {expected[hf_name]} for {hf_name}"
            )
        transform = None
        if permuted and ".attn_q." in gguf_name:
            transform = _unpermute(heads)
        elif permuted and ".attn_k." in gguf_name:
            transform = _unpermute(kv_heads)
        plan.append((gguf_name, hf_name, transform))

    missing = sorted(set(expected) - {hf_name for _, hf_name, _ in plan})
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise GGUFError(f"{g.path}: missing tensor(s) for {shown}")
    return plan


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    match = _LAYER_NAME.fullmatch(gguf_name)
    if match is None or match.group(2) not in _LAYER_TENSORS:
        return None
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_LAYER_TENSORS[part]}.{kind}"


# ---------------------------------------------------------------------------------------------
# Tokenizer

_GPT2_DEFAULT_PRES = {None, "default", "gpt-2", "gpt2"}
_DIGIT_SPLIT_PRES = {"smollm", "starcoder"}  # GPT-2 regex after isolating every digit
_LLAMA3_PRES = {"llama3", "llama-bpe", "llama-v3", "smaug-bpe", "falcon3"}
_QWEN2_PRES = {"qwen2", "deepseek-r1-qwen"}

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def load_gguf_tokenizer(
    path: str | os.PathLike, *, match_original_tokenizer: bool = True
) -> "transformers.PreTrainedTokenizerFast":
    """The fast tokenizer the GGUF file describes: vocabulary, merges, specials and chat template.

    By default the pre-tokenizer is the model's original tokenizer.json pipeline (what it was trained
    on): digits isolated for tokenizer.ggml.pre "smollm"/"starcoder" (as llama.cpp also does), NFC for
    "qwen2", ignore_merges for Llama 3. `match_original_tokenizer=False` gives the pipeline that
    transformers' own GGUF loader builds instead (`AutoTokenizer.from_pretrained(..., gguf_file=...)`).
    The two differ only on rare inputs (e.g. SmolLM2 on "a  2": whitespace before a digit).
    """
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    g = _File(path)
    model = g.get("tokenizer.ggml.model")
    tokens = g.get("tokenizer.ggml.tokens")
    types = g.get("tokenizer.ggml.token_type", None)
    if types is not None and len(types) != len(tokens):
        raise GGUFError(
            f"{g.path}: tokenizer.ggml.token_type has {len(types)} entries "
            f"but tokenizer.ggml.tokens has {len(tokens)}"
        )
    types = types or [_NORMAL] * len(tokens)

    if model == "gpt2":
        backend, keepable = _byte_level_backend(g, tokens, match_original_tokenizer)
        add_bos_default = False
    elif model == "llama":
        backend, keepable = _sentencepiece_backend(g, tokens, types)
        add_bos_default = True  # llama.cpp adds BOS for SentencePiece vocabularies that do not say
    else:
        raise GGUFError(
            f"{g.path}: unsupported tokenizer model {model!r} (tokenizer.ggml.model); supported: gpt2, llama"
        )

    # control tokens must stay whole and count as special; user-defined ones stay whole only
    added = [
        AddedToken(token, special=kind != _USER_DEFINED, normalized=False)
        for token, kind in zip(tokens, types)
        if kind in (_CONTROL, _UNKNOWN, _USER_DEFINED) and keepable(token)
    ]
    backend.add_tokens(added)

    specials = {}
    for role, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        token_id = g.get_int(f"tokenizer.ggml.{key}_token_id", None)
        if token_id is None:
            continue
        if not 0 <= token_id < len(tokens):
            raise GGUFError(f"{g.path}: tokenizer.ggml.{key}_token_id={token_id} is outside the vocabulary")
        specials[f"{role}_token"] = tokens[token_id]

    kwargs = dict(
        tokenizer_object=backend,
        add_bos_token=bool(g.get("tokenizer.ggml.add_bos_token", add_bos_default)),
        add_eos_token=bool(g.get("tokenizer.ggml.add_eos_token", False)),
        clean_up_tokenization_spaces=False,
        **specials,
    )
    chat_template = _chat_template(g)
    if chat_template is not None:
        kwargs["chat_template"] = chat_template
    arch = g.get("general.architecture", None)
    if arch is not None and f"{arch}.context_length" in g.reader.fields:
        kwargs["model_max_length"] = g.get_int(f"{arch}.context_length")
    return PreTrainedTokenizerFast(**kwargs)


def _chat_template(g: _File) -> str | dict | None:
    default = g.get("tokenizer.chat_template", None)
    prefix = "tokenizer.chat_template."
    named = {key[len(prefix):]: g.get(key) for key in g.reader.fields if key.startswith(prefix)}
    if not named:
        return default
    if default is not None:
        named["default"] = default
    return named


def _byte_level_backend(g: _File, tokens: list[str], original: bool):
    """Byte-level BPE (GPT-2 style) with the pre-tokenizer `tokenizer.ggml.pre` names."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers

    spelling = _byte_spelling()
    alphabet = set(spelling.values())
    vocab = {}
    for index, token in enumerate(tokens):
        # added tokens are stored as raw text; the BPE model wants the byte-level spelling
        key = token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8"))
        vocab.setdefault(key, index)
    merges = _merges(g)

    pre = g.get("tokenizer.ggml.pre", None)
    backend = Tokenizer(
        _bpe(
            g,
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            ignore_merges=original and pre in _LLAMA3_PRES,  # Llama 3's tokenizer.json looks words up whole first
        )
    )
    if pre in _LLAMA3_PRES or pre in _QWEN2_PRES:
        split = _LLAMA3_SPLIT if pre in _LLAMA3_PRES else _QWEN2_SPLIT
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        if original and pre in _QWEN2_PRES:
            backend.normalizer = normalizers.NFC()  # as in Qwen2's tokenizer.json
    elif original and pre in _DIGIT_SPLIT_PRES:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    else:
        if pre not in _GPT2_DEFAULT_PRES | _DIGIT_SPLIT_PRES:
            logger.warning("%s: unknown tokenizer.ggml.pre %r; using the GPT-2 pre-tokenizer", g.path, pre)
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # a raw-text token outside the byte alphabet is not in the vocab as spelled, so adding it would mint a new id
    return backend, lambda token: set(token) <= alphabet


def _byte_spelling() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes as themselves, the rest from U+0100."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def _bpe(g: _File, **kwargs):
    from tokenizers import models

    try:
        return models.BPE(**kwargs)
    except Exception as err:  # e.g. a merge naming a token that is not in the vocabulary
        raise GGUFError(f"{g.path}: inconsistent tokenizer.ggml.tokens / tokenizer.ggml.merges: {err}") from err


def _merges(g: _File) -> list[tuple[str, str]]:
    merges = []
    for index, merge in enumerate(g.get("tokenizer.ggml.merges", [])):
        pair = merge.split(" ")
        if len(pair) != 2:
            raise GGUFError(f"{g.path}: tokenizer.ggml.merges[{index}] = {merge!r} is not two tokens")
        merges.append((pair[0], pair[1]))
    return merges


def _sentencepiece_backend(g: _File, tokens: list[str], types: list[int]):
    """SentencePiece-style BPE with byte fallback (llama.cpp's "llama" tokenizer model)."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers

    vocab = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)
    if "tokenizer.ggml.merges" in g.reader.fields:
        merges = _merges(g)
    else:
        scores = g.get("tokenizer.ggml.scores")
        if len(scores) != len(tokens):
            raise GGUFError(
                f"{g.path}: tokenizer.ggml.scores has {len(scores)} entries "
                f"but tokenizer.ggml.tokens has {len(tokens)}"
            )
        merges = _merges_from_scores(tokens, scores, types)

    unk_id = g.get_int("tokenizer.ggml.unknown_token_id", None)
    backend = Tokenizer(
        _bpe(
            g,
            vocab=vocab,
            merges=merges,
            unk_token=tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None,
            fuse_unk=True,
            byte_fallback=True,
            dropout=None,
        )
    )
    prefix_space = bool(g.get("tokenizer.ggml.add_space_prefix", True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if prefix_space else "never", split=False
    )
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix_space:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend, lambda token: token in vocab


def _merges_from_scores(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: a piece's splits, best-scored piece first."""
    normal = {}
    for index, (token, kind) in enumerate(zip(tokens, types)):
        if kind in (_NORMAL, _USER_DEFINED):
            normal.setdefault(token, index)
    found = []
    for token, index in normal.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in normal and right in normal:
                found.append((-scores[index], index, normal[left], normal[right], left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]
