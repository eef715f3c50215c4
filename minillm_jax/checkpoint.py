"""Training checkpoints (Orbax) and their export to a Hugging Face directory.

A step holds three items: `params` (the student's nnx.State), `opt_state` and `meta` (JSON: data
position, rng, anything small), so the parameters can be read without touching the optimizer state.
Restores go into an abstract tree (shapes, dtypes, shardings), so any mesh can load any checkpoint.

Retention: the latest `max_to_keep` steps, plus the best step by `metrics[best_metric]` when one is
named (Orbax's `AnyPreservationPolicy(LatestN, BestN(n=1))`). Steps without that metric are kept only
while they are among the latest. Orbax writes each step into a temporary directory and renames it when
complete, so a crash mid-save leaves no step that `latest_step()` reports; the next writer removes the
leftover temporary directory.
"""

from __future__ import annotations

import math
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import SingleDeviceSharding

from minillm_jax import sharding as sharding_lib
from minillm_jax.models import Transformer, load_tokenizer, save_pretrained
from minillm_jax.models import hf as hf_io
from minillm_jax.trainers.common import TrainState, create_train_state, train_state_shardings

_POLICY_KEYS = ("best_metric", "best_mode")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


class Checkpointer:
    """An Orbax `CheckpointManager` over the items `params`, `opt_state` and `meta`."""

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3, best_metric: str | None = None,
                 best_mode: str = "max", save_interval_steps: int = 1, async_save: bool = True,
                 read_only: bool = False):
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode={best_mode!r}: expected 'max' or 'min'")
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep={max_to_keep}: keep at least the latest step")
        self.directory = pathlib.Path(directory).absolute()
        self.best_metric, self.best_mode = best_metric, best_mode
        score = self._score if best_metric else None
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_interval_steps, enable_async_checkpointing=async_save, read_only=read_only,
            create=not read_only, cleanup_tmp_directories=not read_only, best_fn=score, best_mode=best_mode,
            preservation_policy=_preservation_policy(max_to_keep, score, best_mode),
            multiprocessing_options=_multiprocessing_options(read_only))
        handlers = {"params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
                    "meta": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers,
                                              metadata={"best_metric": best_metric, "best_mode": best_mode})

    @classmethod
    def reader(cls, directory: str | os.PathLike) -> "Checkpointer":
        """A read-only view of an existing run's checkpoints that ranks steps as that run did (its
        best_metric and best_mode are stored in the manager's root metadata), safe beside a live writer."""
        directory = pathlib.Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"{directory}: no checkpoints saved (the directory does not exist)")
        policy = _stored_policy(directory)
        return cls(directory, best_metric=policy.get("best_metric"), best_mode=policy.get("best_mode") or "max",
                   async_save=False, read_only=True)

    def _score(self, metrics: dict) -> float:
        """The ranking value; a missing or non-finite metric ranks worst so it is never 'best'."""
        value = metrics.get(self.best_metric)
        worst = -math.inf if self.best_mode == "max" else math.inf
        return float(value) if value is not None and math.isfinite(float(value)) else worst

    def save(self, step: int, state: TrainState, meta: dict, metrics: dict | None = None,
             force: bool = False) -> bool:
        """Start saving `state` at `step` (in the background when async); False when the save interval
        skips this step. Metrics are recorded only when they hold a finite `best_metric`, so every step
        that has metrics takes part in the ranking."""
        metrics = _ranking_metrics(metrics, self.best_metric)
        args = ocp.args.Composite(params=ocp.args.StandardSave(state.params),
                                  opt_state=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state}),
                                  meta=ocp.args.JsonSave(_jsonable(meta)))
        return self._manager.save(int(step), args=args, metrics=metrics, force=force)

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The step with the best recorded `best_metric`; None without a metric or before any was recorded."""
        return self._manager.best_step() if self.best_metric else None

    def restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, dict]:
        """The full train state at `step`, laid out as `abstract_state` says (leaves without a sharding go
        to the default device), and the step's meta dict."""
        self._check_step(step)
        abstract_state = _with_default_shardings(abstract_state)
        args = ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_state.params),
            opt_state=ocp.args.StandardRestore({"step": abstract_state.step, "opt_state": abstract_state.opt_state}),
            meta=ocp.args.JsonRestore())
        restored = self._manager.restore(step, args=args)
        optimizer = restored["opt_state"]
        state = TrainState(step=optimizer["step"], params=restored["params"], opt_state=optimizer["opt_state"])
        return state, dict(restored["meta"])

    def restore_params(self, step: int, abstract_params: nnx.State) -> nnx.State:
        """Only the parameters at `step` (the optimizer state is not read)."""
        self._check_step(step)
        args = ocp.args.Composite(params=ocp.args.StandardRestore(_with_default_shardings(abstract_params)))
        return self._manager.restore(step, args=args)["params"]

    def params_metadata(self, step: int):
        """The stored parameter tree's metadata (shapes and dtypes as saved), read without the arrays."""
        self._check_step(step)
        return self._manager.item_metadata(step)["params"]

    def _check_step(self, step: int) -> None:
        if step not in self._manager.all_steps():
            available = self.all_steps()
            raise FileNotFoundError(f"{self.directory}: no checkpoint for step {step}; available steps: "
                                    f"{available if available else 'none'}")

    def wait(self) -> None:
        """Block until background saves are committed (and old steps removed)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def _preservation_policy(max_to_keep: int, score, best_mode: str):
    latest = ocp.checkpoint_managers.LatestN(n=max_to_keep)
    if score is None:
        return latest
    best = ocp.checkpoint_managers.BestN(get_metric_fn=score, reverse=best_mode == "min", n=1,
                                         keep_checkpoints_without_metrics=False)
    return ocp.checkpoint_managers.AnyPreservationPolicy([latest, best])


def _multiprocessing_options(read_only: bool) -> ocp.options.MultiprocessingOptions:
    """A reader runs on one process (the exporting one), so it must not wait at barriers for the others."""
    if read_only and jax.process_count() > 1:
        me = jax.process_index()
        return ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    return ocp.options.MultiprocessingOptions()


def _stored_policy(directory: pathlib.Path) -> dict:
    """The best_metric/best_mode the writing run stored in the root metadata ({} when absent)."""
    probe = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
        read_only=True, create=False, multiprocessing_options=_multiprocessing_options(True)))
    try:
        custom = probe.metadata().custom_metadata or {}
    except (ValueError, OSError):
        custom = {}
    finally:
        probe.close()
    return {k: custom.get(k) for k in _POLICY_KEYS}


def _ranking_metrics(metrics: dict | None, best_metric: str | None) -> dict | None:
    if not metrics or best_metric is None or best_metric not in metrics:
        return None
    if not math.isfinite(float(metrics[best_metric])):
        return None
    return {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0 and np.issubdtype(np.asarray(v).dtype,
                                                                                          np.number)}


def _jsonable(value: Any) -> Any:
    """Plain JSON types from numpy/jax scalars and arrays (rng key data, positions) inside `meta`."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (jax.Array, np.ndarray, np.generic)):
        return np.asarray(value).tolist()
    return value


def _is_abstract_leaf(x) -> bool:
    return isinstance(x, jax.ShapeDtypeStruct)


def _with_default_shardings(tree):
    """Leaves without a sharding are placed on the default device, so restore never guesses a layout."""
    default = SingleDeviceSharding(jax.devices()[0])

    def fill(x):
        if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is None:
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=default)
        return x

    return jax.tree.map(fill, tree, is_leaf=_is_abstract_leaf)


# ------------------------------------------------------------------------------------------- abstract trees


def abstract_train_state(model: nnx.Module, tx: optax.GradientTransformation, *,
                         mesh: jax.sharding.Mesh | None = None,
                         rules: sharding_lib.Rules = sharding_lib.TRAIN_RULES) -> TrainState:
    """The TrainState `create_train_state(model, tx)` would make, as ShapeDtypeStructs with shardings:
    the target of `Checkpointer.restore`. `model` may be abstract (`nnx.eval_shape`); nothing is
    allocated. Parameters are placed by the logical-axis `rules` on `mesh`, optimizer moments like their
    parameters, other leaves replicated; without a mesh everything goes to the default device."""
    graphdef, state = nnx.split(model)
    abstract = jax.eval_shape(lambda s: create_train_state(nnx.merge(graphdef, s), tx)[1], state)
    if mesh is None:
        shardings = jax.tree.map(lambda _: SingleDeviceSharding(jax.devices()[0]), abstract)
    else:
        shardings = jax.tree.broadcast(train_state_shardings(state, tx, mesh, rules), abstract)
    return jax.tree.map(lambda leaf, where: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where), abstract,
                        shardings)


# ------------------------------------------------------------------------------------------- export


def export_hf(workdir: str | os.PathLike, output: str | os.PathLike, *, step: int | None = None,
              dtype: str | None = None) -> pathlib.Path:
    """Write the student at `step` (default: `export_step`) from a run's workdir as an HF directory.
    The architecture comes from `<workdir>/student/config.json`, the weights from the checkpoint's params
    item alone, restored onto the host CPU so a live training run keeps its accelerator memory; `dtype`
    defaults to the dtype the parameters were trained in."""
    student = _student_dir(workdir)
    checkpoints = Checkpointer.reader(_checkpoint_dir(workdir))
    try:
        step = _choose_step(checkpoints, step)
        config = _student_config(student, checkpoints.params_metadata(step))
        graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
        cpu = SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu), state)
        model = nnx.merge(graphdef, checkpoints.restore_params(step, target))
    finally:
        checkpoints.close()
    tokenizer = load_tokenizer(student) if any((student / f).exists() for f in _TOKENIZER_FILES) else None
    return save_pretrained(model, output, tokenizer=tokenizer, dtype=dtype)


def export_step(workdir: str | os.PathLike, step: int | None = None) -> int:
    """The step `export_hf` writes: `step` when it exists, else the best step of the run's ranking
    (its `best_metric`), else the latest."""
    checkpoints = Checkpointer.reader(_checkpoint_dir(workdir))
    try:
        return _choose_step(checkpoints, step)
    finally:
        checkpoints.close()


def _checkpoint_dir(workdir: str | os.PathLike) -> pathlib.Path:
    workdir = pathlib.Path(workdir)
    if not workdir.is_dir():
        raise FileNotFoundError(f"workdir {workdir} does not exist")
    return workdir / "checkpoints"


def _student_dir(workdir: str | os.PathLike) -> pathlib.Path:
    student = _checkpoint_dir(workdir).parent / "student"
    if not (student / "config.json").is_file():
        raise FileNotFoundError(f"{student / 'config.json'} is missing: the run writes the student's HF config "
                                "there when it starts; without it the architecture is unknown")
    return student


def _choose_step(checkpoints: Checkpointer, step: int | None) -> int:
    steps = checkpoints.all_steps()
    if not steps:
        raise FileNotFoundError(f"{checkpoints.directory}: no checkpoints saved")
    if step is None:
        best = checkpoints.best_step()
        return best if best is not None else steps[-1]
    if step not in steps:
        raise FileNotFoundError(f"{checkpoints.directory}: no checkpoint for step {step}; available steps: {steps}")
    return step


def _student_config(student: pathlib.Path, params_metadata):
    """The ModelConfig `load_pretrained` would read from config.json, in the dtype the weights were saved in."""
    config = hf_io._config_from_dict(hf_io._read_config_json(student), student / "config.json")
    leaves = jax.tree.leaves(getattr(params_metadata, "tree", params_metadata))
    dtypes = {jnp.dtype(leaf.dtype).name for leaf in leaves if hasattr(leaf, "dtype")}
    floating = sorted(d for d in dtypes if jnp.issubdtype(jnp.dtype(d), jnp.floating))
    saved = floating[0] if len(floating) == 1 else "float32"
    return config.replace(param_dtype=saved, dtype=saved)


__all__ = ["Checkpointer", "abstract_train_state", "export_hf", "export_step"]
