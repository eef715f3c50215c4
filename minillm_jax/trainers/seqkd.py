"""SeqKD (Kim and Rush, 2016): the teacher answers the training prompts (temperature 1, as in the MiniLLM
baselines) and the student is fine-tuned on those answers with `sft.py`."""

from __future__ import annotations

import json
import os
import pathlib

import jax

from minillm_jax.sampling import SamplingConfig, generate
from minillm_jax.sharding import to_host


def teacher_answers(teacher, prompts: list[list[int]], sampling: SamplingConfig, rng, batch_size: int = 32):
    """Response token ids (EOS included when emitted) for every prompt, in order."""
    answers = []
    for start in range(0, len(prompts), batch_size):
        out = generate(teacher, prompts[start:start + batch_size], sampling, jax.random.fold_in(rng, start))
        tokens, lengths = to_host(out.tokens), to_host(out.lengths)
        answers += [row[:length].tolist() for row, length in zip(tokens, lengths)]
    return answers


def write_teacher_data(path: str | os.PathLike, records: list[dict], answers: list[list[int]], tokenizer,
                       output_field: str = "output") -> pathlib.Path:
    """A JSONL data file: each input record with its gold answer replaced by the teacher's (special tokens
    dropped). Written to a temporary name and renamed, so an interrupted run leaves no partial file (each
    process has its own temporary name: on a shared disk they write the same content side by side)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{jax.process_index()}.tmp")
    with open(tmp, "w") as f:
        for record, answer in zip(records, answers, strict=True):
            text = tokenizer.decode(answer, skip_special_tokens=True)
            f.write(json.dumps({**record, output_field: text}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path
