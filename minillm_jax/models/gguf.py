"""Read a GGUF checkpoint (llama.cpp's format) in Hugging Face terms, with numpy only.

Entry points: `read_gguf_config` (an HF `config.json` dict), `iter_gguf_tensors` (HF-named float32
weights, one at a time) and `GGUFTensors` (random access); the tokenizer is in `gguf_tokenizer.py`. Tensors are
dequantised with the `gguf` package's numpy code, so neither torch nor transformers' GGUF loader
is needed.
"""

from __future__ import annotations

import math
import os
import pathlib
import re
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

__all__ = ["GGUFError", "GGUFTensors", "read_gguf_config", "iter_gguf_tensors"]


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


def _reader(path: pathlib.Path):
    """The `gguf` package's reader over a plain ndarray view of the file's memory map instead of the
    np.memmap itself: the reader slices one view per metadata value, and np.memmap's slicing and view hooks
    made parsing SmolLM2's 49k-token vocabulary and merges take 2.2 s on a 2-core machine, 0.8 s over the
    plain view (the same fields and tensors: tests/test_gguf.py). Still read-only: the view shares the map."""
    from gguf import GGUFReader

    class Reader(GGUFReader):
        @property
        def data(self):
            return self._plain

        @data.setter
        def data(self, mapped):  # GGUFReader.__init__ assigns its np.memmap here before parsing
            self._plain = mapped.view(np.ndarray)

    return Reader(path)


class _File:
    """An opened GGUF: metadata access that names the file and key on every error."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        if not self.path.exists():
            raise GGUFError(f"{self.path}: no such GGUF file")
        if not self.path.is_file():
            raise GGUFError(f"{self.path}: not a regular file, so not a GGUF file")
        try:
            self.reader = _reader(self.path)
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
        self.config = _config(self._file)  # the HF config dict, as read_gguf_config gives it
        plan = _tensor_plan(self._file, self.config)
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
