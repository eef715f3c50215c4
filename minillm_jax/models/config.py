"""The family-agnostic model config: one decoder-only transformer covers GPT-2, OPT, Llama/Mistral/SmolLM2
and Qwen2. Family specifics (HF names, config fields) live in `families.py`."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import numpy as np

DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the forward pass needs. Frozen and hashable, so it can be a static jit argument."""

    model_type: str  # the HF family name: gpt2, opt, llama, mistral, qwen2
    vocab_size: int  # rows of the embedding as stored in the checkpoint (may include padding)
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    real_vocab_size: int | None = None  # the tokenizer's size; ids at or beyond it are padding
    norm: Literal["layernorm", "rmsnorm"] = "rmsnorm"
    norm_eps: float = 1e-6
    activation: Literal["silu", "gelu_tanh", "gelu", "relu"] = "silu"
    gated_mlp: bool = True  # SwiGLU-style gate * up
    positions: Literal["rope", "learned"] = "rope"
    position_offset: int = 0  # OPT stores positions shifted by 2
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, float | str], ...] = ()  # HF rope_parameters minus theta, as sorted items
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    pre_norm: bool = True  # False: OPT-350m style post-LayerNorm blocks
    final_norm: bool = True
    embed_dim: int | None = None  # OPT word_embed_proj_dim when it differs from hidden_size
    tie_word_embeddings: bool = True
    sliding_windows: tuple[int, ...] = ()  # per layer, 0 = full attention; empty = all full
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    # operands of the matmuls by a weight when they differ from the compute dtype ("" = dtype), accumulated in
    # float32 (transformer.decoding_twin: float32 activations over bfloat16 weight copies on CPU)
    matmul_dtype: str = ""
    remat: Literal["none", "full", "dots"] = "none"
    # attention without a KV cache off CPU: "xla" (jax.nn.dot_product_attention's XLA softmax attention) or
    # "cudnn" (cuDNN's fused flash attention on NVIDIA GPUs, bf16/fp16; XLA's where cuDNN refuses the shape)
    attention: Literal["xla", "cudnn"] = "xla"
    # the layers of a pass without a KV cache (training, scoring) as a loop over the stacked weights (True) or
    # unrolled (False): then the backward pass reads each layer's saved activations where they were made, where
    # the loop stacks them into [layers, ...] buffers it must first fill with zeros and then copies them in and
    # out (compiled for an H200, a GPT-2 124M train step B 16 x 512 an estimated 19% faster with cuDNN attention,
    # 25% with XLA's, bench/gpu_hlo.py), at the cost of more temporary memory (4.4 -> 5.7 GB there) and about twice
    # the compile time. Decoding always loops (the KV cache is stacked by layer).
    scan_layers: bool = True
    # Training-time dropout rates (HF's): used only when a forward pass is given a `dropout_rng`.
    embed_dropout: float = 0.0  # on the input embeddings (GPT-2 embd_pdrop)
    residual_dropout: float = 0.0  # on each sublayer's output before its residual add (resid_pdrop, OPT dropout)
    attention_dropout: float = 0.0  # on the attention probabilities
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}: expected one of {DTYPES}")
        if self.matmul_dtype not in ("",) + DTYPES:
            raise ValueError(f"ModelConfig.matmul_dtype={self.matmul_dtype!r}: expected '' or one of {DTYPES}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig: num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.sliding_windows and len(self.sliding_windows) != self.num_layers:
            raise ValueError(
                f"ModelConfig.sliding_windows has {len(self.sliding_windows)} entries for {self.num_layers} layers"
            )
        if self.real_vocab_size is not None and not 0 < self.real_vocab_size <= self.vocab_size:
            raise ValueError(
                f"ModelConfig.real_vocab_size={self.real_vocab_size} must be in (0, vocab_size={self.vocab_size}]"
            )
        for name in ("embed_dropout", "residual_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)}: expected in [0, 1)")
        if self.remat not in ("none", "full", "dots"):
            raise ValueError(f"ModelConfig.remat={self.remat!r}: expected 'none', 'full' or 'dots'")
        if self.attention not in ("xla", "cudnn"):
            raise ValueError(f"ModelConfig.attention={self.attention!r}: expected 'xla' or 'cudnn'")
        if not isinstance(self.scan_layers, bool):
            raise ValueError(f"ModelConfig.scan_layers={self.scan_layers!r}: expected True or False")

    @property
    def num_real_tokens(self) -> int:
        """Vocabulary entries a tokenizer can produce; logits beyond this index are padding."""
        return self.real_vocab_size or self.vocab_size

    @property
    def word_dim(self) -> int:
        return self.embed_dim or self.hidden_size

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def rope_inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """Per-pair inverse frequencies [head_dim // 2] in float64, with HF's linear and llama3 scaling."""
    dim = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    scaling = dict(config.rope_scaling)
    kind = scaling.get("rope_type", "default")
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        original = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        low_freq_wavelen, high_freq_wavelen = original / low, original / high
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return np.where(is_medium, smoothed, scaled)
    raise ValueError(f"rope_type {kind!r} is not supported (supported: default, linear, llama3)")
