"""The Table-1 pipeline (`python -m minillm_jax.pipeline`): end to end on tiny random models (2 training seeds,
stages sft + eval, every stage a real CLI subprocess), then in-process: the stage plan of a whole row and the
table's arithmetic on results with known numbers.

The stage processes run without torch, as the package does outside the tests (torch is test-only here; a
`sitecustomize` hides it from the import system), which also spares each process transformers' torch import;
they share a JAX compilation cache."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from minillm_jax import pipeline
from minillm_jax.pipeline_table import write_table
from minillm_jax.workdir import config_differences

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "tests/pipeline_tiny.py"


WITHOUT_TORCH = """import importlib.machinery
import sys


class _WithoutTorch(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.split(".")[0] == "torch" else super().find_spec(name, path, target)


sys.meta_path = [_WithoutTorch if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
"""


def run_pipeline(workdir: pathlib.Path, *args: str, cache: pathlib.Path) -> subprocess.CompletedProcess:
    (cache / "site").mkdir(exist_ok=True)
    (cache / "site" / "sitecustomize.py").write_text(WITHOUT_TORCH)
    path = os.pathsep.join(p for p in (str(cache / "site"), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache / "jax"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "PYTHONPATH": path}
    return subprocess.run([sys.executable, "-m", "minillm_jax.pipeline", "--config", CONFIG, "--workdir", str(workdir),
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)


def started(output: str) -> list[str]:
    return re.findall(r"^== \[\d+/\d+\] (\S+): python -m minillm_jax.main", output, re.M)


def skipped(output: str) -> list[str]:
    return re.findall(r"^== \[\d+/\d+\] (\S+): done .*skipped$", output, re.M)


def archive_of(workdir: pathlib.Path) -> pathlib.Path:
    return workdir.with_name(workdir.name + "-archive")


@pytest.fixture(scope="module")
def row(tmp_path_factory):
    """One pipeline run: seeds 0 and 1, stages sft and eval, archived to archive_of(workdir)."""
    workdir, cache = tmp_path_factory.mktemp("row"), tmp_path_factory.mktemp("cache")
    result = run_pipeline(workdir, "--seeds", "0,1", "--stages", "sft,eval", "--archive", str(archive_of(workdir)),
                          cache=cache)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return workdir, cache, result.stdout


ORDER = ["eval-teacher", "sft-seed0", "eval-sft-seed0", "sft-seed1", "eval-sft-seed1"]


@pytest.mark.slow  # the row: 5 CLI stages in subprocesses
def test_stages_run_in_order_each_a_normal_run_in_its_own_workdir(row):
    workdir, _, output = row
    assert started(output) == ORDER
    assert "[sft-seed1] exported the student" in output  # streamed with the stage's prefix
    for name in ORDER:
        assert json.loads((workdir / "pipeline.json").read_text())["stages"][name]["status"] == "done"
        assert (workdir / "logs" / f"{name}.log").stat().st_size > 0
    assert json.loads((workdir / "sft-seed1" / "config.json").read_text())["seed"] == 1
    evaluated = json.loads((workdir / "eval-sft-seed1" / "eval_config.json").read_text())
    assert evaluated["student"] == str(workdir / "sft-seed1" / "hf") and evaluated["eval"]["seeds"] == [20]
    assert json.loads((workdir / "eval-teacher" / "eval_config.json").read_text())["eval"]["seeds"] == [10, 20]
    results = json.loads((workdir / "eval-sft-seed0" / "results.json").read_text())["student"]
    assert "exposure_bias" in results and {"dist_4_mean", "lm_loss", "reverse_kl_per_token"} <= set(results["dolly"])


@pytest.mark.slow  # the row: 5 CLI stages in subprocesses
def test_table_holds_mean_and_std_of_the_per_seed_results(row):
    workdir, _, _ = row
    table = json.loads((workdir / "table.json").read_text())
    markdown = (workdir / "table.md").read_text()
    per_seed = [json.loads((workdir / f"eval-sft-seed{k}" / "results.json").read_text())["student"]["dolly"]
                for k in (0, 1)]
    for key, source, digits in (("rouge_l", "rouge_l_mean", 2), ("lm_loss", "lm_loss", 3),
                                ("reverse_kl_per_token", "reverse_kl_per_token", 3)):
        values = np.array([r[source] for r in per_seed])
        cell = table["methods"]["sft"]["dolly"][key]
        assert cell["values"] == {"seed 0": values[0], "seed 1": values[1]}
        assert cell["mean"] == pytest.approx(values.mean()) and cell["std"] == pytest.approx(values.std(ddof=1))
        assert f"| sft | {values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f} |" in markdown
    teacher = json.loads((workdir / "eval-teacher" / "results.json").read_text())["teacher"]["dolly"]["per_seed"]
    samples = np.array([teacher["10"]["rouge_l"], teacher["20"]["rouge_l"]])
    assert table["methods"]["teacher"]["dolly"]["rouge_l"]["std"] == pytest.approx(samples.std(ddof=1))
    assert set(table["exacc_err"]["sft"]) == {"1", "8"}
    assert set(table["wall_seconds"]) == set(ORDER) and "## Time per stage" in markdown


@pytest.mark.slow  # the row: 5 CLI stages in subprocesses
def test_rerun_skips_finished_stages_and_resumes_an_interrupted_one(row):
    """sft-seed1 as a run stopped after its step-2 checkpoint (no export, no step 4): the rerun skips every
    finished stage, resumes that one from step 2 and scores its new export again (the old results are stale)."""
    workdir, cache, _ = row
    stage = workdir / "sft-seed1"
    shutil.rmtree(stage / "hf")
    shutil.rmtree(stage / "checkpoints" / "4")
    result = run_pipeline(workdir, "--seeds", "0,1", "--stages", "sft,eval", cache=cache)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert skipped(result.stdout) == ["eval-teacher", "sft-seed0", "eval-sft-seed0"]
    assert started(result.stdout) == ["sft-seed1", "eval-sft-seed1"]
    assert "[sft-seed1] resumed from step 2" in result.stdout
    assert (stage / "hf" / "config.json").is_file()
    attempts = json.loads((workdir / "pipeline.json").read_text())["stages"]["sft-seed1"]["attempts"]
    assert [a["status"] for a in attempts] == ["done", "done"]

    again = run_pipeline(workdir, "--seeds", "0,1", "--stages", "sft,eval", cache=cache)
    assert again.returncode == 0 and started(again.stdout) == [] and skipped(again.stdout) == ORDER

    # the same finished row with --prune-checkpoints: the training stages' checkpoints go, the exports stay
    assert (workdir / "sft-seed0" / "checkpoints").is_dir()
    pruned = run_pipeline(workdir, "--seeds", "0,1", "--stages", "sft,eval", "--prune-checkpoints", cache=cache)
    assert pruned.returncode == 0 and started(pruned.stdout) == [], pruned.stdout[-4000:] + pruned.stderr[-4000:]
    assert re.findall(r"^== (\S+): removed its checkpoints", pruned.stdout, re.M) == ["sft-seed0", "sft-seed1"]
    for name in ("sft-seed0", "sft-seed1"):
        assert not (workdir / name / "checkpoints").exists() and (workdir / name / "hf" / "config.json").is_file()


@pytest.mark.slow  # the row: 5 CLI stages in subprocesses
def test_the_archive_alone_brings_the_row_back_on_a_fresh_machine(row, tmp_path):
    workdir, cache, _ = row
    archive = archive_of(workdir)
    result = run_pipeline(tmp_path / "fresh", "--seeds", "0,1", "--stages", "sft,eval", "--archive", str(archive),
                          cache=cache)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert started(result.stdout) == [] and "restored from" in result.stdout
    assert re.findall(r"^== \[\d+/\d+\] (\S+): not needed", result.stdout, re.M) == ["sft-seed0", "sft-seed1"]
    table = json.loads((tmp_path / "fresh" / "table.json").read_text())
    assert table["methods"] == json.loads((archive / "table.json").read_text())["methods"]
    assert table["methods"]["sft"]["dolly"]["rouge_l"]["values"].keys() == {"seed 0", "seed 1"}
    assert not list(archive.rglob("*.safetensors")) and (archive / "sft-seed1" / "metrics.jsonl").is_file()


@pytest.mark.slow  # the row, then 3 evaluations in subprocesses
def test_a_finished_rows_students_are_scored_again_on_other_prompts_in_a_workdir_of_their_own(row, tmp_path):
    """`--stages eval --reuse row --config.eval.limit=2`: the row's students (read only) and its teacher are
    scored on 2 prompts instead of 3, all in the new workdir; the row's teacher scores (3 prompts) are not reused,
    and the config the pipeline resolves for a stage is the one the CLI records."""
    workdir, cache, _ = row
    teacher = next(s for s in pipeline.plan(pipeline.parse(["--config", CONFIG, "--workdir", str(workdir),
                                                            "--seeds", "0,1", "--stages", "sft,eval"]))
                   if s.name == "eval-teacher")
    recorded = json.loads((workdir / "eval-teacher" / "eval_config.json").read_text())
    assert config_differences(recorded, pipeline.resolved_config(teacher.args)) == []
    before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file() and "jax_cache" not in p.parts}
    again = tmp_path / "again"
    result = run_pipeline(again, "--seeds", "0,1", "--stages", "eval", "--reuse", str(workdir),
                          "--config.eval.limit=2", cache=cache)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert started(result.stdout) == ["eval-teacher", "eval-sft-seed0", "eval-sft-seed1"]
    assert "the teacher is scored again here" in result.stdout and "eval.limit: 3 there, 2 here" in result.stdout
    for name, model in (("eval-teacher", "teacher"), ("eval-sft-seed1", "student")):
        results = json.loads((again / name / "results.json").read_text())[model]["dolly"]
        assert results["n"] == 2
    evaluated = json.loads((again / "eval-sft-seed1" / "eval_config.json").read_text())
    assert evaluated["student"] == str(workdir / "sft-seed1" / "hf") and evaluated["eval"]["seeds"] == [20]
    assert json.loads((again / "table.json").read_text())["methods"].keys() == {"teacher", "sft"}
    assert {p: p.stat().st_mtime_ns for p in before} == before  # the row: read, never written


@pytest.mark.slow  # the row: 5 CLI stages in subprocesses
def test_a_failing_stage_stops_the_pipeline_and_is_named(row):
    workdir, cache, _ = row
    result = run_pipeline(workdir, "--seeds", "0,1", "--stages", "kd", "--config.kd.kd_ratio=2.0", cache=cache)
    assert result.returncode == 2
    assert started(result.stdout) == ["kd-seed0"]  # kd-seed1 never starts
    assert "stage kd-seed0 failed (exit code 2)" in result.stderr
    assert "--config.kd.kd_ratio" in (workdir / "logs" / "kd-seed0.log").read_text()
    assert not (workdir / "kd-seed1").exists()


# ------------------------------------------------------------------------------------------ in process


def test_plan_of_a_whole_row_links_the_stages(tmp_path):
    gpt2 = str(ROOT / "configs" / "gpt2.py")
    options = pipeline.parse(["--config", gpt2, "--size", "120m", "--teacher-size", "1.5b",
                              "--workdir", str(tmp_path), "--seeds", "3,7", "--data-root", "/data",
                              "--stages", "eval,minillm,seqkd,kd,sft,sft_init,teacher_sft", "--config.steps=9"])
    stages = pipeline.plan(options)
    per_seed = ["sft_init", "minillm", "eval-minillm", "sft", "eval-sft", "kd", "eval-kd", "seqkd", "eval-seqkd"]
    assert [s.name for s in stages] == ["teacher_sft", "eval-teacher"] + [
        f"{n}-seed{k}" for k in (3, 7) for n in per_seed]
    by_name = {s.name: s for s in stages}
    teacher = f"--config.teacher={tmp_path / 'teacher_sft' / 'hf'}"
    assert by_name["teacher_sft"].args[:2] == ("--config", f"{gpt2}:teacher_sft-1.5b")
    minillm = by_name["minillm-seed7"].args
    assert minillm[:2] == ("--config", f"{gpt2}:minillm-120m") and teacher in minillm
    assert f"--config.student={tmp_path / 'sft_init-seed7' / 'hf'}" in minillm and "--config.seed=7" in minillm
    assert teacher not in by_name["sft-seed3"].args and teacher in by_name["kd-seed3"].args  # GPT-2 SFT: none
    smollm2 = pipeline.plan(pipeline.parse(["--config", str(ROOT / "configs" / "smollm2.py"), "--workdir",
                                            str(tmp_path), "--stages", "teacher_sft,sft_init,sft"]))
    assert all(teacher in s.args for s in smollm2[1:])  # its students are cut from the (tuned) teacher
    assert all(s.args[-2:] == ("--config.steps=9", "--config.data.root=/data") for s in stages)
    eval_sft, eval_kd = by_name["eval-sft-seed7"].args, by_name["eval-kd-seed7"].args
    assert "--config.eval.seeds=(20,)" in eval_sft and "--config.task=eval" in eval_sft
    assert "--config.eval.exposure_bias=True" in eval_sft and "--config.eval.exposure_bias=True" not in eval_kd
    assert "--config.eval.seeds=(10,20,)" in by_name["eval-teacher"].args
    one = pipeline.parse(["--config", str(ROOT / "configs" / "smollm2.py"), "--workdir", str(tmp_path)])
    assert one.eval_seeds == (10, 20, 30, 40, 50) and one.stages == pipeline.DEFAULT_STAGES
    with pytest.raises(SystemExit, match="sft_init"):  # MiniLLM's init is neither requested nor on disk
        pipeline.check_inputs(options, pipeline.plan(pipeline.parse(
            ["--config", "configs/smollm2.py", "--workdir", str(tmp_path / "new"), "--stages", "minillm"])))


def _results(rouge: dict, extra: dict | None = None) -> dict:
    sets = {name: {"n": 3, "rouge_l_mean": value, "rouge_l_std": 0.0, "exact_match_mean": 0.0, "length_mean": 10.0,
                   "dist_4_mean": 90.0 + value / 10, "lm_loss": value / 10, "reverse_kl_per_token": 1.0,
                   "per_seed": {"10": {"rouge_l": value, "dist_4": 90.0}}} for name, value in rouge.items()}
    return {"student": {**sets, **(extra or {})}}


def test_prune_checkpoints_removes_only_a_finished_training_stages_checkpoints(tmp_path):
    def stage(name: str, kind: str, output: str | None) -> pipeline.Stage:
        workdir = tmp_path / name
        (workdir / "checkpoints" / "4").mkdir(parents=True)
        (workdir / "checkpoints" / "4" / "data").write_bytes(b"x" * 1000)
        (workdir / "checkpoints" / "4" / "meta.json").write_bytes(b"{}")
        if output:
            (workdir / output).parent.mkdir(parents=True, exist_ok=True)
            (workdir / output).write_text("{}")
        return pipeline.Stage(name=name, kind=kind, method=kind, seed=0, workdir=workdir, args=())

    finished, running = stage("sft-seed0", "sft", "hf/config.json"), stage("kd-seed0", "kd", None)
    evaluation = stage("eval-sft-seed0", "eval", "results.json")
    assert pipeline.prune_checkpoints(finished) == 1002
    assert not (finished.workdir / "checkpoints").exists() and (finished.workdir / "hf" / "config.json").is_file()
    assert pipeline.prune_checkpoints(finished) == 0  # already pruned
    assert pipeline.prune_checkpoints(running) == 0  # it resumes from them
    assert pipeline.prune_checkpoints(evaluation) == 0
    assert (running.workdir / "checkpoints" / "4" / "data").is_file()
    assert (evaluation.workdir / "checkpoints" / "4" / "data").is_file()
    args = ["--config", "configs/smollm2.py", "--workdir", str(tmp_path / "row")]
    assert pipeline.parse(args + ["--prune-checkpoints"]).prune_checkpoints
    assert not pipeline.parse(args).prune_checkpoints


def test_table_arithmetic_on_known_results(tmp_path):
    options = pipeline.parse(["--config", "configs/smollm2.py", "--workdir", str(tmp_path), "--seeds", "0,1,2",
                              "--stages", "sft,minillm,eval"])
    stages = pipeline.plan(options)
    rouge = {"sft": [20.0, 24.0, 22.0], "minillm": [25.0, 26.0, 30.0]}
    for stage in stages:
        if stage.kind != "eval" or stage.method == "teacher":
            continue
        value = rouge[stage.method][options.seeds.index(stage.seed)]
        exposure = {"exposure_bias": {"summary": {"10": {"exacc_err": value / 2}}}}
        stage.workdir.mkdir(parents=True)
        (stage.workdir / "results.json").write_text(json.dumps(_results({"dolly": value, "vicuna": value + 1},
                                                                        exposure)))
    table = json.loads(write_table(tmp_path, options.seeds, stages).with_suffix(".json").read_text())
    markdown = (tmp_path / "table.md").read_text()
    assert table["sets"] == ["dolly", "vicuna"]
    assert table["methods"]["sft"]["dolly"]["rouge_l"]["mean"] == pytest.approx(22.0)
    assert table["methods"]["sft"]["dolly"]["rouge_l"]["std"] == pytest.approx(2.0)  # sqrt((4 + 4 + 0) / 2)
    assert "| sft | 22.00 ± 2.00 | 23.00 ± 2.00 |" in markdown
    assert "| minillm | 27.00 ± 2.65 | 28.00 ± 2.65 |" in markdown  # sqrt((4 + 1 + 9) / 2) = 2.6458
    assert "| minillm | 2.700 ± 0.265 | 2.800 ± 0.265 |" in markdown  # LM loss = Rouge-L / 10
    assert "| sft | 11.0 ± 1.0 |" in markdown  # ExAccErr(10) = Rouge-L / 2
    assert "| minillm | seed 2 | 30.00 | 31.00 |" in markdown


def test_an_ablation_reuses_the_rows_teacher_phase1_students_and_teacher_scores(tmp_path):
    row, ablation = tmp_path / "row", tmp_path / "no-mix"
    smollm2 = str(ROOT / "configs" / "smollm2.py")
    for path in ("teacher_sft/hf/config.json", "sft_init-seed0/hf/config.json", "eval-teacher/results.json"):
        (row / path).parent.mkdir(parents=True)
        (row / path).write_text("{}")
    row_options = pipeline.parse(["--config", smollm2, "--workdir", str(row), "--seeds", "0,1"])
    scored = next(s for s in pipeline.plan(row_options) if s.name == "eval-teacher")
    recorded = pipeline.resolved_config(scored.args)  # what the CLI records (checked against it on the slow row)
    assert recorded["eval"]["model"] == "teacher" and recorded["teacher"] == str(row / "teacher_sft" / "hf")
    (row / "eval-teacher" / "eval_config.json").write_text(json.dumps(recorded))
    argv = ["--config", smollm2, "--workdir", str(ablation), "--seeds", "0,1", "--stages", "minillm,eval",
            "--reuse", str(row), "--config.minillm.mix_alpha=0.0"]
    options = pipeline.parse(argv)
    stages = pipeline.plan(options)
    assert [s.name for s in stages] == ["eval-teacher", "minillm-seed0", "eval-minillm-seed0", "minillm-seed1",
                                        "eval-minillm-seed1"]
    by_name = {s.name: s for s in stages}
    assert by_name["eval-teacher"].workdir == row / "eval-teacher" and by_name["eval-teacher"].done()
    for other in ("--config.eval.limit=7", "--config.data.max_prompt_length=64", "--eval-seeds=10,40"):
        assert pipeline.plan(pipeline.parse(argv + [other]))[0].workdir == ablation / "eval-teacher"  # scored here
    with_pt = argv + ["--config.data.pretrain=dolly/train.jsonl", "--config.data.pretrain_field=input",
                      "--config.data.pretrain_length=128", "--config.minillm.pt_coef=1.0"]
    assert pipeline.plan(pipeline.parse(with_pt))[0].workdir == row / "eval-teacher"  # L_PT data: training only
    archived = pipeline.parse(argv + ["--archive", str(tmp_path / "archive")])
    assert pipeline.archive_stage(archived, by_name["eval-teacher"]) is None
    assert not (tmp_path / "archive").exists()  # the row's own stage, not the ablation's
    minillm = by_name["minillm-seed0"]
    assert minillm.workdir == ablation / "minillm-seed0" and "--config.minillm.mix_alpha=0.0" in minillm.args
    assert f"--config.teacher={row / 'teacher_sft' / 'hf'}" in minillm.args
    assert f"--config.student={row / 'sft_init-seed0' / 'hf'}" in minillm.args
    assert by_name["eval-minillm-seed1"].student == ablation / "minillm-seed1" / "hf"
    after_sft = pipeline.plan(pipeline.parse(argv + ["--minillm-init", "sft"]))
    assert f"--config.student={row / 'sft-seed0' / 'hf'}" in after_sft[1].args  # MiniLLM after the SFT baseline
    assert after_sft[2].student == ablation / "minillm-seed0" / "hf"  # and its evaluation scores MiniLLM's export
    whole = [s.name for s in pipeline.plan(pipeline.parse(["--config", smollm2, "--workdir", str(tmp_path / "w"),
                                                            "--minillm-init", "sft"]))]
    assert whole.index("minillm-seed0") > whole.index("sft-seed0")
    with pytest.raises(SystemExit, match=r"sft_init-seed1/hf, which --reuse .* does not hold yet"):
        pipeline.check_inputs(options, stages)
    (row / "sft_init-seed1" / "hf").mkdir(parents=True)
    (row / "sft_init-seed1" / "hf" / "config.json").write_text("{}")
    pipeline.check_inputs(options, stages)
    (row / "eval-teacher" / "results.json").unlink()  # not scored there yet: scored here, never written there
    assert pipeline.plan(options)[0].workdir == ablation / "eval-teacher"

    # `--stages eval --reuse`: the row's students (those it trained) scored again here
    again = pipeline.parse(["--config", smollm2, "--workdir", str(tmp_path / "again"), "--seeds", "0,1",
                            "--stages", "eval", "--reuse", str(row), "--config.eval.limit=200"])
    (row / "kd-seed0" / "hf").mkdir(parents=True)
    (row / "kd-seed0" / "hf" / "config.json").write_text("{}")
    rescored = pipeline.plan(again)
    assert [(s.name, s.student) for s in rescored] == [
        ("eval-teacher", None), ("eval-kd-seed0", row / "kd-seed0" / "hf"), ("eval-kd-seed1", row / "kd-seed1" / "hf")]
    assert all(s.workdir.parent == tmp_path / "again" for s in rescored)
    with pytest.raises(SystemExit, match=r"eval-kd-seed1 needs .*kd-seed1/hf, which --reuse .* does not hold yet"):
        pipeline.check_inputs(again, rescored)
    for bad, message in ((["--stages", "sft_init,minillm"], "sft_init with --reuse"),
                         (["--reuse", str(tmp_path / "none")], "no such directory"),
                         (["--reuse", str(ablation)], "that is --workdir itself")):
        ablation.mkdir(exist_ok=True)
        with pytest.raises(SystemExit), pytest.MonkeyPatch.context() as m:
            errors = []
            m.setattr("argparse.ArgumentParser.error", lambda self, text: (errors.append(text), sys.exit(2)))
            pipeline.parse(argv + bad)
        assert message in errors[0]


def losses(values: dict) -> str:
    return "".join(json.dumps({"step": k, "valid/loss": v, "time": 1.0}) + "\n" for k, v in values.items())


def test_a_fresh_machine_restores_the_archived_results_and_trains_only_what_they_lack(tmp_path):
    """A row archived on one machine (results of the teacher, SFT and MiniLLM; KD trained, not yet scored),
    picked up in an empty workdir on another: the three evaluations come back, SFT, MiniLLM and MiniLLM's phase-1
    student are not trained again, KD is (its score is missing) and so is the tuned teacher KD learns from; once
    KD's score is archived too, nothing is left to train. The archive holds no weights, and refuses another row."""
    first, fresh, archive = tmp_path / "first", tmp_path / "fresh", tmp_path / "archive"
    argv = ["--config", str(ROOT / "configs" / "smollm2.py"), "--seeds", "0", "--archive", str(archive),
            "--stages", "teacher_sft,sft_init,sft,kd,minillm,eval"]
    options = pipeline.parse(argv + ["--workdir", str(first)])
    stages = first_stages = pipeline.plan(options)
    assert [s.name for s in stages] == ["teacher_sft", "eval-teacher", "sft_init-seed0", "minillm-seed0",
                                        "eval-minillm-seed0", "sft-seed0", "eval-sft-seed0", "kd-seed0",
                                        "eval-kd-seed0"]
    scores = {"eval-teacher": 13.0, "eval-sft-seed0": 11.0, "eval-minillm-seed0": 12.5}
    for stage in stages:
        if stage.kind != "eval":
            (stage.workdir / "hf").mkdir(parents=True)
            (stage.workdir / "hf" / "config.json").write_text("{}")
            (stage.workdir / "hf" / "model.safetensors").write_bytes(b"weights")
            (stage.workdir / "metrics.jsonl").write_text(losses({0: 2.8, 8: 2.5}))
        elif stage.name in scores:
            stage.workdir.mkdir(parents=True)
            role = {"role": "teacher"} if stage.method == "teacher" else {}
            results = _results({"dolly": scores[stage.name]})
            (stage.workdir / "results.json").write_text(json.dumps(
                {"teacher": results["student"]} if role else results))
    (first / "pipeline.json").write_text(json.dumps({"stages": {"teacher_sft": {
        "seconds": 60.0, "cpu_seconds": 90.0, "attempts": [], "status": "done"}}}))
    for stage in stages:
        if stage.done():
            pipeline.archive_stage(options, stage)
    kept = sorted(str(p.relative_to(archive)) for p in archive.rglob("*") if p.is_file())
    assert not [p for p in kept if "safetensors" in p or "/hf" in p]
    assert "sft-seed0/metrics.jsonl" in kept and "eval-sft-seed0/results.json" in kept and "pipeline.json" in kept
    assert "eval-kd-seed0/results.json" not in kept

    options = pipeline.parse(argv + ["--workdir", str(fresh)])
    stages = pipeline.plan(options)
    assert pipeline.restore(options, stages) == ["eval-teacher", "eval-minillm-seed0", "eval-sft-seed0"]
    assert json.loads((fresh / "pipeline.json").read_text())["stages"]["teacher_sft"]["seconds"] == 60.0
    assert pipeline.unneeded(stages) == {"sft_init-seed0", "sft-seed0", "minillm-seed0"}
    pipeline.check_inputs(options, stages)  # MiniLLM's phase-1 student is nowhere, and not needed
    table = json.loads(write_table(fresh, options.seeds, stages).with_suffix(".json").read_text())
    assert table["methods"]["minillm"]["dolly"]["rouge_l"]["values"] == {"seed 0": 12.5}
    assert table["methods"]["teacher"]["dolly"]["rouge_l"]["mean"] == 13.0

    (first / "eval-kd-seed0").mkdir()
    (first / "eval-kd-seed0" / "results.json").write_text(json.dumps(_results({"dolly": 10.0})))
    pipeline.archive_stage(pipeline.parse(argv + ["--workdir", str(first)]),
                           next(s for s in first_stages if s.name == "eval-kd-seed0"))
    assert pipeline.restore(options, stages) == ["eval-kd-seed0"]
    assert pipeline.unneeded(stages) == {"teacher_sft", "sft_init-seed0", "sft-seed0", "kd-seed0", "minillm-seed0"}
    (fresh / "sft-seed0" / "checkpoints").mkdir(parents=True)  # started here: resumed, never left half done
    assert "sft-seed0" not in pipeline.unneeded(stages)

    teacher = next(s for s in stages if s.name == "teacher_sft")  # trained again on the fresh machine
    (teacher.workdir / "hf").mkdir(parents=True)
    (teacher.workdir / "hf" / "config.json").write_text("{}")
    (teacher.workdir / "metrics.jsonl").write_text(losses({0: 2.8, 8: 2.5 * (1 + 1e-5)}) + '{"step": 9, "val')
    assert pipeline.archive_stage(options, teacher) is None
    record = json.loads((archive / "teacher_sft" / "stage.json").read_text())
    assert record["reruns"][0]["steps_compared"] == [0, 8]
    assert record["reruns"][0]["max_relative_difference"] == pytest.approx(1e-5)
    assert (archive / "teacher_sft" / "metrics.jsonl").read_text() == losses({0: 2.8, 8: 2.5})  # the first run's
    (teacher.workdir / "metrics.jsonl").write_text(losses({0: 2.8, 8: 2.5 * 1.01}))
    error = pipeline.archive_stage(options, teacher)
    assert "valid/loss at step 8 is 2.525 against 2.5" in error and "--rerun-tolerance 0.001" in error
    assert len(json.loads((archive / "teacher_sft" / "stage.json").read_text())["reruns"]) == 1

    other = pipeline.parse(argv + ["--workdir", str(fresh), "--config.minillm.mix_alpha=0.0"])
    with pytest.raises(SystemExit, match=r"holds teacher_sft run with other arguments .*mix_alpha=0.0"):
        pipeline.check_archive(other, pipeline.plan(other))
    pipeline.check_archive(options, stages)  # the same row from another workdir is the same row
