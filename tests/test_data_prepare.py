"""`data.prepare` rebuilds ../shared/data (MiniLLM's own splits) from sources in the hub layouts.

No network here: each test writes a local file in the hub's layout from ../shared/data and passes it as
`--source`. The shared test/valid records are MiniLLM's (older) Dolly text and train is the current hub
text, so a rebuild from such a file must give back the shared files exactly; from the current hub text
the held-out texts differ by revision (citation markers), which the record keys ignore.
"""

import json
import random

import pytest
from conftest import SHARED_DATA

from minillm_jax.data import prepare as prep
from minillm_jax.data.prepare import PrepareError, record_key, resolve_data


def _shared(path: str) -> list[dict]:
    file = SHARED_DATA / path
    if not file.is_file():
        pytest.fail(f"{file} is missing: these tests need the shared data directory {SHARED_DATA} "
                    "(dolly/, self_inst/, vicuna/, sinst/ as described in its README.md)")
    return [json.loads(line) for line in file.read_text().splitlines()]


def _texts(records):
    return [(r["instruction"], r["input"], r["output"], r["category"]) for r in records]


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def dolly_hub_file(tmp_path_factory):
    """All of ../shared/data/dolly in databricks-dolly-15k's layout and in a scrambled order."""
    rows = [dict(instruction=r["instruction"], context=r["input"], response=r["output"], category=r["category"])
            for split in ("test", "valid", "train") for r in _shared(f"dolly/{split}.jsonl")]
    random.Random(0).shuffle(rows)
    return _write_jsonl(tmp_path_factory.mktemp("hub") / "databricks-dolly-15k.jsonl", rows)


def test_shipped_keys_are_minillm_membership():
    held = json.loads(prep.SPLITS_FILE.read_text())
    for split in ("test", "valid"):
        keys = [entry.split(":")[0] for entry in held[split]]
        assert keys == [record_key(r["instruction"], r["output"]) for r in _shared(f"dolly/{split}.jsonl")]
    dropped = {record_key(r["instruction"], r["output"]) for r in _shared("dolly/train.jsonl")
               if not r["in_minillm_train"]}
    assert set(held["minillm_dropped"]) == dropped
    assert prep.SPLITS_FILE.stat().st_size < 64 * 1024


def test_record_key_ignores_revision_differences():
    older = "It commenced services on 31 August 2000 as Virgin Blue.[3] It grew.[60][61][a]"
    assert record_key("When?", older) == record_key("When? ", "It commenced services on 31 August 2000 as "
                                                              "Virgin Blue. It grew.")
    assert record_key("When?", older) != record_key("When?", older.replace("2000", "2001"))


def test_dolly_rebuilds_minillm_splits(dolly_hub_file, tmp_path):
    counts = prep.prepare("dolly", tmp_path / "dolly", source=dolly_hub_file)
    assert counts == {"train": 13512, "valid": 1000, "test": 500, "train_minillm_exact": 11431}
    out = {split: [json.loads(line) for line in (tmp_path / "dolly" / f"{split}.jsonl").read_text().splitlines()]
           for split in counts}
    for split in ("test", "valid", "train"):  # same records, same order, same text
        assert _texts(out[split]) == _texts(_shared(f"dolly/{split}.jsonl")), split
    shared_train = _shared("dolly/train.jsonl")
    assert [r["in_minillm_train"] for r in out["train"]] == [r["in_minillm_train"] for r in shared_train]
    assert _texts(out["train_minillm_exact"]) == _texts([r for r in shared_train if r["in_minillm_train"]])
    assert set(out["test"][0]) == {"instruction", "input", "output", "source", "category"}


def test_dolly_from_minillm_release_layout(tmp_path):
    """MiniLLM/dolly's layout (raw.jsonl = valid + train, valid.jsonl = test, `topic` for the category)."""
    def minillm(records):
        return [dict(instruction=r["instruction"], input=r["input"], output=r["output"], topic=r["category"])
                for r in records]

    dropped = [r for r in _shared("dolly/train.jsonl") if not r["in_minillm_train"]]
    raw = minillm(_shared("dolly/valid.jsonl") + _shared("dolly/train_minillm_exact.jsonl") + dropped)
    _write_jsonl(tmp_path / "hub" / "raw.jsonl", raw)
    _write_jsonl(tmp_path / "hub" / "valid.jsonl", minillm(_shared("dolly/test.jsonl")))
    counts = prep.prepare("dolly", tmp_path / "out", source=tmp_path / "hub")
    assert counts["test"] == 500 and counts["valid"] == 1000 and counts["train"] == 11435 + len(dropped)
    read = lambda split: [json.loads(x) for x in (tmp_path / "out" / f"{split}.jsonl").read_text().splitlines()]
    assert _texts(read("test")) == _texts(_shared("dolly/test.jsonl"))
    assert _texts(read("valid")) == _texts(_shared("dolly/valid.jsonl"))
    assert _texts(read("train_minillm_exact")) == _texts(_shared("dolly/train_minillm_exact.jsonl"))


@pytest.mark.parametrize("name,shared,hub_path", [("self_inst", "self_inst/test.jsonl", "valid.jsonl"),
                                                  ("vicuna", "vicuna/test.jsonl", "valid.jsonl"),
                                                  ("sinst", "sinst/test.jsonl", "11_/valid.jsonl")])
def test_evaluation_sets_from_minillm_releases(name, shared, hub_path, tmp_path):
    expected = _shared(shared)
    rows = [dict(instruction=r["instruction"], input=r["input"], output=r.get("references", r["output"]),
                 topic=r["category"], prompt="(pre-rendered prompt, ignored)") for r in expected]
    _write_jsonl(tmp_path / "hub" / hub_path, rows)
    assert prep.prepare(name, tmp_path / name, source=tmp_path / "hub") == {"test": len(expected)}
    out = [json.loads(line) for line in (tmp_path / name / "test.jsonl").read_text().splitlines()]
    assert _texts(out) == _texts(expected)
    if name == "sinst":
        assert [r["references"] for r in out] == [r["references"] for r in expected]
        assert max(len(r["references"]) for r in out) > 1


def test_refuses_non_empty_output_and_bad_sources(dolly_hub_file, tmp_path, capsys):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        prep.main(["dolly", "--output", str(tmp_path / "busy"), "--source", str(dolly_hub_file)])
    assert "not empty" in capsys.readouterr().err and (tmp_path / "busy" / "notes.txt").exists()
    assert prep.main(["dolly", "--output", str(tmp_path / "busy"), "--source", str(dolly_hub_file), "--force"]) == 0
    assert "test 500" in capsys.readouterr().out and not (tmp_path / "busy" / "notes.txt").exists()

    vicuna = _write_jsonl(tmp_path / "v.jsonl", [dict(instruction=r["instruction"], context="", response=r["output"])
                                                 for r in _shared("vicuna/test.jsonl")])
    with pytest.raises(PrepareError, match="only 0 of MiniLLM's 1500 held-out"):
        prep.prepare("dolly", tmp_path / "x", source=vicuna)
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "hi", "context": ""}])
    with pytest.raises(PrepareError, match=r"bad.jsonl:1: field 'response' is missing"):
        prep.prepare("dolly", tmp_path / "x", source=bad)
    with pytest.raises(FileNotFoundError, match="11_/valid.jsonl"):
        prep.prepare("sinst", tmp_path / "x", source=tmp_path)
    assert not (tmp_path / "x").exists()


def test_resolve_data_finds_files_or_names_the_command(tmp_path):
    assert resolve_data(SHARED_DATA, "dolly", "test") == SHARED_DATA / "dolly" / "test.jsonl"
    with pytest.raises(FileNotFoundError) as missing:
        resolve_data(tmp_path / "data", "sinst", "test")
    assert str(missing.value).endswith(f"python -m minillm_jax.data.prepare sinst --output {tmp_path / 'data'}/sinst")
    with pytest.raises(ValueError, match="no split 'train'"):
        resolve_data(tmp_path, "vicuna", "train")
    with pytest.raises(ValueError, match="not known"):
        resolve_data(tmp_path, "alpaca", "train")
