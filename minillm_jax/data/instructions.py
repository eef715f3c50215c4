"""Instruction data: records from JSONL / JSON / Parquet files, the paper's Alpaca template or the
tokenizer's chat template, and MiniLLM's tokenisation rule:

    prompt_ids = enc(prompt); full = enc(prompt + response) + [eos]; response_ids = full[len(prompt_ids):]

Examples whose prompt or whole sequence is too long are dropped and counted. Batches come from a
deterministic per-epoch shuffle whose position (epoch, index) can be saved and restored.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
from typing import Any, Iterator

import numpy as np

logger = logging.getLogger(__name__)

ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                     "{instruction}\n\n### Input:\n{input}\n\n### Response:\n")


class RecordError(ValueError):
    """A malformed data record; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class FieldMap:
    """Which record fields hold the instruction, the optional input and the answer."""

    instruction: str = "instruction"
    input: str | None = "input"
    output: str = "output"


def read_records(path: str | os.PathLike, fields: FieldMap = FieldMap(), *, on_error: str = "fail",
                 require_output: bool = True) -> tuple[list[dict[str, Any]], int]:
    """Records from a .jsonl, .json (a list) or .parquet file; returns (records, skipped count).
    `on_error="skip"` drops malformed records (counted and logged) instead of failing on the first."""
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error={on_error!r}: expected 'fail' or 'skip'")
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist")
    if path.suffix == ".jsonl":
        rows = _jsonl_rows(path)
    elif path.suffix == ".json":
        data = json.loads(path.read_text())
        if not isinstance(data, list):
            raise RecordError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        rows = ((i + 1, row, None) for i, row in enumerate(data))
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = ((i + 1, row, None) for i, row in enumerate(pq.read_table(path).to_pylist()))
    else:
        raise ValueError(f"{path}: unsupported data file type {path.suffix!r} (expected .jsonl, .json or .parquet)")

    records, skipped = [], 0
    for line, row, parse_error in rows:
        problem = parse_error or _check(row, fields, require_output)
        if problem:
            message = f"{path}:{line}: {problem}"
            if on_error == "fail":
                raise RecordError(message)
            skipped += 1
            logger.warning("skipping %s", message)
            continue
        records.append(row)
    return records, skipped


def _jsonl_rows(path: pathlib.Path) -> Iterator[tuple[int, Any, str | None]]:
    with open(path, encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                yield number, json.loads(text), None
            except json.JSONDecodeError as e:
                yield number, None, f"not valid JSON ({e.msg} at column {e.colno})"


def _check(row: Any, fields: FieldMap, require_output: bool) -> str | None:
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    needed = [fields.instruction] + ([fields.output] if require_output else [])
    for key in needed:
        if key not in row:
            return f"missing field {key!r} (fields present: {sorted(row)})"
        if not isinstance(row[key], str):
            return f"field {key!r} should be a string, got {type(row[key]).__name__}"
    if fields.input and row.get(fields.input) is not None and not isinstance(row[fields.input], str):
        return f"field {fields.input!r} should be a string, got {type(row[fields.input]).__name__}"
    return None


def format_prompt(record: dict[str, Any], fields: FieldMap = FieldMap(), *, template: str = "alpaca",
                  tokenizer=None) -> str:
    """The prompt text: the paper's Alpaca template, or the tokenizer's chat template (instruction and
    input joined by a blank line as the user turn, generation prompt appended)."""
    instruction = record[fields.instruction]
    extra = (record.get(fields.input) or "") if fields.input else ""
    if template == "alpaca":
        if extra.strip():
            return ALPACA_WITH_INPUT.format(instruction=instruction, input=extra)
        return ALPACA.format(instruction=instruction)
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("template='chat' needs a tokenizer with a chat template")
        content = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    raise ValueError(f"template={template!r}: expected 'alpaca' or 'chat'")


def tokenize_pair(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """MiniLLM's rule: response ids are the joint tokenisation past the prompt's length, plus EOS."""
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    full = tokenizer(prompt + response, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids, full[len(prompt_ids):]


@dataclasses.dataclass
class InstructionData:
    """Tokenised examples with length filters, and resumable shuffled batches for SFT-style training."""

    prompts: list[list[int]]
    responses: list[list[int]]
    dropped: int
    pad_token_id: int

    @classmethod
    def build(cls, records, tokenizer, fields: FieldMap = FieldMap(), *, template: str = "alpaca",
              max_prompt_length: int = 256, max_length: int = 512) -> "InstructionData":
        prompts, responses, dropped = [], [], 0
        for record in records:
            prompt_ids, response_ids = tokenize_pair(tokenizer, format_prompt(record, fields, template=template,
                                                                              tokenizer=tokenizer),
                                                     record[fields.output])
            if len(prompt_ids) > max_prompt_length or len(prompt_ids) + len(response_ids) > max_length:
                dropped += 1
                continue
            prompts.append(prompt_ids)
            responses.append(response_ids)
        if dropped:
            logger.info("dropped %d of %d examples longer than the prompt (%d) or total (%d) limits", dropped,
                        len(records), max_prompt_length, max_length)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls(prompts, responses, dropped, int(pad))

    def __len__(self) -> int:
        return len(self.prompts)

    def order(self, epoch: int, seed: int) -> np.ndarray:
        """The example order of an epoch: a permutation fixed by (seed, epoch)."""
        return np.random.default_rng([seed, epoch]).permutation(len(self))

    def batches(self, batch_size: int, seed: int, position: tuple[int, int] = (0, 0)) -> Iterator[
            tuple[dict[str, np.ndarray], tuple[int, int]]]:
        """Endless (batch, next position) pairs; pass a saved position back in to resume exactly. Each
        batch is left-padded prompt + response: tokens, attention_mask and loss_mask (response tokens)."""
        epoch, index = position
        while True:
            order = self.order(epoch, seed)
            while index + batch_size <= len(order):
                chosen = order[index:index + batch_size]
                index += batch_size
                yield self.collate(chosen), (epoch, index)
            epoch, index = epoch + 1, 0

    def collate(self, indices) -> dict[str, np.ndarray]:
        rows = [(self.prompts[i], self.responses[i]) for i in indices]
        width = max(len(p) + len(r) for p, r in rows)
        tokens = np.full((len(rows), width), self.pad_token_id, np.int32)
        attention = np.zeros((len(rows), width), np.int32)
        loss_mask = np.zeros((len(rows), width), np.int32)
        for row, (prompt, response) in enumerate(rows):
            start = width - len(prompt) - len(response)
            tokens[row, start:] = prompt + response
            attention[row, start:] = 1
            loss_mask[row, start + len(prompt):] = 1
        return {"tokens": tokens, "attention_mask": attention, "loss_mask": loss_mask}
