"""Issue 13 at the loop level: a run never loses or mixes work. Restarts, changed configs, corrupt
checkpoints, NaN states, a second run on the workdir, kills, signals, a full disk and misleading inputs,
each on the `tiny` preset of configs/demo.py, in-process (`loop.run`) or through the CLI in a subprocess.

Most tests start from copies of one finished run (`reference`); the CLI tests that compare with it run with
8 CPU devices like this process, so their numbers equal its numbers bit for bit."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from configs.demo import get_config
from minillm_jax import checkpoint, loop, report
from minillm_jax.config import ConfigError, RunConfig
from minillm_jax.workdir import WorkdirLock

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEACHER = "random:llama:layers=2,hidden=64,heads=4,kv_heads=2,mlp=128"  # the tiny preset's
WIDER_STUDENT = "random:llama:layers=1,hidden=64,heads=2,kv_heads=1,mlp=64"
STEPS = 24
# SFT without a teacher and without validation: the cheapest run that saves and exports
FAST = {"task": "sft", "teacher": "", "steps": STEPS, "checkpoint_every": 4, "eval_every": 0, "best_metric": "",
        "keep_checkpoints": 20, "export.select": "last"}
TIMING = ("time", "step_seconds", "tokens_per_second")
CLI_ENV = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_DEFAULT_MATMUL_PRECISION": "highest"}  # as conftest.py sets up this process


def tiny(**overrides) -> RunConfig:
    """configs/demo.py:tiny with FAST and dotted overrides."""
    c = get_config("tiny")
    for key, value in {**FAST, **overrides}.items():
        *parents, name = key.split(".")
        node = c
        for part in parents:
            node = node[part]
        node[name] = value
    return RunConfig.from_dict(c)


def flags(**overrides) -> list[str]:
    return [f"--config.{key}={value}" for key, value in {**FAST, **overrides}.items()]


def command(workdir: pathlib.Path, *extra: str, **overrides) -> list[str]:
    return [sys.executable, "-m", "minillm_jax.main", "--config", str(ROOT / "configs" / "demo.py") + ":tiny",
            "--workdir", str(workdir), *flags(**overrides), *extra]


def cli(workdir: pathlib.Path, *extra: str, cwd=ROOT, timeout=600, **overrides) -> subprocess.CompletedProcess:
    return subprocess.run(command(workdir, *extra, **overrides), cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **CLI_ENV, "PYTHONPATH": str(ROOT)})


def start_cli(workdir: pathlib.Path, **overrides) -> subprocess.Popen:
    return subprocess.Popen(command(workdir, **overrides), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **CLI_ENV})


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def rows(workdir: pathlib.Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def train_rows(workdir: pathlib.Path) -> list[dict]:
    """The training rows in file order, without the timing columns."""
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows(workdir) if "loss" in r]


def last_logged(workdir: pathlib.Path) -> int:
    try:
        return max([r["step"] for r in rows(workdir)] or [0])
    except (ValueError, KeyError):  # a line being written
        return 0


def wait_for_step(process: subprocess.Popen, workdir: pathlib.Path, step: int, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while last_logged(workdir) < step:
        assert process.poll() is None, f"the run ended before step {step}: {process.communicate()[1][-3000:]}"
        assert time.time() < deadline, f"no step {step} within {timeout} s"
        time.sleep(0.01)


def steps_saved(workdir: pathlib.Path) -> list[int]:
    reader = checkpoint.Checkpointer.reader(workdir / "checkpoints")
    try:
        return reader.all_steps()
    finally:
        reader.close()


def weights(workdir: pathlib.Path, step: int, out: pathlib.Path) -> dict[str, np.ndarray]:
    """The student's weights at `step`, read back through the export (which verifies the checkpoint)."""
    return load_file(checkpoint.export_hf(workdir, out, step=step) / "model.safetensors")


def assert_same_weights(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def assert_same_rows(rows: list[dict], expected: list[dict]) -> None:
    assert [r["step"] for r in rows] == [r["step"] for r in expected]
    for row, want in zip(rows, expected):
        assert row == want, f"step {row['step']}: {row} != {want}"


def swap_params(workdir: pathlib.Path, step: int, donor: int) -> None:
    """Put the parameters saved at `donor` in place of `step`'s: every file reads back cleanly, but the values
    are not the ones `step` recorded the fingerprints of, so only the fingerprint check can catch it (flipped
    bytes may instead break the decoding, depending on where in the OCDBT data files the middle falls)."""
    target = workdir / "checkpoints" / str(step) / "params"
    shutil.rmtree(target)
    shutil.copytree(workdir / "checkpoints" / str(donor) / "params", target)


def corrupt_params(workdir: pathlib.Path, step: int) -> list[pathlib.Path]:
    """Flip 64 bytes in the middle of every data file of the step's parameters (OCDBT keeps files that no
    array of the step reads, so damaging only one file may damage nothing that is restored)."""
    files = sorted((workdir / "checkpoints" / str(step) / "params").glob("ocdbt.process_*/d/*"))
    assert files, f"no parameter data files under {workdir / 'checkpoints' / str(step)}"
    for target in files:
        data = bytearray(target.read_bytes())
        middle = len(data) // 2
        data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
        target.write_bytes(bytes(data))
    return files


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> pathlib.Path:
    """An uninterrupted run: STEPS steps, a checkpoint every 4, exported at the end."""
    workdir = tmp_path_factory.mktemp("reference")
    loop.run(tiny(), str(workdir))
    return workdir


@pytest.fixture
def used(reference, tmp_path) -> pathlib.Path:
    """A copy of the finished reference run to restart, damage or export from."""
    return pathlib.Path(shutil.copytree(reference, tmp_path / "used"))


# ------------------------------------------------------------------------------------------ 1, 2, 4: restarts


def test_1_a_restart_without_resume_is_refused_and_overwrite_moves_the_old_run_aside(used, reference, tmp_path):
    old_export = (used / "hf" / "model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match=r"resume is False.*--config\.overwrite=True"):
        loop.run(tiny(steps=4, resume=False), str(used))
    assert steps_saved(used) == list(range(4, STEPS + 1, 4)) and not (used / "replaced").exists()

    loop.run(tiny(steps=4, resume=False, overwrite=True), str(used))
    (moved,) = (used / "replaced").iterdir()  # the old run is kept whole, never deleted
    assert steps_saved(moved) == list(range(4, STEPS + 1, 4))
    assert (moved / "hf" / "model.safetensors").read_bytes() == old_export
    assert steps_saved(used) == [4]  # the new run's own checkpoint, not skipped below the old latest
    assert json.loads((used / "hf" / ".minillm_export.json").read_text())["step"] == 4
    assert (used / "hf" / "model.safetensors").read_bytes() != old_export
    assert_same_weights(load_file(used / "hf" / "model.safetensors"), weights(reference, 4, tmp_path / "ref4"))
    assert [r["step"] for r in train_rows(used)] == [1, 2, 3, 4]


@pytest.mark.parametrize("change, key", [
    ({"optimizer.learning_rate": 2e-3}, "optimizer.learning_rate"),
    ({"accumulate_steps": 2}, "accumulate_steps"),
    ({"task": "kd", "teacher": TEACHER}, "task"),
    ({"student": WIDER_STUDENT}, "student"),
])
def test_2_a_changed_config_on_resume_stops_naming_the_keys(used, change, key):
    saved = (used / "config.json").read_bytes()
    with pytest.raises(ConfigError) as error:
        loop.run(tiny(**change), str(used))
    message = str(error.value)
    assert f"{key}: " in message and "another --workdir" in message and "--config.overwrite=True" in message
    assert "damaged" not in message
    assert (used / "config.json").read_bytes() == saved
    assert steps_saved(used) == list(range(4, STEPS + 1, 4)) and not (used / "checkpoints" / "damaged").exists()


def test_2_an_allowed_change_resumes(used, reference, capsys):
    """Also a run saved before a config key existed (student_layers_source), the key at its old behaviour."""
    saved = json.loads((used / "config.json").read_text())
    del saved["student_layers_source"]
    (used / "config.json").write_text(json.dumps(saved))
    loop.run(tiny(steps=STEPS + 2, keep_checkpoints=3, **{"logging.tensorboard": False}), str(used))
    assert f"resumed from step {STEPS}" in capsys.readouterr().out
    steps = [r["step"] for r in train_rows(used)]
    assert steps == list(range(1, STEPS + 3))
    assert_same_rows(train_rows(used)[:STEPS], train_rows(reference))


def test_4_a_failed_start_leaves_the_old_runs_files(used, reference, tmp_path):
    """Also without config.json (a run of an older version): the checkpoint itself refuses the other
    architecture, by its shapes, and that is not called damage."""
    files = {name: (used / name).read_bytes() for name in ("config.json", "student/config.json")}
    with pytest.raises(ConfigError, match="student"):
        loop.run(tiny(student=WIDER_STUDENT), str(used))
    (used / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"params\.embed_tokens: saved \(\d+, 32\) float32, expected \(\d+, 64\)"):
        loop.run(tiny(student=WIDER_STUDENT), str(used))
    assert not (used / "config.json").exists()
    assert (used / "student" / "config.json").read_bytes() == files["student/config.json"]
    assert steps_saved(used) == list(range(4, STEPS + 1, 4)) and not (used / "checkpoints" / "damaged").exists()
    assert_same_weights(weights(used, STEPS, tmp_path / "old"), weights(reference, STEPS, tmp_path / "ref"))


# ------------------------------------------------------------------------------------------ 3, 17: damage


def test_3_a_corrupt_checkpoint_falls_back_and_is_moved_aside(used, reference, tmp_path, capsys):
    swap_params(used, STEPS, donor=STEPS - 4)  # readable files holding the wrong values
    loop.run(tiny(), str(used))
    out = capsys.readouterr().out
    assert f"checkpoint step {STEPS} is damaged" in out and "does not match the fingerprint" in out  # the cause
    assert f"resumed from step {STEPS - 4}" in out
    (damaged,) = (used / "checkpoints" / "damaged").iterdir()
    assert damaged.name.startswith(f"{STEPS}-") and "fingerprint" in (damaged / "reason.txt").read_text()
    assert steps_saved(used) == list(range(4, STEPS + 1, 4))
    # the retrained steps are the reference's again, logged once each
    assert_same_rows(train_rows(used), train_rows(reference))
    assert_same_weights(weights(used, STEPS, tmp_path / "new"), weights(reference, STEPS, tmp_path / "ref"))


@pytest.mark.slow  # >= 12 s on the 2-core machine; CI's second step
def test_3_a_nan_state_stops_the_run_with_one_line_and_is_never_saved(tmp_path):
    done = cli(tmp_path, steps=3, checkpoint_every=1, **{"optimizer.learning_rate": 1e30})
    assert done.returncode == 3, done.stderr[-3000:]
    assert lines(done.stderr) == [lines(done.stderr)[0]], done.stderr[-3000:]
    assert done.stderr.startswith("error: the run diverged: step 2: non-finite")
    saved = steps_saved(tmp_path)
    assert saved and max(saved) < 2
    for step in saved:  # every committed step restores, verified and finite
        weights(tmp_path, step, tmp_path / f"hf{step}")


def test_17_a_damaged_checkpoint_is_no_longer_listed_or_selectable(used, tmp_path, capsys):
    corrupt_params(used, STEPS)
    loop.run(tiny(steps=STEPS - 4), str(used))  # falls back to STEPS - 4, which is already the end
    out = capsys.readouterr().out
    assert f"resumed from step {STEPS - 4}" in out
    # flipped bytes break the decoding or, where they land in stored values, the fingerprint: either is named
    assert f"checkpoint step {STEPS} cannot be read" in out or "does not match the fingerprint" in out
    assert steps_saved(used) == list(range(4, STEPS - 3, 4))
    with pytest.raises(FileNotFoundError, match=f"no checkpoint for step {STEPS}; available steps"):
        checkpoint.export_hf(used, tmp_path / "out", step=STEPS)
    assert checkpoint.export_step(used) == STEPS - 4
    assert json.loads((used / "hf" / ".minillm_export.json").read_text())["step"] == STEPS - 4


# ------------------------------------------------------------------------------------------ 5, 6, 7, 14: the CLI


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> dict:
    """The reference's command through the CLI: a second run started beside it, then SIGTERM, a rerun
    killed with SIGKILL (its torn last line left in metrics.jsonl), and a last rerun to the end."""
    workdir = tmp_path_factory.mktemp("cli")
    first = rerun = None
    try:
        first = start_cli(workdir)
        wait_for_step(first, workdir, 3)
        first.send_signal(signal.SIGSTOP)  # held mid-run (and holding the workdir) while the second one tries
        try:
            second = cli(workdir, timeout=300)
        finally:
            first.send_signal(signal.SIGTERM)  # handled once it continues
            first.send_signal(signal.SIGCONT)
        first_out, first_err = first.communicate(timeout=300)
        stopped_at = steps_saved(workdir)[-1]

        rerun = start_cli(workdir)
        wait_for_step(rerun, workdir, stopped_at + 3)
        rerun.kill()
        rerun.communicate()
    finally:
        for process in (first, rerun):
            if process is not None and process.poll() is None:
                process.kill()
                process.communicate()
    killed_after = last_logged(workdir)
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write('{"step": %d, "loss": 0.' % (killed_after + 1))
    last = cli(workdir)
    return dict(workdir=workdir, first=first, first_out=first_out, first_err=first_err, second=second,
                stopped_at=stopped_at, killed_after=killed_after, last=last)


@pytest.mark.slow  # CLI runs started, stopped and killed: minutes
def test_5_a_second_run_on_the_workdir_fails_at_once_naming_the_first(interrupted):
    second = interrupted["second"]
    assert second.returncode == 2, second.stderr[-3000:]
    (line,) = lines(second.stderr)
    assert line.startswith(f"error: workdir {interrupted['workdir']} is in use by another run (pid "
                           f"{interrupted['first'].pid} on host {os.uname().nodename}, started "), line
    assert "train:" not in second.stdout  # refused before reading data or models
    assert interrupted["last"].returncode == 0  # the lock was free again for the reruns
    with WorkdirLock(interrupted["workdir"]):
        pass


@pytest.mark.slow  # CLI runs started, stopped and killed: minutes
def test_14_sigterm_saves_the_current_update_and_a_rerun_continues_exactly(interrupted, reference, tmp_path):
    first = interrupted["first"]
    assert first.returncode == 128 + signal.SIGTERM, interrupted["first_err"][-3000:]
    stopped = interrupted["stopped_at"]
    assert lines(interrupted["first_err"]) == [f"stopped by SIGTERM at step {stopped}, after saving it; rerun the "
                                               "same command to continue"]
    assert stopped >= 3
    last = interrupted["last"]
    assert last.returncode == 0, last.stderr[-3000:]
    assert "resumed from step" in last.stdout
    assert_same_rows(train_rows(interrupted["workdir"]), train_rows(reference))
    assert_same_weights(weights(interrupted["workdir"], STEPS, tmp_path / "cli"),
                        weights(reference, STEPS, tmp_path / "ref"))


def test_14_sigint_in_process_saves_the_current_update_and_a_rerun_continues_exactly(reference, tmp_path,
                                                                                      monkeypatch):
    log = loop.Loop._log

    def interrupt_at_step_3(self, start, *args):
        if start == 2:  # logging step 3: the loop is running with its handlers installed
            os.kill(os.getpid(), signal.SIGINT)
        return log(self, start, *args)

    monkeypatch.setattr(loop.Loop, "_log", interrupt_at_step_3)
    with pytest.raises(loop.Stopped) as stopped:
        loop.run(tiny(), str(tmp_path))
    assert stopped.value.signum == signal.SIGINT and 3 <= stopped.value.step < STEPS
    assert steps_saved(tmp_path)[-1] == stopped.value.step
    monkeypatch.setattr(loop.Loop, "_log", log)
    loop.run(tiny(), str(tmp_path))
    assert_same_rows(train_rows(tmp_path), train_rows(reference))


@pytest.mark.slow  # CLI runs started, stopped and killed: minutes
def test_6_each_step_is_logged_once_after_a_kill_and_a_torn_line(interrupted, tmp_path):
    workdir = interrupted["workdir"]
    assert interrupted["stopped_at"] < interrupted["killed_after"] < STEPS
    assert [r["step"] for r in train_rows(workdir)] == list(range(1, STEPS + 1))
    assert all(line.endswith("}") for line in (workdir / "metrics.jsonl").read_text().splitlines())
    # the plot reads a log with a torn last line
    shutil.copy(workdir / "metrics.jsonl", tmp_path / "metrics.jsonl")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 99, "lo')
    assert report.plot(tmp_path)
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # CLI runs started, stopped and killed: minutes
def test_7_the_cli_shows_warnings_but_not_orbax_noise(interrupted, tmp_path):
    data = tmp_path / "data.jsonl"
    good = {"instruction": "Say hi.", "input": "", "output": "hi"}
    data.write_text("\n".join(json.dumps(r) for r in [good, {"instruction": "no answer"}, good, good]) + "\n")
    done = cli(tmp_path / "w", **{"data.train": data, "data.on_error": "skip", "data.holdout": 0})
    assert done.returncode == 2  # 3 usable records < batch_size 4: stopped after reading the data
    assert f"{data}: skipped 1 malformed records (data.on_error=skip)" in done.stdout
    assert f"skipping {data}:2: " in done.stderr  # the data loader's own logged warning
    assert lines(done.stderr)[-1].startswith("error: --config.batch_size: 4 rows per batch")
    noisy = interrupted["last"].stderr  # a run that saved, restored and exported checkpoints
    assert "orbax" not in noisy.lower() and "checkpoint_manager" not in noisy, noisy[-3000:]


# ------------------------------------------------------------------------------------------ 8, 10, 12, 15, 16


def test_8_checkpoint_every_0_saves_at_validations_and_at_the_end(tmp_path):
    loop.run(tiny(steps=5, checkpoint_every=0, eval_every=2, **{"export.enabled": False}), str(tmp_path))
    assert steps_saved(tmp_path) == [0, 2, 4, 5]


def test_10_eval_on_a_fresh_clone_names_the_missing_set_and_how_to_make_it(tmp_path):
    done = subprocess.run([sys.executable, "-m", "minillm_jax.main", "--config", str(ROOT / "configs" / "gpt2.py")
                           + ":sft-120m", "--workdir", str(tmp_path / "w"), "--config.task=eval"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env={**os.environ, **CLI_ENV,
                                                                            "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2, done.stderr[-3000:]
    assert lines(done.stderr) == ["error: --config.eval.sets.dolly: data/dolly/test.jsonl does not exist (make it "
                                  "with `python -m minillm_jax.data.prepare dolly --output data`)"]
    with pytest.raises(ConfigError, match=r"--config\.eval\.sets\.dolly: .*--config\.data\.root=DIR"):
        loop.run(tiny(task="eval", **{"eval.sets.dolly": "dolly/test.jsonl"}), str(tmp_path / "w"))


_FULL_DISK = """set -e
mount -t tmpfs -o size=2400k tmpfs "$1"
shift
set +e
"$@"
code=$?
cp -a "$WORKDIR" "$COPY"
exit $code
"""


def _can_mount() -> bool:
    probe = "mount -t tmpfs -o size=64k tmpfs /mnt 2>/dev/null || mount -t tmpfs -o size=64k tmpfs /tmp"
    try:
        return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", probe],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


_LIMITED_DISK = """import collections, os, runpy, shutil, sys
limit = int(os.environ["DISK_LIMIT"])
def usage(path):
    used = sum(os.stat(os.path.join(d, f)).st_blocks * 512 for d, _, files in os.walk(os.environ["WORKDIR"])
               for f in files)
    return collections.namedtuple("usage", "total used free")(limit, used, max(limit - used, 0))
shutil.disk_usage = usage
sys.argv = ["minillm_jax.main", *sys.argv[1:]]
runpy.run_module("minillm_jax.main", run_name="__main__")
"""


# ------------------------------------------------------------------------------------------ 18: hangs

_STALL_AFTER = """import runpy, sys, time
from minillm_jax import loop
logged = loop.Loop._log
def stalled(self, start, *args):  # the update after step `stall` never completes, as a lost collective would
    if start >= STALL:
        time.sleep(3600)
    return logged(self, start, *args)
loop.Loop._log = stalled
sys.argv = ["minillm_jax.main", *sys.argv[1:]]
runpy.run_module("minillm_jax.main", run_name="__main__")
"""


def test_18_the_watchdog_fires_once_without_beats_and_never_while_beating():
    fired = []
    with loop.Watchdog(0.4, lambda: " (where)", on_hang=fired.append) as watchdog:
        for _ in range(8):  # 1.6 s of progress every 0.2 s
            time.sleep(0.2)
            watchdog.beat("step 1")
        assert fired == []
        time.sleep(1.2)
    assert len(fired) == 1 and fired[0].startswith("no progress for ") and fired[0].endswith(
        "(hang_timeout_s=0.4) after step 1 (where)"), fired
    with loop.Watchdog(0, on_hang=fired.append):
        time.sleep(0.3)
    assert len(fired) == 1


@pytest.mark.slow  # two CLI runs
def test_18_a_hung_run_stops_with_its_stacks_and_exit_code_75_and_a_rerun_continues_exactly(reference, tmp_path):
    """A run whose update never completes (here: after step 8 of a checkpoint every 4) is stopped by the
    watchdog with every thread's stack, naming the last checkpoint; the same command then resumes from it
    and ends exactly like an uninterrupted run."""
    workdir = tmp_path / "w"
    env = {**os.environ, **CLI_ENV, "PYTHONPATH": str(ROOT)}
    run = command(workdir, hang_timeout_s=20)
    stalled = [sys.executable, "-c", _STALL_AFTER.replace("STALL", "8"), *run[3:]]
    began = time.monotonic()
    hung = subprocess.run(stalled, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert hung.returncode == loop.HANG_EXIT_CODE, hung.stderr[-3000:]
    assert time.monotonic() - began < 300
    assert re.search(r"no progress for \d+ s \(hang_timeout_s=20\) after saving step 8 \(step \d+ dispatched\); "
                     r"checkpoints are intact up to step 8", hung.stderr), hung.stderr[-3000:]
    assert "Thread 0x" in hung.stderr and "in stalled" in hung.stderr  # faulthandler: the stuck frame
    assert steps_saved(workdir)[-1] == 8
    again = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from step 8" in again.stdout
    assert_same_rows(train_rows(workdir), train_rows(reference))
    assert_same_weights(weights(workdir, STEPS, tmp_path / "cli"), weights(reference, STEPS, tmp_path / "ref"))


@pytest.mark.slow  # CLI runs started, stopped and killed: minutes
def test_12_a_full_disk_stops_with_one_line_and_exit_code_28(tmp_path):
    """A real tmpfs of 2.4 MB where a mount namespace can be made (fits the setup and 3 checkpoints),
    else the same limit reported to the run's free-space check."""
    workdir, copy = tmp_path / "w", tmp_path / "after"
    workdir.mkdir()
    run = command(workdir, steps=12, checkpoint_every=1)
    env = {**os.environ, **CLI_ENV, "PYTHONPATH": str(ROOT), "WORKDIR": str(workdir), "COPY": str(copy)}
    if _can_mount():
        run = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", _FULL_DISK, "sh", str(workdir), *run]
    else:
        run = [sys.executable, "-c", _LIMITED_DISK, *run[3:]]
        env["DISK_LIMIT"] = str(2400 * 1024)
    done = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 28, done.stderr[-3000:]
    after = copy if copy.exists() else workdir  # the tmpfs is gone with its mount namespace
    saved = steps_saved(after)
    assert saved and saved[-1] < 12
    (line,) = lines(done.stderr)
    assert line.startswith(f"error: no space left on device at {workdir}") and line.endswith(
        f"; checkpoints up to step {saved[-1]} are intact: free space and rerun the same command to continue"), line
    weights(after, saved[-1], tmp_path / "hf")  # the latest committed step restores, verified


def test_15_empty_inputs_are_named_by_their_key(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ConfigError, match=rf"--config\.data\.train: {re.escape(str(empty))} holds no records"):
        loop.run(tiny(**{"data.train": str(empty)}), str(tmp_path / "w"))
    with pytest.raises(ConfigError, match=rf"--config\.eval\.sets\.dolly: {re.escape(str(empty))} holds no rec"):
        loop.run(tiny(task="eval", **{"eval.sets.dolly": str(empty)}), str(tmp_path / "w"))
    with pytest.raises(ConfigError, match=r"--config\.data\.valid: the generate task answers"):
        loop.run(tiny(task="generate", **{"data.train": "", "data.valid": ""}), str(tmp_path / "w"))


def test_16_export_refuses_a_foreign_directory_and_replaces_its_own(used, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "model.safetensors").write_bytes(b"someone else's model")
    done = subprocess.run([sys.executable, "-m", "minillm_jax.convert", "to-hf", "--workdir", str(used), "--output",
                           str(foreign)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **CLI_ENV})
    assert done.returncode == 2 and "--force" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert [p.name for p in foreign.iterdir()] == ["model.safetensors"]
    assert (foreign / "model.safetensors").read_bytes() == b"someone else's model"

    ours = tmp_path / "ours"
    checkpoint.export_hf(used, ours, step=4)
    checkpoint.export_hf(used, ours, step=8)  # an earlier export of ours is replaced without --force
    assert json.loads((ours / ".minillm_export.json").read_text())["step"] == 8
    checkpoint.export_hf(used, foreign, step=8, force=True)
    assert load_file(foreign / "model.safetensors").keys() == load_file(ours / "model.safetensors").keys()
