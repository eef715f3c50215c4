"""The tasks that train nothing: `eval` (the paper's protocol on every configured set, for the student
and/or the teacher: results.json and results.md) and `generate` (sampled answers to the validation prompts,
generations.jsonl)."""

from __future__ import annotations

import json
import pathlib

import jax

from minillm_jax import evaluate
from minillm_jax.config import ConfigError, RunConfig
from minillm_jax.data import RecordError, load_records
from minillm_jax.data.instructions import read_records
from minillm_jax.experiment import Models, sampling_config
from minillm_jax.tracking import read_metrics
from minillm_jax.validation import prompt_ids
from minillm_jax.workdir import atomic_write_text


def check_sets(config: RunConfig) -> None:
    """Every evaluation set exists and holds records (checked before any model loads)."""
    d = config.data
    for name, path in config.eval.sets:
        if not pathlib.Path(path).is_file():
            hint = (f"make it with `python -m minillm_jax.data.prepare {name} --output {d.root}`" if d.root else
                    "give a file, or --config.data.root=DIR where `python -m minillm_jax.data.prepare` wrote the sets")
            raise ConfigError(f"--config.eval.sets.{name}: {path} does not exist ({hint})")
        try:
            read_records(path, d.fields, limit=1)
        except RecordError as e:  # an empty file, or a malformed first record
            raise ConfigError(f"--config.eval.sets.{name}: {e}") from None


def run_eval(config: RunConfig, workdir: pathlib.Path, models: Models) -> dict:
    e, d = config.eval, config.data
    tokenizer = models.tokenizer
    chosen = {"student": [("student", models.student)], "teacher": [("teacher", models.teacher)],
              "both": [("teacher", models.teacher), ("student", models.student)]}[e.model]
    sets = [evaluate.load_eval_set(name, path, tokenizer, template=d.template, max_prompt_length=d.max_prompt_length,
                                   limit=e.limit or None, fields=d.fields) for name, path in e.sets]
    for eval_set, (name, path) in zip(sets, e.sets):
        if not len(eval_set):
            raise ConfigError(f"--config.eval.sets.{name}: {path} holds no records")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    results = {}
    for name, model in chosen:
        results[name] = evaluate.evaluate_model(
            model, tokenizer, sets, seeds=e.seeds, max_new_tokens=e.max_new_tokens,
            no_repeat_ngram_size=e.no_repeat_ngram_size, batch_size=e.batch_size,
            teacher=models.teacher if name == "student" else None, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad)
        if e.exposure_bias and name == "student" and models.teacher is not None:
            results[name]["exposure_bias"] = evaluate.exposure_bias(
                model, models.teacher, sets[0].prompts[:e.exposure_bias_prompts], max_new_tokens=e.max_new_tokens,
                seed=e.seeds[0], batch_size=e.batch_size)
        if e.calibration:
            results[name]["calibration"] = evaluate.calibration(model, tokenizer, e.calibration, template=d.template)
    if jax.process_index() == 0:
        _, md_path = evaluate.write_report(results, workdir)
        print(pathlib.Path(md_path).read_text())
        if read_metrics(workdir / "metrics.jsonl"):
            evaluate.plot_curves(workdir / "metrics.jsonl", workdir / "curves.png")
    return results


def run_generate(config: RunConfig, workdir: pathlib.Path, models: Models) -> dict:
    """Sampled answers of the student (or of the teacher when there is no student) to the validation
    records (data.valid, else the held-out training records)."""
    d = config.data
    model = models.student if models.student is not None else models.teacher
    source = d.valid or d.train
    if not source:
        raise ConfigError("--config.data.valid: the generate task answers the records of data.valid (or data.train); "
                          "give one")
    try:
        records, _ = load_records(source, d.fields, split=d.valid_split if d.valid else d.split, on_error=d.on_error,
                                  require_output=False)
    except RecordError as e:
        raise ConfigError(f"--config.{'data.valid' if d.valid else 'data.train'}: {e}") from None
    if d.holdout and not d.valid:
        records = records[-d.holdout:]
    if d.valid_examples:
        records = records[:d.valid_examples]
    if not records:
        raise ConfigError(f"--config.data.valid: {source} holds no records to answer")
    tokenizer = models.tokenizer
    prompts = [prompt_ids(tokenizer, r, d.fields, template=d.template, max_prompt_length=d.max_prompt_length,
                          add_special_tokens=d.add_special_tokens) for r in records]
    answers = evaluate.sample_answers(model, tokenizer, prompts, sampling_config(config, tokenizer),
                                      jax.random.key(config.seed), config.batch_size)
    path = workdir / "generations.jsonl"
    if jax.process_index() == 0:
        atomic_write_text(path, "".join(json.dumps({**r, "generated": t}, ensure_ascii=False) + "\n"
                                        for r, t in zip(records, answers.texts, strict=True)))
    print(f"wrote {len(records)} answers to {path}")
    return {"generations": str(path), "count": len(records)}


__all__ = ["check_sets", "run_eval", "run_generate"]
