"""SeqKD (Kim and Rush, 2016): the teacher answers every training prompt once (temperature 1, as in the
MiniLLM baselines), then the student is fine-tuned on those answers with `sft.py`, on the very token ids
the teacher sampled (no decode and re-tokenise round trip).

The answers are kept in `<workdir>/seqkd/teacher_answers.jsonl` (one line per prompt, the ids and the
decoded text), appended batch by batch, so an interrupted run continues where it stopped and draws what an
uninterrupted one would (batch i samples with fold_in(key, i)).
"""

from __future__ import annotations

import json
import os
import pathlib

import jax

from minillm_jax import sampling, sharding
from minillm_jax.data.instructions import InstructionData
from minillm_jax.trainers import sft
from minillm_jax.trainers.common import Method, step_keys

ANSWERS = "seqkd/teacher_answers.jsonl"


def teacher_answers(teacher, prompts: list[list[int]], config: sampling.SamplingConfig, key, path: pathlib.Path,
                    batch_size: int, tokenizer=None) -> list[list[int]]:
    """Response ids (EOS included when emitted) for every prompt, in order, continuing the answers already
    in `path`. Every batch has `batch_size` rows (the last one padded with copies of its last prompt)."""
    done = read_answers(path) if path.exists() else []
    if len(done) > len(prompts):
        raise ValueError(f"{path} holds {len(done)} answers for {len(prompts)} prompts: it belongs to other data; "
                         "remove it or use another --workdir")
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = open(path, "a", encoding="utf-8") if jax.process_index() == 0 else None
    try:
        for start in range(len(done), len(prompts), batch_size):
            rows = prompts[start:start + batch_size]
            real = len(rows)
            out = sampling.generate(teacher, rows + [rows[-1]] * (batch_size - real), config,
                                    jax.random.fold_in(key, start // batch_size))
            tokens, lengths = sharding.to_host(out.tokens), sharding.to_host(out.lengths)
            answers = [row[:length].tolist() for row, length in zip(tokens[:real], lengths[:real])]
            done += answers
            if writer is not None:
                for ids in answers:
                    text = tokenizer.decode(ids, skip_special_tokens=True) if tokenizer is not None else ""
                    writer.write(json.dumps({"response_ids": ids, "output": text}, ensure_ascii=False) + "\n")
                writer.flush()
                os.fsync(writer.fileno())
    finally:
        if writer is not None:
            writer.close()
    return done


def read_answers(path: pathlib.Path) -> list[list[int]]:
    """The answers in `path`; a torn last line (an interrupted write) is dropped and rewritten later."""
    lines = path.read_text(encoding="utf-8").splitlines()
    answers = []
    for number, line in enumerate(lines, start=1):
        try:
            ids = json.loads(line)["response_ids"]
        except (json.JSONDecodeError, KeyError, TypeError):
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number}: not a teacher answer line") from None
        answers.append([int(i) for i in ids])
    if len(answers) < len(lines) and jax.process_index() == 0:  # cut the torn line so appends stay aligned
        path.write_text("".join(line + "\n" for line in lines[:len(answers)]), encoding="utf-8")
    return answers


def build(setup) -> Method:
    c = setup.config
    data = setup.train
    answers = teacher_answers(setup.teacher, data.prompts, setup.sampling, step_keys(c.seed, 0)["sample"],
                              setup.workdir / ANSWERS, c.batch_size, setup.tokenizer)
    kept = [(p, a) for p, a in zip(data.prompts, answers) if len(p) + len(a) <= c.data.max_length]
    if not kept:
        raise ValueError(f"every teacher answer is longer than data.max_length={c.data.max_length}")
    teacher_data = InstructionData([p for p, _ in kept], [a for _, a in kept], len(answers) - len(kept),
                                   data.pad_token_id)
    return sft.build(setup, teacher_data)


__all__ = ["ANSWERS", "build", "read_answers", "teacher_answers"]
