"""Interrupted runs: SIGKILL a CPU training run midway, restart it, and the metrics equal an uninterrupted
run's exactly; a damaged latest checkpoint falls back to the previous one."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest
from test_main import tiny

from minillm_jax import loop

ROOT = pathlib.Path(__file__).resolve().parents[1]
FLAGS = ["--config.task=minillm", "--config.steps=10", "--config.checkpoint_every=2", "--config.eval_every=0",
         "--config.export.enabled=false", "--config.best_metric="]


def start(workdir: pathlib.Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "minillm_jax.main", "--config", "configs/demo.py:tiny",
                             "--workdir", str(workdir), *FLAGS], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def losses(workdir: pathlib.Path) -> dict[int, dict]:
    """The last logged training metrics of each step (a resumed run logs its steps again)."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k not in ("time", "step_seconds", "tokens_per_second")}
            for r in rows if "loss" in r}


def logged_steps(workdir: pathlib.Path) -> int:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return 0
    return max([json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()] or [0])


@pytest.mark.slow  # >= 12 s on the 2-core machine; CI's second step
def test_sigkill_midway_then_resume_equals_an_uninterrupted_run(tmp_path):
    reference = start(tmp_path / "reference")
    assert reference.wait(timeout=600) == 0, reference.stdout.read()[-3000:]

    run = start(tmp_path / "killed")
    deadline = time.time() + 600
    while logged_steps(tmp_path / "killed") < 5 and run.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert run.poll() is None, "the run finished before it could be killed"
    run.send_signal(signal.SIGKILL)
    run.wait()
    killed_at = logged_steps(tmp_path / "killed")
    assert killed_at < 10

    resumed = start(tmp_path / "killed")
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output[-3000:]
    assert "resumed from step" in output
    assert losses(tmp_path / "killed") == losses(tmp_path / "reference")


def test_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path, capsys):
    loop.run(tiny(task="sft", steps=4, eval_every=0, best_metric="", **{"export.enabled": False}), str(tmp_path))
    latest = tmp_path / "checkpoints" / "4"
    for item in latest.glob("params/*"):  # corrupt the array store of the latest step
        if item.is_dir():
            shutil.rmtree(item)
        else:
            item.write_bytes(b"garbage")
    loop.run(tiny(task="sft", steps=6, eval_every=0, best_metric="", **{"export.enabled": False}), str(tmp_path))
    out = capsys.readouterr().out
    assert "checkpoint step 4 is damaged" in out and "resumed from step 2" in out
