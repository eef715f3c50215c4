"""Validation during training: the student's sampled answers to held-out prompts scored by Rouge-L against
the gold answers and (with a teacher) the teacher's, the reverse KL to the teacher on the student's own
samples (per answer, the sum of each step's KL over the vocabulary; also per token), and the student's
cross-entropy on the gold answers (`valid/loss`). Greedy answers of the teacher and the student, for the run
summary, come from `greedy_answers`.

Keys: every validation samples with the same key (so successive figures differ by the model alone).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx

from minillm_jax import evaluate
from minillm_jax.data import FieldMap, InstructionData, format_prompt, response_text
from minillm_jax.data.batches import GoldFeed, Widths, sequence_batch
from minillm_jax.sampling import SamplingConfig
from minillm_jax.trainers import sft
from minillm_jax.trainers.common import jit_eval

CE_ROWS = 8  # rows per chunk of the validation cross-entropy (one compiled shape)


def prompt_ids(tokenizer, record: dict, fields: FieldMap, *, template: str, max_prompt_length: int,
               add_special_tokens: bool = True) -> list[int]:
    """A record's prompt, truncated to its first max_prompt_length tokens (as the paper's evaluation)."""
    text = format_prompt(record, fields, template=template, tokenizer=tokenizer)
    return tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"][:max_prompt_length]


@dataclasses.dataclass
class Validator:
    """Held-out records of a run, scored at every validation by `__call__(params) -> (metrics, texts)`. The
    teacher's greedy answers (made once) are the reference of `valid/rouge_l_teacher` and of the summary."""

    records: list[dict]
    prompts: list[list[int]]
    gold: list[list[str]]
    gold_data: InstructionData | None
    tokenizer: object
    graphdef: object
    teacher: nnx.Module | None
    sampling: SamplingConfig
    batch_size: int
    seed: int
    layout: object = None
    teacher_texts: list[str] | None = None

    @classmethod
    def build(cls, config, records: list[dict], tokenizer, graphdef, teacher, sampling: SamplingConfig,
              layout=None) -> "Validator":
        d = config.data
        prompts = [prompt_ids(tokenizer, r, d.fields, template=d.template, max_prompt_length=d.max_prompt_length,
                              add_special_tokens=d.add_special_tokens) for r in records]
        gold_data = InstructionData.build(records, tokenizer, d.fields, template=d.template,
                                          max_prompt_length=d.max_prompt_length, max_length=d.max_length,
                                          add_special_tokens=d.add_special_tokens) if records else None
        validator = cls(records=records, prompts=prompts, gold=[[response_text(r, d.fields)] for r in records],
                        gold_data=gold_data if gold_data is not None and len(gold_data) else None,
                        tokenizer=tokenizer, graphdef=graphdef, teacher=teacher, sampling=sampling,
                        batch_size=config.eval.batch_size, seed=config.seed, layout=layout)
        if teacher is not None and records:
            validator.teacher_texts = validator.greedy_answers(teacher)
        return validator

    def _answers(self, model, stream: int, teacher=None, sampling=None) -> evaluate.Answers:
        key = jax.random.fold_in(jax.random.key(self.seed), 1_000_003 + stream)  # apart from training's streams
        return evaluate.sample_answers(model, self.tokenizer, self.prompts, sampling or self.sampling, key,
                                       self.batch_size, teacher=teacher)

    def greedy_answers(self, model) -> list[str]:
        return self._answers(model, stream=3, sampling=dataclasses.replace(self.sampling, greedy=True)).texts

    def __call__(self, params) -> tuple[dict, list[str]]:
        if not self.records:
            return {}, []
        student = nnx.merge(self.graphdef, params)
        answers = self._answers(student, stream=2, teacher=self.teacher)
        metrics = {}
        if self.teacher is not None:
            metrics["valid/reverse_kl"] = float(np.mean(answers.reverse_kl))
            metrics["valid/reverse_kl_per_token"] = float(np.sum(answers.reverse_kl) / max(answers.scored_tokens, 1))
            metrics["valid/rouge_l_teacher"] = evaluate.score(answers.texts, [[t] for t in self.teacher_texts])[
                "rouge_l"]
        scores = evaluate.score(answers.texts, self.gold)
        metrics["valid/rouge_l"], metrics["valid/exact_match"] = scores["rouge_l"], scores["exact_match"]
        if self.gold_data is not None:
            metrics["valid/loss"] = self.cross_entropy(params)
        return metrics, answers.texts

    def cross_entropy(self, params) -> float:
        """Token-mean CE on the gold answers, over fixed-size chunks (a short last chunk repeats its last row,
        masked out), weighted by each chunk's answer tokens."""
        if not hasattr(self, "_ce"):
            self._ce = jit_eval(lambda p, b: sft.sft_loss(p, self.graphdef, b)[0], self.layout)
            self._widths = Widths.of(self.gold_data, 1)
        data, total, count = self.gold_data, 0.0, 0
        for start in range(0, len(data), CE_ROWS):
            rows = list(range(start, min(start + CE_ROWS, len(data))))
            padded = rows + [rows[-1]] * (CE_ROWS - len(rows))
            batch = sequence_batch([data.prompts[i] for i in padded], [data.responses[i] for i in padded],
                                   self._widths.prompt[-1], self._widths.response[-1], data.pad_token_id)
            batch["response_mask"][len(rows):] = False
            tokens = int(batch["response_mask"].sum())
            total += float(self._ce(params, self._place(batch))) * tokens
            count += tokens
        return total / max(count, 1)

    def _place(self, batch):
        if self.layout is None:
            return batch
        from minillm_jax import sharding

        return sharding.place_batch(batch, jax.tree.leaves(self.layout)[0].mesh)


__all__ = ["GoldFeed", "Validator", "prompt_ids"]
