"""What keeps a workdir consistent: one run at a time (`WorkdirLock`), files and directories that are
either wholly written or not at all (`atomic_write_text`, `atomic_write_json`, `atomic_directory`), and
the comparison that refuses to resume a run under another configuration (`config_differences`).

Standard library only: the model and checkpoint modules import it.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import math
import os
import pathlib
import secrets
import shutil
import socket
import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"
MARKER_FILE = ".minillm_export.json"
# flock errors that mean "this filesystem cannot lock", not "someone else holds it"
_FLOCK_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class WorkdirBusy(RuntimeError):
    """Another run holds the workdir's lock; the message says which one and what to do."""

    def __init__(self, message: str, holder: dict | None = None):
        super().__init__(message)
        self.holder = holder or {}


# ------------------------------------------------------------------------------------------- lock


class WorkdirLock:
    """`with WorkdirLock(workdir):` holds `<workdir>/.lock` exclusively, or fails at once with `WorkdirBusy`.

    The lock is an `flock` on the open file, so the OS releases it when the process ends, even by SIGKILL.
    The file also names its holder (pid, host, start time, command line): that is what the message shows,
    and what protects filesystems where flock is local to one machine (FUSE mounts such as gcsfuse): a
    lock file still naming a process of *another* host is reported, never broken, since this host cannot
    tell whether that process lives. Where flock fails outright (some network mounts), `mode="auto"` falls
    back to creating the lock file atomically (link of a complete temporary file); a lock left by a dead
    process of this host is then taken over with a warning. A clean exit empties (flock) or removes
    (file) the lock file."""

    def __init__(self, workdir: str | os.PathLike, *, mode: str = "auto"):
        if mode not in ("auto", "flock", "file"):
            raise ValueError(f"mode={mode!r}: expected 'auto', 'flock' or 'file'")
        self.workdir = pathlib.Path(workdir)
        self.path = self.workdir / LOCK_FILE
        self.mode = mode
        self._fd: int | None = None
        self._held_by_file = False
        self._info: dict | None = None

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._info = _holder_info()
        if self.mode != "file" and self._acquire_flock():
            return
        self._acquire_file()

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass
            os.close(self._fd)  # releases the flock
            self._fd = None
        if self._held_by_file:
            if _read_holder(self.path) == self._info:
                self.path.unlink(missing_ok=True)
            self._held_by_file = False

    # flock ---------------------------------------------------------------------------------------

    def _acquire_flock(self) -> bool:
        """True when the flock is held; False when this filesystem cannot flock (fall back to the file)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise WorkdirBusy(_busy_message(self.workdir, self.path, _read_holder(self.path)),
                              _read_holder(self.path)) from None
        except OSError as e:
            os.close(fd)
            if e.errno in _FLOCK_UNSUPPORTED and self.mode == "auto":
                logger.info("%s: flock is not supported here (%s); using a lock file", self.path, e)
                return False
            raise
        holder = _read_holder(self.path)
        if holder and holder.get("host") != self._info["host"]:
            os.close(fd)  # flock on this mount does not reach the other host: trust the file's word
            raise WorkdirBusy(_foreign_message(self.workdir, self.path, holder), holder)
        if holder and holder.get("pid") != self._info["pid"]:
            logger.info("%s: the previous run (pid %s, started %s) did not release its lock; it has ended",
                        self.path, holder.get("pid"), holder.get("started"))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self._info).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return True

    # lock file (no flock) --------------------------------------------------------------------------

    def _acquire_file(self) -> None:
        for _ in range(3):
            staged = self.path.with_name(f"{LOCK_FILE}.{_unique()}")
            _write_synced(staged, json.dumps(self._info).encode())
            try:
                os.link(staged, self.path)  # atomic and complete: the file appears with its content
                linked = True
            except FileExistsError:
                linked = False
            finally:
                staged.unlink(missing_ok=True)
            if linked:
                if _read_holder(self.path) != self._info:
                    continue  # a concurrent take-over replaced it: look again
                self._held_by_file = True
                return
            holder = _read_holder(self.path)
            if holder is None and self.path.exists():
                holder = {}
            if holder and holder.get("host") != self._info["host"]:
                raise WorkdirBusy(_foreign_message(self.workdir, self.path, holder), holder)
            if holder and _process_alive(holder):
                raise WorkdirBusy(_busy_message(self.workdir, self.path, holder), holder)
            if holder:
                logger.warning("%s: taking over the lock of pid %s on this host (started %s), which is no longer "
                               "running", self.path, holder.get("pid"), holder.get("started"))
            with contextlib.suppress(FileNotFoundError):  # rename, not unlink: only one taker removes it
                os.rename(self.path, self.path.with_name(f"{LOCK_FILE}.stale.{_unique()}"))
            for stale in self.workdir.glob(f"{LOCK_FILE}.stale.*"):
                stale.unlink(missing_ok=True)
        raise WorkdirBusy(f"workdir {self.workdir}: could not take {self.path}: other processes keep taking it")


def _holder_info() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "proc_start": _proc_start(os.getpid()),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join([os.path.basename(sys.executable), *sys.argv])}


def _read_holder(path: pathlib.Path) -> dict | None:
    """The holder written in a lock file; None when there is none or it cannot be read."""
    try:
        holder = json.loads(path.read_bytes() or b"null")
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _proc_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid from the holder."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[19]) if fields[0] != "Z" else None


def _process_alive(holder: dict) -> bool:
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    start = _proc_start(pid)
    if pathlib.Path("/proc/self/stat").exists():
        return start is not None and holder.get("proc_start") in (None, start)  # None start: a zombie
    return True


def _describe_holder(holder: dict | None) -> str:
    if not holder:
        return "a run that has not written its details yet"
    return (f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}: "
            f"{holder.get('command')}")


def _busy_message(workdir: pathlib.Path, path: pathlib.Path, holder: dict | None) -> str:
    return (f"workdir {workdir} is in use by another run ({_describe_holder(holder)}). Wait for it to end or "
            f"stop it, or give this run another --workdir.")


def _foreign_message(workdir: pathlib.Path, path: pathlib.Path, holder: dict) -> str:
    return (f"workdir {workdir} is locked by a run on another host ({_describe_holder(holder)}); this host "
            f"({socket.gethostname()}) cannot tell whether it still runs. If it has ended, delete {path} and "
            "start again; otherwise give this run another --workdir.")


def _unique() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


def _write_synced(path: pathlib.Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------- atomic files


def atomic_write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8") -> pathlib.Path:
    """Write `text` to `path` so that a reader (or a crash) sees the old file or the new one, never a
    torn one: a temporary file in the same directory, flushed and fsynced, then renamed over `path`."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> pathlib.Path:
    path = pathlib.Path(path)
    staged = path.with_name(f".{path.name}.tmp-{_unique()}")
    try:
        _write_synced(staged, data)
        os.replace(staged, path)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    _sync_directory(path.parent)
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2,
                      sort_keys: bool = False) -> pathlib.Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=False) + "\n")


def _sync_directory(directory: pathlib.Path) -> None:
    """Make a rename inside `directory` durable (best effort: some filesystems cannot open directories)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------- atomic directories


def is_our_directory(path: str | os.PathLike) -> bool:
    """A directory this package wrote (it holds the export marker file)."""
    marker = _read_holder(pathlib.Path(path) / MARKER_FILE)
    return bool(marker) and marker.get("written_by") == "minillm_jax"


def check_replaceable(path: str | os.PathLike, *, force: bool = False) -> None:
    """Raise FileExistsError unless `path` is absent, an empty directory, one of ours, or `force` is set;
    never for a directory that holds the current one, the home or the root directory."""
    path = pathlib.Path(os.path.abspath(path))
    if not path.exists() and not path.is_symlink():
        return
    real, here = path.resolve(), pathlib.Path.cwd().resolve()
    if real == here or real in here.parents or real == pathlib.Path.home().resolve() or real.parent == real:
        raise FileExistsError(f"refusing to replace {path}: it holds the current directory, or is the home or "
                              "root directory; choose another output directory")
    if force or (path.is_dir() and (not any(path.iterdir()) or is_our_directory(path))):
        return
    what = "a file" if not path.is_dir() else "a non-empty directory that this package did not write"
    raise FileExistsError(f"{path} is {what} (no {MARKER_FILE} inside): choose another output directory, or "
                          "replace it with force=True (--force on the command line)")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, force: bool = False,
                     marker: Mapping[str, Any] | None = None) -> Iterator[pathlib.Path]:
    """Yield a temporary sibling directory to fill; when the block succeeds, it becomes `path` by rename
    (an old `path` is moved aside first and removed only once the new one is in place). A marker file
    (`.minillm_export.json`: `marker` plus who wrote it) goes inside, so a later write recognises the
    directory as ours. Refuses (FileExistsError, before anything is written) a `path` that exists, is not
    empty and is not ours, unless `force`. On an exception the temporary directory is removed and `path`
    is untouched."""
    path = pathlib.Path(os.path.abspath(path))
    if path.is_symlink():
        path = path.resolve()
    check_replaceable(path, force=force)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_siblings(path)
    staged = path.with_name(f".{path.name}.partial-{_unique()}")
    staged.mkdir()
    try:
        yield staged
        stamp = {"written_by": "minillm_jax",
                 "written_at": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), **(marker or {})}
        (staged / MARKER_FILE).write_text(json.dumps(stamp, indent=2, default=str) + "\n")
        _sync_tree(staged)
        _swap_in(staged, path)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


def _swap_in(staged: pathlib.Path, path: pathlib.Path) -> None:
    old = None
    if path.exists() or path.is_symlink():
        old = path.with_name(f".{path.name}.old-{_unique()}")
        os.rename(path, old)
    try:
        os.rename(staged, path)
    except BaseException:
        if old is not None:
            os.rename(old, path)
        raise
    _sync_directory(path.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def _sync_tree(root: pathlib.Path) -> None:
    for directory, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _sync_directory(pathlib.Path(directory))


def _remove_abandoned_siblings(path: pathlib.Path) -> None:
    """Partial or old copies left by a writer of this host that died mid-way (its pid no longer runs)."""
    host = socket.gethostname()
    for kind in ("partial", "old"):
        for sibling in path.parent.glob(f".{path.name}.{kind}-{host}-*"):
            pid = sibling.name[len(f".{path.name}.{kind}-{host}-"):].split("-")[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _process_alive({"pid": int(pid)}):
                shutil.rmtree(sibling, ignore_errors=True)


# ------------------------------------------------------------------------------------------- configs


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


MISSING = _Missing()


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any], *, ignore: Iterable[str] = (),
                       added: Mapping[str, Any] | None = None) -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, current value) for every leaf that differs, sorted by key; a key present
    on one side only has `MISSING` on the other. `ignore` holds keys ("steps") or prefixes ("logging." or
    "logging") whose values may change between a run and its resume; `added` maps keys that came into the
    config after `saved` was written to the value that behaves as before them: missing from `saved` and at
    that value in `current`, they do not differ. Tuples and lists compare alike (a config read back from JSON
    has lists), and NaN equals NaN."""
    ignore, added = tuple(ignore), added or {}
    saved_flat, current_flat = _flatten(saved), _flatten(current)
    differences = []
    for key in sorted(set(saved_flat) | set(current_flat)):
        if any(key == p.rstrip(".") or key.startswith(p if p.endswith(".") else p + ".") for p in ignore):
            continue
        old, new = saved_flat.get(key, MISSING), current_flat.get(key, MISSING)
        if old is MISSING and key in added and _same(new, added[key]):
            continue
        if not _same(old, new):
            differences.append((key, old, new))
    return differences


def describe_differences(differences: list[tuple[str, Any, Any]], limit: int = 8) -> str:
    """One line for an error message: the first `limit` differences as "key: old -> new", then how many more."""
    listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in differences[:limit])
    more = len(differences) - limit
    return listed + (f"; and {more} more" if more > 0 else "")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if hasattr(tree, "to_dict") and not isinstance(tree, Mapping):
        tree = tree.to_dict()  # ml_collections.ConfigDict
    if not isinstance(tree, Mapping) or (prefix and not tree):
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}{key}" if not prefix else f"{prefix}.{key}"))
    return flat


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if type(a) is bool or type(b) is bool:  # True == 1 in Python, not in a config
        return type(a) is type(b) and a == b
    return a == b


__all__ = ["LOCK_FILE", "MARKER_FILE", "MISSING", "WorkdirBusy", "WorkdirLock", "atomic_directory",
           "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "check_replaceable", "config_differences",
           "describe_differences", "is_our_directory"]
