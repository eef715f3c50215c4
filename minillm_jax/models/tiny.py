"""Self-contained stand-ins for tests and the `tiny` presets: a byte-level tokenizer built in memory and
randomly initialised models of any family, so that the whole pipeline runs in seconds with no files.

Model specs: `random:<family>[:key=value,...]`, e.g. `random:llama:layers=2,hidden=64`. Families take
their structure from a small HF-like config (`TINY_FAMILIES`); keys override it.
"""

from __future__ import annotations

from flax import nnx

from minillm_jax.models.config import ModelConfig
from minillm_jax.models.transformer import Transformer

EOS = "<|endoftext|>"
BYTE_VOCAB_SIZE = 257  # 256 byte symbols + the end-of-text token

# A chat template in the ChatML style, so `template="chat"` works with the byte tokenizer too.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TINY_FAMILIES = {
    "llama": dict(norm="rmsnorm", activation="silu", gated_mlp=True, positions="rope", tie_word_embeddings=False),
    "qwen2": dict(norm="rmsnorm", activation="silu", gated_mlp=True, positions="rope", qkv_bias=True,
                  tie_word_embeddings=True),
    "gpt2": dict(norm="layernorm", activation="gelu_tanh", gated_mlp=False, positions="learned", qkv_bias=True,
                 out_bias=True, mlp_bias=True, tie_word_embeddings=True, norm_eps=1e-5),
}
SPEC_KEYS = {"layers": "num_layers", "hidden": "hidden_size", "heads": "num_heads", "kv_heads": "num_kv_heads",
             "mlp": "intermediate_size", "positions": "max_position_embeddings"}


def byte_tokenizer():
    """A transformers fast tokenizer over raw UTF-8 bytes (GPT-2's byte-to-symbol map, no merges), with one
    special token that serves as EOS and padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(symbols, key=_byte_of))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([EOS])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, pad_token=EOS)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _byte_of(symbol: str) -> int:
    """The byte a GPT-2 byte-level symbol stands for, so that token id == byte value."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    code = ord(symbol)
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def parse_random_spec(spec: str, vocab_size: int) -> ModelConfig:
    """The ModelConfig of a `random:<family>[:k=v,...]` spec over a tokenizer of `vocab_size` ids."""
    parts = spec.split(":")
    if parts[0] != "random" or len(parts) not in (2, 3) or parts[1] not in TINY_FAMILIES:
        raise ValueError(f"model spec {spec!r}: expected 'random:<family>[:key=value,...]' with family in "
                         f"{sorted(TINY_FAMILIES)}")
    sizes = dict(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=128,
                 max_position_embeddings=1024)
    for item in filter(None, parts[2].split(",") if len(parts) == 3 else []):
        key, _, value = item.partition("=")
        if key not in SPEC_KEYS or not value.isdigit():
            raise ValueError(f"model spec {spec!r}: bad item {item!r} (keys: {sorted(SPEC_KEYS)}, integer values)")
        sizes[SPEC_KEYS[key]] = int(value)
    if parts[1] == "gpt2":
        sizes["num_kv_heads"] = sizes["num_heads"]
    return ModelConfig(model_type=parts[1], vocab_size=vocab_size, head_dim=sizes["hidden_size"] // sizes["num_heads"],
                       **sizes, **TINY_FAMILIES[parts[1]])


def random_model(spec: str, vocab_size: int, *, seed: int = 0, dtype: str = "float32") -> Transformer:
    config = parse_random_spec(spec, vocab_size).replace(param_dtype=dtype, dtype=dtype)
    return Transformer(config, rngs=nnx.Rngs(seed))
