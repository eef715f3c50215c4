"""One command for a whole Table-1 row of the MiniLLM paper: optional teacher fine-tuning, the student's
phase-1 SFT (kept at its lowest validation loss), the SFT / KD / SeqKD baselines, MiniLLM from that phase-1
student, then the evaluation of every student and of the teacher, for each training seed:

    python -m minillm_jax.pipeline --config configs/smollm2.py --workdir runs/smollm2 [--seeds 0,1,2]
        [--stages sft_init,sft,kd,seqkd,minillm,eval] [--data-root DIR] [--config.<key>=<value> ...]
    python -m minillm_jax.pipeline --config configs/gpt2.py --size 120m --teacher-size 1.5b \\
        --stages teacher_sft,sft_init,sft,kd,seqkd,minillm,eval --workdir runs/gpt2-120m

Presets are `<method>` (`--size` not given) or `<method>-<size>` (teacher_sft: `teacher_sft-<teacher size>`).
Every stage is a normal run of `python -m minillm_jax.main` in its own subprocess and workdir:
`<workdir>/<stage>-seed<k>` for training (teacher_sft: `<workdir>/teacher_sft`, once, with the first seed),
`<workdir>/eval-<method>-seed<k>` and `<workdir>/eval-teacher` for the evaluation (the `eval` task of the
`minillm` preset, whose data, template and teacher are the row's). The pipeline adds only what links the
stages: `--config.seed=<k>`; MiniLLM's `--config.student=<workdir>/sft_init-seed<k>/hf` (`--minillm-init sft`:
the SFT baseline's export instead); with teacher_sft,
`--config.teacher=<workdir>/teacher_sft/hf` for every stage whose preset names a teacher (as the one to
distil or as the source of a layer-cut student, so every student is cut from the same model); for an
evaluation the
student's `hf/`, the sampling seeds and, for SFT and MiniLLM, `eval.exposure_bias=True`. `--data-root` and
every `--config.<key>=<value>` go to every stage.

Sampling seeds: the student of the i-th training seed samples with eval seeds[i::n] (n training seeds), so
by default (10, 20, 30 for three seeds; the paper's five for one) each trained student is sampled once and
the spread over seeds covers training and sampling; the teacher samples with all of them.

Resumable: a stage whose output exists (`hf/config.json` for training, `results.json` for evaluation) is
skipped, an interrupted one resumes from its checkpoints (the CLI's own resume; the config must not change),
and the pipeline stops at the first failing stage, naming it. Output is streamed with a `[stage]` prefix and
appended to `<workdir>/logs/<stage>.log`; wall and CPU time (user + system of the stage's process) per stage
accumulate over sittings in `<workdir>/pipeline.json`.
After every evaluation `<workdir>/table.md` and `table.json` are rewritten from the results so far
(`pipeline_table.py`).

`--archive DIR` (e.g. a directory in git) keeps what a row needs to outlive its machine: after every stage
its small files (results, training curves, resolved configs; never weights), `pipeline.json` and the table.
A rerun on a fresh machine with the same archive restores the finished evaluations, skips every training
stage that only those evaluations used, and trains only what an unfinished one still needs (the tuned
teacher included). An archive holds one row: a stage archived with other arguments is refused, and a
stage trained again (the teacher) must reproduce its archived validation losses (`--rerun-tolerance`).

`--prune-checkpoints` removes a training stage's `checkpoints/` once it has finished (its `hf/` export exists):
the later stages and the evaluation read only the export, and each kept checkpoint (the parameters with
AdamW's two moments) is ~3x the model's size, per stage and seed (the SmolLM2 row with its ablations filled
70 GB). Without it every stage keeps its checkpoints, so a finished run can still be trained further.

Ablations of a finished row (the paper's: no teacher-mix, no length normalisation, no single-step term) run
in a workdir of their own that takes the row's tuned teacher, phase-1 students and teacher scores, read only:

    python -m minillm_jax.pipeline --config configs/smollm2.py --workdir runs/smollm2-no-mix --seeds 0,1,2 \
        --stages minillm,eval --reuse runs/smollm2 --config.minillm.mix_alpha=0.0

The row's teacher scores are reused only when they were made the same way: their recorded config
(`eval-teacher/eval_config.json`) differs from this row's at most in keys an evaluation never reads
(TRAINING_ONLY); otherwise the teacher is scored again here. So `--stages eval` with `--reuse` evaluates a
finished row's students (those it trained) again in a workdir of its own, e.g. on more prompts, nothing trained
or overwritten there:

    python -m minillm_jax.pipeline --config configs/smollm2.py --workdir runs/smollm2-eval242 --seeds 0,1,2 \
        --stages eval --reuse runs/smollm2 --config.eval.limit=242
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import hashlib
import importlib.util
import json
import os
import pathlib
import resource
import shlex
import shutil
import subprocess
import sys
import time

from minillm_jax.pipeline_table import write_table
from minillm_jax.workdir import WorkdirBusy, WorkdirLock, atomic_write_bytes, atomic_write_json, config_differences

# The order stages run in: MiniLLM right after the phase-1 student it starts from (the headline row first, and
# the phase-1 student needed no longer than that), then the baselines.
TRAINING = ("teacher_sft", "sft_init", "minillm", "sft", "kd", "seqkd")
STAGES = TRAINING + ("eval",)
DEFAULT_STAGES = ("sft_init", "minillm", "sft", "kd", "seqkd", "eval")
METHODS = ("sft", "kd", "seqkd", "minillm")  # the rows of Table 1 besides the teacher
EXPOSURE_BIAS = ("sft", "minillm")  # the paper's exposure-bias comparison
PAPER_SEEDS = (10, 20, 30, 40, 50)


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str  # e.g. "kd-seed1", "eval-kd-seed1", "teacher_sft", "eval-teacher"
    kind: str  # one of STAGES
    method: str  # the row it belongs to: a training stage's name, or "teacher"
    seed: int | None
    workdir: pathlib.Path
    args: tuple[str, ...]  # after `python -m minillm_jax.main`

    student: pathlib.Path | None = None  # an evaluation's student export

    @property
    def output(self) -> pathlib.Path:
        return self.workdir / ("results.json" if self.kind == "eval" else "hf/config.json")

    def done(self) -> bool:
        """The output exists (for an evaluation: and is newer than the student it scored, which may have been
        retrained since; evaluating again is safe, training again is not, so training stages never go stale)."""
        if not self.output.is_file():
            return False
        student = self.student / "config.json" if self.student is not None else None
        return student is None or not student.is_file() or self.output.stat().st_mtime >= student.stat().st_mtime


@dataclasses.dataclass(frozen=True)
class Options:
    config: str
    workdir: pathlib.Path
    seeds: tuple[int, ...]
    stages: tuple[str, ...]
    size: str
    teacher_size: str
    eval_seeds: tuple[int, ...]
    overrides: tuple[str, ...]  # --config.<key>=<value>, --data-root included
    reuse: pathlib.Path | None = None  # another row's workdir: its teacher_sft, sft_init-seed<k>, eval-teacher
    minillm_init: str = "sft_init"  # the stage whose export MiniLLM starts from: sft_init (the paper's) or sft
    archive: pathlib.Path | None = None  # where each finished stage's small files are copied (and restored from)
    rerun_tolerance: float = 1e-3  # a stage trained again against its archived run: valid/loss, relative
    prune_checkpoints: bool = False  # remove a training stage's checkpoints/ once its export exists

    @property
    def inputs(self) -> pathlib.Path:
        """Where the tuned teacher, the phase-1 students and the teacher's scores are read from."""
        return self.reuse or self.workdir


def preset_name(options: Options, method: str) -> str:
    size = (options.teacher_size or options.size) if method == "teacher_sft" else options.size
    return f"{method}-{size}" if size else method


def preset(options: Options, method: str) -> str:
    return f"{options.config}:{preset_name(options, method)}"


@functools.cache
def _config_module(path: str):
    spec = importlib.util.spec_from_file_location("pipeline_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def preset_teacher(options: Options, method: str) -> str:
    """The teacher a preset names (the file's own `get_config`, before any override); "" when it has none."""
    try:
        module = _config_module(str(pathlib.Path(options.config).resolve()))
        return module.get_config(preset_name(options, method)).teacher
    except (OSError, ValueError, AttributeError) as e:
        raise SystemExit(f"error: --config {options.config} preset {preset_name(options, method)!r}: {e}") from None


def plan(options: Options) -> list[Stage]:
    """The stages in the order they run: teacher_sft, the teacher's evaluation, then seed by seed the training
    stages in their fixed order, each student's evaluation right after its training."""
    root, requested = options.workdir, set(options.stages)
    source = options.inputs
    teacher_dir = source / "teacher_sft"
    tuned_teacher = "teacher_sft" in requested or (teacher_dir / "hf" / "config.json").is_file()
    teacher_args = (f"--config.teacher={teacher_dir / 'hf'}",) if tuned_teacher else ()
    stages = []
    if "teacher_sft" in requested:
        stages.append(Stage("teacher_sft", "teacher_sft", "teacher_sft", options.seeds[0], teacher_dir,
                            ("--config", preset(options, "teacher_sft"), "--workdir", str(teacher_dir),
                             f"--config.seed={options.seeds[0]}") + options.overrides))
    evaluated = [m for m in METHODS if m in requested] or list(METHODS)
    if options.reuse and not requested & set(TRAINING):  # `--stages eval --reuse`: the students the row has
        evaluated = [m for m in METHODS if any((source / f"{m}-seed{k}" / "hf").is_dir() for k in options.seeds)]
    if "eval" in requested:
        teacher_eval = _eval_stage(options, "teacher", None, None, options.eval_seeds, teacher_args)
        if options.reuse:  # scored there already, the same way: read from there; else scored here, never there
            reused = dataclasses.replace(teacher_eval, workdir=source / teacher_eval.name)
            if reused.done() and not evaluation_differences(teacher_eval, reused):
                teacher_eval = reused
        stages.append(teacher_eval)
    kinds = [k for k in TRAINING[1:] if k != "minillm" or options.minillm_init == "sft_init"]
    if options.minillm_init != "sft_init":
        kinds.append("minillm")  # after the stage it starts from
    for index, seed in enumerate(options.seeds):
        for kind in kinds:
            if kind in requested:
                workdir = root / f"{kind}-seed{seed}"
                args = ["--config", preset(options, kind), "--workdir", str(workdir), f"--config.seed={seed}"]
                if teacher_args and preset_teacher(options, kind):  # also where the teacher only sources the cut
                    args += teacher_args
                if kind == "minillm":
                    args += [f"--config.student={source / f'{options.minillm_init}-seed{seed}' / 'hf'}",
                             "--config.student_layers=()"]
                stages.append(Stage(f"{kind}-seed{seed}", kind, kind, seed, workdir, tuple(args) + options.overrides))
            if "eval" in requested and kind in evaluated:  # right after its training: a result as early as can be
                trained = root if kind in requested or not options.reuse else source  # `--stages eval --reuse`
                stages.append(_eval_stage(options, kind, seed, trained / f"{kind}-seed{seed}" / "hf",
                                          options.eval_seeds[index::len(options.seeds)], teacher_args))
    return stages


def unneeded(stages: list[Stage]) -> set[str]:
    """The training stages to skip although not done: never started here, and every stage that uses their
    export (as its student, teacher or init) is done or skipped. So a student whose evaluation is done (e.g.
    restored from --archive on a fresh machine) is not trained again, nor the phase-1 student of a MiniLLM run
    that is skipped, nor the tuned teacher once nothing left uses it. A training stage nothing uses (the one
    asked for) or one already started here (it resumes; its evaluation, older than its new export, reruns) runs."""
    runs: dict[str, bool] = {}
    for index in reversed(range(len(stages))):
        stage = stages[index]
        if stage.kind == "eval" or stage.done():
            runs[stage.name] = not stage.done()
            continue
        export = stage.workdir / "hf"
        users = [s for s in stages[index + 1:] if s.student == export or any(
            a.startswith("--config.") and a.partition("=")[2] == str(export) for a in s.args)]
        runs[stage.name] = stage.workdir.exists() or not users or any(runs[s.name] for s in users)
    return {s.name for s in stages if s.kind != "eval" and not s.done() and not runs[s.name]}


def _eval_stage(options: Options, method: str, seed: int | None, student: pathlib.Path | None,
                eval_seeds: tuple[int, ...], teacher_args: tuple[str, ...]) -> Stage:
    name = "eval-teacher" if student is None else f"eval-{method}-seed{seed}"
    workdir = options.workdir / name
    args = ["--config", preset(options, "minillm"), "--workdir", str(workdir), "--config.task=eval",
            f"--config.seed={options.seeds[0] if seed is None else seed}", "--config.student_layers=()",
            f"--config.eval.seeds=({','.join(map(str, eval_seeds))},)", *teacher_args]
    if student is None:
        args += ["--config.student=", "--config.eval.model=teacher"]
    else:
        args += [f"--config.student={student}", "--config.eval.model=student"]
        if method in EXPOSURE_BIAS:
            args.append("--config.eval.exposure_bias=True")
    return Stage(name, "eval", method, seed, workdir, tuple(args) + options.overrides, student)


# What a teacher's evaluation never reads: another row's eval-teacher is this row's when their resolved configs
# differ at most here (a MiniLLM ablation's --config.minillm.*, its L_PT corpus); any other difference (eval.*,
# the prompts' data.* settings, the teacher) scores the teacher again in this row. Keys or prefixes, as
# workdir.config_differences takes them.
TRAINING_ONLY = ("minillm.", "gkd.", "distillm.", "kd.", "optimizer.", "steps", "batch_size", "accumulate_steps",
                 "eval_every", "checkpoint_every", "keep_checkpoints", "best_metric", "best_mode", "resume",
                 "overwrite", "hang_timeout_s", "compilation_cache_dir", "logging.", "export.", "data.pretrain",
                 "data.pretrain_field", "data.pretrain_length", "data.pretrain_shuffle", "data.max_train_examples")


def resolved_config(args: tuple[str, ...]) -> dict:
    """The config a stage's `python -m minillm_jax.main <args>` runs with (file, preset and overrides applied, as
    the CLI parses them), as the plain dict its `<task>_config.json` records."""
    from absl import flags
    from ml_collections import config_flags

    argv, values = ["pipeline", *args], flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "", flag_values=values)
    try:
        values(argv)
    except Exception as e:  # flags.Error, and AttributeError/KeyError/TypeError/ValueError from ml_collections
        raise SystemExit(f"error: {shlex.join(args)}: {e}") from None
    return json.loads(json.dumps(values.config.to_dict()))


def evaluation_differences(ours: Stage, theirs: Stage) -> list[str]:
    """Why another row's finished evaluation (`theirs`, e.g. --reuse's eval-teacher) is not `ours`: the keys
    of its recorded config (eval_config.json) that differ from ours outside TRAINING_ONLY, or a missing record."""
    record = theirs.workdir / "eval_config.json"
    try:
        saved = json.loads(record.read_text())
    except (OSError, ValueError) as e:
        return [f"{record}: unreadable ({e})"]
    return [f"{key}: {old!r} there, {new!r} here" for key, old, new in
            config_differences(saved, resolved_config(ours.args), ignore=TRAINING_ONLY)]


def check_inputs(options: Options, stages: list[Stage]) -> None:
    """Fail before anything runs when a stage's input can come neither from an earlier stage nor from disk."""
    skipped = unneeded(stages)
    produced = {s.workdir / "hf" for s in stages if s.kind != "eval" and s.name not in skipped}
    for stage in stages:
        if stage.done() or stage.name in skipped:
            continue
        needs = []
        if stage.kind == "minillm":
            needs.append(options.inputs / f"{options.minillm_init}-seed{stage.seed}" / "hf")
        if stage.kind == "eval" and stage.method != "teacher":
            needs.append(stage.student)
        for path in needs:
            if path not in produced and not (path / "config.json").is_file():
                if options.reuse and path.is_relative_to(options.reuse):
                    raise SystemExit(f"error: stage {stage.name} needs {path}, which --reuse {options.reuse} does "
                                     f"not hold yet; run {path.parent.name} there first")
                raise SystemExit(f"error: stage {stage.name} needs {path}, which no requested stage makes; add "
                                 f"{path.parent.name.rsplit('-seed', 1)[0]} to --stages")


# ------------------------------------------------------------------------------------------ archive

# What --archive keeps of a finished stage: its small files, never weights (enough for the table, the training
# curves and the resolved configs). Only evaluations are restored from it: a training run is a checkpoint.
ARCHIVED = {"eval": ("results.json", "results.md", "eval_config.json"),
            "train": ("config.json", "metrics.jsonl", "summary.md")}
ARCHIVED_ROOT = ("pipeline.json", "table.json", "table.md")
STAGE_RECORD = "stage.json"  # the stage's arguments, workdir-independent: an archive holds one row only


def _portable_args(options: Options, stage: Stage) -> list[str]:
    """The stage's arguments with this machine's paths replaced by names, so that the same row run in another
    workdir (a fresh machine) gives the same list, and another row does not."""
    replace = [(str(options.workdir), "{workdir}"), (str(options.config), pathlib.Path(options.config).name)]
    if options.reuse is not None:
        replace.insert(0, (str(options.reuse), "{reuse}"))
    args = []
    for arg in stage.args:
        for old, new in replace:
            arg = arg.replace(old, new)
        args.append(arg)
    return args


def check_archive(options: Options, stages: list[Stage]) -> None:
    """Fail before anything runs when --archive holds a stage of the same name run with other arguments (another
    row, another config override): its results are not this row's and must not be mixed into it."""
    if options.archive is None:
        return
    for stage in stages:
        record = options.archive / stage.name / STAGE_RECORD
        if not record.is_file():
            continue
        try:
            archived = json.loads(record.read_text())["args"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"error: --archive {record}: unreadable ({e}); expected {{\"args\": [...]}}") from None
        ours = _portable_args(options, stage)
        if archived != ours:
            differ = sorted(set(archived) ^ set(ours))
            raise SystemExit(f"error: --archive {options.archive} holds {stage.name} run with other arguments "
                             f"(differing: {differ}); give this row an archive of its own")


def archive_stage(options: Options, stage: Stage) -> str | None:
    """Copy a finished stage's small files, and the row's record and table, into --archive. A training stage
    the archive already holds (trained again on a fresh machine: the tuned teacher, whenever a student still
    has to learn from it) keeps its first record, and is compared with it: the validation losses at every
    common step must agree within --rerun-tolerance (relative), else the message saying where they differ
    is returned and nothing is written, for results from two different teachers must not end up in one row."""
    if options.archive is None or not stage.workdir.is_relative_to(options.workdir):
        return None  # a stage read from --reuse is the other row's, archived (if at all) with it
    target = options.archive / stage.name
    record = target / STAGE_RECORD
    entry = {"args": _portable_args(options, stage)}
    previous = json.loads(record.read_text()) if record.is_file() else {}
    if previous.get("reruns"):
        entry["reruns"] = previous["reruns"]
    if stage.kind == "eval":
        names = ARCHIVED["eval"]
    else:
        names = ARCHIVED["train"]
        new, old = stage.workdir / "metrics.jsonl", target / "metrics.jsonl"
        old_bytes = old.read_bytes() if old.is_file() else None  # only a rerun reads the new one here
        new_bytes = new.read_bytes() if old_bytes is not None and new.is_file() else None
        if new_bytes is not None and new_bytes != old_bytes:
            entry["reruns"] = entry.get("reruns", [])
            digest = hashlib.sha256(new_bytes).hexdigest()
            if all(r["metrics_sha256"] != digest for r in entry["reruns"]):
                old_loss, new_loss = _valid_losses(old_bytes), _valid_losses(new_bytes)
                steps = sorted(old_loss.keys() & new_loss.keys())
                if not steps:
                    return (f"{stage.name} was trained again here, but its metrics.jsonl and the archived one "
                            f"({old}) share no validation step to compare")
                gaps = {step: abs(new_loss[step] - old_loss[step]) / max(abs(old_loss[step]), 1e-12) for step in steps}
                worst = max(gaps, key=gaps.get)
                if gaps[worst] > options.rerun_tolerance:
                    return (f"{stage.name} trained again here is not the archived run: valid/loss at step {worst} "
                            f"is {new_loss[worst]:.6g} against {old_loss[worst]:.6g} in {old} (relative difference "
                            f"{gaps[worst]:.2g} > --rerun-tolerance {options.rerun_tolerance:g}); the archived results "
                            "came from the other one. Keep the two apart: give this run another --archive")
                entry["reruns"].append({"finished": datetime.datetime.now().isoformat(timespec="seconds"),
                                        "metrics_sha256": digest, "steps_compared": steps,
                                        "max_relative_difference": gaps[worst]})
            names = ()  # the first run's record stays
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (stage.workdir / name).is_file():
            atomic_write_bytes(target / name, (stage.workdir / name).read_bytes())
    atomic_write_json(record, entry)
    archive_row(options)
    return None


def archive_row(options: Options) -> None:
    """Copy the row's record and table (ARCHIVED_ROOT) into --archive."""
    for name in ARCHIVED_ROOT:
        if (options.workdir / name).is_file():
            atomic_write_bytes(options.archive / name, (options.workdir / name).read_bytes())


def _valid_losses(metrics: bytes) -> dict[int, float]:
    """{step: valid/loss} of a metrics.jsonl's contents (a torn last line, from a kill mid-write, is left out)."""
    losses = {}
    for line in metrics.decode("utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("valid/loss"), (int, float)):
            losses[int(row["step"])] = float(row["valid/loss"])
    return losses


def restore(options: Options, stages: list[Stage]) -> list[str]:
    """Copy into the workdir the archived results of the evaluations it lacks (and pipeline.json when it has
    none), so a fresh machine picks the row up where the archive left it; returns the stages restored."""
    if options.archive is None:
        return []
    restored = []
    for stage in stages:
        saved = options.archive / stage.name
        if stage.kind != "eval" or stage.done() or not (saved / "results.json").is_file():
            continue
        stage.workdir.mkdir(parents=True, exist_ok=True)
        for name in sorted(ARCHIVED["eval"], key=lambda n: n == "results.json"):  # the mark of done last
            if (saved / name).is_file():
                atomic_write_bytes(stage.workdir / name, (saved / name).read_bytes())
        restored.append(stage.name)
    record = options.workdir / "pipeline.json"
    if not record.exists() and (options.archive / "pipeline.json").is_file():
        atomic_write_bytes(record, (options.archive / "pipeline.json").read_bytes())
    return restored


# ------------------------------------------------------------------------------------------ running


def run_stage(stage: Stage, log_dir: pathlib.Path, cache_dir: pathlib.Path) -> int:
    """Run one stage's CLI in a subprocess, its output streamed with a `[stage]` prefix (progress bars'
    carriage returns kept) and appended to logs/<stage>.log; returns its exit code. Stages share JAX's
    persistent compilation cache (`cache_dir`, unless JAX_COMPILATION_CACHE_DIR is set): the evaluations of
    every method and seed compile the same functions."""
    command = [sys.executable, "-m", "minillm_jax.main", *stage.args]
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {"JAX_COMPILATION_CACHE_DIR": str(cache_dir), **os.environ, "PYTHONUNBUFFERED": "1"}
    prefix = f"[{stage.name}] ".encode()
    with open(log_dir / f"{stage.name}.log", "ab") as log:
        log.write(f"\n=== {datetime.datetime.now().isoformat(timespec='seconds')} {shlex.join(command)}\n".encode())
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        try:
            at_line_start = True
            while chunk := child.stdout.read1(65536):
                log.write(chunk)
                out = bytearray()
                for byte in chunk:  # the prefix goes before the first character of each line
                    if at_line_start and byte not in (10, 13):
                        out += prefix
                        at_line_start = False
                    out.append(byte)
                    at_line_start = at_line_start or byte in (10, 13)
                sys.stdout.buffer.write(bytes(out))
                sys.stdout.buffer.flush()
            return child.wait()
        except KeyboardInterrupt:  # the child got the same SIGINT: let it save its state and stop
            return child.wait()
        finally:
            log.flush()


def prune_checkpoints(stage: Stage) -> int:
    """Remove a finished training stage's checkpoints/ (`--prune-checkpoints`); returns the bytes freed, 0 for
    an evaluation, an unfinished stage (it resumes from them) or one already pruned."""
    directory = stage.workdir / "checkpoints"
    if stage.kind == "eval" or not stage.done() or not directory.is_dir():
        return 0
    freed = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file() and not f.is_symlink())
    shutil.rmtree(directory)
    return freed


def _prune(options: Options, stage: Stage) -> None:
    if options.prune_checkpoints and (freed := prune_checkpoints(stage)):
        print(f"== {stage.name}: removed its checkpoints ({freed / 2**30:.2f} GiB; --prune-checkpoints), its "
              f"export {stage.workdir / 'hf'} stays", flush=True)


def _cpu_seconds() -> float:
    """User + system CPU time of the finished child processes so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _record(path: pathlib.Path, stage: Stage, seconds: float, cpu: float, status: str) -> None:
    record = json.loads(path.read_text()) if path.exists() else {"stages": {}}
    entry = record["stages"].setdefault(stage.name, {"seconds": 0.0, "cpu_seconds": 0.0, "attempts": []})
    entry["seconds"] += seconds
    entry["cpu_seconds"] += cpu
    entry["attempts"].append({"seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1), "status": status,
                              "finished": datetime.datetime.now().isoformat(timespec="seconds")})
    entry["status"] = status
    entry["workdir"] = str(stage.workdir)
    atomic_write_json(path, record)


def run(options: Options) -> int:
    stages = plan(options)
    check_archive(options, stages)
    if options.archive is None:
        check_inputs(options, stages)  # before the workdir is made; with an archive, once restored
    root = options.workdir
    root.mkdir(parents=True, exist_ok=True)
    try:
        lock = WorkdirLock(root)
        lock.acquire()
    except WorkdirBusy as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        record = root / "pipeline.json"
        print(f"pipeline: {len(stages)} stages in {root}: " + ", ".join(s.name for s in stages), flush=True)
        teacher = next((s for s in stages if s.name == "eval-teacher" and s.workdir.is_relative_to(root)), None)
        if options.reuse and teacher and not teacher.done():  # plan() found the reused row's scores not ours: say why
            theirs = dataclasses.replace(teacher, workdir=options.reuse / teacher.name)
            if theirs.done():
                print(f"pipeline: the teacher is scored again here: {theirs.workdir} was scored otherwise ("
                      + "; ".join(evaluation_differences(teacher, theirs)) + ")", flush=True)
        restored = restore(options, stages)
        if restored:
            print(f"pipeline: restored from {options.archive}: {', '.join(restored)}", flush=True)
        if options.archive is not None:
            check_inputs(options, stages)
        for stage in stages:
            if stage.done() and (error := archive_stage(options, stage)):
                print(f"pipeline: {error}", file=sys.stderr, flush=True)
                return 1
        skip = unneeded(stages)
        for number, stage in enumerate(stages, start=1):
            if stage.done():
                print(f"== [{number}/{len(stages)}] {stage.name}: done ({stage.output}), skipped", flush=True)
                _prune(options, stage)
                continue
            if stage.name in skip:
                print(f"== [{number}/{len(stages)}] {stage.name}: not needed (every stage that uses it is done), "
                      "skipped", flush=True)
                continue
            print(f"== [{number}/{len(stages)}] {stage.name}: python -m minillm_jax.main {shlex.join(stage.args)}",
                  flush=True)
            start, cpu = time.time(), _cpu_seconds()
            code = run_stage(stage, root / "logs", root / "jax_cache")
            seconds, cpu = time.time() - start, _cpu_seconds() - cpu
            _record(record, stage, seconds, cpu, "done" if code == 0 and stage.done() else f"exit {code}")
            if code != 0 or not stage.done():
                why = (f"exit code {code}" if code > 0 else f"killed by signal {-code}" if code < 0 else
                       f"no {stage.output} after it ended")
                print(f"pipeline: stage {stage.name} failed ({why}); log: {root / 'logs' / (stage.name + '.log')}. "
                      "Fix it and rerun the same command: finished stages are skipped, this one resumes.",
                      file=sys.stderr, flush=True)
                return code if code > 0 else 1
            print(f"== {stage.name}: finished in {seconds / 60:.1f} min ({cpu / 60:.1f} CPU-min)", flush=True)
            if stage.kind == "eval":
                write_table(root, options.seeds, stages)
            if error := archive_stage(options, stage):
                print(f"pipeline: {error}", file=sys.stderr, flush=True)
                return 1
            _prune(options, stage)
        table = write_table(root, options.seeds, stages)
        if options.archive is not None:
            archive_row(options)
        if table is not None:
            print(table.read_text(), flush=True)
        return 0
    finally:
        lock.release()


# ------------------------------------------------------------------------------------------ command line


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers") from None
    if not values or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected distinct integers")
    return values


def _stages(text: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [n for n in names if n not in STAGES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: stages are {', '.join(STAGES)}")
    return names


def parse(argv: list[str]) -> Options:
    parser = argparse.ArgumentParser(prog="python -m minillm_jax.pipeline", description=__doc__.split("\n\n")[0],
                                     epilog="Any --config.<key>=<value> is passed to every stage.")
    parser.add_argument("--config", required=True, help="configs/<file>.py (presets <method> or <method>-<size>)")
    parser.add_argument("--workdir", required=True, type=pathlib.Path)
    parser.add_argument("--seeds", type=_ints, default=(0,), help="training seeds, e.g. 0,1,2 (default 0)")
    parser.add_argument("--stages", type=_stages, default=DEFAULT_STAGES,
                        help=f"subset of {','.join(STAGES)} (default: {','.join(DEFAULT_STAGES)})")
    parser.add_argument("--size", default="", help="preset size: presets are <method>-<size> (e.g. 120m)")
    parser.add_argument("--teacher-size", default="", help="teacher_sft's preset size (default --size), e.g. 1.5b")
    parser.add_argument("--eval-seeds", type=_ints, default=None,
                        help="sampling seeds (default 10,20,30... one per training seed; the paper's five for one)")
    parser.add_argument("--data-root", default="", help="passed as --config.data.root to every stage")
    parser.add_argument("--reuse", type=pathlib.Path, default=None,
                        help="another row's workdir whose teacher_sft, sft_init-seed<k> and eval-teacher (if "
                             "scored the same way) this one uses, read only; for a MiniLLM ablation: --stages "
                             "minillm,eval; to score its students again (e.g. --config.eval.limit=242): --stages eval")
    parser.add_argument("--archive", type=pathlib.Path, default=None,
                        help="a directory (e.g. in git) that keeps every finished stage's small files: results, "
                             "curves, configs, times; a rerun on a fresh machine restores the evaluations from it "
                             "and trains only what an unfinished evaluation still needs")
    parser.add_argument("--rerun-tolerance", type=float, default=1e-3,
                        help="a stage trained again (on a fresh machine) must match its archived run's valid/loss "
                             "at every step within this relative difference (default 1e-3)")
    parser.add_argument("--minillm-init", choices=("sft_init", "sft"), default="sft_init",
                        help="what MiniLLM starts from: the phase-1 student (default, the paper's) or the SFT "
                             "baseline's export (an ablation: MiniLLM after a full SFT run)")
    parser.add_argument("--prune-checkpoints", action="store_true",
                        help="remove each training stage's checkpoints/ once it has finished and exported hf/ "
                             "(later stages read only the export; each kept checkpoint is ~3x the model's size)")
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        parser.error(f"unexpected arguments {bad} (stage overrides are --config.<key>=<value>)")
    if ":" in pathlib.Path(args.config).name:
        parser.error(f"--config {args.config}: give the file only; the pipeline picks the presets")
    seeds = args.seeds
    eval_seeds = args.eval_seeds or (PAPER_SEEDS if len(seeds) == 1 else tuple(10 * (i + 1) for i in range(len(seeds))))
    if len(eval_seeds) < len(seeds):
        parser.error(f"--eval-seeds: {len(eval_seeds)} sampling seeds for {len(seeds)} training seeds (need >=)")
    overrides = tuple(rest) + ((f"--config.data.root={args.data_root}",) if args.data_root else ())
    workdir = args.workdir.expanduser().resolve()
    reuse = args.reuse.expanduser().resolve() if args.reuse is not None else None
    if reuse is not None:
        if not reuse.is_dir():
            parser.error(f"--reuse {args.reuse}: no such directory (expected another pipeline run's --workdir)")
        if reuse == workdir:
            parser.error(f"--reuse {args.reuse}: that is --workdir itself")
        shared = [s for s in ("teacher_sft", "sft_init") if s in args.stages]
        if shared:
            parser.error(f"--stages {','.join(shared)} with --reuse: those come from {args.reuse}; leave them out")
    archive = args.archive.expanduser().resolve() if args.archive is not None else None
    if archive is not None and archive in (workdir, reuse):
        parser.error(f"--archive {args.archive}: that is --workdir or --reuse itself; give a directory of its own")
    return Options(config=args.config, workdir=workdir, seeds=seeds,
                   stages=tuple(s for s in STAGES if s in args.stages), size=args.size, teacher_size=args.teacher_size,
                   eval_seeds=eval_seeds, overrides=overrides, reuse=reuse,
                   archive=archive, rerun_tolerance=args.rerun_tolerance,
                   minillm_init=args.minillm_init, prune_checkpoints=args.prune_checkpoints)


def main(argv: list[str] | None = None) -> int:
    return run(parse(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
