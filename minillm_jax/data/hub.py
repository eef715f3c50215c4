"""Records from anywhere `datasets` can load: a hub dataset name or a local dataset folder, with an
optional `name:config` suffix. Local data files keep going through `read_records`, so a typo in a file
name fails as a missing file instead of a hub lookup. Remote code is never run (`datasets` no longer
executes loading scripts, and no `trust_remote_code` is passed).
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

from minillm_jax.data.instructions import FieldMap, collect_records, read_records

DATA_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


def split_source(source: str | os.PathLike) -> tuple[str, str | None]:
    """(name, config) from "name" or "name:config"; an existing path is taken whole."""
    source = str(source)
    if os.path.exists(source) or ":" not in source:
        return source, None
    name, config = source.rsplit(":", 1)
    return name, config or None


def describe(source: str | os.PathLike, split: str) -> str:
    """How error messages name a dataset split."""
    name, config = split_source(source)
    return f"dataset {name!r}" + (f" (config {config!r})" if config else "") + f" split {split!r}"


def load_hub_dataset(source: str | os.PathLike, *, split: str, streaming: bool = False):
    """`datasets.load_dataset` for `source` ("name[:config]"), with errors that name what was asked for.
    With `streaming`, falls back to a regular (memory-mapped, still lazily read) dataset for builders that
    cannot stream."""
    import datasets

    name, config = split_source(source)
    where = describe(source, split)
    try:
        try:
            return datasets.load_dataset(name, config, split=split, streaming=streaming)
        except NotImplementedError:
            if not streaming:
                raise
            return datasets.load_dataset(name, config, split=split)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{where}: {e}") from e
    except (ValueError, ConnectionError) as e:
        raise ValueError(f"{where}: {e}") from e


def is_data_file(source: str | os.PathLike) -> bool:
    """A local file (or what is meant as one: a name with a data-file suffix that is not a folder)."""
    path = pathlib.Path(source)
    return path.is_file() or (path.suffix in DATA_FILE_SUFFIXES and not path.is_dir())


def load_records(source: str | os.PathLike, fields: FieldMap = FieldMap(), *, split: str = "train",
                 on_error: str = "fail", require_output: bool = True,
                 limit: int | None = None) -> tuple[list[dict[str, Any]], int]:
    """Records from a data file (`read_records`) or a dataset split (hub name or local folder,
    "name:config" to pick a config), checked alike; returns (records, skipped count). Errors in dataset
    rows name the dataset, split and row index (0-based, as `dataset[i]`)."""
    if is_data_file(source):
        return read_records(source, fields, on_error=on_error, require_output=require_output, limit=limit)
    dataset = load_hub_dataset(source, split=split)
    where = describe(source, split)
    rows = ((f"{where} row {index}", row, None) for index, row in enumerate(dataset))
    return collect_records(rows, fields, on_error=on_error, require_output=require_output, limit=limit, source=where)
