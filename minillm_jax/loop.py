"""The run behind `main.py`: one generic training loop for every method, and the hand-off to the tasks that
train nothing (`inference.py`).

Training: read and tokenise the data, check the workdir (a resume must match the checkpointed run's
config; nothing is written before these checks), load the models, build the method (`trainers/`), then
repeat: the feed's next host inputs -> the method's compiled update (one optimizer step, or a whole
MiniLLM round) -> its metrics, read only after the next update is dispatched. Validation and checkpoints
happen at update ends, on the same state: every validated state is saved and ranked by `best_metric`.
SIGINT/SIGTERM finish the current update, save it and stop; rerunning the same command continues.

Workdir: config.json, student/ (the student's HF config and tokenizer), checkpoints/, metrics.jsonl,
tensorboard/, summary.md, curves.png, hf/ (the exported student), greedy_before.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import pathlib
import shutil
import signal
import time

import jax
import numpy as np
from flax import nnx

from minillm_jax import checkpoint, inference, report, sharding
from minillm_jax.config import ADDED_KEYS, RESUMABLE_CHANGES, ConfigError, RunConfig
from minillm_jax.data import InstructionData, RecordError, load_records
from minillm_jax.experiment import (
    build_mesh,
    cpu_compute_note,
    load_models,
    load_run_tokenizer,
    sampling_config,
    workdir_path,
)
from minillm_jax.models.hf import save_config
from minillm_jax.tracking import MetricWriter
from minillm_jax.trainers import METHODS
from minillm_jax.trainers.common import Setup, jit_update, make_optimizer, sharded_train_state
from minillm_jax.validation import Validator
from minillm_jax.workdir import (
    WorkdirLock,
    atomic_directory,
    atomic_write_json,
    config_differences,
    describe_differences,
)

logger = logging.getLogger(__name__)

RUN_FILES = ("checkpoints", "metrics.jsonl", "tensorboard", "summary.md", "curves.png", "hf", "student", "config.json",
             "greedy_before.json", "seqkd", "student.gguf")


def run(config: RunConfig, workdir: str) -> dict:
    """Run `config.task` in `workdir`; returns the final metrics (or evaluation results)."""
    path = workdir_path(workdir)
    lock = WorkdirLock(path) if jax.process_index() == 0 else contextlib.nullcontext()
    with lock:
        if config.trains:
            return train(config, path)
        if config.task == "eval":
            inference.check_sets(config)
        check_results(config, path)
        models = load_models(config, build_mesh(config))
        if jax.process_index() == 0:
            if config.overwrite and (moved := move_aside(path, RESULT_FILES[config.task])):
                print(f"moved the earlier {config.task} results in {path} aside to {moved}")
            atomic_write_json(path / f"{config.task}_config.json", config.raw)
        run_task = inference.run_eval if config.task == "eval" else inference.run_generate
        return run_task(config, path, models)


# ------------------------------------------------------------------------------------------ data


@dataclasses.dataclass
class RunData:
    train: InstructionData
    valid_records: list[dict]
    description: str


def read_data(config: RunConfig, tokenizer) -> RunData:
    """The training examples (tokenised, length-filtered) and the held-out validation records."""
    d = config.data
    records = _records(config, d.train, d.split, "data.train")
    if d.holdout:
        if d.holdout >= len(records):
            raise ConfigError(f"--config.data.holdout: {d.holdout} held-out records leave none of the "
                              f"{len(records)} in {d.train} to train on")
        records, valid = records[:-d.holdout], records[-d.holdout:]
        where = f"the last {d.holdout} records of data.train (data.holdout)"
    elif d.valid:
        valid = _records(config, d.valid, d.valid_split, "data.valid")
        where = d.valid
    else:
        valid, where = [], "none"
    if d.max_train_examples:
        records = records[:d.max_train_examples]
    if d.valid_examples:
        valid = valid[:d.valid_examples]
    # MiniLLM samples its own answers: its prompts are filtered on the prompt length only (as the reference)
    max_length = 1 << 30 if config.task == "minillm" else d.max_length
    data = InstructionData.build(records, tokenizer, d.fields, template=d.template,
                                 max_prompt_length=d.max_prompt_length, max_length=max_length,
                                 add_special_tokens=d.add_special_tokens)
    if not len(data):
        raise ConfigError(f"--config.data.max_prompt_length: none of the {len(records)} records of {d.train} fits "
                          f"max_prompt_length={d.max_prompt_length}" + (f" and max_length={d.max_length}"
                                                                        if config.task != "minillm" else ""))
    rows = config.method.num_rollouts if config.task == "minillm" else config.batch_size
    key = "minillm.num_rollouts" if config.task == "minillm" else "batch_size"
    if rows > len(data):
        raise ConfigError(f"--config.{key}: {rows} rows per batch, but {d.train} has only {len(data)} usable examples")
    description = (f"train: {len(data)} examples from {d.train} ({data.dropped} dropped by the length limits); "
                   f"validation: {len(valid)} records ({where})")
    if config.task == "minillm" and config.method.pt_coef and d.pretrain:
        description += "; L_PT: " + ("the answers of data.train" if d.pretrain == "@train" else
                                     f"{d.pretrain} (field {d.pretrain_field!r})")
    return RunData(train=data, valid_records=valid, description=description)


def _records(config: RunConfig, source: str, split: str, key: str) -> list[dict]:
    try:
        records, skipped = load_records(source, config.data.fields, split=split, on_error=config.data.on_error)
    except FileNotFoundError as e:
        raise ConfigError(f"--config.{key}: {e}" + _prepare_hint(config)) from None
    except RecordError as e:  # an empty file, or a malformed record under data.on_error=fail
        raise ConfigError(f"--config.{key}: {e}") from None
    if skipped:
        logger.warning("%s: skipped %d malformed records (data.on_error=skip)", source, skipped)
        print(f"warning: {source}: skipped {skipped} malformed records (data.on_error=skip)", flush=True)
    if not records:
        raise ConfigError(f"--config.{key}: {source} holds no records")
    return records


def _prepare_hint(config: RunConfig) -> str:
    if config.data.root:
        return (f" (the paper's data sets are made with `python -m minillm_jax.data.prepare <set> --output "
                f"{config.data.root}/<set>`, <set> one of dolly, self_inst, vicuna, sinst)")
    return ""


# ------------------------------------------------------------------------------------------ workdir


def check_workdir(config: RunConfig, workdir: pathlib.Path) -> None:
    """Refuse to mix runs: a workdir with checkpoints is resumed only under a compatible config, and is
    never started over unless `overwrite` moves the old run aside (nothing is deleted)."""
    steps = saved_steps(workdir / "checkpoints")
    if not steps:
        return
    if config.resume:
        saved_path = workdir / "config.json"
        if not saved_path.exists():
            return
        saved = json.loads(saved_path.read_text())
        differences = config_differences(saved, config.raw, ignore=RESUMABLE_CHANGES, added=ADDED_KEYS)
        if not differences:
            return
        listed = describe_differences(differences)
        raise ConfigError(f"--workdir {workdir} holds checkpoints (steps {steps[0]}..{steps[-1]}) of a run with "
                          f"another config ({listed}). Resume with the same config, use another --workdir, or add "
                          "--config.overwrite=True to move the old run aside and start fresh")
    if not config.overwrite:
        raise ConfigError(f"--workdir {workdir} holds checkpoints (steps {steps[0]}..{steps[-1]}) and --config.resume "
                          "is False: use another --workdir, or add --config.overwrite=True to move the old run aside "
                          "and start fresh")


# What an evaluation or generation writes; the first name is the finished run's mark, the last its config.
RESULT_FILES = {"eval": ("results.json", "results.md", "eval_config.json"),
                "generate": ("generations.jsonl", "generate_config.json")}
# Keys that do not change what an evaluation or generation writes.
RESULT_NEUTRAL = ("overwrite", "resume", "hang_timeout_s", "compilation_cache_dir", "logging.")


def check_results(config: RunConfig, workdir: pathlib.Path) -> None:
    """Refuse to replace another run's results: a workdir whose evaluation (or generation) finished under a
    different config is written again only with `overwrite`, which moves the old results aside. The same
    config may run again (it writes what it wrote); an unfinished run left nothing to lose."""
    finished, *_, recorded = RESULT_FILES[config.task]
    if config.overwrite or not (workdir / finished).exists():
        return
    try:
        saved = json.loads((workdir / recorded).read_text())
        differences = config_differences(saved, config.raw, ignore=RESULT_NEUTRAL, added=ADDED_KEYS)
        listed = describe_differences(differences)
    except (OSError, ValueError) as e:
        differences, listed = [e], f"its {recorded} is unreadable: {e}"
    if differences:
        raise ConfigError(f"--workdir {workdir} holds {finished} of an earlier {config.task} run with another config "
                          f"({listed}): use another --workdir, or add --config.overwrite=True to move those results "
                          "aside")


def saved_steps(directory: pathlib.Path) -> list[int]:
    """Committed checkpoint steps (Orbax names each step's directory by its number), read without opening
    a manager (which would create or clean the directory)."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def move_aside(workdir: pathlib.Path, names=RUN_FILES) -> pathlib.Path | None:
    """Move an earlier run's files into workdir/replaced/<time>/ (the `overwrite` start)."""
    present = [name for name in names if (workdir / name).exists()]
    if not present:
        return None
    target = workdir / "replaced" / time.strftime("%Y%m%d-%H%M%S")
    target.mkdir(parents=True, exist_ok=False)
    for name in present:
        shutil.move(str(workdir / name), str(target / name))
    return target


# ------------------------------------------------------------------------------------------ training


def train(config: RunConfig, workdir: pathlib.Path) -> dict:
    tokenizer = load_run_tokenizer(config)
    data = read_data(config, tokenizer)
    check_workdir(config, workdir)
    mesh = build_mesh(config)
    models = load_models(config, mesh, tokenizer)
    primary = jax.process_index() == 0
    if primary and config.overwrite and not config.resume:
        moved = move_aside(workdir)
        if moved:
            print(f"moved the earlier run in {workdir} aside to {moved}")
    print(data.description, flush=True)
    note = cpu_compute_note(config.compute_dtype) if primary else None
    if note:
        print(note, flush=True)

    o = config.optimizer
    tx, schedule = make_optimizer(learning_rate=o.learning_rate, warmup_steps=o.warmup_steps, total_steps=config.steps,
                                  schedule=o.schedule, end_learning_rate=o.end_learning_rate,
                                  weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps,
                                  max_grad_norm=o.max_grad_norm or None)
    setup = Setup(config=config, graphdef=nnx.graphdef(models.student), tx=tx, schedule=schedule,
                  teacher=models.teacher, mesh=mesh, train=data.train, tokenizer=tokenizer, workdir=workdir,
                  sampling=sampling_config(config, tokenizer))
    method = METHODS[config.task](setup)
    graphdef, state, layout = sharded_train_state(models.student, tx, mesh, extra=method.extra)
    update = jit_update(method.update, layout, setup.teacher_layout, name=config.task)
    if method.steps_per_update > 1 and config.steps % method.steps_per_update:
        print(f"note: {config.task} updates make {method.steps_per_update} optimizer steps each, so the run ends at "
              f"step {math.ceil(config.steps / method.steps_per_update) * method.steps_per_update}")

    checkpoints = checkpoint.Checkpointer(workdir / "checkpoints", max_to_keep=config.keep_checkpoints,
                                          best_metric=config.best_metric or None, best_mode=config.best_mode)
    try:
        start, state = resume(config, checkpoints, state, method.feed)
        if primary:  # only now: a start refused above leaves the earlier run's files as they were
            atomic_write_json(workdir / "config.json", config.raw)
            with atomic_directory(workdir / "student", force=True) as student_dir:
                save_config(models.student.config, student_dir)
                tokenizer.save_pretrained(str(student_dir))
        # a run that starts at step 0 logs step 0 (the initial validation) again
        writer = MetricWriter(workdir, tensorboard=config.logging.tensorboard, wandb=config.logging.wandb,
                              wandb_project=config.logging.wandb_project, config=config.raw,
                              resume_step=start if start else -1)
        validator = Validator.build(config, data.valid_records, tokenizer, graphdef, models.teacher,
                                    sampling_config(config, tokenizer), layout)
        loop = Loop(config, workdir, update, method, validator, checkpoints, writer, models.teacher)
        try:
            with Interrupts() as interrupts:
                result = loop.run(state, start, interrupts)
        finally:
            writer.close()
        if interrupts.signum is not None:
            raise Stopped(loop.done, interrupts.signum)
        if primary:
            export(config, workdir, checkpoints)
        return result
    finally:
        checkpoints.close()


def resume(config: RunConfig, checkpoints: checkpoint.Checkpointer, state, feed) -> tuple[int, object]:
    """(start step, state): the newest checkpoint that restores intact; a damaged one (corrupt files,
    non-finite values) is moved to checkpoints/damaged/ with a warning and the one before is tried. A
    checkpoint of another shape stops the run with the differences."""
    if not config.resume:
        return 0, state
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    for step in reversed(checkpoints.all_steps()):
        try:
            restored, meta = checkpoints.restore(step, abstract)
        except (checkpoint.CheckpointCorrupt, checkpoint.NonFiniteState) as e:
            moved = checkpoints.quarantine(step, str(e))
            print(f"warning: checkpoint step {step} is damaged ({e}); moved to {moved}, trying the previous one",
                  flush=True)
            continue
        except checkpoint.CheckpointIncompatible as e:
            raise ConfigError(f"{e} (use another --workdir, or --config.overwrite=True --config.resume=False to move "
                              "the old run aside)") from None
        feed.restore(meta["feed"])
        print(f"resumed from step {step}", flush=True)
        return step, restored
    return 0, state


def export(config: RunConfig, workdir: pathlib.Path, checkpoints: checkpoint.Checkpointer) -> None:
    checkpoints.wait()
    if not config.export.enabled or not checkpoints.all_steps():
        return
    step = checkpoint.export_step(workdir, None if config.export.select == "best" else checkpoints.latest_step())
    if config.export.format in ("hf", "both"):
        out = checkpoint.export_hf(workdir, workdir / "hf", step=step, dtype=config.export.dtype or None, force=True)
        print(f"exported the student (step {step}) to {out}")
    if config.export.format in ("gguf", "both"):
        from minillm_jax.models.gguf_export import export_gguf_from_workdir

        out = export_gguf_from_workdir(workdir, step, workdir / "student.gguf", type=config.export.gguf_type,
                                       force=True)
        print(f"exported the student (step {step}) to {out}")


class Stopped(Exception):
    """The run stopped on a signal after saving its state."""

    def __init__(self, step: int, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}, after saving it; rerun the same "
                         "command to continue")
        self.step, self.signum = step, signum


class Interrupts:
    """SIGINT/SIGTERM ask the loop to stop after the current update (SIGTERM is how schedulers and
    preemptible VMs stop a job); a second SIGINT stops at once."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self) -> "Interrupts":
        import threading

        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after the current update and saving it (Ctrl-C again to "
              "stop at once)", flush=True)

    def requested(self) -> bool:
        """Whether any process was asked to stop (a collective on several processes: every process calls it
        after every update, so all stop at the same one)."""
        flag = self.signum is not None
        if jax.process_count() == 1:
            return flag
        return not sharding.on_every_process(not flag)


HANG_EXIT_CODE = 75  # EX_TEMPFAIL: a scheduler may restart the run, which resumes from its last checkpoint


class Watchdog:
    """Stops a run that makes no progress for `timeout` seconds (a collective that never completes leaves
    every process of a pod waiting forever, with no error): prints where each thread is, says which step
    the checkpoints reach, and exits with HANG_EXIT_CODE. `beat(what)` marks progress; 0 turns it off."""

    def __init__(self, timeout: float, describe=lambda: "", on_hang=None):
        import threading

        self.timeout, self.describe = float(timeout), describe
        self.on_hang = on_hang or self._exit
        self.last, self.what = time.monotonic(), "start"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="minillm_jax-watchdog", daemon=True)

    def __enter__(self) -> "Watchdog":
        if self.timeout > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def beat(self, what: str) -> None:
        self.last, self.what = time.monotonic(), what

    def _watch(self) -> None:
        while not self._stop.wait(min(self.timeout / 4, 30.0)):
            idle = time.monotonic() - self.last
            if idle > self.timeout:
                self.on_hang(f"no progress for {idle:.0f} s (hang_timeout_s={self.timeout:g}) after {self.what}"
                             f"{self.describe()}")
                return

    @staticmethod
    def _exit(message: str) -> None:
        import faulthandler
        import os
        import sys

        print(f"\nprocess {jax.process_index()}: {message}; the stacks of its threads follow, then it exits with "
              f"code {HANG_EXIT_CODE}", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(all_threads=True)
        sys.stderr.flush()
        os._exit(HANG_EXIT_CODE)


class Loop:
    """The generic loop: updates, logging, validation, checkpoints, the run summary."""

    def __init__(self, config: RunConfig, workdir: pathlib.Path, update, method, validator: Validator, checkpoints,
                 writer: MetricWriter, teacher):
        self.config, self.workdir, self.update, self.method = config, workdir, update, method
        self.validator, self.checkpoints, self.writer, self.teacher = validator, checkpoints, writer, teacher
        self.teacher_params = nnx.state(teacher) if teacher is not None else None
        self.done = 0
        self.primary = jax.process_index() == 0

    def run(self, state, start: int, interrupts: Interrupts) -> dict:
        def where() -> str:
            latest = self.checkpoints.latest_step()
            saved = "no checkpoint saved yet" if latest is None else f"checkpoints are intact up to step {latest}"
            return f" (step {self.done} dispatched); {saved}"

        with Watchdog(self.config.hang_timeout_s, where) as watchdog:
            return self._run(state, start, interrupts, watchdog)

    def _run(self, state, start: int, interrupts: Interrupts, watchdog: Watchdog) -> dict:
        c, S = self.config, self.method.steps_per_update
        self.done = start
        validating = bool(c.eval_every) and bool(self.validator.records)
        before = self._before(state, start) if validating else None
        next_eval = (start // c.eval_every + 1) * c.eval_every if c.eval_every else math.inf
        next_save = (start // c.checkpoint_every + 1) * c.checkpoint_every if c.checkpoint_every else math.inf
        progress = _progress(c, start)
        pending, valid, clock = None, {}, time.time()
        mesh = sharding.mesh_of(state.params)
        while self.done < c.steps:
            inputs = self.method.feed.next()
            placed = sharding.place_batch(inputs, mesh) if mesh is not None else inputs
            state, metrics = self.update(state, self.teacher_params, placed)
            if pending is not None:  # step N's metrics are read only after update N+1 is dispatched
                clock = self._log(*pending, clock, progress)
                watchdog.beat(f"step {pending[0] + S}")
            pending = (self.done, metrics)
            self.done += S
            stop = interrupts.requested()
            validate = validating and (self.done >= next_eval or self.done >= c.steps)
            save = validate or self.done >= next_save or self.done >= c.steps or stop
            if not (validate or save):
                continue
            clock = self._log(*pending, clock, progress)
            watchdog.beat(f"step {self.done}")
            pending = None
            if validate:
                valid, texts = self.validator(state.params)
                self.writer.write(self.done, {**valid, "sample": texts[0]})
                self.method.feed.after_validation(valid)
                if progress is not None:
                    progress.write(f"step {self.done}: " + " ".join(f"{k}={v:.4g}" for k, v in valid.items()))
                next_eval = (self.done // c.eval_every + 1) * c.eval_every
            watchdog.beat(f"validating at step {self.done}")
            self._save(state, valid if validate else None)
            watchdog.beat(f"saving step {self.done}")
            if c.checkpoint_every:
                next_save = (self.done // c.checkpoint_every + 1) * c.checkpoint_every
            clock = time.time()  # validation and saving are not training time
            if stop:
                break
        if progress is not None:
            progress.close()
        self.checkpoints.wait()
        if before is not None and interrupts.signum is None:
            return self._finish(state, before, valid)
        return valid

    def _save(self, state, metrics: dict | None) -> None:
        meta = {"step": self.done, "feed": self.method.feed.state(), "config": self.config.raw}
        self.checkpoints.save(self.done, state, meta, metrics=metrics)

    def _log(self, start: int, metrics: dict, clock: float, progress) -> float:
        """Write the rows of one update: per-step values ([S] arrays) on their steps, per-update values
        ([]: e.g. a round's rollout statistics) on its first step; raise on a non-finite value."""
        values = jax.tree.map(np.asarray, jax.device_get(metrics))
        now = time.time()
        S = self.method.steps_per_update
        seconds = (now - clock) / S
        for i in range(S):
            row = {k: float(v[i]) if np.ndim(v) else float(v) for k, v in values.items() if np.ndim(v) or i == 0}
            bad = sorted(k for k, v in row.items() if not math.isfinite(v))
            if bad:
                raise FloatingPointError(f"step {start + i + 1}: non-finite {', '.join(bad)}; checkpoints up to the "
                                         f"last save are intact ({row})")
            row["step_seconds"] = seconds
            if "tokens" in row:
                row["tokens_per_second"] = row["tokens"] / max(seconds, 1e-9)
            self.writer.write(start + i + 1, row)
        if progress is not None:
            progress.update(start + S - progress.n)
            progress.set_postfix(loss=f"{float(np.ravel(values.get('loss', [np.nan]))[-1]):.4f}")
        return now

    def _before(self, state, start: int) -> dict | None:
        """Validate the initial student (saved and ranked as step 0) and keep its greedy answers for the
        summary (in greedy_before.json, so a resumed run still has them)."""
        path = self.workdir / "greedy_before.json"
        if start > 0:
            return json.loads(path.read_text()) if path.exists() else None
        print("validating the initial student ...", flush=True)
        metrics, _ = self.validator(state.params)
        student = nnx.merge(self.validator.graphdef, state.params)
        greedy = self.validator.greedy_answers(student)
        teacher = self.validator.teacher_texts
        metrics.update(report.greedy_scores(greedy, teacher, self.validator.gold))
        self.writer.write(0, metrics)
        if 0 not in self.checkpoints.all_steps():  # a rerun that resumed from the saved step 0 has it already
            self._save(state, metrics)
        before = {"metrics": metrics, "greedy": greedy, "teacher_greedy": teacher}
        if self.primary:
            atomic_write_json(path, before)
        return before

    def _finish(self, state, before: dict, after: dict) -> dict:
        student = nnx.merge(self.validator.graphdef, state.params)
        greedy = self.validator.greedy_answers(student)
        after = {**after, **report.greedy_scores(greedy, before["teacher_greedy"], self.validator.gold)}
        if self.primary:
            curves = report.plot(self.workdir)
            full, printed = report.summary(before["metrics"], after, self.validator.records,
                                           self.config.data.fields,
                                           {"teacher": before["teacher_greedy"], "before": before["greedy"],
                                            "after": greedy}, curves=curves)
            report.write_summary(self.workdir, full)
            print("\n" + printed + f"\n(all prompts: {self.workdir / 'summary.md'})\n", flush=True)
        return after


def _progress(config: RunConfig, start: int):
    if not config.logging.progress or jax.process_index() != 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=config.steps, initial=start, desc=config.task, unit="step", dynamic_ncols=True)


__all__ = ["Interrupts", "Loop", "RunData", "Stopped", "check_workdir", "move_aside", "read_data", "resume", "run",
           "saved_steps", "train"]
