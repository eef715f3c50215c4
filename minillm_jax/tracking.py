"""Where metrics go: a JSONL file in the workdir (always), TensorBoard event files (tensorboardX), and
Weights & Biases when it is installed and enabled. Only process 0 writes; the others get a no-op.

The JSONL file holds each step once across resumes: a writer opened with `resume_step` first drops the
rows after that step (they are about to be written again), and every row is flushed and fsynced as it is
written, so a row logged before a checkpoint survives a kill. `read_metrics` reads the file back,
tolerating the torn last line a kill can leave.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import time

import jax
import numpy as np

from minillm_jax.workdir import atomic_write_text

logger = logging.getLogger(__name__)


class MetricWriter:
    def __init__(self, workdir: pathlib.Path, *, tensorboard: bool = True, wandb: bool = False,
                 wandb_project: str = "minillm_jax", config: dict | None = None, resume_step: int | None = None,
                 fsync: bool = True):
        """`resume_step`: the step a resumed run restarts from; rows logged after it are dropped (and
        TensorBoard events after it hidden). None keeps every row of an existing file."""
        self.active = jax.process_index() == 0
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self._tb = self._wandb = None
        self._fsync = fsync
        if not self.active:
            return
        _repair(self.path, resume_step)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                purge = None if resume_step is None else int(resume_step) + 1
                self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"), purge_step=purge)
            except ImportError:
                logger.warning("tensorboardX is not installed: no TensorBoard event files")
        if wandb:
            try:
                import wandb as wandb_lib

                self._wandb = wandb_lib.init(project=wandb_project, dir=str(workdir), config=config,
                                             name=pathlib.Path(workdir).name, resume="allow")
            except ImportError:
                logger.warning("config.logging.wandb is set but wandb is not installed; skipping it")

    def write(self, step: int, metrics: dict) -> None:
        """Scalars go everywhere; strings (decoded samples) to the JSONL file and as TensorBoard text."""
        if not self.active:
            return
        row = {"step": int(step), "time": round(time.time(), 3)}
        for key, value in metrics.items():
            row[key] = value if isinstance(value, str) else _scalar(value)
        self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._file.flush()
        if self._fsync:
            os.fsync(self._file.fileno())
        for key, value in row.items():
            if key in ("step", "time"):
                continue
            if self._tb is not None:
                if isinstance(value, str):
                    self._tb.add_text(key, value, step)
                elif value is not None and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k != "step"}, step=int(step))

    def close(self) -> None:
        if not self.active:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows of a metrics.jsonl file; a torn line (a kill mid-write) is left out with a warning, and a
    missing file has no rows."""
    path = pathlib.Path(path)
    if not path.exists():
        return []
    return _parse(path)[0]


def _parse(path: pathlib.Path) -> tuple[list[dict], bool]:
    """(rows, whether any line was dropped)."""
    lines = path.read_bytes().split(b"\n")
    rows, dropped = [], False
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
            if not isinstance(row, dict):
                raise ValueError(f"a JSON {type(row).__name__}, not an object")
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            dropped = True
            where = "last line" if number >= len(lines) - 1 else "line"
            logger.warning("%s: dropping torn %s %d (%s)", path, where, number, " ".join(str(e).split())[:120])
            continue
        rows.append(row)
    return rows, dropped


def _repair(path: pathlib.Path, resume_step: int | None) -> None:
    """Drop torn lines and, on a resume, the rows after `resume_step`; rewritten atomically when needed."""
    if not path.exists() or path.stat().st_size == 0:
        return
    rows, dropped = _parse(path)
    kept = rows if resume_step is None else [r for r in rows if not _after(r, resume_step)]
    if len(kept) < len(rows):
        logger.info("%s: dropping %d rows logged after step %d, where this run resumes", path,
                    len(rows) - len(kept), resume_step)
    if dropped or len(kept) < len(rows) or not path.read_bytes().endswith(b"\n"):
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))


def _after(row: dict, step: int) -> bool:
    value = row.get("step")
    return isinstance(value, (int, float)) and value > step


def _scalar(value) -> float | None:
    value = float(np.asarray(value))
    return value if math.isfinite(value) else None
