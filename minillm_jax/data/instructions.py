"""Instruction data: records from JSONL / JSON / Parquet files (instruction / input / output fields, or a
list of chat messages), the paper's Alpaca template or the tokenizer's chat template, and MiniLLM's
tokenisation rule:

    prompt_ids = enc(prompt); full = enc(prompt + response) + [eos]; response_ids = full[len(prompt_ids):]

Examples whose prompt or whole sequence is too long are dropped and counted. Batches come from a
deterministic per-epoch shuffle whose position (epoch, index) can be saved and restored.
"""

from __future__ import annotations

import codecs
import dataclasses
import itertools
import json
import logging
import os
import pathlib
from typing import Any, Iterable, Iterator

import numpy as np

logger = logging.getLogger(__name__)

ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                     "{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
CHAT_ROLES = ("system", "user", "assistant", "tool")
TOKENIZE_CHUNK = 256  # examples per tokenizer call while building: parallel encoding, bounded memory


class RecordError(ValueError):
    """A malformed data record; the message names the file and line (or dataset, split and row)."""


@dataclasses.dataclass(frozen=True)
class FieldMap:
    """Which record fields hold the instruction, the optional input and the answer. With `messages` set,
    records are chat conversations instead (a list of {"role", "content"} in that field): the answer is the
    last assistant message and the other fields are not used."""

    instruction: str = "instruction"
    input: str | None = "input"
    output: str = "output"
    messages: str | None = None


def read_records(path: str | os.PathLike, fields: FieldMap = FieldMap(), *, on_error: str = "fail",
                 require_output: bool = True, limit: int | None = None) -> tuple[list[dict[str, Any]], int]:
    """Records from a .jsonl, .json (a list) or .parquet file; returns (records, skipped count).
    `on_error="skip"` drops malformed records (counted and logged) instead of failing on the first;
    `limit` stops after that many good records."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist")
    if path.suffix == ".jsonl":
        rows = jsonl_rows(path)
    elif path.suffix == ".json":
        data = _read_json(path)
        if not isinstance(data, list):
            raise RecordError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        rows = ((i + 1, row, None) for i, row in enumerate(data))
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = ((i + 1, row, None) for i, row in enumerate(pq.read_table(path).to_pylist()))
    else:
        raise ValueError(f"{path}: unsupported data file type {path.suffix!r} (expected .jsonl, .json or .parquet)")
    located = ((f"{path}:{line}", row, parse_error) for line, row, parse_error in rows)
    return collect_records(located, fields, on_error=on_error, require_output=require_output, limit=limit,
                           source=str(path))


def collect_records(rows: Iterable[tuple[str, Any, str | None]], fields: FieldMap, *, on_error: str,
                    require_output: bool, limit: int | None,
                    source: str | None = None) -> tuple[list[dict[str, Any]], int]:
    """Checks (location, row, parse error) triples, so files and hub datasets fail or skip alike. With
    `source` (how messages name the file or dataset), finding no good record is an error."""
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error={on_error!r}: expected 'fail' or 'skip'")
    records, skipped = [], 0
    for where, row, parse_error in rows:
        if limit is not None and len(records) >= limit:
            break
        problem = parse_error or check_record(row, fields, require_output)
        if problem:
            message = f"{where}: {problem}"
            if on_error == "fail":
                raise RecordError(message)
            skipped += 1
            logger.warning("skipping %s", message)
            continue
        records.append(row)
    if source is not None and not records and limit != 0:
        if skipped:
            raise RecordError(f"{source} holds no usable records: all {skipped} were malformed and skipped")
        raise RecordError(f"{source} holds no records")
    return records, skipped


def text_lines(path: str | os.PathLike) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, text, problem) for every line of a UTF-8 text file, decoded line by line so that a
    bad byte costs one line (text None, problem naming its column and byte offset), not the file. Lines
    end at LF only (a stray CR does not shift the numbering); the line ending and a leading BOM are
    not part of the text."""
    offset = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            start, offset = offset, offset + len(raw)
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw, start = raw[len(codecs.BOM_UTF8):], start + len(codecs.BOM_UTF8)
            line = raw[:-1] if raw.endswith(b"\n") else raw
            line = line[:-1] if line.endswith(b"\r") else line
            try:
                yield number, line.decode("utf-8"), None
            except UnicodeDecodeError as e:
                column = len(line[:e.start].decode("utf-8")) + 1
                yield number, None, (f"not valid UTF-8 (byte 0x{line[e.start]:02x} at column {column}, byte offset "
                                     f"{start + e.start} of the file)")


def jsonl_rows(path: str | os.PathLike) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, parsed value, problem) for every non-blank line of a JSONL file; columns in problems
    count characters of that line from 1."""
    for number, text, problem in text_lines(path):
        if problem:
            yield number, None, problem
        elif text.strip():
            try:
                yield number, json.loads(text), None
            except json.JSONDecodeError as e:
                yield number, None, f"not valid JSON ({e.msg} at column {e.colno})"


def _read_json(path: pathlib.Path) -> Any:
    """A whole .json file, its errors located by line, column and byte offset."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise RecordError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at byte offset {e.start} of "
                          "the file)") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None


def check_record(row: Any, fields: FieldMap, require_output: bool) -> str | None:
    """What is wrong with one record, or None; the caller adds where it came from."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    if fields.messages:
        if fields.messages not in row:
            return f"missing field {fields.messages!r} (fields present: {sorted(row)})"
        return _check_messages(row[fields.messages], fields.messages, require_output)
    needed = [fields.instruction] + ([fields.output] if require_output else [])
    for key in needed:
        if key not in row:
            return f"missing field {key!r} (fields present: {sorted(row)})"
        if not isinstance(row[key], str):
            return f"field {key!r} should be a string, got {type(row[key]).__name__}"
    if fields.input and row.get(fields.input) is not None and not isinstance(row[fields.input], str):
        return f"field {fields.input!r} should be a string, got {type(row[fields.input]).__name__}"
    return None


def _check_messages(messages: Any, name: str, require_output: bool) -> str | None:
    if not isinstance(messages, list) or not messages:
        return f"field {name!r} should be a non-empty list of messages, got {_describe(messages)}"
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"{name}[{i}] should be an object with 'role' and 'content', got {type(message).__name__}"
        for key in ("role", "content"):
            if key not in message:
                return f"{name}[{i}] is missing {key!r} (keys present: {sorted(message)})"
        if message["role"] not in CHAT_ROLES:
            return f"{name}[{i}] has role {message['role']!r}, expected one of {list(CHAT_ROLES)}"
        if not isinstance(message["content"], str):
            return f"{name}[{i}] content should be a string, got {type(message['content']).__name__}"
    if require_output and messages[-1]["role"] != "assistant":
        return f"the last message of {name!r} should be the assistant's answer, got role {messages[-1]['role']!r}"
    if not any(message["role"] == "user" for message in split_messages(messages)[0]):
        return f"{name!r} has no user message before the answer"
    return None


def _describe(value: Any) -> str:
    return "an empty list" if value == [] else type(value).__name__


def split_messages(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], str | None]:
    """(prompt messages, answer): the answer is a final assistant turn; a conversation ending on another
    role is all prompt (usable where no answer is needed)."""
    if messages[-1]["role"] == "assistant":
        return messages[:-1], messages[-1]["content"]
    return messages, None


def response_text(record: dict[str, Any], fields: FieldMap = FieldMap()) -> str:
    """The answer of a record in either layout: the output field, or the last assistant message."""
    if not fields.messages:
        return record[fields.output]
    answer = split_messages(record[fields.messages])[1]
    if answer is None:
        raise ValueError(f"record's {fields.messages!r} does not end with an assistant answer")
    return answer


def format_prompt(record: dict[str, Any], fields: FieldMap = FieldMap(), *, template: str = "alpaca",
                  tokenizer=None) -> str:
    """The prompt text: the paper's Alpaca template, or the tokenizer's chat template (instruction and
    input joined by a blank line as the user turn, generation prompt appended). Chat-message records
    always use the chat template, over every message before the answer."""
    if fields.messages:
        if template != "chat":
            raise ValueError(f"records with chat messages need template='chat', got {template!r}")
        prompt = [{"role": m["role"], "content": m["content"]} for m in split_messages(record[fields.messages])[0]]
        return _chat_template(tokenizer, prompt)
    instruction = record[fields.instruction]
    extra = (record.get(fields.input) or "") if fields.input else ""
    if template == "alpaca":
        if extra.strip():
            return ALPACA_WITH_INPUT.format(instruction=instruction, input=extra)
        return ALPACA.format(instruction=instruction)
    if template == "chat":
        content = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return _chat_template(tokenizer, [{"role": "user", "content": content}])
    raise ValueError(f"template={template!r}: expected 'alpaca' or 'chat'")


def _chat_template(tokenizer, messages: list[dict[str, str]]) -> str:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("template='chat' needs a tokenizer with a chat template")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def tokenize_pair(tokenizer, prompt: str, response: str, *, add_special_tokens: bool = True
                  ) -> tuple[list[int], list[int]]:
    """MiniLLM's rule: response ids are the joint tokenisation past the prompt's length, plus EOS.
    `add_special_tokens=False` is the reference's encoding (no BOS even where the tokenizer adds one)."""
    return tokenize_pairs(tokenizer, [prompt], [response], add_special_tokens=add_special_tokens)[0]


def tokenize_pairs(tokenizer, prompts: list[str], responses: list[str], *, add_special_tokens: bool = True
                   ) -> list[tuple[list[int], list[int]]]:
    """`tokenize_pair` over many examples in one tokenizer call (fast tokenizers encode a list in parallel)."""
    prompt_ids = tokenizer(prompts, add_special_tokens=add_special_tokens)["input_ids"]
    full = tokenizer([p + r for p, r in zip(prompts, responses)], add_special_tokens=add_special_tokens)["input_ids"]
    return [(list(p), list(f[len(p):]) + [tokenizer.eos_token_id]) for p, f in zip(prompt_ids, full)]


def _chunks(items, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


@dataclasses.dataclass
class InstructionData:
    """Tokenised examples with length filters, and resumable shuffled batches: whole sequences for
    SFT-style training, prompts alone for MiniLLM rollouts."""

    prompts: list[list[int]]
    responses: list[list[int]]
    dropped: int
    pad_token_id: int

    @classmethod
    def build(cls, records, tokenizer, fields: FieldMap = FieldMap(), *, template: str = "alpaca",
              max_prompt_length: int = 256, max_length: int = 512, max_examples: int | None = None,
              add_special_tokens: bool = True) -> "InstructionData":
        """Keeps the examples within both length limits, in record order; with `max_examples`, the first
        that many kept (tokenising stops there, so a small run does not pay for the whole file)."""
        prompts, responses, dropped = [], [], 0
        for chunk in _chunks(records, TOKENIZE_CHUNK):
            if max_examples is not None and len(prompts) >= max_examples:
                break
            texts = [format_prompt(record, fields, template=template, tokenizer=tokenizer) for record in chunk]
            pairs = tokenize_pairs(tokenizer, texts, [response_text(r, fields) for r in chunk],
                                   add_special_tokens=add_special_tokens)
            for prompt_ids, response_ids in pairs:
                if max_examples is not None and len(prompts) >= max_examples:
                    break
                if len(prompt_ids) > max_prompt_length or len(prompt_ids) + len(response_ids) > max_length:
                    dropped += 1
                    continue
                prompts.append(prompt_ids)
                responses.append(response_ids)
        if dropped:
            logger.info("dropped %d of %d examples longer than the prompt (%d) or total (%d) limits", dropped,
                        len(prompts) + dropped, max_prompt_length, max_length)
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
        for chosen, next_position in self._index_batches(batch_size, seed, position):
            yield self.collate(chosen), next_position

    def prompt_batches(self, batch_size: int, seed: int, position: tuple[int, int] = (0, 0)) -> Iterator[
            tuple[list[list[int]], tuple[int, int]]]:
        """Endless (prompt id lists, next position) pairs in the same order as `batches`: MiniLLM's
        rollouts need only the prompts (the sampler pads them itself)."""
        for chosen, next_position in self._index_batches(batch_size, seed, position):
            yield [list(self.prompts[i]) for i in chosen], next_position

    def _index_batches(self, batch_size: int, seed: int, position: tuple[int, int]) -> Iterator[
            tuple[np.ndarray, tuple[int, int]]]:
        """Example indices per batch; an epoch's incomplete last batch is dropped so every batch has the
        same size. The position (epoch, index) says where the next batch starts."""
        if not 0 < batch_size <= len(self):
            raise ValueError(f"batch_size={batch_size} must be between 1 and the number of examples ({len(self)})")
        epoch, index = (int(p) for p in position)
        while True:
            order = self.order(epoch, seed)
            while index + batch_size <= len(order):
                chosen = order[index:index + batch_size]
                index += batch_size
                yield chosen, (epoch, index)
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
