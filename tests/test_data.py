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


def test_bytes_that_are_not_utf8_name_their_line_and_can_be_skipped(tmp_path):
    good = json.dumps({"instruction": "a", "output": "b"}).encode()  # 35 bytes
    bad = b'{"instruction": "caf\xe9", "output": "x"}'  # Latin-1 e-acute at byte 20 of its line
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b"\n".join([good, good, bad, good]) + b"\n")
    with pytest.raises(RecordError, match=r"latin1\.jsonl:3: not valid UTF-8 \(byte 0xe9 at column 21, byte offset 92 "
                                          r"of the file\)"):
        read_records(path)
    records, skipped = read_records(path, on_error="skip")
    assert len(records) == 3 and skipped == 1


def test_malformed_json_reports_its_line_and_column(tmp_path):
    cut = '{"instruction": "a", "output": "b"'  # the closing brace is missing: the error is at column 35
    assert len(cut) == 34
    path = tmp_path / "cut.jsonl"
    path.write_text(json.dumps({"instruction": "x", "output": "y"}) + "\n" + cut + "\n")
    with pytest.raises(RecordError, match=r"cut\.jsonl:2: not valid JSON \(Expecting ',' delimiter at column 35\)"):
        read_records(path)
    # a stray CR inside a record (valid JSON whitespace) does not split it or shift the line numbers, and a
    # byte-order mark does not hide the first record
    path.write_bytes(b'\xef\xbb\xbf{"instruction": "a",\r "output": "b"}\r\n{"instruction": "c", "output": 3}\n')
    with pytest.raises(RecordError, match=r"cut\.jsonl:2: field 'output' should be a string"):
        read_records(path)
    assert read_records(path, on_error="skip") == ([{"instruction": "a", "output": "b"}], 1)
    whole = tmp_path / "d.json"
    whole.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]\n')
    with pytest.raises(RecordError, match=r"d\.json:3: not valid JSON \(Expecting ',' delimiter at column 23\)"):
        read_records(whole)
    whole.write_bytes(b'[\n{"instruction": "\xff"}]')
    with pytest.raises(RecordError, match=r"d\.json:2: not valid UTF-8 \(byte 0xff at byte offset 19"):
        read_records(whole)


def test_an_empty_data_file_says_so(tmp_path):
    for name, content in (("empty.jsonl", ""), ("blank.jsonl", "\n  \n"), ("empty.json", "[]")):
        (tmp_path / name).write_text(content)
        with pytest.raises(RecordError, match=rf"{name} holds no records$"):
            read_records(tmp_path / name)
    (tmp_path / "junk.jsonl").write_text("{oops\n[1]\n")
    with pytest.raises(RecordError, match=r"junk\.jsonl holds no usable records: all 2 were malformed and skipped"):
        read_records(tmp_path / "junk.jsonl", on_error="skip")


def test_plain_text_sources_name_the_bad_line(tmp_path):
    from minillm_jax.data.pretrain import jsonl_texts, text_blocks

    (tmp_path / "t.txt").write_bytes(b"first doc\r\nstill first\n\nsecond \xff doc\n")
    blocks = text_blocks(tmp_path / "t.txt")
    assert next(blocks) == "first doc\nstill first"
    with pytest.raises(RecordError, match=r"t\.txt:4: not valid UTF-8 \(byte 0xff at column 8, byte offset 31 "):
        next(blocks)
    (tmp_path / "t.jsonl").write_text('{"text": "a"}\n{"text": "b"\n')
    texts = jsonl_texts(tmp_path / "t.jsonl", "text")
    assert next(texts) == "a"
    with pytest.raises(RecordError, match=r"t\.jsonl:2: not valid JSON \(Expecting ',' delimiter at column 13\)"):
        next(texts)


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


@pytest.mark.slow  # >= 12 s on the 2-core machine; CI's second step
def test_length_filter_count_on_the_full_train_file(tokenizer):
    """Dolly train.jsonl, Alpaca template, prompt <= 256 and sequence <= 512 tokens: the dropped count
    against one computed here from the template text and the tokenizer alone."""
    records, _ = read_records(DOLLY / "train.jsonl")
    data = InstructionData.build(records, tokenizer, max_prompt_length=256, max_length=512)
    head = "Below is an instruction that describes a task"
    prompts = [f"{head}, paired with an input that provides further context. Write a response that appropriately "
               f"completes the request.\n\n### Instruction:\n{r['instruction']}\n\n### Input:\n{r['input']}\n\n"
               "### Response:\n" if r["input"].strip() else
               f"{head}. Write a response that appropriately completes the request.\n\n### Instruction:\n"
               f"{r['instruction']}\n\n### Response:\n" for r in records]
    prompt_lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    full_lengths = [len(ids) + 1 for ids in tokenizer([p + r["output"] for p, r in zip(prompts, records)])["input_ids"]]
    expected = sum(p > 256 or f > 512 for p, f in zip(prompt_lengths, full_lengths))
    assert data.dropped == expected and len(data) == len(records) - expected
    assert 1000 < expected < 4000  # the long-context records MiniLLM dropped, and a few long answers


def test_max_examples_keeps_the_first_that_pass(tokenizer, dolly_train):
    full = InstructionData.build(dolly_train[:300], tokenizer, max_prompt_length=64, max_length=160)
    capped = InstructionData.build(dolly_train[:300], tokenizer, max_prompt_length=64, max_length=160,
                                   max_examples=10)
    assert len(capped) == 10 and capped.prompts == full.prompts[:10] and capped.responses == full.responses[:10]
    assert capped.dropped < full.dropped


def test_prompt_batches_follow_the_shuffle_and_resume(tokenizer, dolly_train):
    data = InstructionData.build(dolly_train[:40], tokenizer, max_prompt_length=256, max_length=512)
    size, seed = 16, 5  # 2 batches per epoch, so the stream crosses epochs
    stream = data.prompt_batches(size, seed)
    run = [next(stream) for _ in range(5)]
    orders = [data.order(epoch, seed) for epoch in range(3)]
    expected = [[data.prompts[i] for i in orders[epoch][start:start + size]]
                for epoch in range(3) for start in (0, size)]
    assert [prompts for prompts, _ in run] == expected[:5]
    assert [position for _, position in run] == [(0, 16), (0, 32), (1, 16), (1, 32), (2, 16)]
    assert next(data.prompt_batches(size, seed)) == run[0]  # deterministic
    for k in (1, 2, 3):
        resumed = data.prompt_batches(size, seed, position=run[k - 1][1])
        assert [next(resumed) for _ in range(5 - k)] == run[k:]
    batch, _ = next(data.batches(size, seed))
    from_batches = [row[(a == 1) & (m == 0)].tolist() for row, a, m in
                    zip(batch["tokens"], batch["attention_mask"], batch["loss_mask"])]
    assert from_batches == run[0][0]
    with pytest.raises(ValueError, match="batch_size=41"):
        next(data.prompt_batches(41, seed))
