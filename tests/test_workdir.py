"""One run per workdir (a lock that names its holder and dies with it), all-or-nothing files and
directories, and the config comparison that refuses an incompatible resume."""

import errno
import json
import math
import os
import pathlib
import signal
import socket
import subprocess
import sys

import pytest

from minillm_jax import workdir as workdir_lib
from minillm_jax.workdir import (
    MARKER_FILE,
    MISSING,
    WorkdirBusy,
    WorkdirLock,
    atomic_directory,
    atomic_write_json,
    atomic_write_text,
    config_differences,
    describe_differences,
)

REPO = pathlib.Path(__file__).resolve().parents[1]

_HOLDER = """
import sys
from minillm_jax.workdir import WorkdirLock
with WorkdirLock(sys.argv[1], mode=sys.argv[2]):
    print("locked", flush=True)
    sys.stdin.readline()
"""


def _hold(workdir: pathlib.Path, mode: str) -> subprocess.Popen:
    """A process holding the lock until its stdin gets a line (or it is killed)."""
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(workdir), mode], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    assert holder.stdout.readline().strip() == "locked"
    return holder


def _try_lock(workdir: pathlib.Path, mode: str) -> subprocess.CompletedProcess:
    """A second process taking the lock and letting it go."""
    code = ("import sys\nfrom minillm_jax.workdir import WorkdirLock\n"
            "with WorkdirLock(sys.argv[1], mode=sys.argv[2]):\n    print('got it')\n")
    return subprocess.run([sys.executable, "-c", code, str(workdir), mode], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)


@pytest.mark.parametrize("mode", ["flock", "file"])
def test_a_second_run_on_the_workdir_fails_at_once_naming_the_first(tmp_path, mode):
    holder = _hold(tmp_path, mode)
    try:
        second = _try_lock(tmp_path, mode)
        assert second.returncode != 0 and "got it" not in second.stdout
        message = second.stderr.strip().splitlines()[-1]
        assert message.startswith("minillm_jax.workdir.WorkdirBusy: ")
        for part in (f"workdir {tmp_path} is in use", f"pid {holder.pid}", f"host {socket.gethostname()}",
                     "started 20", "another --workdir"):
            assert part in message, (part, message)
        with pytest.raises(WorkdirBusy, match=f"pid {holder.pid}"):  # and in this process too
            WorkdirLock(tmp_path, mode=mode).acquire()
    finally:
        holder.communicate("\n", timeout=30)
    assert holder.returncode == 0
    assert "got it" in _try_lock(tmp_path, mode).stdout  # released on exit


@pytest.mark.parametrize("mode", ["flock", "file"])
def test_the_lock_of_a_killed_run_can_be_taken(tmp_path, mode, caplog):
    holder = _hold(tmp_path, mode)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == holder.pid  # it never cleaned up
    with caplog.at_level("INFO", logger="minillm_jax.workdir"):
        with WorkdirLock(tmp_path, mode=mode):
            assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    if mode == "file":
        assert f"taking over the lock of pid {holder.pid}" in caplog.text
        assert not (tmp_path / ".lock").exists()
    with WorkdirLock(tmp_path, mode=mode):  # and released again
        pass


@pytest.mark.parametrize("mode", ["flock", "file"])
def test_a_lock_from_another_host_is_reported_and_kept(tmp_path, mode):
    other = {"pid": 4242, "host": "other-host", "started": "2026-01-01T00:00:00+00:00", "command": "python -m x"}
    (tmp_path / ".lock").write_text(json.dumps(other))
    with pytest.raises(WorkdirBusy) as info:
        WorkdirLock(tmp_path, mode=mode).acquire()
    message = str(info.value)
    assert "another host" in message and "pid 4242 on host other-host" in message
    assert f"delete {tmp_path / '.lock'}" in message
    assert json.loads((tmp_path / ".lock").read_text()) == other


def test_auto_falls_back_to_the_lock_file_where_flock_fails(tmp_path, monkeypatch):
    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(workdir_lib.fcntl, "flock", no_flock)
    with WorkdirLock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
        with pytest.raises(WorkdirBusy, match="is in use"):
            WorkdirLock(tmp_path).acquire()
    assert not (tmp_path / ".lock").exists()


def test_atomic_write_replaces_whole_files(tmp_path):
    target = tmp_path / "config.json"
    atomic_write_json(target, {"a": [1, 2]})
    assert json.loads(target.read_text()) == {"a": [1, 2]}
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]

    class Unserialisable:
        pass

    with pytest.raises(TypeError):
        atomic_write_json(target, {"a": Unserialisable()})
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_atomic_directory_replaces_its_own_and_refuses_others(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with atomic_directory(out, marker={"step": 3}) as staging:
        assert staging.parent == tmp_path and staging != out
        (staging / "weights").write_text("v1")
        assert not out.exists()
    assert (out / "weights").read_text() == "v1" and json.loads((out / MARKER_FILE).read_text())["step"] == 3

    with atomic_directory(out) as staging:  # our own earlier output: replaced whole
        (staging / "other").write_text("v2")
    assert sorted(p.name for p in out.iterdir()) == [MARKER_FILE, "other"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing left beside it

    with pytest.raises(RuntimeError, match="boom"), atomic_directory(out) as staging:
        (staging / "half").write_text("x")
        raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == [MARKER_FILE, "other"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    foreign = tmp_path / "theirs"
    foreign.mkdir()
    (foreign / "model.safetensors").write_text("their model")
    with pytest.raises(FileExistsError, match=r"theirs is a non-empty directory that this package did not write"):
        with atomic_directory(foreign):
            pytest.fail("the block must not run")
    assert (foreign / "model.safetensors").read_text() == "their model"
    with atomic_directory(foreign, force=True) as staging:
        (staging / "ours").write_text("v3")
    assert sorted(p.name for p in foreign.iterdir()) == [MARKER_FILE, "ours"]

    (tmp_path / "empty").mkdir()
    with atomic_directory(tmp_path / "empty") as staging:
        (staging / "a").write_text("a")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        with atomic_directory(tmp_path / "file"):
            pass
    monkeypatch.chdir(foreign)
    for mine in (pathlib.Path("."), foreign, tmp_path):
        with pytest.raises(FileExistsError, match="refusing to replace .*: it holds the current directory"):
            with atomic_directory(mine, force=True):
                pass


def test_config_differences_lists_dotted_keys():
    saved = {"task": "sft", "steps": 10, "optimizer": {"learning_rate": 1e-3, "b1": 0.9},
             "logging": {"every": 5}, "student_layers": [0, 2], "seed": 0, "nan": math.nan, "flag": True}
    current = {"task": "sft", "steps": 20, "optimizer": {"learning_rate": 1e-4, "b1": 0.9, "b2": 0.99},
               "logging": {"every": 1}, "student_layers": (0, 2), "seed": 0, "nan": math.nan, "flag": 1}
    assert config_differences(saved, current, ignore=["steps", "logging."]) == [
        ("flag", True, 1), ("optimizer.b2", MISSING, 0.99), ("optimizer.learning_rate", 1e-3, 1e-4)]
    assert [key for key, _, _ in config_differences(saved, current, ignore=["logging"])] == [
        "flag", "optimizer.b2", "optimizer.learning_rate", "steps"]
    assert config_differences(saved, saved) == []
    assert config_differences({"a": {"b": 1}}, {"a": 1}) == [("a", MISSING, 1), ("a.b", 1, MISSING)]
    assert repr(MISSING) == "<missing>"


def test_describe_differences_names_the_first_keys_and_counts_the_rest():
    differences = [(f"k{i}", i, i + 1) for i in range(10)]
    assert describe_differences(differences[:1]) == "k0: 0 -> 1"
    assert describe_differences([("a.b", MISSING, "x")]) == "a.b: <missing> -> 'x'"
    assert describe_differences(differences, limit=2) == "k0: 0 -> 1; k1: 1 -> 2; and 8 more"
    assert describe_differences(differences[:8]).count(" -> ") == 8
    assert describe_differences(differences).endswith("k7: 7 -> 8; and 2 more")


def test_a_run_saved_before_a_key_existed_resumes_while_the_key_keeps_its_old_behaviour():
    """A checkpointed config without `student_layers_source` (added at 3eb9688) against today's: the same run
    while the key is at the value that cuts from the teacher, as before; a difference at any other value.
    Every registered key exists in the shipped defaults with exactly that value."""
    from configs.common import base
    from minillm_jax.config import ADDED_KEYS

    current = base().to_dict()
    saved = {k: v for k, v in current.items() if k != "student_layers_source"}
    assert config_differences(saved, current) == [("student_layers_source", MISSING, "")]
    assert config_differences(saved, current, added=ADDED_KEYS) == []
    current["student_layers_source"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert config_differences(saved, current, added=ADDED_KEYS) == [
        ("student_layers_source", MISSING, "HuggingFaceTB/SmolLM2-135M-Instruct")]
    defaults = {key: value for key, _, value in config_differences({}, base())}
    assert {key: defaults[key] for key in ADDED_KEYS} == ADDED_KEYS


def test_a_resume_may_change_how_the_sampler_runs_but_not_what_it_samples():
    """Split layers and cache segments give the same samples, so a resumed run may switch them; an int8 KV cache
    samples from rounded keys and values, so switching it refuses the resume (by the key's name)."""
    from configs.common import base
    from minillm_jax.config import ADDED_KEYS, RESUMABLE_CHANGES

    saved = base().to_dict()
    current = base().to_dict()
    current["sampling"] = {**saved["sampling"], "split_layers": True, "cache_segments": 4}
    assert config_differences(saved, current, ignore=RESUMABLE_CHANGES, added=ADDED_KEYS) == []
    current["sampling"]["kv_cache_dtype"] = "int8"
    assert config_differences(saved, current, ignore=RESUMABLE_CHANGES, added=ADDED_KEYS) == [
        ("sampling.kv_cache_dtype", "auto", "int8")]


def test_config_differences_reads_config_dicts():
    import ml_collections

    config = ml_collections.ConfigDict({"model": {"hidden": 32}, "steps": 4})
    saved = json.loads(config.to_json())
    config.model.hidden = 64
    assert config_differences(saved, config) == [("model.hidden", 32, 64)]
