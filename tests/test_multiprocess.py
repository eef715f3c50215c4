"""Multi-host JAX on one machine: two processes with 4 CPU devices each (jax.distributed on localhost,
gloo collectives) train exactly like one process with 8 devices. Each process loads its shards of an HF
teacher, feeds only the batch rows its devices hold, and only process 0 writes logs."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[1]
FLAGS = ["--config.task=minillm", "--config.steps=3", "--config.batch_size=8", "--config.minillm.minibatch_size=8",
         "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2", "--config.eval_every=3",
         "--config.sample_every=2", "--config.checkpoint_every=3", "--config.logging.progress=false"]
TIMING = ("time", "step_seconds", "tokens_per_second")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(workdir: pathlib.Path, devices: int, extra_env: dict, flags: list[str]) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           **extra_env}
    return subprocess.Popen([sys.executable, "-m", "minillm_jax.main", "--config", "configs/demo.py:tiny",
                             "--workdir", str(workdir), *flags], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen) -> str:
    try:
        output, _ = process.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
    assert process.returncode == 0, output[-4000:]
    return output


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
    port = _free_port()
    processes = [_start(tmp_path / "two", 4, {"MINILLM_COORDINATOR": f"localhost:{port}",
                                              "MINILLM_NUM_PROCESSES": "2", "MINILLM_PROCESS_ID": str(i)}, flags)
                 for i in range(2)]
    outputs = [_finish(p) for p in processes]
    assert "exported the student" in outputs[0] and "exported the student" not in outputs[1]

    one, two = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert [r["step"] for r in two] == [r["step"] for r in one]  # process 1 wrote nothing
    assert sum("loss" in r for r in two) == 3 and any("valid/rouge_l" in r for r in two)
    compared = 0
    for a, b in zip(one, two):
        for key, value in a.items():
            if key in TIMING or isinstance(value, str):
                continue
            np.testing.assert_allclose(b[key], value, rtol=1e-5, atol=1e-7, err_msg=f"step {a['step']} {key}")
            compared += 1
    assert compared > 30
    assert [r["sample"] for r in two if "sample" in r] == [r["sample"] for r in one if "sample" in r]
    assert (tmp_path / "two" / "checkpoints" / "3").is_dir() and (tmp_path / "two" / "hf" / "config.json").exists()
