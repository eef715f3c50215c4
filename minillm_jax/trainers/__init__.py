"""One small module per method (its config, its loss, and a `build(setup) -> Method` whose pure update the
generic loop compiles), sharing the train state, optimizer and update helpers of `common.py`."""

from minillm_jax.trainers import distillm, gkd, kd, minillm, seqkd, sft

METHODS = {"sft": sft.build, "kd": kd.build, "seqkd": seqkd.build, "minillm": minillm.build, "gkd": gkd.build,
           "distillm": distillm.build}

__all__ = ["METHODS"]
