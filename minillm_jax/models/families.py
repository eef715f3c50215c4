"""Per-family HF conversion: config fields both ways and one tensor-name table per family.

Each table entry says which HF tensor feeds which of our parameters (and which layer of the stacked
`layers` axis), with the layout change both ways. HF Linear weights are [out, in]; GPT-2's Conv1D is
[in, out]; ours are einsum-shaped ([D, H, Dh] for a query projection).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from minillm_jax.models.config import ModelConfig

SUPPORTED_MODEL_TYPES = ("gpt2", "opt", "llama", "mistral", "qwen2")


class UnsupportedModelError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    hf_name: str
    hf_shape: tuple[int, ...]
    targets: tuple[str, ...]  # our parameter paths, e.g. ("layers.q_proj",)
    layer: int | None  # index on the stacked `layers` axis, None for top-level parameters
    to_ours: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_hf: Callable[..., np.ndarray]


def _same():
    return (lambda w: (w,)), (lambda w: w)


def _transposed():
    return (lambda w: (w.T,)), (lambda w: np.ascontiguousarray(w.T))


def _heads_in(n: int, dh: int):
    """Linear [n*dh, D] <-> ours [D, n, dh]."""
    return (lambda w: (w.T.reshape(-1, n, dh),)), (lambda w: np.ascontiguousarray(w.reshape(w.shape[0], -1).T))


def _heads_out(n: int, dh: int):
    """Linear [D, n*dh] <-> ours [n, dh, D]."""
    return (lambda w: (w.T.reshape(n, dh, -1),)), (lambda w: np.ascontiguousarray(w.reshape(n * dh, -1).T))


def _bias_heads(n: int, dh: int):
    return (lambda b: (b.reshape(n, dh),)), (lambda b: b.reshape(-1))


def _spec(hf_name, hf_shape, targets, layer, conv):
    to_ours, to_hf = conv
    return TensorSpec(hf_name, tuple(hf_shape), tuple(targets), layer, to_ours, to_hf)


# ---------------------------------------------------------------------------------------------- config


def _activation(name: str, model_type: str) -> str:
    table = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
             "gelu": "gelu", "relu": "relu", "silu": "silu", "swish": "silu"}
    if name not in table:
        raise UnsupportedModelError(f"{model_type}: activation {name!r} is not supported (supported: {sorted(table)})")
    return table[name]


def _rope(hf) -> tuple[float, tuple]:
    params = dict(getattr(hf, "rope_parameters", None) or {})
    theta = float(params.pop("rope_theta", getattr(hf, "rope_theta", 10000.0)))
    legacy = getattr(hf, "rope_scaling", None)
    if not params and isinstance(legacy, dict):
        params = dict(legacy)
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    kind = params.get("rope_type", "default")
    if kind not in ("default", "linear", "llama3"):
        raise UnsupportedModelError(
            f"{hf.model_type}: rope_type {kind!r} is not supported (supported: default, linear, llama3)")
    keep = {"default": (), "linear": ("factor",),
            "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}[kind]
    scaling = () if kind == "default" else tuple(sorted([("rope_type", kind)] + [(k, params[k]) for k in keep]))
    return theta, scaling


def _token_ids(hf) -> dict[str, Any]:
    eos = getattr(hf, "eos_token_id", None)
    return dict(bos_token_id=getattr(hf, "bos_token_id", None),
                eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
                pad_token_id=getattr(hf, "pad_token_id", None))


def _rate(hf, name: str) -> float:
    return float(getattr(hf, name, None) or 0.0)


def _dropout_from_hf(hf) -> dict[str, float]:
    """The dropout rates transformers trains with, where it applies them: GPT-2 on the embeddings, the
    attention probabilities and each sublayer's output; OPT (as transformers implements it: no embedding
    dropout) on the attention probabilities and each sublayer's output; the Llama family on the attention
    probabilities only."""
    if hf.model_type == "gpt2":
        return dict(embed_dropout=_rate(hf, "embd_pdrop"), residual_dropout=_rate(hf, "resid_pdrop"),
                    attention_dropout=_rate(hf, "attn_pdrop"))
    if hf.model_type == "opt":
        return dict(residual_dropout=_rate(hf, "dropout"), attention_dropout=_rate(hf, "attention_dropout"))
    return dict(attention_dropout=_rate(hf, "attention_dropout"))


def _dropout_to_hf(c: ModelConfig) -> dict[str, float]:
    if c.model_type == "gpt2":
        return dict(embd_pdrop=c.embed_dropout, resid_pdrop=c.residual_dropout, attn_pdrop=c.attention_dropout)
    unsupported = ("embed_dropout",) if c.model_type == "opt" else ("embed_dropout", "residual_dropout")
    for name in unsupported:
        if getattr(c, name):
            raise ValueError(f"ModelConfig.{name}={getattr(c, name)}: a {c.model_type} checkpoint has no such "
                             "dropout (transformers would not apply it); expected 0")
    if c.model_type == "opt":
        return dict(dropout=c.residual_dropout, attention_dropout=c.attention_dropout)
    return dict(attention_dropout=c.attention_dropout)


def config_from_hf(hf) -> ModelConfig:
    """Our ModelConfig from a transformers PretrainedConfig of a supported family."""
    mt = hf.model_type
    if mt == "gpt2":
        if getattr(hf, "scale_attn_by_inverse_layer_idx", False) or not getattr(hf, "scale_attn_weights", True):
            raise UnsupportedModelError("gpt2: scale_attn_by_inverse_layer_idx / scale_attn_weights=False "
                                        "are not supported")
        return ModelConfig(
            model_type=mt, vocab_size=hf.vocab_size, hidden_size=hf.n_embd, num_layers=hf.n_layer,
            num_heads=hf.n_head, num_kv_heads=hf.n_head, head_dim=hf.n_embd // hf.n_head,
            intermediate_size=hf.n_inner or 4 * hf.n_embd, max_position_embeddings=hf.n_positions,
            norm="layernorm", norm_eps=hf.layer_norm_epsilon, activation=_activation(hf.activation_function, mt),
            gated_mlp=False, positions="learned", qkv_bias=True, out_bias=True, mlp_bias=True,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", True)), **_dropout_from_hf(hf),
            **_token_ids(hf))
    if mt == "opt":
        if not getattr(hf, "layer_norm_elementwise_affine", True):
            raise UnsupportedModelError("opt: layer_norm_elementwise_affine=False is not supported")
        bias = bool(getattr(hf, "enable_bias", True))
        pre_norm = bool(hf.do_layer_norm_before)
        return ModelConfig(
            model_type=mt, vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
            num_layers=hf.num_hidden_layers, num_heads=hf.num_attention_heads,
            num_kv_heads=hf.num_attention_heads, head_dim=hf.hidden_size // hf.num_attention_heads,
            intermediate_size=hf.ffn_dim, max_position_embeddings=hf.max_position_embeddings,
            norm="layernorm", norm_eps=1e-5, activation=_activation(hf.activation_function, mt), gated_mlp=False,
            positions="learned", position_offset=2, qkv_bias=bias, out_bias=bias, mlp_bias=bias,
            pre_norm=pre_norm, final_norm=pre_norm and not getattr(hf, "_remove_final_layer_norm", False),
            embed_dim=hf.word_embed_proj_dim if hf.word_embed_proj_dim != hf.hidden_size else None,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", True)), **_dropout_from_hf(hf),
            **_token_ids(hf))
    if mt in ("llama", "mistral", "qwen2"):
        heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
        theta, scaling = _rope(hf)
        windows = ()
        layer_types = getattr(hf, "layer_types", None)
        window = getattr(hf, "sliding_window", None)
        if mt == "mistral" and window:
            windows = (int(window),) * hf.num_hidden_layers
        elif layer_types and window and "sliding_attention" in layer_types:
            windows = tuple(int(window) if t == "sliding_attention" else 0 for t in layer_types)
        # Qwen2 always has q/k/v biases and never an o_proj bias, whatever `attention_bias` a dict carries
        attention_bias = bool(getattr(hf, "attention_bias", False)) and mt != "qwen2"
        return ModelConfig(
            model_type=mt, vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
            num_layers=hf.num_hidden_layers, num_heads=heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads, head_dim=head_dim,
            intermediate_size=hf.intermediate_size, max_position_embeddings=hf.max_position_embeddings,
            norm="rmsnorm", norm_eps=hf.rms_norm_eps, activation=_activation(hf.hidden_act, mt), gated_mlp=True,
            positions="rope", rope_theta=theta, rope_scaling=scaling,
            qkv_bias=mt == "qwen2" or attention_bias, out_bias=attention_bias,
            mlp_bias=bool(getattr(hf, "mlp_bias", False)), sliding_windows=windows,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)), **_dropout_from_hf(hf),
            **_token_ids(hf))
    raise UnsupportedModelError(
        f"model_type {mt!r} is not supported; supported families: {', '.join(SUPPORTED_MODEL_TYPES)}")


def _activation_to_hf(c: ModelConfig) -> str:
    if c.model_type == "gpt2":
        return {"gelu_tanh": "gelu_new"}.get(c.activation, c.activation)
    return {"gelu_tanh": "gelu_pytorch_tanh"}.get(c.activation, c.activation)


def config_to_hf(c: ModelConfig) -> dict[str, Any]:
    """The config.json fields transformers expects for `c` (validated by transformers' config class)."""
    eos = list(c.eos_token_id) if isinstance(c.eos_token_id, tuple) else c.eos_token_id
    ids = dict(bos_token_id=c.bos_token_id, eos_token_id=eos, pad_token_id=c.pad_token_id)
    common = dict(vocab_size=c.vocab_size, tie_word_embeddings=c.tie_word_embeddings, **_dropout_to_hf(c), **ids)
    if c.model_type == "gpt2":
        return dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_embd=c.hidden_size,
                    n_layer=c.num_layers, n_head=c.num_heads, n_inner=c.intermediate_size,
                    n_positions=c.max_position_embeddings, layer_norm_epsilon=c.norm_eps,
                    activation_function=_activation_to_hf(c), **common)
    if c.model_type == "opt":
        return dict(model_type="opt", architectures=["OPTForCausalLM"], hidden_size=c.hidden_size,
                    num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, ffn_dim=c.intermediate_size,
                    max_position_embeddings=c.max_position_embeddings, do_layer_norm_before=c.pre_norm,
                    _remove_final_layer_norm=c.pre_norm and not c.final_norm, word_embed_proj_dim=c.word_dim,
                    activation_function=_activation_to_hf(c), enable_bias=c.qkv_bias, **common)
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[c.model_type]
    rope = {"rope_type": "default", **dict(c.rope_scaling), "rope_theta": c.rope_theta}
    out = dict(model_type=c.model_type, architectures=[arch], hidden_size=c.hidden_size,
               intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
               num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim,
               max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.norm_eps,
               hidden_act=_activation_to_hf(c), rope_parameters=rope, **common)
    windows = set(c.sliding_windows) - {0}
    if c.model_type == "llama":
        out.update(attention_bias=c.out_bias, mlp_bias=c.mlp_bias)
    elif c.model_type == "mistral":
        out.update(sliding_window=windows.pop() if windows else None)
    elif c.model_type == "qwen2" and windows:
        out.update(use_sliding_window=True, sliding_window=windows.pop(),
                   layer_types=["sliding_attention" if w else "full_attention" for w in c.sliding_windows],
                   max_window_layers=next(i for i, w in enumerate(c.sliding_windows) if w))
    return out


# ---------------------------------------------------------------------------------------------- tensors


def tensor_specs(c: ModelConfig) -> list[TensorSpec]:
    """Every HF tensor of the checkpoint, in file order, with its mapping onto our parameters."""
    if c.model_type == "gpt2":
        return _gpt2_specs(c)
    if c.model_type == "opt":
        return _opt_specs(c)
    if c.model_type in ("llama", "mistral", "qwen2"):
        return _llama_specs(c)
    raise UnsupportedModelError(f"model_type {c.model_type!r} is not supported")


def _norm_specs(prefix, ours, shape, layer, with_bias):
    specs = [_spec(f"{prefix}.weight", shape, [f"{ours}_scale"], layer, _same())]
    if with_bias:
        specs.append(_spec(f"{prefix}.bias", shape, [f"{ours}_bias"], layer, _same()))
    return specs


def _gpt2_specs(c: ModelConfig) -> list[TensorSpec]:
    D, H, Dh, F = c.hidden_size, c.num_heads, c.head_dim, c.intermediate_size
    specs = [_spec("transformer.wte.weight", (c.vocab_size, D), ["embed_tokens"], None, _same()),
             _spec("transformer.wpe.weight", (c.max_position_embeddings, D), ["embed_positions"], None, _same())]

    def split_qkv(w):  # Conv1D [D, 3D] -> three [D, H, Dh]
        return tuple(part.reshape(D, H, Dh) for part in np.split(w, 3, axis=-1))

    def join_qkv(q, k, v):
        return np.concatenate([x.reshape(D, H * Dh) for x in (q, k, v)], axis=-1)

    def split_qkv_bias(b):
        return tuple(part.reshape(H, Dh) for part in np.split(b, 3))

    def join_qkv_bias(q, k, v):
        return np.concatenate([x.reshape(-1) for x in (q, k, v)])

    for i in range(c.num_layers):
        p = f"transformer.h.{i}"
        specs += _norm_specs(f"{p}.ln_1", "layers.attn_norm", (D,), i, True)
        specs += [
            _spec(f"{p}.attn.c_attn.weight", (D, 3 * D), ["layers.q_proj", "layers.k_proj", "layers.v_proj"], i,
                  (split_qkv, join_qkv)),
            _spec(f"{p}.attn.c_attn.bias", (3 * D,), ["layers.q_bias", "layers.k_bias", "layers.v_bias"], i,
                  (split_qkv_bias, join_qkv_bias)),
            _spec(f"{p}.attn.c_proj.weight", (D, D), ["layers.o_proj"], i,
                  ((lambda w: (w.reshape(H, Dh, D),)), (lambda w: w.reshape(H * Dh, D)))),
            _spec(f"{p}.attn.c_proj.bias", (D,), ["layers.o_bias"], i, _same()),
        ]
        specs += _norm_specs(f"{p}.ln_2", "layers.mlp_norm", (D,), i, True)
        specs += [_spec(f"{p}.mlp.c_fc.weight", (D, F), ["layers.up_proj"], i, _same()),
                  _spec(f"{p}.mlp.c_fc.bias", (F,), ["layers.up_bias"], i, _same()),
                  _spec(f"{p}.mlp.c_proj.weight", (F, D), ["layers.down_proj"], i, _same()),
                  _spec(f"{p}.mlp.c_proj.bias", (D,), ["layers.down_bias"], i, _same())]
    specs += _norm_specs("transformer.ln_f", "final_norm", (D,), None, True)
    if not c.tie_word_embeddings:
        specs.append(_spec("lm_head.weight", (c.vocab_size, D), ["lm_head"], None, _transposed()))
    return specs


def _attention_specs(prefix, c: ModelConfig, i, out_name) -> list[TensorSpec]:
    D, H, K, Dh = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    specs = []
    for name, n in (("q", H), ("k", K), ("v", K)):
        specs.append(_spec(f"{prefix}.{name}_proj.weight", (n * Dh, D), [f"layers.{name}_proj"], i, _heads_in(n, Dh)))
        if c.qkv_bias:
            specs.append(_spec(f"{prefix}.{name}_proj.bias", (n * Dh,), [f"layers.{name}_bias"], i, _bias_heads(n, Dh)))
    specs.append(_spec(f"{prefix}.{out_name}.weight", (D, H * Dh), ["layers.o_proj"], i, _heads_out(H, Dh)))
    if c.out_bias:
        specs.append(_spec(f"{prefix}.{out_name}.bias", (D,), ["layers.o_bias"], i, _same()))
    return specs


def _opt_specs(c: ModelConfig) -> list[TensorSpec]:
    D, E, F = c.hidden_size, c.word_dim, c.intermediate_size
    p = "model.decoder"
    specs = [_spec(f"{p}.embed_tokens.weight", (c.vocab_size, E), ["embed_tokens"], None, _same()),
             _spec(f"{p}.embed_positions.weight", (c.max_position_embeddings + 2, D), ["embed_positions"], None,
                   _same())]
    if c.embed_dim is not None:
        specs += [_spec(f"{p}.project_in.weight", (D, E), ["project_in"], None, _transposed()),
                  _spec(f"{p}.project_out.weight", (E, D), ["project_out"], None, _transposed())]
    for i in range(c.num_layers):
        lp = f"{p}.layers.{i}"
        specs += _attention_specs(f"{lp}.self_attn", c, i, "out_proj")
        specs += _norm_specs(f"{lp}.self_attn_layer_norm", "layers.attn_norm", (D,), i, True)
        specs += [_spec(f"{lp}.fc1.weight", (F, D), ["layers.up_proj"], i, _transposed()),
                  _spec(f"{lp}.fc2.weight", (D, F), ["layers.down_proj"], i, _transposed())]
        if c.mlp_bias:
            specs += [_spec(f"{lp}.fc1.bias", (F,), ["layers.up_bias"], i, _same()),
                      _spec(f"{lp}.fc2.bias", (D,), ["layers.down_bias"], i, _same())]
        specs += _norm_specs(f"{lp}.final_layer_norm", "layers.mlp_norm", (D,), i, True)
    if c.final_norm:
        specs += _norm_specs(f"{p}.final_layer_norm", "final_norm", (D,), None, True)
    if not c.tie_word_embeddings:
        specs.append(_spec("lm_head.weight", (c.vocab_size, E), ["lm_head"], None, _transposed()))
    return specs


def _llama_specs(c: ModelConfig) -> list[TensorSpec]:
    D, F = c.hidden_size, c.intermediate_size
    specs = [_spec("model.embed_tokens.weight", (c.vocab_size, D), ["embed_tokens"], None, _same())]
    for i in range(c.num_layers):
        lp = f"model.layers.{i}"
        specs += _norm_specs(f"{lp}.input_layernorm", "layers.attn_norm", (D,), i, False)
        specs += _attention_specs(f"{lp}.self_attn", c, i, "o_proj")
        specs += _norm_specs(f"{lp}.post_attention_layernorm", "layers.mlp_norm", (D,), i, False)
        for name, shape, ours in (("gate_proj", (F, D), "gate"), ("up_proj", (F, D), "up"),
                                  ("down_proj", (D, F), "down")):
            specs.append(_spec(f"{lp}.mlp.{name}.weight", shape, [f"layers.{ours}_proj"], i, _transposed()))
            if c.mlp_bias:
                specs.append(_spec(f"{lp}.mlp.{name}.bias", shape[:1], [f"layers.{ours}_bias"], i, _same()))
    specs += _norm_specs("model.norm", "final_norm", (D,), None, False)
    if not c.tie_word_embeddings:
        specs.append(_spec("lm_head.weight", (c.vocab_size, D), ["lm_head"], None, _transposed()))
    return specs
