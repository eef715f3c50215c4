"""Training checkpoints (Orbax) and their export to a Hugging Face directory.

A step holds three items: `params` (the student's nnx.State), `opt_state` and `meta` (JSON: data
position, rng, anything small), so the parameters can be read without touching the optimizer state.
Restores go into an abstract tree (shapes, dtypes, shardings), so any mesh can load any checkpoint.

Retention: the latest `max_to_keep` steps, plus the best step by `metrics[best_metric]` when one is
named (Orbax's `AnyPreservationPolicy(LatestN, BestN(n=1))`). Steps without that metric are kept only
while they are among the latest. Orbax writes each step into a temporary directory and renames it when
complete, so a crash mid-save leaves no step that `latest_step()` reports; the next writer removes the
leftover temporary directory.

Integrity: every save records a fingerprint of each array (the wrapping uint32 sums of its bits, plain and
position-mixed: integer sums do not depend on the reduction order, so the figures are exact on any mesh)
in its meta, computed in one compiled pass that also checks that every value is finite; a non-finite
state is never written (`NonFiniteState`). A restore first compares the stored tree with the target
(`CheckpointIncompatible`: another architecture or dtype), then recomputes the fingerprints of what it
read (`CheckpointCorrupt`: damaged files). `quarantine` moves a damaged step out of the managed tree.
"""

from __future__ import annotations

import datetime
import errno
import functools
import logging
import math
import os
import pathlib
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from minillm_jax import sharding as sharding_lib
from minillm_jax.models import Transformer, load_tokenizer, save_pretrained
from minillm_jax.models import hf as hf_io
from minillm_jax.trainers.common import TrainState, create_train_state, train_state_shardings
from minillm_jax.workdir import check_replaceable

logger = logging.getLogger(__name__)

_POLICY_KEYS = ("best_metric", "best_mode")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
_INTEGRITY = "_integrity"  # the meta key holding the fingerprints; `restore` takes it out of the meta it returns
_ARRAY_ITEMS = ("params", "opt_state")
_SHOWN = 3  # paths named in a message


def quiet_orbax_logs() -> None:
    """For the command-line tools: Orbax's own log lines (through absl, and its `orbax` loggers) below
    CRITICAL are dropped: a warning on every read-only open, and its background threads' errors, which reach
    the caller again as the exception the call raises. Other absl warnings (skipped records, ...) still show."""
    for name in ("orbax", "jax._src.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    absl = logging.getLogger("absl")
    if _not_orbax not in absl.filters:
        absl.addFilter(_not_orbax)


def _not_orbax(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.CRITICAL or f"{os.sep}orbax{os.sep}" not in record.pathname


class CheckpointCorrupt(RuntimeError):
    """A checkpoint step whose files cannot be read or whose arrays differ from what was saved."""

    def __init__(self, message: str, *, step: int, item: str | None = None):
        super().__init__(message)
        self.step, self.item = step, item


class CheckpointIncompatible(ValueError):
    """A checkpoint step that is intact but holds another tree (structure, shapes or dtypes) than the target."""

    def __init__(self, message: str, *, step: int, differences: list[str]):
        super().__init__(message)
        self.step, self.differences = step, differences


class NonFiniteState(FloatingPointError):
    """A train state with NaN or infinite values: never saved, never resumed from."""

    def __init__(self, message: str, *, step: int, paths: list[str]):
        super().__init__(message)
        self.step, self.paths = step, paths


class SaveSkipped(RuntimeError):
    """A save that Orbax would silently skip: its step is not after the latest saved step."""


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
        self.best_metric, self.best_mode, self._read_only = best_metric, best_mode, read_only
        score = self._score if best_metric else None
        several = jax.process_count() > 1
        if several and not read_only:  # Orbax creates it only without `active_processes` (see below)
            if jax.process_index() == 0:
                self.directory.mkdir(parents=True, exist_ok=True)
            sharding_lib.barrier("checkpoint_directory")
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_interval_steps, enable_async_checkpointing=async_save, read_only=read_only,
            create=not (read_only or several), cleanup_tmp_directories=not read_only, best_fn=score,
            best_mode=best_mode,
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
        that has metrics takes part in the ranking. Raises `SaveSkipped` for a step at or before the latest
        saved one (Orbax would skip it) and `NonFiniteState` before writing anything when a value of the
        state is NaN or infinite."""
        step = int(step)
        latest = self._manager.latest_step()
        if latest is not None and step <= latest:
            raise SaveSkipped(f"{self.directory}: cannot save step {step}: the latest saved step is {latest}, and "
                              "Orbax writes only steps after it (start from that step, quarantine the later steps, "
                              "or use another workdir)")
        if not force and not self._manager.should_save(step):
            return False
        items = _state_items(state)
        integrity, non_finite = {}, []
        for name in _ARRAY_ITEMS:
            integrity[name], bad = _inspect(items[name])
            non_finite += [f"{name}.{path}" for path in bad]
        if non_finite:
            raise NonFiniteState(f"{self.directory}: not saving step {step}: non-finite values in "
                                 f"{_first(non_finite)}", step=step, paths=non_finite)
        self._check_space(step, items)
        meta = {**_jsonable(meta), _INTEGRITY: integrity}
        args = ocp.args.Composite(params=ocp.args.StandardSave(items["params"]),
                                  opt_state=ocp.args.StandardSave(items["opt_state"]), meta=ocp.args.JsonSave(meta))
        if not self._manager.save(step, args=args, metrics=_ranking_metrics(metrics, self.best_metric), force=True):
            raise SaveSkipped(f"{self.directory}: Orbax did not write step {step} (latest saved step: "
                              f"{self._manager.latest_step()})")
        return True

    def _check_space(self, step: int, items: dict) -> None:
        """Raise OSError(ENOSPC) before writing a step that does not fit on the disk (a write that fails
        half-way leaves Orbax's background writers failing one after another). Collective: every process
        checks the bytes it writes, and all refuse when one must."""
        self.wait()  # the previous step's writes (and Orbax's removal of old steps) are done
        arrays = sum(_bytes_written(leaf) for name in _ARRAY_ITEMS for leaf in jax.tree.leaves(items[name]))
        needed = arrays + arrays // 16 + 2**20  # Orbax's metadata, index files and block rounding
        try:
            usage = shutil.disk_usage(self.directory)
        except OSError:
            return
        fits = not usage.total or usage.free >= needed  # total 0: a filesystem that reports no sizes
        if not sharding_lib.on_every_process(fits):
            raise OSError(errno.ENOSPC, f"No space left on device: checkpoint step {step} needs "
                          f"{needed / 2**20:.1f} MiB, {usage.free / 2**20:.1f} MiB free (on some process)",
                          str(self.directory))

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The step with the best recorded `best_metric`; None without a metric or before any was recorded."""
        return self._manager.best_step() if self.best_metric else None

    def restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, dict]:
        """The full train state at `step`, laid out as `abstract_state` says (leaves without a sharding go
        to the default device), and the step's meta dict. Raises `CheckpointIncompatible` when the step
        holds another tree than `abstract_state`, `CheckpointCorrupt` when its files are damaged, and
        `NonFiniteState` when it holds NaN or infinite values (saved before saves were checked)."""
        self._check_step(step)
        targets = _state_items(_with_default_shardings(abstract_state))
        restored = self._restore_verified(step, targets)
        optimizer = restored["opt_state"]
        fields = {"extra": optimizer["extra"]} if "extra" in optimizer else {}
        state = type(abstract_state)(step=optimizer["step"], params=restored["params"],
                                     opt_state=optimizer["opt_state"], **fields)
        return state, restored["meta"]

    def restore_params(self, step: int, abstract_params: nnx.State) -> nnx.State:
        """Only the parameters at `step` (the optimizer state is not read), checked as `restore` does."""
        self._check_step(step)
        return self._restore_verified(step, {"params": _with_default_shardings(abstract_params)})["params"]

    def _restore_verified(self, step: int, targets: dict) -> dict:
        """Restore `targets` (item -> abstract tree) and the meta, each array item compared with the stored
        tree first and checked against the saved fingerprints after."""
        metadata = self._item_metadata(step, list(targets))
        differences = []
        for name, target in targets.items():
            differences += [f"{name}.{d}" for d in _tree_differences(metadata[name], target)]
        if differences:
            raise CheckpointIncompatible(
                f"{self.directory}: checkpoint step {step} holds another model or optimizer state than this run "
                f"expects ({len(differences)} differences): {_first(differences, 5)}", step=step,
                differences=differences)
        args = {name: ocp.args.StandardRestore(target) for name, target in targets.items()}
        try:
            restored = dict(self._manager.restore(step, args=ocp.args.Composite(**args, meta=ocp.args.JsonRestore())))
        except Exception as e:
            if _out_of_memory(e):
                raise
            raise CheckpointCorrupt(f"{self.directory}: checkpoint step {step} cannot be read "
                                    f"({type(e).__name__}: {_one_line(e)})", step=step) from e
        meta = dict(restored.pop("meta") or {})
        saved = meta.pop(_INTEGRITY, None)
        for name, tree in restored.items():
            fingerprints, non_finite = _inspect(tree)
            if saved is not None:
                expected = saved.get(name, {})
                wrong = [p for p in fingerprints if p not in expected or list(fingerprints[p]) != list(expected[p])]
                if wrong:
                    raise CheckpointCorrupt(
                        f"{self.directory}: checkpoint step {step} is damaged: item {name} does not match the "
                        f"fingerprint saved with it, at {_first(wrong)}", step=step, item=name)
            if non_finite:
                raise NonFiniteState(f"{self.directory}: checkpoint step {step} holds non-finite values in "
                                     f"{_first([f'{name}.{p}' for p in non_finite])}", step=step, paths=non_finite)
        if saved is None:
            logger.warning("%s: checkpoint step %d has no fingerprints (saved by an older version): not verified",
                           self.directory, step)
        return {**restored, "meta": meta}

    def _item_metadata(self, step: int, names: list[str]) -> dict:
        try:
            metadata = self._manager.item_metadata(step)
            found = {name: getattr(metadata[name], "tree", metadata[name]) for name in names}
        except Exception as e:
            raise CheckpointCorrupt(f"{self.directory}: the metadata of checkpoint step {step} cannot be read "
                                    f"({type(e).__name__}: {_one_line(e)})", step=step) from e
        missing = [name for name, tree in found.items() if tree is None]
        if missing:
            raise CheckpointCorrupt(f"{self.directory}: checkpoint step {step} has no readable "
                                    f"{' or '.join(missing)} item", step=step, item=missing[0])
        return found

    def quarantine(self, step: int, reason: str) -> pathlib.Path:
        """Move a damaged step out of the managed tree, to `<directory>/damaged/<step>-<time>/` with a
        `reason.txt`, so it is no longer listed, restored or exported and its step number can be saved again.
        Collective: every process calls it (process 0 moves the files)."""
        if self._read_only:
            raise PermissionError(f"{self.directory}: a read-only Checkpointer cannot quarantine step {step}")
        self._check_step(step)
        self.wait()
        stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
        destination = self.directory / "damaged" / f"{step}-{stamp}"
        if jax.process_index() == 0:
            source = self._step_directory(step)
            destination.parent.mkdir(exist_ok=True)
            shutil.move(source, destination)
            (destination / "reason.txt").write_text(reason.rstrip("\n") + "\n")
            logger.warning("%s: moved damaged checkpoint step %d to %s: %s", self.directory, step, destination,
                           reason)
        sharding_lib.barrier(f"quarantine_{step}")  # not the time stamp: it may differ between processes
        self._manager.reload()
        return destination

    def _step_directory(self, step: int) -> pathlib.Path:
        for candidate in self.directory.iterdir():
            if candidate.is_dir() and candidate.name.split("_")[-1] == str(step) and candidate.name != "damaged":
                return candidate
        raise FileNotFoundError(f"{self.directory}: no directory for checkpoint step {step}")

    def read_meta(self, step: int) -> dict:
        """The meta dict saved with `step` (as `restore` returns it), read without any array: enough to
        compare a run's saved config with the current one before restoring."""
        self._check_step(step)
        try:
            meta = dict(self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"] or {})
        except Exception as e:
            raise CheckpointCorrupt(f"{self.directory}: the meta of checkpoint step {step} cannot be read "
                                    f"({type(e).__name__}: {_one_line(e)})", step=step, item="meta") from e
        meta.pop(_INTEGRITY, None)
        return meta

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


def _bytes_written(leaf) -> int:
    """The bytes of `leaf` this process writes: one replica of each of its shards."""
    if isinstance(leaf, jax.Array):
        return sum(shard.data.nbytes for shard in leaf.addressable_shards if shard.replica_id == 0)
    return np.asarray(leaf).nbytes


def _state_items(state) -> dict:
    """The two array items of a train state: the parameters, and the optimizer state with the step counter
    (and a method's extra arrays, when it carries any)."""
    optimizer = {"step": state.step, "opt_state": state.opt_state}
    extra = getattr(state, "extra", None)
    if jax.tree.leaves(extra):
        optimizer["extra"] = extra
    return {"params": state.params, "opt_state": optimizer}


# ------------------------------------------------------------------------------------------- fingerprints

_GOLDEN, _MIX1, _MIX2 = 0x9E3779B9, 0x85EBCA6B, 0xC2B2AE35


def fingerprint(tree) -> dict[str, tuple[int, int]]:
    """Per array of `tree` (by dotted path): two uint32 figures of its bits, the wrapping sum of its
    32-bit words and the wrapping sum of those words mixed with their positions. Exact and independent of
    the sharding: integer addition is associative, so no reduction order changes the result."""
    return {path: tuple(value) for path, value in _inspect(tree)[0].items()}


def _inspect(tree) -> tuple[dict[str, list[int]], list[str]]:
    """(fingerprints by path, paths holding non-finite values). One small compiled function per distinct
    leaf shape, dtype and layout (cached, so parameters, moments and later saves share them); every leaf
    is dispatched before any result is fetched."""
    leaves = [(_path_name(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]
    results = [_check_fn(_mesh_of(leaf))(leaf) for _, leaf in leaves]
    rows = [[int(v) for v in _local_copy(result)] for result in results]
    return ({path: row[:2] for (path, _), row in zip(leaves, rows)},
            [path for (path, _), row in zip(leaves, rows) if not row[2]])


def _mesh_of(leaf) -> jax.sharding.Mesh | None:
    sharding = getattr(leaf, "sharding", None)
    return sharding.mesh if isinstance(sharding, NamedSharding) else None


def _local_copy(x) -> np.ndarray:
    """The host value of a replicated result, also when the array spans processes."""
    return np.asarray(x.addressable_data(0) if isinstance(x, jax.Array) else x)


@functools.lru_cache(maxsize=None)
def _check_fn(mesh: jax.sharding.Mesh | None):
    """uint32 [3]: a leaf's two fingerprint figures and 1 when all its values are finite (replicated)."""
    if mesh is None:
        return jax.jit(_leaf_check)
    return sharding_lib.StartedTogether(jax.jit(_leaf_check, out_shardings=NamedSharding(mesh, PartitionSpec())),
                                        "leaf_check")


def _leaf_check(x) -> jax.Array:
    x = jnp.asarray(x)
    finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
    return jnp.concatenate([_leaf_fingerprint(x), finite.astype(jnp.uint32)[None]])


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
    words = _words(x)
    position = jnp.zeros(words.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):
        position = position + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= words.shape[axis]
    mixed = _mix(words ^ _mix(position + jnp.uint32(_GOLDEN)))
    return jnp.stack([jnp.sum(words, dtype=jnp.uint32), jnp.sum(mixed, dtype=jnp.uint32)])


def _words(x: jax.Array) -> jax.Array:
    """The bits of `x` as uint32 words (64-bit values give two words each)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    bits = jnp.dtype(x.dtype).itemsize * 8
    if x.dtype == jnp.bool_ or (bits <= 8 and jnp.issubdtype(x.dtype, jnp.integer)):
        return x.astype(jnp.uint32)
    if bits <= 8:  # fp8 / fp4 values are exact in float32
        return jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    if bits == 16:
        return jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.uint32)


def _mix(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: every input bit flips about half of the output bits."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(_MIX1)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(_MIX2)
    return h ^ (h >> 16)


def _path_name(path) -> str:
    """A tree path as dotted names ("layers.q_proj"), without the `value` of nnx Variables."""
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    return ".".join(names[:-1] if names and names[-1] == "value" else names)


def _tree_differences(stored, target) -> list[str]:
    """How the stored tree (Orbax array metadata) and the target tree differ, path by path."""
    saved = {_path_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(stored)[0]}
    wanted = {_path_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(target)[0]}
    differences = []
    for path in sorted(set(saved) | set(wanted)):
        if path not in saved:
            differences.append(f"{path}: not in the checkpoint (expected {_describe(wanted[path])})")
        elif path not in wanted:
            differences.append(f"{path}: in the checkpoint ({_describe(saved[path])}) but not expected")
        elif _describe(saved[path]) != _describe(wanted[path]):
            differences.append(f"{path}: saved {_describe(saved[path])}, expected {_describe(wanted[path])}")
    return differences


def _describe(leaf) -> str:
    shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
    if shape is None or dtype is None:
        return type(leaf).__name__
    return f"{tuple(shape)} {jnp.dtype(dtype).name}"


def _first(items: list[str], count: int = _SHOWN) -> str:
    more = f" and {len(items) - count} more" if len(items) > count else ""
    return ", ".join(items[:count]) + more


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:300] + ("..." if len(text) > 300 else "")


def _out_of_memory(error: BaseException) -> bool:
    return isinstance(error, MemoryError) or "RESOURCE_EXHAUSTED" in str(error)


def _preservation_policy(max_to_keep: int, score, best_mode: str):
    latest = ocp.checkpoint_managers.LatestN(n=max_to_keep)
    if score is None:
        return latest
    best = ocp.checkpoint_managers.BestN(get_metric_fn=score, reverse=best_mode == "min", n=1,
                                         keep_checkpoints_without_metrics=False)
    return ocp.checkpoint_managers.AnyPreservationPolicy([latest, best])


def _multiprocessing_options(read_only: bool) -> ocp.options.MultiprocessingOptions:
    """A reader runs on one process (the exporting one), so it must not wait at barriers for the others. A
    writer on several processes names them all as active: Orbax then meets at its barriers through the
    coordination service (with a timeout) instead of `sync_global_devices`, a device collective per
    barrier launched between the training programs."""
    if jax.process_count() == 1:
        return ocp.options.MultiprocessingOptions()
    if read_only:
        me = jax.process_index()
        return ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    return ocp.options.MultiprocessingOptions(active_processes=set(range(jax.process_count())))


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
              dtype: str | None = None, force: bool = False) -> pathlib.Path:
    """Write the student at `step` (default: `export_step`) from a run's workdir as an HF directory.
    The architecture comes from `<workdir>/student/config.json`, the weights from the checkpoint's params
    item alone, restored onto the host CPU so a live training run keeps its accelerator memory; `dtype`
    defaults to the dtype the parameters were trained in. The directory is written whole or not at all;
    an `output` holding anything but an earlier export of ours is refused (FileExistsError, checked before
    any work) unless `force`."""
    check_replaceable(output, force=force)
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
    return save_pretrained(model, output, tokenizer=tokenizer, dtype=dtype, force=force,
                           marker={"workdir": str(pathlib.Path(workdir).absolute()), "step": int(step)})


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


__all__ = ["CheckpointCorrupt", "CheckpointIncompatible", "Checkpointer", "NonFiniteState", "SaveSkipped",
           "abstract_train_state", "export_hf", "export_step", "fingerprint"]
