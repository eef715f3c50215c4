"""Where metrics go: a JSONL file in the workdir (always), TensorBoard event files (tensorboardX), and
Weights & Biases when it is installed and enabled. Only process 0 writes; the others get a no-op."""

from __future__ import annotations

import json
import logging
import math
import pathlib
import time

import jax
import numpy as np

logger = logging.getLogger(__name__)


class MetricWriter:
    def __init__(self, workdir: pathlib.Path, *, tensorboard: bool = True, wandb: bool = False,
                 wandb_project: str = "minillm_jax", config: dict | None = None):
        self.active = jax.process_index() == 0
        self.path = workdir / "metrics.jsonl"
        self._tb = self._wandb = None
        if not self.active:
            return
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(workdir / "tensorboard"))
            except ImportError:
                logger.warning("tensorboardX is not installed: no TensorBoard event files")
        if wandb:
            try:
                import wandb as wandb_lib

                self._wandb = wandb_lib.init(project=wandb_project, dir=str(workdir), config=config,
                                             name=workdir.name, resume="allow")
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


def _scalar(value) -> float | None:
    value = float(np.asarray(value))
    return value if math.isfinite(value) else None
