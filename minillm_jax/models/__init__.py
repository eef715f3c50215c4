"""Models: one Flax NNX decoder for the GPT-2, OPT, Llama/Mistral/SmolLM2 and Qwen2 families, with
Hugging Face and GGUF import/export."""

from minillm_jax.models.config import ModelConfig
from minillm_jax.models.families import SUPPORTED_MODEL_TYPES, UnsupportedModelError
from minillm_jax.models.hf import CheckpointError, load_pretrained, load_tokenizer, save_pretrained
from minillm_jax.models.transformer import KVCache, Transformer, mask_padded_vocab, select_layers

__all__ = [
    "CheckpointError",
    "KVCache",
    "ModelConfig",
    "SUPPORTED_MODEL_TYPES",
    "Transformer",
    "UnsupportedModelError",
    "load_pretrained",
    "load_tokenizer",
    "mask_padded_vocab",
    "save_pretrained",
    "select_layers",
]
