"""metrics.jsonl across resumes and kills: each step once, torn lines dropped, every row on disk when written."""

import json
import os
import subprocess
import sys

from minillm_jax import tracking
from minillm_jax.tracking import MetricWriter, read_metrics


def _log(workdir, steps, resume_step=None, **kwargs):
    writer = MetricWriter(workdir, tensorboard=False, resume_step=resume_step, **kwargs)
    for step in steps:
        writer.write(step, {"loss": 1.0 / step, "sample": f"text {step}"})
    writer.close()


def test_a_resume_drops_the_rows_after_the_restored_step(tmp_path):
    _log(tmp_path, range(1, 7))  # killed after step 6, last checkpoint at step 4
    _log(tmp_path, range(5, 9), resume_step=4)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows[4]["loss"] == 0.2 and rows[4]["sample"] == "text 5"
    _log(tmp_path, [9])  # no resume step: nothing is dropped
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == list(range(1, 10))
    _log(tmp_path, [1], resume_step=0)  # a fresh start keeps nothing of the old log
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1]


def test_a_torn_last_line_is_dropped_with_a_warning(tmp_path, caplog):
    _log(tmp_path, [1, 2])
    path = tmp_path / "metrics.jsonl"
    with open(path, "ab") as f:
        f.write(b'{"step": 3, "loss": 0.3')  # killed mid-write
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    assert "dropping torn last line 3" in caplog.text
    _log(tmp_path, [3], resume_step=2)
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    assert path.read_text().count("\n") == 3 and all(json.loads(line) for line in path.read_text().splitlines())


def test_a_torn_line_in_the_middle_is_reported_by_number(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n\xff\xfe\n{"step": 4}\n')
    assert [r["step"] for r in read_metrics(path)] == [1, 3, 4]
    assert "dropping torn line 2" in caplog.text and "dropping torn line 4" in caplog.text
    _log(tmp_path, [5])
    assert [r["step"] for r in read_metrics(path)] == [1, 3, 4, 5]
    assert read_metrics(tmp_path / "missing.jsonl") == []


def test_every_row_is_flushed_and_synced_when_written(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(tracking.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    writer = MetricWriter(tmp_path, tensorboard=False)
    writer.write(1, {"loss": 1.0})
    assert synced == [writer._file.fileno()]
    writer.write(2, {"loss": 0.5})
    assert len(synced) == 2 and [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    writer.close()


def test_a_row_written_before_a_kill_survives(tmp_path):
    code = ("import os, signal, sys\nfrom minillm_jax.tracking import MetricWriter\n"
            "w = MetricWriter(__import__('pathlib').Path(sys.argv[1]), tensorboard=False)\n"
            "w.write(1, {'loss': 2.0})\nos.kill(os.getpid(), signal.SIGKILL)\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.getcwd()}
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, timeout=120)
    assert result.returncode == -9
    assert read_metrics(tmp_path / "metrics.jsonl")[0]["loss"] == 2.0


def test_tensorboard_hides_the_events_after_the_restored_step(tmp_path, monkeypatch):
    import tensorboardX

    opened = []

    class Recorder:
        def __init__(self, logdir, purge_step=None):
            opened.append(purge_step)

        def close(self):
            pass

    monkeypatch.setattr(tensorboardX, "SummaryWriter", Recorder)
    MetricWriter(tmp_path, resume_step=12).close()
    MetricWriter(tmp_path).close()
    assert opened == [13, None]
