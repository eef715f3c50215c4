"""Host batches in the one layout every trainer takes, and the resumable feeds that make them.

A sequence batch is a dict of numpy arrays: `prompt` [B, P] int32 left-padded with `prompt_mask` [B, P],
then `response` [B, R] int32 right-padded with `response_mask` [B, R] (True on the tokens a loss counts,
EOS included). Plain text for L_PT uses it too (prompt = the first token, response = the rest). Widths
come from a few buckets per run, so the compiled steps see few shapes; the trainers unembed only the
response positions, never the prompt or its padding.

Stacked inputs put the rows on the second-to-last axis of every array ([..., B, T]), so one rule places
any of them on the mesh (`sharding.place_batch`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from minillm_jax.data.instructions import InstructionData

SEQUENCE_KEYS = ("prompt", "prompt_mask", "response", "response_mask")


def length_buckets(longest: int, count: int, multiple: int = 8) -> tuple[int, ...]:
    """`count` widths evenly spaced up to `longest`, each rounded up to a multiple of `multiple`."""
    if longest < 1:
        raise ValueError(f"length_buckets: longest={longest} must be >= 1")
    widths = {_round_up(math.ceil(longest * (i + 1) / count), multiple) for i in range(max(count, 1))}
    return tuple(sorted(widths))


def fit(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds `length`."""
    for width in buckets:
        if width >= length:
            return width
    raise ValueError(f"a sequence of {length} tokens exceeds the largest bucket {buckets[-1]}")


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def sequence_batch(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], prompt_width: int,
                   response_width: int, pad_id: int) -> dict[str, np.ndarray]:
    """Left-padded prompts and right-padded responses (a response longer than the width is cut)."""
    rows = len(prompts)
    batch = {"prompt": np.full((rows, prompt_width), pad_id, np.int32),
             "prompt_mask": np.zeros((rows, prompt_width), bool),
             "response": np.full((rows, response_width), pad_id, np.int32),
             "response_mask": np.zeros((rows, response_width), bool)}
    for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        if len(prompt) > prompt_width:
            raise ValueError(f"row {i}: prompt of {len(prompt)} tokens exceeds the width {prompt_width}")
        if len(prompt):
            batch["prompt"][i, prompt_width - len(prompt):] = prompt
            batch["prompt_mask"][i, prompt_width - len(prompt):] = True
        kept = list(response)[:response_width]
        batch["response"][i, :len(kept)] = kept
        batch["response_mask"][i, :len(kept)] = True
    return batch


def text_batch(tokens: np.ndarray) -> dict[str, np.ndarray]:
    """Plain-text chunks [B, L] (L_PT) as a sequence batch: predict tokens 1..L-1 from their prefixes."""
    tokens = np.asarray(tokens, np.int32)
    ones = np.ones(tokens.shape, bool)
    return {"prompt": tokens[:, :1], "prompt_mask": ones[:, :1], "response": tokens[:, 1:],
            "response_mask": ones[:, 1:]}


def stack(batches: Sequence[dict]) -> dict:
    return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def count_tokens(batch: dict) -> int:
    """Real tokens in a (stacked) sequence batch: prompt and response."""
    return int(np.sum(batch["prompt_mask"])) + int(np.sum(batch["response_mask"]))


@dataclasses.dataclass(frozen=True)
class Widths:
    """The buckets of a run's prompt and response widths; a fixed width when a tuple has one entry."""

    prompt: tuple[int, ...]
    response: tuple[int, ...]

    @classmethod
    def of(cls, data: InstructionData, buckets: int, *, min_response: int = 0, fixed_prompt: bool = False,
           fixed_response: bool = False) -> "Widths":
        longest_prompt = max(map(len, data.prompts))
        longest_response = max(max(map(len, data.responses)) if data.responses else 1, min_response)
        prompt = length_buckets(longest_prompt, 1 if fixed_prompt else buckets)
        response = length_buckets(longest_response, 1 if fixed_response else buckets)
        return cls(prompt[-1:] if fixed_prompt else prompt, response[-1:] if fixed_response else response)


class Order:
    """Deterministic shuffled example indices in fixed-size groups, resumable at (epoch, index); an
    epoch's incomplete last group is dropped so every group has the same size."""

    def __init__(self, count: int, group: int, seed: int, position: tuple[int, int] = (0, 0)):
        if not 0 < group <= count:
            raise ValueError(f"a batch of {group} rows needs at least that many examples, the data has {count}")
        self.count, self.group, self.seed = count, group, seed
        self.epoch, self.index = (int(p) for p in position)

    def next(self) -> np.ndarray:
        if self.index + self.group > self.count:
            self.epoch, self.index = self.epoch + 1, 0
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.count)
        chosen = order[self.index:self.index + self.group]
        self.index += self.group
        return chosen

    @property
    def position(self) -> list[int]:
        return [self.epoch, self.index]


class GoldFeed:
    """Gold (or teacher-written) examples: each `next()` is one optimizer update's input, `accumulate`
    micro-batches of `rows // accumulate` rows stacked [A, b, ...]."""

    def __init__(self, data: InstructionData, rows: int, accumulate: int, seed: int, widths: Widths):
        self.data, self.accumulate, self.widths = data, accumulate, widths
        self.order = Order(len(data), rows, seed)

    def next(self) -> dict:
        return self.batch(self.order.next())

    def batch(self, chosen, *, prompt_width: int | None = None, response_width: int | None = None) -> dict:
        """The stacked micro-batches of rows `chosen`: widths from the buckets unless given; with a
        `response_width`, empty responses of that width (prompts for a sampler to answer)."""
        prompts = [self.data.prompts[i] for i in chosen]
        if response_width is None:
            responses = [self.data.responses[i] for i in chosen]
            response_width = fit(max(map(len, responses)), self.widths.response)
        else:
            responses = [[]] * len(chosen)
        prompt_width = prompt_width or fit(max(map(len, prompts)), self.widths.prompt)
        widths = (prompt_width, response_width)  # one shape for every micro-batch of the update
        rows = len(chosen) // self.accumulate
        return stack([sequence_batch(prompts[i:i + rows], responses[i:i + rows], *widths, self.data.pad_token_id)
                      for i in range(0, len(chosen), rows)])

    def example(self, prompt_width: int | None = None, response_width: int | None = None) -> dict:
        """All-padding inputs of the largest widths (or the given ones): the shapes and dtypes `next()` can
        return."""
        rows = self.order.group // self.accumulate
        empty = sequence_batch([[]] * rows, [[]] * rows, prompt_width or self.widths.prompt[-1],
                               response_width or self.widths.response[-1], self.data.pad_token_id)
        return stack([empty] * self.accumulate)

    def state(self) -> dict:
        return {"position": self.order.position}

    def restore(self, saved: dict) -> None:
        self.order.epoch, self.order.index = (int(p) for p in saved["position"])

    def after_validation(self, metrics: dict) -> None:
        pass


__all__ = ["GoldFeed", "Order", "SEQUENCE_KEYS", "Widths", "count_tokens", "fit", "length_buckets",
           "sequence_batch", "stack", "text_batch"]
