"""Multi-host JAX on one machine: two processes with 4 CPU devices each (jax.distributed on localhost,
gloo collectives) train exactly like one process with 8 devices, through a stop and a resume. Each
process loads its shards of an HF teacher, feeds only the batch rows its devices hold, writes its shards
of each checkpoint, and only process 0 writes logs and the export."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from flax import nnx

pytestmark = pytest.mark.slow  # two processes x a compile each: minutes; CI runs it in the slow step

ROOT = pathlib.Path(__file__).resolve().parents[1]
FLAGS = ["--config.task=minillm", "--config.steps=3", "--config.batch_size=8", "--config.minillm.num_rollouts=8",
         "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2", "--config.eval_every=3",
         "--config.checkpoint_every=3", "--config.logging.progress=false"]
TIMING = ("time", "step_seconds", "tokens_per_second")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


# XLA:CPU runs a program's ready collectives on its intra-op thread pool, sized by the machine's cores
# (NPROC overrides it): with 4 fake devices on 2 cores, every pool thread of both processes was seen blocked in
# a gloo send or receive of one collective while the peers waited for another (the soak's hangs, stacks in
# bench/RESULTS.md). Real accelerators do not run collectives on host threads.
POOL_THREADS = "32"


def _start(workdir: pathlib.Path, devices: int, extra_env: dict, flags: list[str]) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "NPROC": POOL_THREADS, **extra_env}
    return subprocess.Popen([sys.executable, "-m", "minillm_jax.main", "--config", "configs/demo.py:tiny",
                             "--workdir", str(workdir), *flags], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(*processes: subprocess.Popen, timeout: float = 600) -> list[str]:
    """Each process's output once all have exited; a run still going after `timeout` seconds (together) is
    taken for a hang: the stacks of every thread of every process still running, Python and native frames,
    are printed (py-spy and gdb, when installed; pytest shows them with the failure), then they are killed."""
    deadline, outputs = time.monotonic() + timeout, []
    for process in processes:
        try:
            outputs.append(process.communicate(timeout=max(deadline - time.monotonic(), 1))[0])
        except subprocess.TimeoutExpired:
            for other in processes:
                if other.poll() is None and shutil.which("py-spy"):
                    dump = subprocess.run(["py-spy", "dump", "--native", "--pid", str(other.pid)],
                                          capture_output=True, text=True, timeout=300)
                    print(f"===== hung process {other.pid} ({' '.join(other.args[-3:])}):\n{dump.stdout}{dump.stderr}")
                if other.poll() is None and shutil.which("gdb"):  # XLA's own threads (py-spy sees Python's only)
                    dump = subprocess.run(["gdb", "-p", str(other.pid), "-batch", "-ex", "thread apply all bt 24"],
                                          capture_output=True, text=True, timeout=300)
                    frames = [line for line in dump.stdout.splitlines() if line.startswith(("Thread ", "#"))]
                    print(f"===== native threads of {other.pid}:\n" + "\n".join(frames))
            for other in processes:
                other.kill()
            outputs.append(process.communicate()[0])
    failed = [i for i, process in enumerate(processes) if process.returncode != 0]
    assert not failed, "\n".join(f"===== process {i} (exit code {processes[i].returncode}): its XLA/absl errors\n"
                                  f"{_native_errors(outputs[i])}\n----- and the end of its output:\n"
                                  f"{outputs[i][-5000:]}" for i in range(len(processes)))
    return outputs


def _native_errors(output: str) -> str:
    """The fatal and error lines of XLA's own log (absl: `F1130 12:00:00.0 ...`), which a Python thread dump
    after an abort pushes out of the tail."""
    return "\n".join(line[:600] for line in output.splitlines() if re.match(r"[FE]\d{4} ", line))[-4000:]


def _rows(workdir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_of_four_devices_match_one_process_of_eight(tmp_path):
    from minillm_jax.models import Transformer, save_pretrained
    from minillm_jax.models.tiny import byte_tokenizer, parse_random_spec

    tokenizer = byte_tokenizer()
    config = parse_random_spec("random:llama:layers=2,hidden=64,heads=4,kv_heads=2,mlp=128", len(tokenizer))
    save_pretrained(Transformer(config, rngs=nnx.Rngs(1)), tmp_path / "teacher", tokenizer=tokenizer)
    flags = [*FLAGS, f"--config.teacher={tmp_path / 'teacher'}"]

    _finish(_start(tmp_path / "one", 8, {}, flags))
    # the two-process run stops after step 2 (a checkpoint written by both processes) and resumes to 3
    outputs = []
    for steps in (2, 3):
        port = _free_port()
        env = {"MINILLM_COORDINATOR": f"localhost:{port}", "MINILLM_NUM_PROCESSES": "2"}
        processes = [_start(tmp_path / "two", 4, {**env, "MINILLM_PROCESS_ID": str(i)},
                            [*flags, f"--config.steps={steps}"]) for i in range(2)]
        outputs.append(_finish(*processes))
    resumed = outputs[1]
    assert all("resumed from step 2" in out for out in resumed)
    assert "exported the student" in resumed[0] and "exported the student" not in resumed[1]

    one, two = _by_step_and_key(tmp_path / "one"), _by_step_and_key(tmp_path / "two")
    assert sum(key == "loss" for _, key in two) == 3  # process 1 wrote nothing, the resume re-logged nothing
    assert set(one) <= set(two)  # the stopped run validated at its last step (2) too: extra keys only
    compared = 0
    for (step, key), value in one.items():
        if key in TIMING:
            continue
        if isinstance(value, str):
            assert two[step, key] == value, (step, key)
        else:
            np.testing.assert_allclose(two[step, key], value, rtol=1e-5, atol=1e-7, err_msg=f"step {step} {key}")
        compared += 1
    assert compared > 30 and ("sample" in {key for _, key in one})
    assert (tmp_path / "two" / "checkpoints" / "3").is_dir() and (tmp_path / "two" / "hf" / "config.json").exists()


def _by_step_and_key(workdir: pathlib.Path) -> dict:
    return {(row["step"], key): value for row in _rows(workdir) for key, value in row.items() if key != "step"}
