"""PackedText (L_PT plain text) against a plain-Python reference: every document tokenised on its own,
followed by EOS, the stream sliced into seq_len chunks; resume, epochs, shuffling, laziness, errors."""

import itertools
import json

import numpy as np
import pytest
from conftest import SHARED_DATA

from minillm_jax.data import PackedText, RecordError
from minillm_jax.data.pretrain import buffer_shuffle, text_blocks
from minillm_jax.models import load_tokenizer

VALID = SHARED_DATA / "dolly" / "valid.jsonl"
TEXT = "First document,\nsecond line.\n\nSecond document.\n\n\n\nThird\ndocument.\n  \t\nFourth one.\n"
BLOCKS = ["First document,\nsecond line.", "Second document.", "Third\ndocument.", "Fourth one."]


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf):
    return load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def answers():
    return [json.loads(line)["output"] for line in VALID.read_text().splitlines()]


def reference_stream(tokenizer, documents):
    """Tokens of one pass: each document encoded alone, without special tokens, then EOS."""
    stream = []
    for text in documents:
        stream += tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    return stream


def reference_batches(stream, seq_len, batch_size, count):
    span = seq_len * batch_size
    return [np.array(stream[k * span:(k + 1) * span]).reshape(batch_size, seq_len) for k in range(count)]


def take(packed, count):
    return [next(packed) for _ in range(count)]


def assert_same(batches, expected):
    assert len(batches) == len(expected)
    for got, want in zip(batches, expected):
        np.testing.assert_array_equal(got["tokens"], want)


def test_jsonl_answers_match_the_reference(tokenizer, answers):
    packed = PackedText(VALID, tokenizer, seq_len=64, batch_size=4, text_field="output")
    batches = take(packed, 6)
    assert_same(batches, reference_batches(reference_stream(tokenizer, answers[:200]), 64, 4, 6))
    for batch in batches:
        assert set(batch) == {"tokens", "attention_mask", "loss_mask"}
        for key in batch:
            assert batch[key].shape == (4, 64) and batch[key].dtype == np.int32
        assert (batch["attention_mask"] == 1).all() and (batch["loss_mask"] == 1).all()


def test_txt_blocks_are_documents(tokenizer, tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    assert list(text_blocks(path)) == BLOCKS
    stream = reference_stream(tokenizer, BLOCKS)
    seq_len = 5
    batches = take(PackedText(path, tokenizer, seq_len=seq_len, batch_size=2), len(stream) // 10)
    assert_same(batches, reference_batches(stream, seq_len, 2, len(stream) // 10))


def test_sources_are_read_in_order_and_loop_over_epochs(tokenizer, tmp_path, answers):
    (tmp_path / "a.txt").write_text(TEXT)
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in answers[:3]))
    one_pass = reference_stream(tokenizer, BLOCKS + answers[:3])
    packed = PackedText([tmp_path / "a.txt", str(tmp_path / "b.jsonl")], tokenizer, seq_len=16, batch_size=3)
    count = 3 * len(one_pass) // 48 + 2  # a little over three passes
    batches = take(packed, count)
    assert_same(batches, reference_batches(one_pass * 4, 16, 3, count))
    assert packed.epoch == 3


def test_resume_equals_the_uninterrupted_stream(tokenizer, answers):
    def stream(**kwargs):
        return PackedText(VALID, tokenizer, seq_len=32, batch_size=2, text_field="output", **kwargs)

    uninterrupted = take(stream(), 12)
    for n in (1, 5, 11):
        first = stream()
        take(first, n)
        saved = json.loads(json.dumps(first.state()))
        assert_same(take(stream(state=saved), 12 - n), [b["tokens"] for b in uninterrupted[n:]])
        other = stream()
        take(other, 3)
        other.restore(saved)
        assert_same(take(other, 12 - n), [b["tokens"] for b in uninterrupted[n:]])


def test_resume_where_a_chunk_ends_a_document(tokenizer, tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    seq_len = len(tokenizer.encode(BLOCKS[0], add_special_tokens=False)) + 1
    stream = reference_stream(tokenizer, BLOCKS) * 2
    first = PackedText(path, tokenizer, seq_len=seq_len, batch_size=1)
    take(first, 1)
    assert first.state()["document"] == 0 and first.state()["offset"] == seq_len
    resumed = PackedText(path, tokenizer, seq_len=seq_len, batch_size=1, state=first.state())
    assert_same(take(resumed, 3), reference_batches(stream, seq_len, 1, 4)[1:])


def test_resume_across_epochs_with_shuffling(tokenizer, tmp_path, answers):
    path = tmp_path / "small.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in [a for a in answers if len(a) < 100][:12]))

    def stream(**kwargs):
        return PackedText(path, tokenizer, seq_len=24, batch_size=2, seed=4, shuffle_buffer=5, **kwargs)

    uninterrupted = take(stream(), 40)
    first = stream()
    take(first, 23)
    assert first.state()["epoch"] > 0
    assert_same(take(stream(state=first.state()), 17), [b["tokens"] for b in uninterrupted[23:]])
    with pytest.raises(ValueError, match="seed=4"):
        PackedText(path, tokenizer, seq_len=24, batch_size=2, seed=5, shuffle_buffer=5, state=first.state())


def test_shuffling_permutes_documents_anew_each_epoch(tokenizer, tmp_path, answers):
    documents = answers[:30]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in documents))
    one_pass = reference_stream(tokenizer, documents)
    seq_len, batch_size = 50, 4
    count = 2 * len(one_pass) // (seq_len * batch_size) + 1
    packed = PackedText(path, tokenizer, seq_len=seq_len, batch_size=batch_size, seed=1, shuffle_buffer=100)
    tokens = np.concatenate([b["tokens"].ravel() for b in take(packed, count)]).tolist()
    epochs = [tokens[:len(one_pass)], tokens[len(one_pass):2 * len(one_pass)]]
    want = sorted(tokenizer.encode(t, add_special_tokens=False) for t in documents)
    orders = []
    for epoch in epochs:
        assert epoch[-1] == tokenizer.eos_token_id
        docs = [list(g) for is_eos, g in itertools.groupby(epoch, lambda t: t == tokenizer.eos_token_id) if not is_eos]
        assert sorted(docs) == want  # every document exactly once per epoch
        orders.append(docs)
    assert orders[0] != orders[1] and epochs[0] != one_pass


def test_buffer_shuffle_is_a_seeded_permutation():
    items = list(range(50))
    for size in (1, 7, 50, 80):
        out = list(buffer_shuffle(iter(items), size, np.random.default_rng(0)))
        assert sorted(out) == items
        assert out == list(buffer_shuffle(iter(items), size, np.random.default_rng(0)))
    assert list(buffer_shuffle(iter(items), 80, np.random.default_rng(0))) != items


class CountingTokenizer:
    """Counts documents encoded, to show the stream never tokenises ahead of need."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls, self.eos_token_id = tokenizer, 0, tokenizer.eos_token_id

    def __call__(self, text, **kwargs):
        self.calls += 1
        return self.tokenizer(text, **kwargs)


def test_the_stream_is_lazy(tokenizer):
    """Three batches of a 13k-document file tokenise just the documents they cover."""
    path = SHARED_DATA / "dolly" / "train.jsonl"
    counting = CountingTokenizer(tokenizer)
    packed = PackedText(path, counting, seq_len=64, batch_size=2, text_field="output")
    assert counting.calls == 0
    take(packed, 3)
    with open(path) as f:
        documents = [json.loads(line)["output"] for line in itertools.islice(f, 50)]
    needed = next(i for i in range(1, 50) if len(reference_stream(tokenizer, documents[:i])) >= 3 * 128)
    assert counting.calls == needed


def test_a_corpus_shorter_than_one_chunk_fails(tokenizer, tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("Just a few words.\n\nAnd a few more.\n")
    with pytest.raises(ValueError, match=r"tiny\.txt.*not even one 512-token chunk"):
        next(PackedText(path, tokenizer, batch_size=1))
    (tmp_path / "blank.txt").write_text("\n\n  \n")
    with pytest.raises(ValueError, match=r"blank\.txt.*hold 0 tokens"):
        next(PackedText(tmp_path / "blank.txt", tokenizer, seq_len=8, batch_size=1))


def test_bad_sources_are_named(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        PackedText(tmp_path / "missing.txt", tokenizer, batch_size=1)
    (tmp_path / "table.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported plain-text file type '.csv'"):
        PackedText(tmp_path / "table.csv", tokenizer, batch_size=1)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(RecordError, match=r"bad\.jsonl:2: missing text field 'text'"):
        next(PackedText(tmp_path / "bad.jsonl", tokenizer, seq_len=64, batch_size=1))


def test_a_dataset_folder_streams(tokenizer, tmp_path, monkeypatch, answers):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    folder = tmp_path / "web_text"
    folder.mkdir()
    documents = answers[:8]
    pq.write_table(pa.Table.from_pylist([{"text": t, "id": i} for i, t in enumerate(documents)]),
                   folder / "train.parquet")
    one_pass = reference_stream(tokenizer, documents)
    count = 2 * len(one_pass) // 96 + 1  # into the third pass
    packed = PackedText(str(folder), tokenizer, seq_len=48, batch_size=2)
    assert_same(take(packed, count), reference_batches(one_pass * 3, 48, 2, count))
    assert packed.epoch == 2
    with pytest.raises(ValueError, match="split 'validation'"):
        PackedText(str(folder), tokenizer, batch_size=1, split="validation")
