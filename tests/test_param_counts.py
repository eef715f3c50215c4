"""Parameter counts at real sizes (abstract shapes only) equal transformers' counts for the same configs."""

import math

import pytest
import torch
import transformers
from flax import nnx

from minillm_jax.models import Transformer
from minillm_jax.models.families import config_from_hf

REAL_CONFIGS = {
    "gpt2-xl": transformers.GPT2Config(n_embd=1600, n_layer=48, n_head=25, vocab_size=50257, n_positions=1024),
    "opt-13b": transformers.OPTConfig(hidden_size=5120, num_hidden_layers=40, ffn_dim=20480, num_attention_heads=40,
                                      vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=5120),
    "opt-350m": transformers.OPTConfig(hidden_size=1024, num_hidden_layers=24, ffn_dim=4096, num_attention_heads=16,
                                       vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=512,
                                       do_layer_norm_before=False),
    "llama-2-7b": transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                           num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                           max_position_embeddings=4096),
    "qwen2.5-7b": transformers.Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                           num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                           max_position_embeddings=32768, tie_word_embeddings=False),
    "qwen2.5-0.5b": transformers.Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                             num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                             max_position_embeddings=32768, tie_word_embeddings=True),
}


@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_parameter_count_matches_transformers(name):
    hf_config = REAL_CONFIGS[name]
    with torch.device("meta"):
        hf_model = transformers.AutoModelForCausalLM.from_config(hf_config)
    expected = sum(p.numel() for p in hf_model.parameters())

    abstract = nnx.eval_shape(lambda: Transformer(config_from_hf(hf_config), rngs=nnx.Rngs(0)))
    ours = sum(math.prod(v.get_value().shape) for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
    assert ours == expected, f"{name}: ours {ours:,} vs transformers {expected:,}"
