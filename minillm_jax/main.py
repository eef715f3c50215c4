"""Entry point: `python -m minillm_jax.main --config configs/<file>.py[:<preset>] --workdir <dir>
[--config.<key>=<value> ...]`. Parses flags (the config is locked: an unknown key or a wrong type fails),
validates it once into a typed `RunConfig`, starts `jax.distributed` on multi-process launches, and hands
off to `loop.run`. Errors a user can act on end the run with one line and exit code 2."""

from __future__ import annotations

import errno
import logging
import os
import pathlib
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py[:preset])",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, logs, results and the export")

NO_SPACE = ("No space left on device", "os_error_code='28'")  # how TensorStore (Orbax's writer) reports ENOSPC


def initialize_distributed(jax) -> None:
    """Multi-process runs start `jax.distributed` before anything touches a device: on TPU pods
    (launch/tpu.sh sets MINILLM_DISTRIBUTED=1; JAX finds its peers itself) and on GPU hosts
    (launch/gpu.sh sets the coordinator, process count and id)."""
    if os.environ.get("MINILLM_COORDINATOR"):
        jax.distributed.initialize(coordinator_address=os.environ["MINILLM_COORDINATOR"],
                                   num_processes=int(os.environ["MINILLM_NUM_PROCESSES"]),
                                   process_id=int(os.environ["MINILLM_PROCESS_ID"]))
    elif os.environ.get("MINILLM_DISTRIBUTED") == "1":
        jax.distributed.initialize()


def enable_compilation_cache(jax, setting: str, workdir: str) -> pathlib.Path | None:
    """Keep compiled XLA programs in a folder on disk (`compilation_cache_dir`: "auto" = <workdir>/compilation_cache
    unless JAX_COMPILATION_CACHE_DIR names one, a folder, or "" = off), before the first compile: a rerun, a
    resume or the next stage of a pipeline loads each program compiled in at least
    jax_persistent_cache_min_compile_time_secs (1 s by default) instead of compiling it again. Process 0 writes;
    every process reads. The folder holds executable code: it is created private to the user."""
    if not setting:
        return None
    if setting == "auto" and os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return pathlib.Path(os.environ["JAX_COMPILATION_CACHE_DIR"])  # jax has read it already
    from minillm_jax.config import ConfigError
    from minillm_jax.experiment import workdir_path

    folder = workdir_path(workdir) / "compilation_cache" if setting == "auto" else pathlib.Path(setting).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise ConfigError(f"--config.compilation_cache_dir: cannot create {folder} ({e.strerror or e}); give a "
                          "writable folder, or '' to compile without a cache") from None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    return folder


def _no_space(error: BaseException) -> OSError | None:
    """The disk-full error behind `error` (Orbax and others wrap it), if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return error
        if any(text in str(error) for text in NO_SPACE):  # Orbax's array writes raise ValueError(RESOURCE_EXHAUSTED)
            return OSError(errno.ENOSPC, str(error))
        error = error.__cause__ or error.__context__
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with ml_collections' errors for a bad override (an unknown key surfaces as an
    AttributeError deep in its parser) turned into one line naming the flag, and exit code 2."""
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # flags.Error, and AttributeError/KeyError/TypeError/ValueError from ml_collections
        message = str(e)
        named = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
        culprit = next((a for a in named if a.split(".")[-1] in message), None)
        if isinstance(e, (AttributeError, KeyError)) and culprit:
            message = f"{culprit}: the config has no key {culprit[len('--config.'):]!r}"
        print(f"error: {message}", file=sys.stderr)
        print("usage: python -m minillm_jax.main --config configs/<file>.py[:<preset>] --workdir <dir> "
              "[--config.<key>=<value> ...]", file=sys.stderr)
        sys.exit(2)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # warnings (e.g. skipped records) show; infos do not
    import jax

    from minillm_jax import loop
    from minillm_jax.checkpoint import CheckpointIncompatible, quiet_orbax_logs
    from minillm_jax.config import ConfigError, RunConfig
    from minillm_jax.workdir import WorkdirBusy

    quiet_orbax_logs()
    initialize_distributed(jax)
    try:
        config = RunConfig.from_dict(_CONFIG.value)
        enable_compilation_cache(jax, config.compilation_cache_dir, _WORKDIR.value)
        loop.run(config, _WORKDIR.value)
    except (ConfigError, WorkdirBusy, CheckpointIncompatible) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as e:  # a diverged run: non-finite metrics, or a state the checkpointer refused
        print(f"error: the run diverged: {e}", file=sys.stderr)
        sys.exit(3)
    except loop.Stopped as e:
        print(str(e), file=sys.stderr)
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:
        print("interrupted: checkpoints saved before this point are intact; rerun the same command to continue",
              file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        full = _no_space(e)
        if full is None:
            raise
        steps = loop.saved_steps(pathlib.Path(_WORKDIR.value) / "checkpoints")
        intact = f"checkpoints up to step {steps[-1]} are intact" if steps else "no checkpoint was saved yet"
        print(f"error: no space left on device at {full.filename or _WORKDIR.value}; {intact}: free space and "
              "rerun the same command to continue", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(28)  # not sys.exit: at interpreter shutdown Orbax's abandoned writes print tracebacks


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=parse_flags)
