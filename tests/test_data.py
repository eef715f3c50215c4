"""Instruction data on the real Dolly files: template, the paper's tokenisation rule, filters, errors
with file and line, resumable deterministic batches."""

import json

import numpy as np
import pytest
from conftest import SHARED_DATA

from minillm_jax.data import FieldMap, InstructionData, RecordError, format_prompt, read_records, tokenize_pair
from minillm_jax.models import load_tokenizer

DOLLY = SHARED_DATA / "dolly"


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf):
    return load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def dolly_train():
    records, skipped = read_records(DOLLY / "train_minillm_exact.jsonl")
    assert skipped == 0
    return records


def test_reads_the_papers_dolly_split(dolly_train):
    assert len(dolly_train) == 11435
    assert len(read_records(DOLLY / "test.jsonl")[0]) == 500
    assert all(isinstance(r["instruction"], str) and isinstance(r["output"], str) for r in dolly_train[:100])


def test_alpaca_template_text():
    plain = {"instruction": "Name a colour.", "input": "", "output": "Blue"}
    assert format_prompt(plain) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nName a colour.\n\n### Response:\n")
    with_input = {"instruction": "Summarise.", "input": "Cats sleep a lot.", "output": "Cats nap."}
    assert format_prompt(with_input) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nSummarise.\n\n"
        "### Input:\nCats sleep a lot.\n\n### Response:\n")


def test_chat_template_uses_the_tokenizer(tokenizer):
    text = format_prompt({"instruction": "Name a colour.", "input": "", "output": ""}, template="chat",
                         tokenizer=tokenizer)
    assert text.endswith("<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n")


def test_tokenisation_rule(tokenizer, dolly_train):
    for record in dolly_train[:20]:
        prompt = format_prompt(record)
        prompt_ids, response_ids = tokenize_pair(tokenizer, prompt, record["output"])
        joint = tokenizer(prompt + record["output"])["input_ids"]
        assert prompt_ids == tokenizer(prompt)["input_ids"]
        assert response_ids == joint[len(prompt_ids):] + [tokenizer.eos_token_id]
        assert tokenizer.decode(prompt_ids + response_ids[:-1]) == prompt + record["output"]


def test_length_filters_drop_and_count(tokenizer, dolly_train):
    records = dolly_train[:200]
    data = InstructionData.build(records, tokenizer, max_prompt_length=64, max_length=160)
    expected_kept = 0
    for record in records:
        p, r = tokenize_pair(tokenizer, format_prompt(record), record["output"])
        expected_kept += len(p) <= 64 and len(p) + len(r) <= 160
    assert len(data) == expected_kept and data.dropped == 200 - expected_kept and 0 < data.dropped < 200


def test_malformed_lines_are_named_or_skipped(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps({"instruction": "a", "output": "b"}), json.dumps({"instruction": "c", "output": "d"}),
             "{not json", json.dumps({"instruction": "e"}), json.dumps({"instruction": 3, "output": "f"})]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(RecordError, match=r"bad\.jsonl:3: not valid JSON"):
        read_records(path)
    records, skipped = read_records(path, on_error="skip")
    assert [r["instruction"] for r in records] == ["a", "c"] and skipped == 3
    path.write_text(lines[0] + "\n" + lines[3] + "\n")
    with pytest.raises(RecordError, match=r"bad\.jsonl:2: missing field 'output'"):
        read_records(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_records(tmp_path / "none.jsonl")


def test_json_parquet_and_field_mapping(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"question": "q1", "context": "", "answer": "a1"}, {"question": "q2", "context": "c2", "answer": "a2"}]
    fields = FieldMap(instruction="question", input="context", output="answer")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for name in ("d.json", "d.parquet"):
        records, skipped = read_records(tmp_path / name, fields)
        assert records == rows and skipped == 0
    assert "### Input:\nc2" in format_prompt(rows[1], fields)


def test_batches_are_deterministic_and_resumable(tokenizer, dolly_train):
    data = InstructionData.build(dolly_train[:40], tokenizer, max_prompt_length=256, max_length=512)
    stream = data.batches(batch_size=8, seed=3)
    first, after_first = next(stream)
    second, _ = next(stream)
    third, _ = next(stream)
    resumed = data.batches(batch_size=8, seed=3, position=after_first)
    for expected in (second, third):
        got, _ = next(resumed)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])
    assert not np.array_equal(data.order(0, 3), data.order(1, 3))  # a new shuffle every epoch
    tokens, attention, loss_mask = first["tokens"], first["attention_mask"], first["loss_mask"]
    assert (attention[:, -1] == 1).all() and (loss_mask <= attention).all()
    row = 0
    prompt_length = attention[row].sum() - loss_mask[row].sum()
    assert tokens[row, -1] == tokenizer.eos_token_id and loss_mask[row, -1] == 1
    assert prompt_length > 0 and loss_mask[row, : attention.shape[1] - loss_mask[row].sum()].sum() == 0
