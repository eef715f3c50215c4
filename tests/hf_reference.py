"""Tiny random transformers + torch (fp32) models of every supported family and variant: the reference."""

from __future__ import annotations

import numpy as np
import torch
import transformers

SMALL = dict(vocab_size=96)

# name -> (config class, kwargs). Every family and variant the model code claims to cover.
VARIANTS = {
    "gpt2": (transformers.GPT2Config, dict(n_positions=64, n_embd=32, n_layer=2, n_head=4, n_inner=80,
                                           activation_function="gelu_new", **SMALL)),
    "opt_pre_ln": (transformers.OPTConfig, dict(hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                                num_attention_heads=4, max_position_embeddings=64,
                                                word_embed_proj_dim=32, do_layer_norm_before=True, **SMALL)),
    "opt_post_ln_project": (transformers.OPTConfig, dict(hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                                         num_attention_heads=4, max_position_embeddings=64,
                                                         word_embed_proj_dim=16, do_layer_norm_before=False,
                                                         **SMALL)),
    "llama_gqa": (transformers.LlamaConfig, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=2,
                                                 max_position_embeddings=64, rope_theta=500000.0,
                                                 tie_word_embeddings=False, **SMALL)),
    "llama3_rope_scaling": (transformers.LlamaConfig, dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        max_position_embeddings=128, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=8), **SMALL)),
    "llama_linear_rope_bias_headdim": (transformers.LlamaConfig, dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, attention_bias=True, mlp_bias=True, max_position_embeddings=64, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0), **SMALL)),
    "smollm2_tied": (transformers.LlamaConfig, dict(hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                                                    num_attention_heads=3, num_key_value_heads=1,
                                                    max_position_embeddings=64, rope_theta=100000.0,
                                                    tie_word_embeddings=True, **SMALL)),
    "mistral_sliding_window": (transformers.MistralConfig, dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, sliding_window=4, head_dim=8, **SMALL)),
    "qwen2": (transformers.Qwen2Config, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=64, tie_word_embeddings=False, **SMALL)),
    "qwen2_tied": (transformers.Qwen2Config, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                  num_attention_heads=4, num_key_value_heads=1,
                                                  max_position_embeddings=64, tie_word_embeddings=True, **SMALL)),
}


def build_hf_model(name: str, seed: int = 0, **overrides):
    """A transformers model with every parameter randomised (norm weights and biases too, so a mis-mapped
    bias or norm cannot hide behind HF's ones/zeros initialisation); `overrides` change its config."""
    config_cls, kwargs = VARIANTS[name]
    config = config_cls(**{**kwargs, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model = model.float().eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if "norm" in pname or "ln_" in pname:
                param.copy_(1.0 + 0.1 * noise if pname.endswith("weight") else 0.1 * noise)
            else:
                param.copy_(0.15 * noise)
    return model


def left_padded_batch(vocab: int, batch: int = 3, length: int = 12, seed: int = 0):
    """Random ids with a different amount of left padding per row (row 0 unpadded)."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, vocab, size=(batch, length)).astype(np.int32)
    mask = np.ones((batch, length), np.int32)
    for row in range(1, batch):
        mask[row, : min(row * 3, length - 2)] = 0
    ids = np.where(mask > 0, ids, 0).astype(np.int32)
    return ids, mask


def hf_forward(model, ids: np.ndarray, mask: np.ndarray) -> torch.Tensor:
    """Logits of a left-padded batch, positions counting real tokens only (as ours); with autograd."""
    position_ids = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    return model(input_ids=torch.from_numpy(ids.astype(np.int64)), attention_mask=torch.from_numpy(mask),
                 position_ids=torch.from_numpy(position_ids.astype(np.int64))).logits


def hf_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf_forward(model, ids, mask).float().numpy()


def max_diff_on_real(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    return float(np.abs(np.where(mask[..., None] > 0, np.asarray(a) - np.asarray(b), 0.0)).max())


def random_model(variant: str, seed: int = 0, noise: float = 0.1):
    """Our Transformer for a variant's config, randomly initialised, with every parameter (norms and
    biases included) perturbed so that all of them take part."""
    import jax
    from flax import nnx

    from minillm_jax.models import Transformer
    from minillm_jax.models.families import config_from_hf

    config_cls, kwargs = VARIANTS[variant]
    model = Transformer(config_from_hf(config_cls(**kwargs)), rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(model)
    keys = iter(jax.random.split(jax.random.key(seed + 1), 64))
    state = jax.tree.map(lambda x: x + noise * jax.random.normal(next(keys), x.shape, x.dtype), state)
    return nnx.merge(graphdef, state)


def _int8_rounded(x: torch.Tensor) -> torch.Tensor:
    """Each vector along the last axis rounded to int8 steps of its largest magnitude / 127, in float32."""
    scale = x.abs().amax(-1, keepdim=True) / 127.0
    steps = torch.round(x / torch.where(scale > 0, scale, torch.ones_like(scale)))
    return torch.clamp(steps, -127, 127) * scale


def _int8_kv_attention(module, query, key, value, *args, **kwargs):
    """transformers' SDPA attention over keys and values each rounded per head and position to int8 steps."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, _int8_rounded(key), _int8_rounded(value), *args, **kwargs)


def _register_int8_kv_attention() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register("int8_kv_reference", _int8_kv_attention)
    AttentionMaskInterface.register("int8_kv_reference", AttentionMaskInterface._global_mapping["sdpa"])
    return "int8_kv_reference"


def hf_int8_kv_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Logits of a left-padded batch whose every attention reads keys and values rounded to int8 steps per head
    and position (a prompt written into an int8 KV cache first and attending over it)."""
    before = model.config._attn_implementation
    model.set_attn_implementation(_register_int8_kv_attention())
    try:
        return hf_logits(model, ids, mask)
    finally:
        model.set_attn_implementation(before)


def hf_int8_cache_decode_logits(model, ids: np.ndarray, mask: np.ndarray, prompt: int) -> np.ndarray:
    """Logits at positions prompt.. of a left-padded batch decoded one token at a time by transformers over its
    own KV cache, the prompt in full precision (SDPA) and every decode step attending over keys and values
    rounded to int8 steps per head and position (what an int8 KV cache holds); [B, T - prompt, V]."""
    rounded = _register_int8_kv_attention()
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)

    def tensor(a):
        return torch.from_numpy(np.asarray(a).astype(np.int64))

    before = model.config._attn_implementation
    pieces = []
    try:
        with torch.no_grad():
            model.set_attn_implementation("sdpa")
            out = model(input_ids=tensor(ids[:, :prompt]), attention_mask=tensor(mask[:, :prompt]),
                        position_ids=tensor(positions[:, :prompt]), use_cache=True)
            model.set_attn_implementation(rounded)
            for t in range(prompt, ids.shape[1]):
                out = model(input_ids=tensor(ids[:, t:t + 1]), attention_mask=tensor(mask[:, :t + 1]),
                            position_ids=tensor(positions[:, t:t + 1]), cache=out.cache, use_cache=True)
                pieces.append(out.logits.float().numpy())
    finally:
        model.set_attn_implementation(before)
    return np.concatenate(pieces, axis=1)
