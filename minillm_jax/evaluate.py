"""MiniLLM's evaluation protocol (docs/minillm.md section 5): sampled answers scored by Rouge-L and exact
match over 5 seeds, Rouge-L by gold-response length, the student's reverse KL to the teacher, exposure
bias (ExAccErr), label-word calibration (ECE), and the report files.

Shapes: N prompts, B batch, P prompt (left-padded bucket), R max new tokens, V the real vocabulary.
Every batch is padded to the same size with copies of its last prompt (outputs dropped), so a set
compiles one decode loop per prompt bucket; batch b of seed s samples with fold_in(key(s), b).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import pathlib
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float
from tqdm.auto import tqdm

from minillm_jax import losses
from minillm_jax.data.instructions import (
    FieldMap,
    format_prompt,
    read_records,
    response_text,
    tokenize_pair,
    tokenize_pairs,
)
from minillm_jax.eval_metrics import (
    LENGTH_BUCKETS,
    bucket_means,
    dist_n,
    exact_match,
    expected_calibration_error,
    finite_or_none,
    mean_std,
    normalize_answer,
    rouge_l,
    score,
)
from minillm_jax.models.transformer import Transformer
from minillm_jax.sampling import DEFAULT_BUCKETS, SampleOutput, SamplingConfig, generate, pad_prompts
from minillm_jax.sharding import to_host
from minillm_jax.workdir import atomic_write_text

__all__ = ["Answers", "EvalSet", "LENGTH_BUCKETS", "calibration", "evaluate_model", "exact_match",
           "expected_calibration_error", "exposure_bias", "generate_texts", "gold_loss", "load_eval_set",
           "normalize_answer", "plot_curves", "prefix_kl", "rouge_l", "sample_answers", "score", "write_report"]

logger = logging.getLogger(__name__)

SEEDS = (10, 20, 30, 40, 50)


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """A test set: tokenised prompts (each cut to its first max_prompt_length tokens), reference lists and the
    first reference's token ids after its prompt (`gold`, without EOS; for the LM loss)."""

    name: str
    prompts: list[list[int]]
    references: list[list[str]]
    records: list[dict[str, Any]]
    gold: list[list[int]] | None = None

    def __len__(self) -> int:
        return len(self.prompts)


def load_eval_set(name: str, path: str | os.PathLike, tokenizer, *, template: str = "alpaca",
                  max_prompt_length: int = 256, limit: int | None = None, fields: FieldMap = FieldMap(),
                  min_reference_tokens: int = 0) -> EvalSet:
    """Read a JSONL/JSON/Parquet test file. References are `record["references"]` (S-NI: all gold outputs)
    or else `[record[fields.output]]`. Long prompts are truncated, never dropped, as the paper does.

    `min_reference_tokens` keeps records whose first reference has at least that many tokens (the paper's
    S-NI / UnNI rule is >= 11). `../shared/data/sinst/test.jsonl` is MiniLLM's already-filtered `11_` split
    (1694, counted with GPT-2 tokens), so leave it at 0 there: re-filtering with another tokenizer drops
    extra records (34 with SmolLM2's). `limit` keeps the first records after that filter."""
    records, _ = read_records(path, fields)
    references = [_references(record, fields) for record in records]
    if min_reference_tokens:
        lengths = reference_lengths(tokenizer, references)
        kept = [i for i, n in enumerate(lengths) if n >= min_reference_tokens]
        records, references = [records[i] for i in kept], [references[i] for i in kept]
    if limit is not None:
        records, references = records[:limit], references[:limit]
    texts = [format_prompt(record, fields, template=template, tokenizer=tokenizer) for record in records]
    pairs = tokenize_pairs(tokenizer, texts, [refs[0] for refs in references]) if texts else []
    full = [prompt for prompt, _ in pairs]
    truncated = sum(len(ids) > max_prompt_length for ids in full)
    logger.info("%s: %d prompts from %s", name, len(full), path)
    if truncated:  # the paper's rule; the cut also drops the template's end ("### Response:", the chat header)
        logger.warning("%s: %d of %d prompts are longer than max_prompt_length=%d and are cut to their first %d "
                       "tokens, which drops the end of their template (the paper's rule, with 256)", name,
                       truncated, len(full), max_prompt_length, max_prompt_length)
    return EvalSet(name, [list(ids[:max_prompt_length]) for ids in full], references, records,
                   gold=[response[:-1] for _, response in pairs])  # the project's tokenisation rule, EOS dropped


def _references(record: dict[str, Any], fields: FieldMap) -> list[str]:
    refs = record.get("references")
    if refs is None:
        return [response_text(record, fields)]
    if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
        raise ValueError(f"record field 'references' must be a non-empty list of strings, got {refs!r}")
    return list(refs)


def reference_lengths(tokenizer, references: Sequence[Sequence[str]]) -> list[int]:
    """Token count of each example's first reference (the gold response the length analysis buckets by)."""
    firsts = [refs[0] for refs in references]
    return [len(ids) for ids in tokenizer(firsts, add_special_tokens=False)["input_ids"]] if firsts else []


# ------------------------------------------------------------------------------------ sampling


def _sample_batches(model: Transformer, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, seed,
                    batch_size: int, *, teacher: Transformer | None = None,
                    desc: str | None = None) -> Iterator[tuple[SampleOutput, int]]:
    """(samples, number of real rows) batch by batch; every call to `generate` has the same batch size: the
    fewest batches of at most `batch_size`, balanced (40 prompts at 32: two of 20), the last batch's padding
    rows being copies of its last prompt. `seed`: an int or a JAX key; batch i uses fold_in(key, i)."""
    if not prompts:
        raise ValueError("no prompts to sample from")
    key = jax.random.key(seed) if isinstance(seed, (int, np.integer)) else seed
    width = -(-len(prompts) // -(-len(prompts) // batch_size))  # balanced: 40 prompts at 32 are two batches of 20
    starts = range(0, len(prompts), width)
    for index, start in enumerate(tqdm(starts, desc=desc, leave=False, disable=desc is None)):
        rows = [list(p) for p in prompts[start:start + width]]
        real = len(rows)
        rows += [rows[-1]] * (width - real)
        yield generate(model, rows, sampling, jax.random.fold_in(key, index), teacher=teacher, mix_alpha=0.0), real


def _host(out: SampleOutput, real: int) -> SampleOutput:
    """The real rows, as numpy arrays."""
    return jax.tree.map(lambda x: to_host(x)[:real], out)


def _response_tokens(out: SampleOutput, eos: tuple[int, ...]) -> list[list[int]]:
    """Generated ids of each row, without the closing EOS."""
    rows = []
    for tokens, length in zip(out.tokens, out.lengths):
        row = tokens[:length].tolist()
        rows.append(row[:-1] if row and row[-1] in eos else row)
    return rows


@dataclasses.dataclass
class Answers:
    texts: list[str]  # stripped, special tokens skipped
    tokens: list[list[int]]  # generated ids without the closing EOS
    reverse_kl: list[float]  # with a teacher: per answer, sum over its steps (EOS included) of KL(q || p)
    scored_tokens: int  # how many tokens those sums cover


def sample_answers(model: Transformer, tokenizer, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
                   seed, batch_size: int = 32, *, teacher: Transformer | None = None,
                   desc: str | None = None) -> Answers:
    """The student's (or any model's) sampled answers to `prompts`, batch by batch at one batch size
    (`seed`: an int or a JAX key). With a `teacher`, which only scores (no mixing), each answer's
    reverse KL to it as well (each step's over the whole vocabulary: `SampleOutput.reverse_kl`). The one
    sampling path of validation, evaluation and `generate`."""
    answers = Answers(texts=[], tokens=[], reverse_kl=[], scored_tokens=0)
    for out, real in _sample_batches(model, prompts, sampling, seed, batch_size, teacher=teacher, desc=desc):
        out = _host(out, real)
        rows = _response_tokens(out, sampling.eos_token_id)
        answers.tokens += rows
        answers.texts += [t.strip() for t in tokenizer.batch_decode(rows, skip_special_tokens=True)]
        if teacher is not None:
            answers.reverse_kl += np.sum(np.where(out.mask, out.reverse_kl, 0.0), axis=1).tolist()
            answers.scored_tokens += int(out.mask.sum())
    return answers


def generate_texts(model: Transformer, tokenizer, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
                   seed, batch_size: int = 32) -> tuple[list[str], list[list[int]]]:
    """Sampled answers as stripped text (special tokens skipped) and as token ids without EOS."""
    answers = sample_answers(model, tokenizer, prompts, sampling, seed, batch_size)
    return answers.texts, answers.tokens


# ------------------------------------------------------------------------------------ Rouge-L protocol


def evaluate_model(model: Transformer, tokenizer, eval_sets: Sequence[EvalSet], *, seeds: Sequence[int] = SEEDS,
                   max_new_tokens: int = 256, no_repeat_ngram_size: int = 6, batch_size: int = 32,
                   teacher: Transformer | None = None, eos_token_id: int | Sequence[int] | None = None,
                   pad_token_id: int | None = None, length_buckets: Sequence[int] = LENGTH_BUCKETS,
                   keep_predictions: int = 8) -> dict[str, dict]:
    """The paper's protocol on each set: temperature 1, top_k 0, top_p 1, `no_repeat_ngram_size` 6 (test
    time), one sampling run per seed. Per set: per-seed Rouge-L / exact match, their mean and sample std
    over seeds, mean response length (generated tokens without EOS), Rouge-L by gold length (first
    reference, in tokens; buckets [edge_i, edge_i+1) and a last open one; per-example Rouge-L averaged over
    seeds), and with a `teacher` the mean sequence-level reverse KL sum_t KL(q(.|y<t) || p(.|y<t)) over the
    student's samples (each step's KL exact over the vocabulary; the n-gram block makes the prefixes
    slightly off q), also per token.
    Per seed also Dist-4 (distinct 4-grams of each answer's generated ids, x 100: `eval_metrics.dist_n`), and
    per set the LM loss on the gold answers (`gold_loss`; sets from `load_eval_set`). EOS and padding ids
    default to the tokenizer's."""
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    pad = pad_token_id if pad_token_id is not None else tokenizer.pad_token_id
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, eos_token_id=eos,
                              no_repeat_ngram_size=no_repeat_ngram_size, pad_token_id=0 if pad is None else int(pad))
    results = {}
    for s in eval_sets:
        results[s.name] = _evaluate_set(model, tokenizer, s, sampling, seeds, batch_size, teacher, length_buckets,
                                        keep_predictions)
        if s.gold is not None:
            results[s.name].update(gold_loss(model, s, max_response_length=max_new_tokens,
                                             pad_token_id=sampling.pad_token_id))
    return results


def _evaluate_set(model, tokenizer, eval_set: EvalSet, sampling, seeds, batch_size, teacher, length_buckets,
                  keep_predictions) -> dict:
    per_seed, example_rouge, lengths, sequence_kl, predictions, scored = {}, [], [], [], [], 0
    for seed in seeds:
        answers = sample_answers(model, tokenizer, eval_set.prompts, sampling, seed, batch_size, teacher=teacher,
                                 desc=f"{eval_set.name} seed {seed}")
        texts, kls = answers.texts, answers.reverse_kl
        lengths += map(len, answers.tokens)
        rouges = [rouge_l(t, r) for t, r in zip(texts, eval_set.references)]
        matches = [exact_match(t, r) for t, r in zip(texts, eval_set.references)]
        per_seed[str(seed)] = {"rouge_l": float(np.mean(rouges)), "exact_match": float(np.mean(matches)),
                               "dist_4": dist_n(answers.tokens, 4)}
        example_rouge.append(rouges)
        sequence_kl += kls
        scored += answers.scored_tokens
        predictions = predictions or texts[:keep_predictions]
    rouge_mean, rouge_std = mean_std([v["rouge_l"] for v in per_seed.values()])
    em_mean, em_std = mean_std([v["exact_match"] for v in per_seed.values()])
    dist = [v["dist_4"] for v in per_seed.values() if v["dist_4"] is not None]
    dist_mean, dist_std = mean_std(dist) if dist else (None, None)
    result = {"n": len(eval_set), "seeds": [int(s) for s in seeds], "per_seed": per_seed, "rouge_l_mean": rouge_mean,
              "rouge_l_std": rouge_std, "exact_match_mean": em_mean, "exact_match_std": em_std,
              "dist_4_mean": dist_mean, "dist_4_std": dist_std,
              "length_mean": float(np.mean(lengths)),
              "rouge_l_by_length": bucket_means(np.mean(example_rouge, axis=0),
                                                reference_lengths(tokenizer, eval_set.references), length_buckets),
              "predictions": predictions}
    if teacher is not None:
        result["reverse_kl"] = float(np.mean(sequence_kl))
        result["reverse_kl_per_token"] = float(np.sum(sequence_kl) / max(scored, 1))
    return result


# ------------------------------------------------------------------------------------ LM loss on the gold answers

GOLD_LOSS_ROWS = 8  # rows per teacher-forced batch ([rows, T, V] float32 logits)


def gold_loss(model: Transformer, eval_set: EvalSet, *, max_response_length: int = 256, pad_token_id: int = 0,
              batch_size: int = GOLD_LOSS_ROWS) -> dict:
    """The model's cross-entropy on each example's first reference (`eval_set.gold`, without EOS), cut to its
    first `max_response_length` tokens, teacher-forced after the (truncated) prompt, over the real vocabulary
    in float32. As MiniLLM's evaluate_main.py: `lm_loss` is the mean over answers of each answer's token mean;
    `lm_loss_per_token` pools every token. Answers with no tokens are left out. Rows are sorted by length and
    right-padded to power-of-two widths (a few compiled shapes)."""
    rows = [(list(p), list(g[:max_response_length])) for p, g in zip(eval_set.prompts, eval_set.gold) if g]
    if not rows:
        return {"lm_loss": None, "lm_loss_per_token": None, "lm_loss_tokens": 0}
    graphdef, state = nnx.split(model)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
    width = min(batch_size, len(rows))
    sums, counts = np.zeros(len(rows)), np.zeros(len(rows), np.int64)
    for start in range(0, len(rows), width):
        real = order[start:start + width]
        chunk = real + [real[-1]] * (width - len(real))
        longest = max(len(rows[i][0]) + len(rows[i][1]) for i in chunk)
        T = max(16, 1 << (longest - 1).bit_length())
        ids, mask = np.full((width, T), pad_token_id, np.int32), np.zeros((width, T), bool)
        target = np.zeros((width, T), bool)
        for r, i in enumerate(chunk):
            prompt, answer = rows[i]
            ids[r, :len(prompt) + len(answer)] = prompt + answer
            mask[r, :len(prompt) + len(answer)] = True
            target[r, len(prompt):len(prompt) + len(answer)] = True
        nll = to_host(_token_nll(graphdef, state, ids, mask, num_real=model.config.num_real_tokens))
        nll = np.where(target[:, 1:], nll.astype(np.float64), 0.0)
        for r, i in enumerate(real):
            sums[i], counts[i] = nll[r].sum(), target[r].sum()
    return {"lm_loss": float(np.mean(sums / counts)), "lm_loss_per_token": float(sums.sum() / counts.sum()),
            "lm_loss_tokens": int(counts.sum())}


@functools.partial(jax.jit, static_argnames=("graphdef", "num_real"))
def _token_nll(graphdef, state, ids, mask, *, num_real: int) -> Float[Array, "B T-1"]:
    """-log q(ids[:, t] | ids[:, <t]) for t >= 1 (right padding is fine: positions count real tokens)."""
    logits = nnx.merge(graphdef, state)(ids, mask)[:, :-1]
    return losses.cross_entropy(losses.log_probs(logits, num_real), ids[:, 1:])


# ------------------------------------------------------------------------------------ exposure bias


def prefix_kl(student: Transformer, teacher: Transformer, sample: SampleOutput) -> Float[Array, "B R"]:
    """KL(p(. | y<t) || q(. | y<t)) at every generated position of `sample`, teacher-forced through both
    models over prompt + response, in float32 over the full real vocabulary; 0 where the response mask is
    off (after EOS)."""
    student_def, student_state = nnx.split(student)
    teacher_def, teacher_state = nnx.split(teacher)
    ids = jnp.concatenate([jnp.asarray(sample.prompt_tokens), jnp.asarray(sample.tokens)], axis=1)
    mask = jnp.concatenate([jnp.asarray(sample.prompt_mask), jnp.asarray(sample.mask)], axis=1)
    return _prefix_kl(student_def, student_state, teacher_def, teacher_state, ids, mask,
                      num_real=student.config.num_real_tokens, length=sample.tokens.shape[1])


@functools.partial(jax.jit, static_argnames=("student_def", "teacher_def", "num_real", "length"))
def _prefix_kl(student_def, student_state, teacher_def, teacher_state, ids, mask, *, num_real: int, length: int):
    def log_probs(graphdef, state):
        logits = nnx.merge(graphdef, state)(ids, mask)[:, -length - 1:-1]  # the ones that predict the response
        return losses.log_probs(logits, num_real)

    log_q, log_p = log_probs(student_def, student_state), log_probs(teacher_def, teacher_state)
    kl = losses.forward_kl(log_q, log_p)
    return jnp.where(mask[:, -length:], kl, 0.0)


def exposure_bias(student: Transformer, teacher: Transformer, prompts: Sequence[Sequence[int]], *,
                  max_new_tokens: int, seed: int, batch_size: int = 32, eos_token_id=None, pad_token_id: int = 0,
                  summary_lengths: Sequence[int] = (1, 10, 50, 100, 200)) -> dict:
    """ExAccErr (MiniLLM, after Arora et al. 2022): R(l) = sum_{t<=l} E_{y<t ~ q}[KL(p || q)] on student
    samples, eps(l) the same on teacher samples, ExAccErr(l) = (R(l) - eps(l)) / eps(l) x 100 (None where
    eps is 0). Both models sample at temperature 1 with the same keys (common random numbers, so the
    difference is less noisy). With no EOS (default) every row runs to max_new_tokens; with one, a row that
    ended adds 0 from then on while still counting in the mean over all N prompts."""
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    totals = {}
    for role, sampler in (("student", student), ("teacher", teacher)):
        per_position = [to_host(prefix_kl(student, teacher, out)).astype(np.float64)[:real]
                        for out, real in _sample_batches(sampler, prompts, sampling, seed, batch_size,
                                                         desc=f"exposure bias, {role} prefixes")]
        totals[role] = np.cumsum(np.concatenate(per_position).sum(0)) / len(prompts)
    accumulated, reference = totals["student"], totals["teacher"]
    with np.errstate(divide="ignore", invalid="ignore"):
        error = (accumulated - reference) / reference * 100.0
    picks = sorted({n for n in summary_lengths if n <= max_new_tokens} | {max_new_tokens})
    return {"R": accumulated.tolist(), "epsilon": reference.tolist(),
            "exacc_err": [finite_or_none(e) for e in error], "num_prompts": len(prompts),
            "summary": {str(n): {"R": float(accumulated[n - 1]), "epsilon": float(reference[n - 1]),
                                 "exacc_err": finite_or_none(error[n - 1])} for n in picks}}


# ------------------------------------------------------------------------------------ calibration


def calibration(model: Transformer, tokenizer, path: str | os.PathLike, *, template: str = "alpaca",
                n_bins: int = 10, batch_size: int = 32, max_prompt_length: int = 1024) -> dict:
    """ECE of zero-shot label-word probabilities (SST-2 / BoolQ style). The file is JSONL, one
    {"prompt": str, "choices": [label words], "label": index of the right choice} per line; the prompt is
    the instruction of the template ("alpaca", "chat", or "raw" for the text as is). A choice's probability
    is the softmax, over the choices only, of the logits of its first token after the prompt (tokenised as
    the continuation of the prompt, MiniLLM's rule, so give a raw prompt's choices their leading space);
    choices must differ in that token. Prompts keep their
    last `max_prompt_length` tokens. ECE, accuracy and confidence are fractions in [0, 1]."""
    records = [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line.strip()]
    prompts, choice_ids, labels = [], [], []
    for number, record in enumerate(records, start=1):
        text = _classification_prompt(record, template, tokenizer, f"{path}:{number}")
        firsts = [tokenize_pair(tokenizer, text, choice)[1][0] for choice in record["choices"]]
        if len(set(firsts)) != len(firsts):
            raise ValueError(f"{path}:{number}: choices {record['choices']} share a first token; use other words")
        prompts.append(tokenizer(text, add_special_tokens=True)["input_ids"][-max_prompt_length:])
        choice_ids.append(firsts)
        labels.append(int(record["label"]))
    logits = _last_logits(model, prompts, batch_size, tokenizer.pad_token_id or 0)
    probabilities = [_softmax(row[ids]) for row, ids in zip(logits, choice_ids)]
    confidence = np.array([p.max() for p in probabilities])
    correct = np.array([int(p.argmax()) == label for p, label in zip(probabilities, labels)])
    return {"ece": expected_calibration_error(confidence, correct, n_bins), "accuracy": float(correct.mean()),
            "mean_confidence": float(confidence.mean()), "n": len(records), "n_bins": n_bins,
            "probabilities": [p.tolist() for p in probabilities]}


def _classification_prompt(record, template: str, tokenizer, where: str) -> str:
    choices, label = record.get("choices"), record.get("label")
    if not isinstance(record.get("prompt"), str) or not isinstance(choices, list) or len(choices) < 2 or \
            not all(isinstance(c, str) and c for c in choices) or not isinstance(label, int) or \
            not 0 <= label < len(choices):
        raise ValueError(f"{where}: expected {{'prompt': str, 'choices': [>= 2 words], 'label': int index}}")
    if template == "raw":
        return record["prompt"]
    return format_prompt({"instruction": record["prompt"]}, FieldMap(input=None), template=template,
                         tokenizer=tokenizer)


def _last_logits(model: Transformer, prompts: list[list[int]], batch_size: int, pad_id: int) -> np.ndarray:
    """Next-token logits after each prompt, float64 [N, V]; batches padded to one size."""
    graphdef, state = nnx.split(model)
    width, rows = min(batch_size, len(prompts)), []
    for start in range(0, len(prompts), width):
        batch = prompts[start:start + width]
        ids, mask = pad_prompts(batch + [batch[-1]] * (width - len(batch)), DEFAULT_BUCKETS, pad_id)
        logits = _final_logits(graphdef, state, ids, mask)[:, :model.config.num_real_tokens]
        rows.append(to_host(logits).astype(np.float64)[:len(batch)])
    return np.concatenate(rows)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _final_logits(graphdef, state, ids, mask: Bool[Array, "B P"]) -> Float[Array, "B V"]:
    return nnx.merge(graphdef, state)(ids, mask)[:, -1]


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max())
    return z / z.sum()


# ------------------------------------------------------------------------------------ report files


def write_report(results: dict, workdir: str | os.PathLike) -> tuple[pathlib.Path, pathlib.Path]:
    """results.json (everything) and results.md: one row per model and set with every per-set figure
    (Rouge-L mean ± std over seeds, exact match, Dist-4, mean answer length, the gold answers' LM loss per
    token, and with a teacher the reverse KL per token and per answer), Rouge-L by gold length, and the
    exposure-bias and calibration figures where a model has them. `results` maps model names to
    `evaluate_model` outputs, or is one `evaluate_model` output (reported as model "model")."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = workdir / "results.json", workdir / "results.md"
    atomic_write_text(json_path, json.dumps(results, indent=2, default=_to_json))

    def cell(r: dict, key: str, digits: int) -> str:
        return "–" if r.get(key) is None else f"{r[key]:.{digits}f}"

    lines = ["| model | set | n | Rouge-L | exact match | Dist-4 | length | LM loss / token | reverse KL / token "
             "| reverse KL / answer |", "|---|---|---|---|---|---|---|---|---|---|"]
    buckets = ["", "Rouge-L by gold-response length (tokens), mean (count):", "",
               "| model | set | buckets |", "|---|---|---|"]
    for model_name, set_name, r in _set_rows(results):
        lines.append(f"| {model_name} | {set_name} | {r['n']} | {r['rouge_l_mean']:.2f} ± {r['rouge_l_std']:.2f} | "
                     f"{r['exact_match_mean']:.2f} | {cell(r, 'dist_4_mean', 2)} | {r['length_mean']:.1f} | "
                     f"{cell(r, 'lm_loss_per_token', 3)} | {cell(r, 'reverse_kl_per_token', 3)} | "
                     f"{cell(r, 'reverse_kl', 3)} |")
        cells = [f"{b['bucket']}: {cell(b, 'mean', 1)} ({b['count']})" for b in r.get("rouge_l_by_length", [])]
        buckets.append(f"| {model_name} | {set_name} | {'; '.join(cells)} |")
    extras = []
    for model_name, r in _model_rows(results):
        if isinstance(r.get("exposure_bias"), dict):
            e = r["exposure_bias"]
            extras += ["", f"Exposure bias of {model_name} over {e['num_prompts']} prompts (ExAccErr, %, after l "
                       "generated tokens):", "", "| l | R(l) | epsilon(l) | ExAccErr |", "|---|---|---|---|"]
            extras += [f"| {n} | {v['R']:.3f} | {v['epsilon']:.3f} | {cell(v, 'exacc_err', 1)} |"
                       for n, v in e["summary"].items()]
    calibrated = [(m, r["calibration"]) for m, r in _model_rows(results) if isinstance(r.get("calibration"), dict)]
    if calibrated:
        extras += ["", "Calibration (zero-shot label words):", "", "| model | n | ECE | accuracy | mean confidence |",
                   "|---|---|---|---|---|"]
        extras += [f"| {m} | {c['n']} | {c['ece']:.4f} | {c['accuracy']:.4f} | {c['mean_confidence']:.4f} |"
                   for m, c in calibrated]
    atomic_write_text(md_path, "\n".join(lines + buckets + extras) + "\n")
    return json_path, md_path


def _is_set(value) -> bool:
    return isinstance(value, dict) and "rouge_l_mean" in value


def _model_rows(results: dict) -> Iterator[tuple[str, dict]]:
    """(model name, its results); one model's bare results are model "model"."""
    if any(_is_set(v) for v in results.values()):
        results = {"model": results}
    yield from ((name, r) for name, r in results.items() if isinstance(r, dict))


def _set_rows(results: dict) -> Iterator[tuple[str, str, dict]]:
    for model_name, sets in _model_rows(results):
        yield from ((model_name, name, r) for name, r in sets.items() if _is_set(r))


def _to_json(value):
    if isinstance(value, (np.generic, np.ndarray, jax.Array)):
        return np.asarray(value).tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"cannot write {type(value).__name__} to results.json")


def plot_curves(metrics_jsonl_path: str | os.PathLike, png_path: str | os.PathLike,
                keys: Sequence[str] | None = None) -> pathlib.Path:
    """Training curves: one subplot per metric against "step", from JSONL lines {"step": int, name: float}.
    A line may hold only some metrics (train and validation logs interleave); by default every numeric key."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from minillm_jax.tracking import read_metrics

    rows = [r for r in read_metrics(metrics_jsonl_path) if "step" in r]
    if keys is None:
        keys = sorted({k for r in rows for k, v in r.items() if k != "step" and isinstance(v, (int, float))
                       and not isinstance(v, bool)})
    if not keys:
        raise ValueError(f"{metrics_jsonl_path}: no metrics to plot")
    figure, axes = plt.subplots(len(keys), 1, figsize=(7, 2.4 * len(keys)), sharex=True, squeeze=False)
    for axis, key in zip(axes[:, 0], keys):
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 50 else None)
        axis.set_ylabel(key)
        axis.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    figure.tight_layout()
    png_path = pathlib.Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png_path, dpi=100)
    plt.close(figure)
    return png_path
