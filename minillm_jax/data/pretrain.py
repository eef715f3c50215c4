"""Plain text for MiniLLM's pre-training term L_PT: documents tokenised without special tokens, each
followed by EOS, the endless stream cut into consecutive `seq_len`-token chunks (no padding: a chunk may
span documents, and epochs).

Documents come from .txt files (blank-line-separated blocks), .jsonl files (one field per line; with
`text_field="output"` an instruction file's answers serve) or a dataset split (hub name or local folder,
"name:config", streamed when the builder can; note that `datasets` reads a folder of .txt files as one row
per line). The stream is lazy: it holds one batch, one document's
tokens and, when shuffling, the shuffle buffer; nothing is tokenised ahead of need.

Position: (epoch, document, offset) = the next chunk starts at token `offset` of the epoch's `document`-th
document. Restoring re-reads (without tokenising) the documents before it, so a resumed stream yields
exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import itertools
import os
import pathlib
from typing import Any, Iterator

import numpy as np

from minillm_jax.data.hub import describe, load_hub_dataset
from minillm_jax.data.instructions import RecordError, jsonl_rows, text_lines


class PackedText:
    """Endless, resumable L_PT batches {"tokens", "attention_mask", "loss_mask"}: int32 [batch_size, seq_len],
    masks all ones (the layout `trainers.common.token_means` consumes; it predicts tokens[:, 1:]).

    `shuffle_buffer` > 0 shuffles the source order and the documents (through a buffer of that many,
    seeded by (seed, epoch)) anew every epoch; a buffer at least the corpus size is a full permutation."""

    def __init__(self, sources, tokenizer, *, seq_len: int = 512, batch_size: int, text_field: str = "text",
                 seed: int = 0, shuffle_buffer: int = 0, split: str = "train", state: dict | None = None):
        self.sources = [str(s) for s in ([sources] if isinstance(sources, (str, os.PathLike)) else sources)]
        if not self.sources:
            raise ValueError("PackedText needs at least one source")
        if seq_len < 2 or batch_size < 1 or shuffle_buffer < 0:
            raise ValueError(f"need seq_len >= 2, batch_size >= 1, shuffle_buffer >= 0; got {seq_len}, "
                             f"{batch_size}, {shuffle_buffer}")
        if tokenizer.eos_token_id is None:
            raise ValueError("PackedText joins documents with EOS: the tokenizer has no eos_token_id")
        self.tokenizer, self.eos = tokenizer, int(tokenizer.eos_token_id)
        self.seq_len, self.batch_size, self.text_field = seq_len, batch_size, text_field
        self.seed, self.shuffle_buffer, self.split = seed, shuffle_buffer, split
        self._datasets = {s: load_hub_dataset(s, split=split, streaming=True)
                          for s in self.sources if _kind(s) == "dataset"}
        self.restore(state or {"epoch": 0, "document": 0, "offset": 0})

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        tokens = np.array([self._take(self.seq_len) for _ in range(self.batch_size)], np.int32)
        return {"tokens": tokens, "attention_mask": np.ones_like(tokens), "loss_mask": np.ones_like(tokens)}

    @property
    def epoch(self) -> int:
        return self._epoch

    def state(self) -> dict[str, int]:
        """The position after the last batch, JSON-serialisable; pass it to `restore` or the constructor."""
        return {"epoch": self._epoch, "document": self._document, "offset": self._offset, "seed": self.seed,
                "shuffle_buffer": self.shuffle_buffer}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a saved position (the documents are re-opened at the next batch)."""
        for key in ("seed", "shuffle_buffer"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"saved plain-text position has {key}={state[key]}, this stream {getattr(self, key)}: "
                                 "the document order would differ")
        self._epoch, self._document, self._offset = int(state["epoch"]), int(state["document"]), int(state["offset"])
        self._docs: Iterator[str] | None = None
        self._tokens: list[int] = []
        self._pass_tokens: int | None = None

    def _take(self, count: int) -> list[int]:
        """The next `count` tokens of the endless stream."""
        if self._docs is None:
            self._seek()
        out: list[int] = []
        while len(out) < count:
            if self._offset >= len(self._tokens):
                self._advance()
            piece = self._tokens[self._offset:self._offset + count - len(out)]
            out += piece
            self._offset += len(piece)
        return out

    def _seek(self) -> None:
        self._docs = self._documents(self._epoch)
        text = next(itertools.islice(self._docs, self._document, None), None)
        if text is None:
            if self._document:
                raise ValueError(f"saved plain-text position (epoch {self._epoch}, document {self._document}) lies "
                                 f"past the end of {self.sources}")
            raise self._too_short(0)
        self._tokens = self._encode(text)
        self._pass_tokens = len(self._tokens) if self._document == 0 else None

    def _advance(self) -> None:
        """Moves to the next document, starting a new epoch after the last one."""
        text = next(self._docs, None)
        if text is None:
            if self._pass_tokens is not None and self._pass_tokens < self.seq_len:
                raise self._too_short(self._pass_tokens)
            self._epoch, self._document, self._pass_tokens = self._epoch + 1, -1, 0
            self._docs = self._documents(self._epoch)
            text = next(self._docs, None)
            if text is None:
                raise self._too_short(0)
        self._document, self._offset = self._document + 1, 0
        self._tokens = self._encode(text)
        if self._pass_tokens is not None:
            self._pass_tokens += len(self._tokens)

    def _too_short(self, tokens: int) -> ValueError:
        return ValueError(f"plain-text sources {self.sources} hold {tokens} tokens (with EOS) in a full pass, "
                          f"not even one {self.seq_len}-token chunk")

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) + [self.eos]

    def _documents(self, epoch: int) -> Iterator[str]:
        """The epoch's document texts, in order (shuffled by (seed, epoch) when asked)."""
        if not self.shuffle_buffer:
            return itertools.chain.from_iterable(self._source_documents(s) for s in self.sources)
        rng = np.random.default_rng([self.seed, epoch])
        order = [self.sources[i] for i in rng.permutation(len(self.sources))]
        return buffer_shuffle(itertools.chain.from_iterable(self._source_documents(s) for s in order),
                              self.shuffle_buffer, rng)

    def _source_documents(self, source: str) -> Iterator[str]:
        kind = _kind(source)
        if kind == "txt":
            texts = text_blocks(source)
        elif kind == "jsonl":
            texts = jsonl_texts(source, self.text_field)
        else:
            texts = dataset_texts(self._datasets[source], self.text_field, describe(source, self.split))
        return (text for text in texts if text.strip())


def _kind(source: str) -> str:
    path = pathlib.Path(source)
    if path.suffix in (".txt", ".jsonl"):
        if not path.is_file():
            raise FileNotFoundError(f"plain-text file {source} does not exist")
        return path.suffix[1:]
    if path.is_file():
        raise ValueError(f"{source}: unsupported plain-text file type {path.suffix!r} (expected .txt, .jsonl, a "
                         "dataset folder or a hub dataset name)")
    return "dataset"


def text_blocks(path: str | os.PathLike) -> Iterator[str]:
    """Documents of a .txt file: blocks of lines separated by blank (or whitespace-only) lines; a line that
    is not UTF-8 fails with its file:line and byte offset."""
    block: list[str] = []
    for number, line, problem in text_lines(path):
        if problem:
            raise RecordError(f"{path}:{number}: {problem}")
        if line.strip():
            block.append(line)
        elif block:
            yield "\n".join(block)
            block = []
    if block:
        yield "\n".join(block)


def jsonl_texts(path: str | os.PathLike, field: str) -> Iterator[str]:
    """The `field` of every line of a .jsonl file; a bad line fails with its file:line."""
    for number, row, problem in jsonl_rows(path):
        if problem:
            raise RecordError(f"{path}:{number}: {problem}")
        yield _text_of(row, field, f"{path}:{number}")


def dataset_texts(dataset, field: str, where: str) -> Iterator[str]:
    for index, row in enumerate(dataset):
        yield _text_of(row, field, f"{where} row {index}")


def _text_of(row: Any, field: str, where: str) -> str:
    if not isinstance(row, dict) or field not in row:
        present = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise RecordError(f"{where}: missing text field {field!r} (found: {present})")
    if not isinstance(row[field], str):
        raise RecordError(f"{where}: field {field!r} should be a string, got {type(row[field]).__name__}")
    return row[field]


def buffer_shuffle(items: Iterator[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """A seeded streaming shuffle: each item waits in a buffer of `size` and leaves at a random slot's turn
    (memory bounded by the buffer; a buffer at least the stream's length gives a uniform permutation)."""
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        slot = int(rng.integers(size))
        yield buffer[slot]
        buffer[slot] = item
    yield from (buffer[i] for i in rng.permutation(len(buffer)))
