"""Entry point: `python -m minillm_jax.main --config configs/<file>.py[:<preset>] --workdir <dir>
[--config.<key>=<value> ...]`. Parses flags (the config is locked: an unknown key or a wrong type fails),
validates it once, starts `jax.distributed` on multi-process launches, and hands off to `loop.run`."""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py[:preset])",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, logs, results and the export")


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


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    import jax
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax logs every file it writes and each read-only open

    from minillm_jax import experiment, loop

    initialize_distributed(jax)
    config = _CONFIG.value
    try:
        experiment.validate(config)
        loop.run(config, _WORKDIR.value)
    except experiment.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
