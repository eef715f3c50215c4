"""The run behind `main.py`: load models and data, train with validation and checkpoints, report
before/after, export the student to HF; or evaluate / generate without training.

Workdir: config.json (the resolved config), student/ (the student's HF config and tokenizer), checkpoints/
(Orbax), metrics.jsonl, tensorboard/, summary.md, hf/ (the exported student).
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
import time

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from minillm_jax import checkpoint, evaluate
from minillm_jax.data import InstructionData, PackedText, format_prompt, load_records, response_text
from minillm_jax.data.instructions import split_messages
from minillm_jax.experiment import build_mesh, load_models, sampling_config, workdir_path
from minillm_jax.models.hf import save_config
from minillm_jax.tasks import Context, field_map, make_task, pad_to_bucket
from minillm_jax.tracking import MetricWriter
from minillm_jax.trainers import sft
from minillm_jax.trainers.common import jit_eval_step, make_optimizer, sharded_train_state

logger = logging.getLogger(__name__)


def run(config, workdir: str) -> dict:
    """Run `config.task` in `workdir`; returns the final metrics (or evaluation results)."""
    workdir = workdir_path(workdir)
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))
    models = load_models(config, build_mesh(config))
    writer = MetricWriter(workdir, tensorboard=config.logging.tensorboard, wandb=config.logging.wandb,
                          wandb_project=config.logging.wandb_project, config=config.to_dict())
    try:
        if config.task == "eval":
            return run_eval(config, workdir, models)
        if config.task == "generate":
            return run_generate(config, workdir, models)
        return train(config, workdir, models, writer)
    finally:
        writer.close()


# ------------------------------------------------------------------------------------------ data


def read_split(config, source: str, split: str, limit: int = 0) -> list[dict]:
    records, skipped = load_records(source, field_map(config), split=split, on_error=config.data.on_error)
    if skipped:
        logger.warning("%s: skipped %d malformed records", source, skipped)
    return records[:limit] if limit else records


def train_and_valid_records(config) -> tuple[list[dict], list[dict]]:
    records = read_split(config, config.data.train, config.data.split)
    if config.data.holdout:
        records, valid = records[:-config.data.holdout], records[-config.data.holdout:]
    elif config.data.valid:
        valid = read_split(config, config.data.valid, config.data.valid_split)
    else:
        valid = []
    if config.data.max_train_examples:
        records = records[:config.data.max_train_examples]
    return records, valid[:config.data.valid_examples] if config.data.valid_examples else valid


def prompt_ids(config, tokenizer, record) -> list[int]:
    """A record's prompt, truncated to its first max_prompt_length tokens (as the paper's evaluation)."""
    text = format_prompt(record, field_map(config), template=config.data.template, tokenizer=tokenizer)
    return tokenizer(text, add_special_tokens=True)["input_ids"][:config.data.max_prompt_length]


# ------------------------------------------------------------------------------------------ validation


GOLD_ROWS = 8  # rows per chunk of the validation cross-entropy


class Validator:
    """Held-out prompts: the student's sampled answers scored by Rouge-L against the gold answers and,
    with a teacher, against the teacher's answers (sampled once), the reverse KL to the teacher on the
    student's own samples, and the student's cross-entropy on the gold answers."""

    def __init__(self, ctx: Context, records: list[dict]):
        c, tokenizer = ctx.config, ctx.tokenizer
        self.ctx = ctx
        self.records = records
        self.prompts = [prompt_ids(c, tokenizer, r) for r in records]
        self.gold = [[response_text(r, field_map(c))] for r in records]
        self.gold_data = InstructionData.build(records, tokenizer, field_map(c), template=c.data.template,
                                               max_prompt_length=c.data.max_prompt_length,
                                               max_length=c.data.max_length)
        self.teacher_texts = self._answers(ctx.teacher, seed=1).texts if ctx.teacher is not None and records else None
        self._ce = jit_eval_step(lambda params, batch: sft.sft_loss(params, ctx.graphdef, batch)[0], ctx.layout,
                                 GOLD_ROWS)

    def _answers(self, model, seed: int, teacher=None) -> evaluate.Answers:
        return evaluate.sample_answers(model, self.ctx.tokenizer, self.prompts, self.ctx.sampling,
                                       self.ctx.key(seed, 5), self.ctx.config.batch_size, teacher=teacher)

    def __call__(self, params) -> tuple[dict, list[str]]:
        if not self.records:
            return {}, []
        student = nnx.merge(self.ctx.graphdef, params)
        metrics = {}
        answers = self._answers(student, seed=2, teacher=self.ctx.teacher)
        texts = answers.texts
        if self.ctx.teacher is not None:
            metrics["valid/reverse_kl"] = float(np.mean(answers.reverse_kl))
            metrics["valid/reverse_kl_per_token"] = float(np.sum(answers.reverse_kl) / max(answers.scored_tokens, 1))
            metrics["valid/rouge_l_teacher"] = evaluate.score(texts, [[t] for t in self.teacher_texts])["rouge_l"]
        scores = evaluate.score(texts, self.gold)
        metrics["valid/rouge_l"], metrics["valid/exact_match"] = scores["rouge_l"], scores["exact_match"]
        if len(self.gold_data):
            losses, count = [], len(self.gold_data)
            for i in range(0, count, GOLD_ROWS):  # fixed-size chunks: a short last one repeats its last row
                rows = list(range(i, min(i + GOLD_ROWS, count)))
                batch = self.gold_data.collate(rows + [rows[-1]] * (GOLD_ROWS - len(rows)))
                batch["loss_mask"][len(rows):] = 0  # ... which does not count
                batch = self.ctx.place(pad_to_bucket(batch, self.gold_data.pad_token_id))
                losses.append(float(self._ce(params, batch)))
            metrics["valid/loss"] = float(np.mean(losses))
        return metrics, texts


# ------------------------------------------------------------------------------------------ training


def train(config, workdir: pathlib.Path, models, writer: MetricWriter) -> dict:
    c, tokenizer = config, models.tokenizer
    if c.batch_size % c.accumulate_steps:
        raise ValueError(f"config.batch_size={c.batch_size} is not a multiple of accumulate_steps={c.accumulate_steps}")
    records, valid_records = train_and_valid_records(c)
    data = InstructionData.build(records, tokenizer, field_map(c), template=c.data.template,
                                 max_prompt_length=c.data.max_prompt_length, max_length=c.data.max_length)
    print(f"train: {len(data)} examples ({data.dropped} dropped by the length limits), valid: {len(valid_records)}")
    if not len(data):
        raise ValueError(f"config.data.train={c.data.train}: no example fits max_prompt_length="
                         f"{c.data.max_prompt_length} / max_length={c.data.max_length}")
    o = c.optimizer
    tx, schedule = make_optimizer(learning_rate=o.learning_rate, warmup_steps=o.warmup_steps,
                                  total_steps=c.steps, schedule=o.schedule, end_learning_rate=o.end_learning_rate,
                                  weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps,
                                  max_grad_norm=o.max_grad_norm or None, accumulate_steps=c.accumulate_steps)
    if jax.process_index() == 0:
        save_config(models.student.config, workdir / "student")
        tokenizer.save_pretrained(str(workdir / "student"))
    graphdef, state, layout = sharded_train_state(models.student, tx, models.mesh)
    pretrain = PackedText([c.data.pretrain], tokenizer, seq_len=c.data.pretrain_length,
                          batch_size=c.minillm.minibatch_size, text_field=c.data.pretrain_field, seed=c.seed) \
        if c.data.pretrain and c.task == "minillm" else None
    ctx = Context(config=c, workdir=workdir, tokenizer=tokenizer, teacher=models.teacher, graphdef=graphdef, tx=tx,
                  schedule=schedule, train=data, records=records, sampling=sampling_config(c, tokenizer),
                  pretrain=pretrain, mesh=models.mesh, layout=layout.with_teacher(models.teacher))
    task = make_task(ctx)
    checkpoints = checkpoint.Checkpointer(workdir / "checkpoints", max_to_keep=c.keep_checkpoints,
                                          best_metric="valid/rouge_l" if valid_records else None)
    start, state = _maybe_resume(c, checkpoints, state, task, models.mesh)
    validator = Validator(ctx, valid_records)
    before = None
    if c.eval_every and start == 0:
        print("validating the initial student ...", flush=True)
        before = validator(state.params)
        writer.write(0, before[0])
    final = _train_loop(c, ctx, task, state, start, validator, checkpoints, writer)
    checkpoints.wait()
    after_metrics, after_texts, state = final
    summary = _summary(c, workdir, validator, before, (after_metrics, after_texts))
    if jax.process_index() == 0:
        _plot(workdir)
    if c.export.enabled and jax.process_index() == 0:
        step = checkpoint.export_step(workdir, None if c.export.select == "best" else checkpoints.latest_step())
        out = checkpoint.export_hf(workdir, workdir / "hf", step=step, dtype=c.export.dtype or None)
        print(f"exported the student (step {step}) to {out}")
    checkpoints.close()
    return {**after_metrics, "summary": summary}


def _maybe_resume(config, checkpoints, state, task, mesh):
    """Continue from the newest checkpoint that restores; a damaged one is skipped with a warning."""
    if not config.resume:
        return 0, state
    replicated = NamedSharding(mesh, PartitionSpec())

    def target(x):  # placed leaves keep their layout; scalars made on one device are replicated on the mesh
        placed = isinstance(getattr(x, "sharding", None), NamedSharding)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding if placed else replicated)

    abstract = jax.tree.map(target, state)
    for step in reversed(checkpoints.all_steps()):
        try:
            restored, meta = checkpoints.restore(step, abstract)
        except Exception as e:  # a truncated or corrupt step: fall back to the one before
            logger.warning("checkpoint step %d does not restore (%s: %s); trying the previous one", step,
                           type(e).__name__, str(e)[:200])
            print(f"warning: checkpoint step {step} is damaged ({type(e).__name__}); falling back", flush=True)
            continue
        task.set_position(meta["task"])
        print(f"resumed from step {step}")
        return step, restored
    return 0, state


def _checkpoint_due(config, task, done: int, pending: bool) -> tuple[bool, bool]:
    """(save now, still pending). Every `checkpoint_every` steps and at the end; for MiniLLM a save that
    falls inside a round waits for the round's end, so that a resume samples the same next round (same
    state, same key) as an uninterrupted run."""
    pending = pending or done % config.checkpoint_every == 0
    if done == config.steps:
        return True, False
    if pending and getattr(task, "at_round_end", True):
        return True, False
    return False, pending


def _train_loop(c, ctx, task, state, start, validator, checkpoints, writer):
    progress = _progress(c, start)
    pending, last_time, valid_metrics, valid_texts = None, time.time(), {}, []
    save_pending = False
    for step in range(start, c.steps):
        state, metrics = task.step(state, step)
        if pending is not None:  # read step N's metrics only after step N+1 is dispatched
            last_time = _log(writer, progress, *pending, last_time)
        pending = (step + 1, metrics)
        done = step + 1
        if c.sample_every and done % c.sample_every == 0 and validator.records:
            student = nnx.merge(ctx.graphdef, state.params)
            answers = evaluate.sample_answers(student, ctx.tokenizer, validator.prompts[:2], ctx.sampling,
                                              ctx.key(done, 6), batch_size=2)
            writer.write(done, {"sample": answers.texts[0]})
        validated = bool(c.eval_every) and (done % c.eval_every == 0 or done == c.steps)
        if validated:
            last_time = _log(writer, progress, *pending, last_time)
            pending = None
            valid_metrics, valid_texts = validator(state.params)
            writer.write(done, valid_metrics)
            task.on_validation(valid_metrics)
            if progress is not None:
                progress.write(" ".join(f"{k}={v:.4g}" for k, v in valid_metrics.items()))
        save, save_pending = _checkpoint_due(c, task, done, save_pending)
        if save:
            checkpoints.save(done, state, {"step": done, "task": task.get_position(), "config": c.to_dict()},
                             metrics=valid_metrics if validated else None)
    if pending is not None:
        _log(writer, progress, *pending, last_time)
    if progress is not None:
        progress.close()
    return valid_metrics, valid_texts, state


def _progress(config, start):
    if not config.logging.progress or jax.process_index() != 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=config.steps, initial=start, desc=config.task, unit="step", dynamic_ncols=True)


def _log(writer, progress, step, metrics, last_time):
    values = {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    if bad:
        raise FloatingPointError(f"step {step}: non-finite {', '.join(bad)} ({values})")
    now = time.time()
    values["step_seconds"] = now - last_time
    if "tokens" in values:
        values["tokens_per_second"] = values["tokens"] / max(now - last_time, 1e-9)
    writer.write(step, values)
    if progress is not None:
        progress.update(step - progress.n)
        progress.set_postfix(loss=f"{values.get('loss', float('nan')):.4f}")
    return now


CURVES = ("loss", "valid/rouge_l", "valid/reverse_kl", "valid/loss", "rollout/reverse_kl", "pg", "single_step", "pt",
          "ce", "grad_norm", "lr", "tokens_per_second")


def _plot(workdir: pathlib.Path) -> None:
    """curves.png: the main training curves that this run logged."""
    logged = set()
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        logged |= set(json.loads(line))
    keys = [k for k in CURVES if k in logged]
    if keys:
        evaluate.plot_curves(workdir / "metrics.jsonl", workdir / "curves.png", keys=keys)


def shown_prompt(record: dict, fields) -> str:
    """What the user asked, for display: the instruction (and its input), or a chat record's last prompt
    turn. (Rendering the Alpaca template and cutting it apart failed on chat records, which refuse it.)"""
    if fields.messages:
        return split_messages(record[fields.messages])[0][-1]["content"]
    extra = (record.get(fields.input) or "") if fields.input else ""
    return record[fields.instruction] + (f"\n\n{extra}" if extra.strip() else "")


def _summary(config, workdir, validator, before, after) -> str:
    """Before/after figures and a few answers side by side (printed, and kept as summary.md)."""
    if not validator.records or before is None:
        return ""
    lines = ["| metric | before | after |", "|---|---|---|"]
    for key in after[0]:
        lines.append(f"| {key} | {before[0].get(key, float('nan')):.4g} | {after[0][key]:.4g} |")
    for i in range(min(3, len(validator.records))):
        lines += ["", f"**Prompt {i + 1}:** {shown_prompt(validator.records[i], field_map(config)).strip()}"]
        if validator.teacher_texts is not None:
            lines.append(f"- teacher: {validator.teacher_texts[i]}")
        lines += [f"- student before: {before[1][i]}", f"- student after: {after[1][i]}"]
    text = "\n".join(lines)
    if jax.process_index() == 0:
        (workdir / "summary.md").write_text(text + "\n")
        print("\n" + text + "\n")
    return text


# ------------------------------------------------------------------------------------------ eval, generate


def run_eval(config, workdir: pathlib.Path, models) -> dict:
    """The paper's protocol on every configured set, for the student and/or the teacher."""
    e = config.eval
    results = {}
    chosen = {"student": [("student", models.student)], "teacher": [("teacher", models.teacher)],
              "both": [("teacher", models.teacher), ("student", models.student)]}[e.model]
    sets = [evaluate.load_eval_set(name, path, models.tokenizer, template=config.data.template,
                                   max_prompt_length=config.data.max_prompt_length, limit=e.limit or None)
            for name, path in e.sets.items() if path]
    tokenizer = models.tokenizer
    for name, model in chosen:
        results[name] = evaluate.evaluate_model(
            model, tokenizer, sets, seeds=tuple(e.seeds), max_new_tokens=e.max_new_tokens,
            no_repeat_ngram_size=e.no_repeat_ngram_size, batch_size=e.batch_size,
            teacher=models.teacher if name == "student" else None, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
        if e.exposure_bias and name == "student" and models.teacher is not None and sets:
            results[name]["exposure_bias"] = evaluate.exposure_bias(
                model, models.teacher, sets[0].prompts[:e.exposure_bias_prompts], max_new_tokens=e.max_new_tokens,
                seed=e.seeds[0], batch_size=e.batch_size)
        if e.calibration:
            results[name]["calibration"] = evaluate.calibration(model, tokenizer, e.calibration,
                                                                template=config.data.template)
    if jax.process_index() == 0:
        json_path, md_path = evaluate.write_report(results, workdir)
        print(pathlib.Path(md_path).read_text())
        metrics = workdir / "metrics.jsonl"
        if metrics.exists() and metrics.stat().st_size:
            evaluate.plot_curves(metrics, workdir / "curves.png")
    return results


def run_generate(config, workdir: pathlib.Path, models) -> dict:
    """Sampled answers of the student (or the teacher when there is no student) to the validation
    prompts, written to generations.jsonl."""
    model = models.student if models.student is not None else models.teacher
    _, records = train_and_valid_records(config) if config.data.train else ([], read_split(
        config, config.data.valid, config.data.valid_split))
    tokenizer = models.tokenizer
    sampling = sampling_config(config, tokenizer)
    texts = evaluate.generate_texts(model, tokenizer, [prompt_ids(config, tokenizer, r) for r in records], sampling,
                                    config.seed, config.batch_size)[0]
    rows = [{**record, "generated": text} for record, text in zip(records, texts, strict=True)]
    path = workdir / "generations.jsonl"
    if jax.process_index() == 0:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {len(rows)} answers to {path}")
    return {"generations": str(path), "count": len(rows)}
