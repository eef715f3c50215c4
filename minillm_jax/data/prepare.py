"""The paper's instruction data by name, rebuilt deterministically from its public releases:

    python -m minillm_jax.data.prepare dolly|self_inst|vicuna|sinst --output DIR [--source HUB_NAME_OR_LOCAL] [--force]

| name | default source | writes |
|---|---|---|
| dolly | databricks/databricks-dolly-15k | train, valid (1,000), test (500), train_minillm_exact |
| self_inst | MiniLLM/self-inst (valid.jsonl) | test (242) |
| vicuna | MiniLLM/Vicuna (valid.jsonl) | test (80) |
| sinst | MiniLLM/sinst (11_/valid.jsonl) | test (1,694, with all references) |

Dolly's held-out membership is MiniLLM's own (`splits/dolly.json`: one key per record, robust to the
citation markers and whitespace that differ between Dolly revisions), so the test and valid sets hold
MiniLLM's records in MiniLLM's order, in the source's text. train is every other record, sorted then
shuffled with seed 42; train_minillm_exact (the paper presets' training file) drops the records MiniLLM's
prompt-length filter dropped. A source in MiniLLM's own layout (`MiniLLM/dolly`: raw.jsonl + valid.jsonl)
gives MiniLLM's exact text instead.
`--source` takes a hub name, a local directory in the hub's layout, or a local file (a
databricks-dolly-15k-style JSONL for dolly, the `valid.jsonl` for the others). Files are JSONL with
`instruction`, `input`, `output`, `source`, `category` (sinst adds `references`, dolly's train
`in_minillm_train`), written as one directory that appears whole; a non-empty `--output` needs `--force`.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import json
import os
import pathlib
import random
import re
import sys
from typing import Any

from minillm_jax.workdir import atomic_directory

SPLITS_FILE = pathlib.Path(__file__).with_name("splits") / "dolly.json"
_CITATION = re.compile(r"\[[^\[\]]{0,20}\]")
_SPACE = re.compile(r"\s+")
_MIN_MATCHED = 0.99  # of MiniLLM's held-out Dolly records; fewer means the source is not Dolly


@dataclasses.dataclass(frozen=True)
class Dataset:
    default_source: str
    splits: tuple[str, ...]
    files: tuple[str, ...]  # the files a hub snapshot or local directory must hold (first match wins)


DATASETS = {
    "dolly": Dataset("databricks/databricks-dolly-15k", ("train", "valid", "test", "train_minillm_exact"),
                     ("databricks-dolly-15k.jsonl", "raw.jsonl")),
    "self_inst": Dataset("MiniLLM/self-inst", ("test",), ("valid.jsonl",)),
    "vicuna": Dataset("MiniLLM/Vicuna", ("test",), ("valid.jsonl",)),
    "sinst": Dataset("MiniLLM/sinst", ("test",), ("11_/valid.jsonl",)),
}


class PrepareError(ValueError):
    """A source that is not what the dataset name expects; the message names the file and field."""


# ------------------------------------------------------------------------------------------- lookup


def resolve_data(root: str | os.PathLike, name: str, split: str) -> pathlib.Path:
    """`<root>/<name>/<split>.jsonl` as `prepare` writes it (../shared/data has the same layout); a missing
    file raises FileNotFoundError with the command that makes it."""
    if name not in DATASETS:
        raise ValueError(f"data set {name!r} is not known; choose one of {', '.join(DATASETS)}")
    if split not in DATASETS[name].splits:
        raise ValueError(f"data set {name!r} has no split {split!r}; it has {', '.join(DATASETS[name].splits)}")
    path = pathlib.Path(root) / name / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; make it with: python -m minillm_jax.data.prepare {name} "
                                f"--output {pathlib.Path(root) / name}")
    return path


def record_key(instruction: str, response: str) -> str:
    """A Dolly record's key in `splits/dolly.json`: equal across revisions that differ only in citation
    markers such as [3] or [a] and in whitespace."""

    def norm(text: str) -> str:
        return _SPACE.sub("", _CITATION.sub("", text))

    return hashlib.sha256(f"{norm(instruction)}\x1f{norm(response)}".encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------------- prepare


def prepare(name: str, output: str | os.PathLike, *, source: str | os.PathLike | None = None,
            force: bool = False) -> dict[str, int]:
    """Write `name`'s splits into `output` (see the module docstring); returns the record count per split."""
    if name not in DATASETS:
        raise ValueError(f"data set {name!r} is not known; choose one of {', '.join(DATASETS)}")
    output = pathlib.Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not force:
        raise FileExistsError(f"{output} exists and is not empty; choose another --output or pass --force")
    source = str(source or DATASETS[name].default_source)
    file = _source_file(name, source)
    splits = _dolly(file, source) if name == "dolly" else {"test": _evaluation_set(file, source)}
    counts = {split: len(records) for split, records in splits.items()}
    marker = {"dataset": name, "source": source, "source_file": str(file), "records": counts}
    with atomic_directory(output, force=True, marker=marker) as staged:
        for split, records in splits.items():
            with open(staged / f"{split}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    return counts


def _source_file(name: str, source: str) -> pathlib.Path:
    """The data file behind `source`: a local file, a file inside a local directory, or a hub download."""
    path = pathlib.Path(source).expanduser()
    if path.is_file():
        return path
    if not path.exists():
        if source.count("/") != 1 or source.startswith((".", "/")):
            raise FileNotFoundError(f"--source {source!r}: no such file or directory (nor a hub name 'org/name')")
        path = _download(name, source)
    for candidate in DATASETS[name].files:
        if (path / candidate).is_file():
            return path / candidate
    raise FileNotFoundError(f"{path}: none of {', '.join(DATASETS[name].files)} is in it (the layout of "
                            f"{DATASETS[name].default_source} is expected)")


def _download(name: str, repo: str) -> pathlib.Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.jsonl", "*.json", "*/valid.jsonl"] if name != "sinst" else ["11_/valid.jsonl"]
    try:
        return pathlib.Path(snapshot_download(repo, repo_type="dataset", allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, gated: one line naming the repo and the way out
        raise FileNotFoundError(f"cannot download the hub dataset {repo!r} ({type(e).__name__}: {e}); with no "
                                "network, pass --source with a local copy of its files") from e


def _read(file: pathlib.Path) -> list[tuple[str, dict]]:
    """(location, record) for a JSONL file or a JSON list."""
    text = file.read_text(encoding="utf-8")
    if file.suffix == ".json":
        rows = json.loads(text)
        if not isinstance(rows, list):
            raise PrepareError(f"{file}: expected a JSON list of records")
        located = [(f"{file}[{index}]", row) for index, row in enumerate(rows)]
    else:
        located = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    located.append((f"{file}:{number}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise PrepareError(f"{file}:{number}: not valid JSON ({e})") from e
    for where, row in located:
        if not isinstance(row, dict):
            raise PrepareError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return located


def _field(where: str, row: dict, *names: str, optional: bool = False) -> Any:
    for name in names:
        if name in row:
            return row[name]
    if optional:
        return None
    raise PrepareError(f"{where}: field {' or '.join(map(repr, names))} is missing (fields: {sorted(row)})")


def _record(where: str, row: dict, source: str, *, input_field: str, output_field: str) -> dict:
    instruction, output = _field(where, row, "instruction"), _field(where, row, output_field)
    record = {"instruction": instruction, "input": _field(where, row, input_field, optional=True) or "",
              "output": output, "source": source, "category": _field(where, row, "category", "topic",
                                                                       optional=True)}
    if isinstance(output, list):  # S-NI: every reference answer; Rouge-L takes the best
        if not output or not all(isinstance(o, str) for o in output):
            raise PrepareError(f"{where}: field {output_field!r} should be a string or a non-empty list of strings")
        record["output"], record["references"] = output[0], output
    for name in ("instruction", "input", "output"):
        if not isinstance(record[name], str):
            raise PrepareError(f"{where}: field {name!r} should be a string, got {type(record[name]).__name__}")
    return record


def _evaluation_set(file: pathlib.Path, source: str) -> list[dict]:
    """MiniLLM's evaluation files (`valid.jsonl`: instruction, input, output or list of outputs, topic)."""
    return [_record(where, row, source, input_field="input", output_field="output") for where, row in _read(file)]


def _dolly(file: pathlib.Path, source: str) -> dict[str, list[dict]]:
    splits = json.loads(SPLITS_FILE.read_text())
    if file.name == "raw.jsonl":  # MiniLLM's release: test = valid.jsonl, valid = the first 1,000 of raw.jsonl
        test_file = file.with_name("valid.jsonl")
        if not test_file.is_file():
            raise FileNotFoundError(f"{test_file} is missing: MiniLLM's Dolly layout is raw.jsonl + valid.jsonl")
        raw = [_record(w, r, source, input_field="input", output_field="output") for w, r in _read(file)]
        test = [_record(w, r, source, input_field="input", output_field="output") for w, r in _read(test_file)]
        valid, train = raw[:len(splits["valid"])], raw[len(splits["valid"]):]
    else:
        records = [_record(w, r, source, input_field="context", output_field="response") for w, r in _read(file)]
        test, valid, train = _split_by_membership(records, splits, file)
        train.sort(key=lambda r: (r["category"] or "", r["instruction"], r["input"], r["output"]))
        random.Random(42).shuffle(train)
    dropped = set(splits["minillm_dropped"])
    for record in train:
        record["in_minillm_train"] = record_key(record["instruction"], record["output"]) not in dropped
    kept = [{k: v for k, v in r.items() if k != "in_minillm_train"} for r in train if r["in_minillm_train"]]
    return {"train": train, "valid": valid, "test": test, "train_minillm_exact": kept}


def _split_by_membership(records: list[dict], splits: dict, file: pathlib.Path):
    """(test, valid, train): each held-out key takes the first free record with that key (and category,
    for the few keys Dolly holds twice), in MiniLLM's order; train is every record left."""
    by_key = collections.defaultdict(list)
    for index, record in enumerate(records):
        by_key[record_key(record["instruction"], record["output"])].append(index)
    taken: set[int] = set()

    def take(entry: str) -> dict | None:
        key, _, category = entry.partition(":")
        chosen = [i for i in by_key.get(key, ()) if i not in taken]
        if category:
            chosen = [i for i in chosen if records[i]["category"] == category] or chosen
        if not chosen:
            return None
        taken.add(chosen[0])
        return records[chosen[0]]

    held = {split: [r for r in map(take, splits[split]) if r is not None] for split in ("test", "valid")}
    wanted = len(splits["test"]) + len(splits["valid"])
    found = len(held["test"]) + len(held["valid"])
    if found < _MIN_MATCHED * wanted:
        raise PrepareError(f"{file}: only {found} of MiniLLM's {wanted} held-out Dolly records are in it; expected "
                           "databricks-dolly-15k records (instruction, context, response, category)")
    train = [record for index, record in enumerate(records) if index not in taken]
    return held["test"], held["valid"], train


# ------------------------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minillm_jax.data.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("name", choices=list(DATASETS), help="which data set")
    parser.add_argument("--output", required=True, help="directory to write (e.g. data/dolly)")
    parser.add_argument("--source", default=None, help="hub dataset name, local directory or file "
                        "(default: the dataset's hub release, see the module docstring)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --output")
    args = parser.parse_args(argv)
    try:
        counts = prepare(args.name, args.output, source=args.source, force=args.force)
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    if args.name == "dolly":
        held = json.loads(SPLITS_FILE.read_text())
        for split in ("test", "valid"):
            if counts[split] < len(held[split]):
                print(f"note: {len(held[split]) - counts[split]} of MiniLLM's {len(held[split])} {split} records "
                      "are not in this Dolly revision", file=sys.stderr)
    print(f"wrote {args.output}: " + ", ".join(f"{split} {count}" for split, count in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
