"""The built-in byte tokenizer and random model specs used by the `tiny` presets."""

import pytest

from minillm_jax.models.tiny import BYTE_VOCAB_SIZE, byte_tokenizer, parse_random_spec


def test_byte_tokenizer_ids_are_the_utf8_bytes_and_round_trip(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = byte_tokenizer()
    text = "Grüße, 世界!\n\ttab  two spaces"
    ids = tokenizer(text)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text
    assert len(tokenizer) == BYTE_VOCAB_SIZE and tokenizer.eos_token_id == 256 == tokenizer.pad_token_id
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(text)["input_ids"] == ids and reloaded.chat_template == tokenizer.chat_template


def test_random_spec_parsing_and_errors():
    config = parse_random_spec("random:gpt2:layers=3,hidden=48,heads=4", 257)
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads) == (3, 48, 4, 4)
    assert config.head_dim == 12 and config.positions == "learned"
    for bad in ("random:bert", "llama", "random:llama:depth=2", "random:llama:layers=two"):
        with pytest.raises(ValueError, match="model spec"):
            parse_random_spec(bad, 257)
