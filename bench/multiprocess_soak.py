"""Issue 13, item 18: the two-process test (tests/test_multiprocess.py) run again and again on a loaded
machine, to show that no run hangs.

    python bench/multiprocess_soak.py                  # 20 runs beside one CPU-burning process
    python bench/multiprocess_soak.py --runs 5 --burners 2 --timeout 900 [--fresh-compile]

A hang once blocked both processes of the run in eager reductions on global arrays. Each run here is one
pytest process with its own timeout; when a run passes `--timeout`, the stacks of its training processes
are dumped (py-spy, when installed) into the log before it is killed, and the run counts as a hang. One line
per run (pass / fail / hang, seconds), then a summary; logs of failed runs are kept.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
BURN = "while True:\n    pass\n"


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def dump_stacks(pid: int, log) -> None:
    if shutil.which("py-spy") is None:
        log.write("\n(no py-spy: stacks not dumped)\n")
        return
    for child in [pid, *descendants(pid)]:
        log.write(f"\n===== py-spy dump --pid {child}\n")
        log.flush()
        subprocess.run(["py-spy", "dump", "--native", "--pid", str(child)], stdout=log, stderr=subprocess.STDOUT,
                       timeout=300)


def one_run(index: int, timeout: float, logs: pathlib.Path, env: dict) -> tuple[str, float]:
    path = logs / f"run{index:02d}.log"
    began = time.time()
    with open(path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "pytest", "tests/test_multiprocess.py", "-x", "-q",
                                    "-p", "no:cacheprovider"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True, env=env)
        try:
            code = process.wait(timeout=timeout)
            outcome = "pass" if code == 0 else "fail"
        except subprocess.TimeoutExpired:
            outcome = "hang"
            dump_stacks(process.pid, log)
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    seconds = time.time() - began
    if outcome == "pass":
        path.unlink()
    return outcome, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--burners", type=int, default=1, help="CPU-burning processes beside the test")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds before a run counts as hung")
    parser.add_argument("--fresh-compile", action="store_true",
                        help="compile everything in every run (default: the runs share one XLA compilation cache, "
                             "so a run takes ~2 min instead of ~8 under load; the hang this hunts was in training)")
    args = parser.parse_args()
    logs = pathlib.Path(tempfile.mkdtemp(prefix="multiprocess_soak-"))
    env = dict(os.environ)
    if not args.fresh_compile:
        env["JAX_COMPILATION_CACHE_DIR"] = str(logs / "xla-cache")  # kept by tests/conftest.py, removed below
    burners = [subprocess.Popen([sys.executable, "-c", BURN]) for _ in range(args.burners)]
    outcomes = []
    try:
        print(f"{args.runs} runs of tests/test_multiprocess.py beside {args.burners} CPU-burning process(es), "
              f"{os.cpu_count()} CPUs, timeout {args.timeout:.0f} s; logs of failures in {logs}", flush=True)
        for index in range(1, args.runs + 1):
            load = os.getloadavg()[0]
            outcome, seconds = one_run(index, args.timeout, logs, env)
            outcomes.append((outcome, seconds))
            print(f"run {index:2d}: {outcome:4s} {seconds:6.0f} s (load average at start {load:.1f})", flush=True)
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
        shutil.rmtree(logs / "xla-cache", ignore_errors=True)
    times = sorted(s for _, s in outcomes)
    counts = {k: sum(o == k for o, _ in outcomes) for k in ("pass", "fail", "hang")}
    print(f"\n{len(outcomes)} runs: {counts['pass']} passed, {counts['fail']} failed, {counts['hang']} hung; "
          f"seconds min {times[0]:.0f}, median {times[len(times) // 2]:.0f}, max {times[-1]:.0f}")
    sys.exit(0 if counts["pass"] == len(outcomes) else 1)


if __name__ == "__main__":
    main()
