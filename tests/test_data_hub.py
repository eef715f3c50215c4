"""`load_records` through `datasets` on local dataset folders (no network): splits, `name:config`,
readable errors naming dataset / split / row, the same checks as local files."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from minillm_jax.data import FieldMap, RecordError, load_records

ROWS = [{"instruction": f"question {i}", "input": "" if i % 2 else f"context {i}", "output": f"answer {i}"}
        for i in range(6)]


@pytest.fixture(autouse=True)
def private_datasets_cache(tmp_path, monkeypatch):
    """`datasets` writes Arrow caches; keep them out of the user's cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture
def parquet_folder(tmp_path):
    folder = tmp_path / "parquet_set"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(ROWS[:4]), folder / "train.parquet")
    pq.write_table(pa.Table.from_pylist(ROWS[4:]), folder / "test.parquet")
    return folder


@pytest.fixture
def two_configs(tmp_path):
    """A folder with two configs declared in its README, as hub datasets do."""
    folder = tmp_path / "configs_set"
    write_jsonl(folder / "small" / "train.jsonl", ROWS[:2])
    write_jsonl(folder / "large" / "train.jsonl", ROWS)
    (folder / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: small\n  data_files:\n  - split: train\n    path: small/*.jsonl\n"
        "- config_name: large\n  data_files:\n  - split: train\n    path: large/*.jsonl\n---\n")
    return folder


def test_a_parquet_folder_loads_through_datasets(parquet_folder):
    records, skipped = load_records(str(parquet_folder))
    assert records == ROWS[:4] and skipped == 0
    assert load_records(parquet_folder, split="test")[0] == ROWS[4:]
    assert load_records(parquet_folder, limit=3)[0] == ROWS[:3]


def test_name_config_picks_a_config(two_configs):
    assert load_records(f"{two_configs}:small")[0] == ROWS[:2]
    assert load_records(f"{two_configs}:large")[0] == ROWS


def test_unknown_config_and_split_are_readable(two_configs, parquet_folder):
    with pytest.raises(ValueError, match=r"configs_set' \(config 'medium'\) split 'train': .*'medium' not found.*"
                                         r"small"):
        load_records(f"{two_configs}:medium")
    with pytest.raises(ValueError, match=r"parquet_set' split 'validation': .*Unknown split.*train"):
        load_records(parquet_folder, split="validation")
    (parquet_folder.parent / "empty_set").mkdir()
    with pytest.raises(FileNotFoundError, match="empty_set"):
        load_records(parquet_folder.parent / "empty_set")


def test_a_malformed_row_names_dataset_split_and_row(tmp_path):
    rows = ROWS[:3] + [{"instruction": "no answer", "input": ""}] + ROWS[3:]
    write_jsonl(tmp_path / "gappy" / "train.jsonl", rows)
    with pytest.raises(RecordError, match=r"dataset '.*gappy' split 'train' row 3: field 'output' should be a "
                                          r"string, got NoneType"):
        load_records(tmp_path / "gappy")
    records, skipped = load_records(tmp_path / "gappy", on_error="skip")
    assert records == ROWS and skipped == 1


def test_chat_messages_from_a_dataset(tmp_path):
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    rows = [{"messages": conversation}, {"messages": conversation[:1]}]
    write_jsonl(tmp_path / "chats" / "train.jsonl", rows)
    fields = FieldMap(messages="messages")
    with pytest.raises(RecordError, match=r"'.*chats' split 'train' row 1: the last message .* role 'user'"):
        load_records(tmp_path / "chats", fields)
    records, _ = load_records(tmp_path / "chats", fields, require_output=False)
    assert records == rows


def test_a_data_file_path_never_goes_to_the_hub(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", ROWS)
    assert load_records(tmp_path / "d.jsonl", limit=2) == (ROWS[:2], 0)
    with pytest.raises(FileNotFoundError, match="typo.jsonl does not exist"):
        load_records(str(tmp_path / "typo.jsonl"))
