"""Word-level KD: (1 - kd_ratio) CE on the gold response + kd_ratio soft CE(p || q), teacher-forced on the
same sequences (kd_ratio = 0.5 as in the MiniLLM baselines), the student with its dropout."""

from __future__ import annotations

import dataclasses

import jax

from minillm_jax import losses
from minillm_jax.trainers import sft
from minillm_jax.trainers.common import Method, paired_token_values


@dataclasses.dataclass(frozen=True)
class KDConfig:
    kd_ratio: float = 0.5
    dropout: bool = True


def kd_loss(params, teacher_params, batch, dropout_rng, *, setup, kd_ratio: float):
    values = paired_token_values(setup, params, teacher_params, batch,
                                 ["cross_entropy", "soft_cross_entropy", "forward_kl"], dropout_rng=dropout_rng)
    ce, soft, forward_kl = (losses.masked_mean(values[..., i], batch["response_mask"]) for i in range(3))
    forward_kl = jax.lax.stop_gradient(forward_kl)  # reported only
    loss = (1.0 - kd_ratio) * ce + kd_ratio * soft
    return loss, {"loss": loss, "ce": ce, "soft_ce": soft, "forward_kl": forward_kl}


def build(setup) -> Method:
    config = setup.config.method

    def loss(params, teacher_params, batch, key):
        return kd_loss(params, teacher_params, batch, key, setup=setup, kd_ratio=config.kd_ratio)

    return Method(update=sft.supervised_update(loss, setup, dropout=config.dropout), steps_per_update=1,
                  feed=sft.gold_feed(setup))
