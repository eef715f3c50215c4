"""Chat-message records: prompt from the tokenizer's chat template over the turns before the answer,
the last assistant turn as the response, and structural errors named by file and line."""

import json

import pytest

from minillm_jax.data import FieldMap, InstructionData, RecordError, format_prompt, read_records, response_text
from minillm_jax.models import load_tokenizer

CHAT = FieldMap(messages="messages")
CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one?"},
    {"role": "assistant", "content": "Green."},
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf):
    return load_tokenizer(smollm2_gguf)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_prompt_is_the_chat_template_before_the_last_answer(tokenizer, tmp_path):
    records, skipped = read_records(write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}]), CHAT)
    assert skipped == 0
    record = records[0]
    by_hand = tokenizer.apply_chat_template(CONVERSATION[:4], tokenize=False, add_generation_prompt=True)
    assert format_prompt(record, CHAT, template="chat", tokenizer=tokenizer) == by_hand
    assert by_hand.endswith("<|im_start|>user\nAnother one?<|im_end|>\n<|im_start|>assistant\n")
    assert "Blue." in by_hand and "Green." not in by_hand
    assert response_text(record, CHAT) == "Green."
    assert response_text({"instruction": "x", "output": "y"}) == "y"


def test_build_tokenises_chat_records(tokenizer):
    records = [{"messages": CONVERSATION}, {"messages": CONVERSATION[1:3]}]
    data = InstructionData.build(records, tokenizer, CHAT, template="chat")
    assert len(data) == 2 and data.dropped == 0
    for record, prompt_ids, response_ids in zip(records, data.prompts, data.responses):
        prompt = tokenizer.apply_chat_template(record["messages"][:-1], tokenize=False, add_generation_prompt=True)
        assert prompt_ids == tokenizer(prompt)["input_ids"]
        assert response_ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(prompt_ids + response_ids[:-1]) == prompt + record["messages"][-1]["content"]


def test_chat_records_need_the_chat_template(tokenizer):
    with pytest.raises(ValueError, match="template='chat'"):
        format_prompt({"messages": CONVERSATION}, CHAT, template="alpaca", tokenizer=tokenizer)


def test_prompt_only_conversations_when_no_answer_is_required(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"messages": CONVERSATION[:2]}])
    with pytest.raises(RecordError, match=r"prompts\.jsonl:1: the last message .* got role 'user'"):
        read_records(path, CHAT)
    records, _ = read_records(path, CHAT, require_output=False)
    expected = tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert format_prompt(records[0], CHAT, template="chat", tokenizer=tokenizer) == expected
    with pytest.raises(ValueError, match="does not end with an assistant answer"):
        response_text(records[0], CHAT)


@pytest.mark.parametrize("messages, error", [
    ([{"content": "Hi"}, {"role": "assistant", "content": "Hello"}], r"messages\[0\] is missing 'role'"),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant"}], r"messages\[1\] is missing 'content'"),
    ([{"role": "user", "content": "Hi"}, {"role": "user", "content": "Hello"}], "last message .* got role 'user'"),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": 3}], r"messages\[1\] content .* got int"),
    ([{"role": "human", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], "role 'human', expected one"),
    ([["user", "Hi"], {"role": "assistant", "content": "Hello"}], r"messages\[0\] should be an object .* got list"),
    ([{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "Hello"}], "no user message"),
    ("Hi", "non-empty list of messages, got str"),
    ([], "non-empty list of messages, got an empty list"),
])
def test_malformed_messages_name_file_and_line(tmp_path, messages, error):
    good = {"messages": CONVERSATION[1:3]}
    path = write_jsonl(tmp_path / "chat.jsonl", [good, good, {"messages": messages}])
    with pytest.raises(RecordError, match=rf"chat\.jsonl:3: .*{error}"):
        read_records(path, CHAT)
    records, skipped = read_records(path, CHAT, on_error="skip")
    assert len(records) == 2 and skipped == 1


def test_missing_messages_field_is_named(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"instruction": "a", "output": "b"}])
    with pytest.raises(RecordError, match=r"chat\.jsonl:1: missing field 'messages'"):
        read_records(path, CHAT)
