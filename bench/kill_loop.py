"""The kill -9 loop of issue 13: a training run SIGKILLed at random points and restarted with the same
command until it completes ends with the weights and the metrics of an uninterrupted run.

    python bench/kill_loop.py                     # SFT and MiniLLM on configs/demo.py:tiny, >= 10 kills each
    python bench/kill_loop.py --tasks minillm --kills 20 --seed 3

Per task: one uninterrupted CLI run (the reference), then the same command in a fresh workdir, killed with
SIGKILL `--kills` times and restarted each time, then left to finish. Kills alternate between a random
moment of the start (imports, compilation, restore) and a random training step spread over the run
(training, logging, saving), plus a random delay. Then: both runs' exports (`hf/`, the last step)
compared array by array, bit for bit; metrics.jsonl holds every training step exactly once, with the
reference's values (timing columns aside). One table: task, kills, restarts, where the kills landed
(logged step at each kill), final weights equal, rows per step, metrics equal.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
from safetensors.numpy import load_file

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMING = ("time", "step_seconds", "tokens_per_second")
COMMON = ["--config.eval_every=0", "--config.best_metric=", "--config.checkpoint_every=4",
          "--config.keep_checkpoints=2", "--config.export.select=last", "--config.logging.progress=false",
          "--config.logging.tensorboard=false"]
TASKS = {  # MiniLLM rounds of 8 rollouts in mini-batches of 4: 2 optimizer steps per round
    "sft": ["--config.task=sft", "--config.teacher=", "--config.steps=160"],
    "minillm": ["--config.task=minillm", "--config.steps=80"],
}


def command(workdir: pathlib.Path, task: str) -> list[str]:
    return [sys.executable, "-m", "minillm_jax.main", "--config", "configs/demo.py:tiny", "--workdir", str(workdir),
            *TASKS[task], *COMMON]


def start(workdir: pathlib.Path, task: str, log) -> subprocess.Popen:
    return subprocess.Popen(command(workdir, task), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})


def rows(workdir: pathlib.Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a torn last line (a kill mid-write); the next run drops it
            pass
    return out


def last_step(workdir: pathlib.Path) -> int:
    return max([r["step"] for r in rows(workdir)] or [0])


def steps_of(task: str) -> int:
    return int(next(f for f in TASKS[task] if f.startswith("--config.steps=")).split("=")[1])


def run_reference(workdir: pathlib.Path, task: str, log) -> tuple[float, float]:
    """(wall seconds, seconds until the first training row was logged)."""
    began, first_row = time.time(), None
    process = start(workdir, task, log)
    while process.poll() is None:
        if first_row is None and last_step(workdir) > 0:
            first_row = time.time() - began
        time.sleep(0.01)
    if process.returncode != 0:
        raise SystemExit(f"{task}: the reference run failed (log: {log.name})")
    return time.time() - began, first_row or 1.0


def kill_loop(workdir: pathlib.Path, task: str, kills: int, startup_seconds: float, rng: random.Random,
              log) -> dict:
    """Even kills at a random moment of the start (imports, compilation, restore: uniform up to the
    reference's time to its first row); odd kills at a random step of the next of kills/2 equal stretches of
    the run, plus up to a quarter second (training, logging, saving). A run that ends on its own before its
    kill is fine (it must succeed); the kills go on with the next restarts."""
    steps = steps_of(task)
    stretches = (kills + 1) // 2
    landed, started, done = [], 0, 0
    while True:
        process = start(workdir, task, log)
        started += 1
        if done >= kills:
            if process.wait() != 0:
                raise SystemExit(f"{task}: the final run failed (log: {log.name})")
            return {"kills": done, "restarts": started - 1, "landed": landed}
        if done % 2 == 0:
            deadline = time.time() + rng.uniform(0.5, startup_seconds)
            while time.time() < deadline and process.poll() is None:
                time.sleep(0.005)
        else:
            low = 1 + (done // 2) * (steps - 4) // stretches
            high = (done // 2 + 1) * (steps - 4) // stretches
            target = max(rng.randint(low, max(low, high)), last_step(workdir) + 1)
            while last_step(workdir) < target and process.poll() is None:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.25))
        if process.poll() is not None:
            if process.returncode != 0:
                raise SystemExit(f"{task}: a restarted run failed with exit code {process.returncode} "
                                 f"(log: {log.name})")
            print(f"  {task}: run {started} ended on its own before its kill", flush=True)
            continue
        process.send_signal(signal.SIGKILL)
        process.wait()
        done += 1
        landed.append(last_step(workdir))
        print(f"  {task}: kill {done} after logged step {landed[-1]}", flush=True)


def compare(reference: pathlib.Path, killed: pathlib.Path, task: str) -> dict:
    a, b = load_file(reference / "hf" / "model.safetensors"), load_file(killed / "hf" / "model.safetensors")
    same_weights = sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    steps = steps_of(task)
    train = [r for r in rows(killed) if "loss" in r]
    counts = [sum(r["step"] == s for r in train) for s in range(1, steps + 1)]
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING} for r in rs if "loss" in r]  # noqa: E731
    return {"weights_equal": same_weights, "rows_per_step": (min(counts), max(counts)),
            "extra_rows": len(train) - steps, "metrics_equal": strip(rows(reference)) == strip(rows(killed))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default="sft,minillm", help="comma-separated: sft, minillm")
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="where the runs go (default: a temporary directory)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    base = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="kill_loop-"))
    base.mkdir(parents=True, exist_ok=True)
    results = []
    for task in args.tasks.split(","):
        with open(base / f"{task}.log", "w") as log:
            began = time.time()
            reference_seconds, startup_seconds = run_reference(base / f"{task}-reference", task, log)
            print(f"{task}: reference run {reference_seconds:.0f} s ({startup_seconds:.0f} s to its first row)",
                  flush=True)
            outcome = kill_loop(base / f"{task}-killed", task, args.kills, startup_seconds, rng, log)
            outcome.update(compare(base / f"{task}-reference", base / f"{task}-killed", task))
            outcome.update(task=task, steps=steps_of(task), minutes=(time.time() - began) / 60)
            results.append(outcome)
    print()
    print("| task | steps | SIGKILLs | restarts | logged step at each kill | final weights equal | "
          "training rows per step | metrics equal | wall |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        low, high = r["rows_per_step"]
        per_step = f"exactly 1 (all {r['steps']})" if low == high == 1 and not r["extra_rows"] else \
            f"{low}..{high}, {r['extra_rows']:+d} rows"
        print(f"| {r['task']} | {r['steps']} | {r['kills']} | {r['restarts']} | {', '.join(map(str, r['landed']))} | "
              f"{'yes, bit for bit' if r['weights_equal'] else 'NO'} | {per_step} | "
              f"{'yes' if r['metrics_equal'] else 'NO'} | {r['minutes']:.1f} min |")
    print(f"\n(runs and logs in {base})")
    if not all(r["weights_equal"] and r["metrics_equal"] and r["rows_per_step"] == (1, 1) for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
