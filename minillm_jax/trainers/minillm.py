"""MiniLLM (Gu et al., ICLR 2024): on-policy reverse KL with teacher-mixed sampling, as the reference code
computes it by default (shared docs minillm.md section 2), with the paper's variants as options.

One round is one compiled function (`round_update`): sample `num_rollouts` answers from
(1 - alpha) q + alpha p with both KV caches in lock-step; rescore them teacher-forced in the training
dtype (log q_old, log p and the importance weight w, as the reference does "because of the fp16 loss",
so that the first update's policy ratio is 1); fix rewards r_t = log p - log q_old and the discounted,
length-normalised returns; keep the teacher's final hidden states (the single-step term unembeds them
per mini-batch: one teacher forward per round instead of one per PPO epoch); then `lax.scan` over
`ppo_epochs` shuffled passes of mini-batches of `batch_size` rollouts, one optimizer step each (with
`accumulate_steps` micro-batches), each with one L_PT batch when a plain-text source is set.

Loss per mini-batch: the PPO-clipped policy term on rho = (q / q_old) w + the single-step term (full-
vocabulary KL(q || p) per position, no importance weight, as in the code) + pt_coef L_PT, with
L_PT = (1 - kd_ratio) CE + kd_ratio soft CE(p || q) on plain text. q and p are taken at the sampling
temperature everywhere (rollouts, rescoring, loss).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minillm_jax import losses, sampling
from minillm_jax.data.batches import Order, stack, text_batch
from minillm_jax.data.pretrain import PackedText
from minillm_jax.trainers.common import (
    Method,
    accumulated_gradients,
    apply_gradients,
    batch_tokens,
    response_hidden,
    step_keys,
)

WHITEN = ("minibatch", "round", "none")


@dataclasses.dataclass(frozen=True)
class MiniLLMConfig:
    num_rollouts: int = 256  # rollouts per round; the PPO mini-batch is the run's batch_size
    ppo_epochs: int = 4
    mix_alpha: float = 0.2
    gamma: float = 0.95
    clip: float | None = 0.2
    length_norm: bool = True
    include_current_reward: bool = True  # the code's G_t; False: the paper's R_{t+1}
    whiten: str = "minibatch"  # the code: per PPO mini-batch; "round": over the whole round; "none"
    whiten_over_padding: bool = True  # the code's statistics include the padding zeros; False: valid tokens only
    single_step: bool = True
    single_step_weights: bool = False  # the paper's w_t on the single-step term (the code has none)
    importance: str = "token"  # "token": w_t as paper and code; "sequence": prod_t w_t (experimental, see README)
    pt_coef: float = 1.0
    kd_ratio: float = 0.5  # L_PT = (1 - k) CE + k soft CE

    def __post_init__(self):
        if self.importance not in ("token", "sequence"):
            raise ValueError(f"MiniLLMConfig.importance={self.importance!r}: expected 'token' or 'sequence'")
        if self.whiten not in WHITEN:
            raise ValueError(f"MiniLLMConfig.whiten={self.whiten!r}: expected one of {WHITEN}")


def steps_per_round(config: MiniLLMConfig, batch_size: int) -> int:
    return config.ppo_epochs * (config.num_rollouts // batch_size)


# ------------------------------------------------------------------------------------------ the loss


def minillm_loss(params, teacher_params, batch: dict, *, setup, config: MiniLLMConfig):
    """The loss of one (micro-)batch of rollouts (with its `teacher_hidden`, `old_logprobs`, `weights`,
    whitened `advantages`) and, under key "pt", an L_PT batch."""
    student = nnx.merge(setup.graphdef, params)
    teacher = nnx.merge(setup.teacher_graphdef, teacher_params)
    chunk, temperature = setup.config.logits_chunk_size or None, setup.sampling.temperature
    n = student.config.num_real_tokens
    mask = batch["response_mask"]
    terms = ["logprob", "entropy"] + (["reverse_kl"] if config.single_step else [])
    values = losses.token_values(
        terms, response_hidden(student, batch), student.unembed,
        batch["teacher_hidden"] if config.single_step else None, teacher.unembed, labels=batch["response"],
        num_real_tokens=n, temperature=temperature, chunk_size=chunk)
    logprobs, entropy = values[..., 0], values[..., 1]
    ratio = jax.lax.stop_gradient(jnp.exp(logprobs - batch["old_logprobs"]))
    pg = losses.policy_gradient_loss(logprobs, batch["old_logprobs"], batch["advantages"], mask,
                                     weights=batch["weights"], clip=config.clip)
    metrics = {"pg": pg, "entropy": jax.lax.stop_gradient(losses.masked_mean(entropy, mask)),
               "ratio_mean": losses.masked_mean(ratio, mask),
               "policy_ratio_deviation": losses.masked_mean(jnp.abs(ratio - 1.0), mask),
               "clip_fraction": losses.masked_mean(jnp.abs(ratio - 1.0) > (config.clip or jnp.inf), mask)}
    total = pg
    if config.single_step:
        weights = jax.lax.stop_gradient(batch["weights"]) if config.single_step_weights else 1.0
        metrics["single_step"] = losses.masked_mean(values[..., 2] * weights, mask)
        total = total + metrics["single_step"]
    if "pt" in batch and config.pt_coef:
        pt = batch["pt"]
        kd = bool(config.kd_ratio)  # the teacher's forward only when its soft term counts
        values = losses.token_values(
            ["cross_entropy"] + (["soft_cross_entropy"] if kd else []), response_hidden(student, pt),
            student.unembed, jax.lax.stop_gradient(response_hidden(teacher, pt)) if kd else None, teacher.unembed,
            labels=pt["response"], num_real_tokens=n, chunk_size=chunk)
        ce = losses.masked_mean(values[..., 0], pt["response_mask"])
        soft = losses.masked_mean(values[..., 1], pt["response_mask"]) if kd else 0.0
        metrics["pt"] = (1.0 - config.kd_ratio) * ce + config.kd_ratio * soft
        total = total + config.pt_coef * metrics["pt"]
    metrics["loss"] = total
    return total, metrics


# ------------------------------------------------------------------------------------------ the round


def rescore(setup, params, teacher_params, rollouts: dict, order, rows: int) -> dict:
    """Teacher-forced log q_old(y_t), log p(y_t) and the teacher's final hidden states [N, R, E] of every
    rollout, in the training dtype and with the loss's own forward. Computed in chunks of `rows` taken in
    `order` (the first epoch's mini-batch order), so the first optimizer step sees exactly the numbers it
    would compute itself."""
    student = nnx.merge(setup.graphdef, params)
    teacher = nnx.merge(setup.teacher_graphdef, teacher_params)
    n, temperature = student.config.num_real_tokens, setup.sampling.temperature

    def score(indices):
        chunk = jax.tree.map(lambda x: x[indices], rollouts)
        hidden = response_hidden(teacher, chunk)
        common = dict(labels=chunk["response"], num_real_tokens=n, temperature=temperature,
                      chunk_size=setup.config.logits_chunk_size or None)
        old = losses.token_values(["logprob"], response_hidden(student, chunk), student.unembed, **common)
        return old[..., 0], losses.token_values(["logprob"], hidden, teacher.unembed, **common)[..., 0], hidden

    old, teacher_logprobs, hidden = jax.lax.map(score, order.reshape(-1, rows))
    inverse = jnp.argsort(order)

    def unchunk(x):  # [chunks, rows, ...] in `order` -> [N, ...] in rollout order
        return x.reshape(-1, *x.shape[2:])[inverse]

    return {"old_logprobs": unchunk(old), "teacher_logprobs": unchunk(teacher_logprobs),
            "teacher_hidden": jax.lax.stop_gradient(unchunk(hidden))}


def rollout_buffer(setup, config: MiniLLMConfig, params, teacher_params, prompt, prompt_mask, keys, order,
                   rows: int) -> tuple[dict, dict]:
    """Sample, rescore and fix the per-token quantities of a round; returns (buffer, round statistics)."""
    student = nnx.merge(setup.graphdef, params)
    teacher = nnx.merge(setup.teacher_graphdef, teacher_params)
    out = sampling.sample(student, teacher, prompt, prompt_mask, keys["sample"], jnp.float32(config.mix_alpha),
                          config=setup.sampling, num_real=student.config.num_real_tokens, mesh=setup.mesh)
    rollouts = {"prompt": jnp.asarray(out.prompt_tokens), "prompt_mask": jnp.asarray(out.prompt_mask),
                "response": out.tokens, "response_mask": out.mask}
    scores = rescore(setup, params, teacher_params, rollouts, order, rows)
    mask = out.mask.astype(jnp.float32)
    old, teacher_logprobs = scores["old_logprobs"], scores["teacher_logprobs"]
    alpha = config.mix_alpha
    # w = q / ((1 - alpha) q + alpha p), in float32 from the rescored log-probabilities
    weights = jnp.exp(-jnp.logaddexp(jnp.log1p(-alpha), jnp.log(alpha) + teacher_logprobs - old)) if alpha else \
        jnp.ones_like(old)
    weights = jnp.where(out.mask, weights, 1.0)
    if config.importance == "sequence":
        weights = jnp.broadcast_to(jnp.prod(weights, axis=1, keepdims=True), weights.shape)
    rewards = teacher_logprobs - old
    advantages = losses.discounted_returns(rewards, mask, config.gamma, length_norm=config.length_norm,
                                           include_current_reward=config.include_current_reward)
    if config.whiten == "round":
        advantages = losses.whiten(advantages, mask, over_padding=config.whiten_over_padding)
    lengths = out.lengths.astype(jnp.float32)
    drift = jnp.exp(out.logprobs - old) - 1.0  # the sampler's cached log q against the teacher-forced one
    stats = {
        "rollout/seq_log_ratio": jnp.mean(jnp.sum(-rewards * mask, axis=1)),  # on mixed samples: not the reverse KL
        "rollout/length_mean": jnp.mean(lengths), "rollout/length_max": jnp.max(lengths),
        "rollout/truncated": jnp.mean(lengths >= setup.sampling.max_new_tokens),
        "rollout/weight_mean": losses.masked_mean(weights, mask),
        "rollout/weight_max": jnp.max(jnp.where(out.mask, weights, 0.0)),
        "rollout/cache_logprob_gap": losses.masked_mean(jnp.abs(out.logprobs - old), mask),
        "rollout/cache_ratio_outside_5pct": losses.masked_mean(jnp.abs(drift) > 0.05, mask),
    }
    buffer = {**rollouts, "old_logprobs": old, "weights": weights, "advantages": advantages,
              "teacher_hidden": scores["teacher_hidden"]}
    return buffer, stats


def round_update_fn(setup, config: MiniLLMConfig):
    """`update(state, teacher_params, inputs) -> (state, metrics)`: one whole round (see the module doc).
    inputs: `prompt`/`prompt_mask` [N, P]; with L_PT, `pt` sequence batches stacked [S, A, b, ...]."""
    run = setup.config
    rows, accumulate = run.batch_size, run.accumulate_steps
    micro = rows // accumulate
    per_epoch = config.num_rollouts // rows
    schedule, tx = setup.schedule, setup.tx

    def loss(params, teacher_params, batch, _):
        return minillm_loss(params, teacher_params, batch, setup=setup, config=config)

    def update(state, teacher_params, inputs):
        keys = step_keys(run.seed, state.step)
        orders = jax.vmap(lambda e: jax.random.permutation(jax.random.fold_in(keys["shuffle"], e),
                                                           config.num_rollouts))(jnp.arange(config.ppo_epochs))
        buffer, stats = rollout_buffer(setup, config, state.params, teacher_params, inputs["prompt"],
                                       inputs["prompt_mask"], keys, orders[0], micro)
        batches = orders.reshape(config.ppo_epochs * per_epoch, rows)
        pt = inputs.get("pt")

        def train_step(state, xs):
            indices, pt_batch = xs
            batch = jax.tree.map(lambda x: x[indices], buffer)
            if config.whiten == "minibatch":
                batch["advantages"] = losses.whiten(batch["advantages"], batch["response_mask"],
                                                    over_padding=config.whiten_over_padding)
            tokens = batch_tokens(batch)
            batch = jax.tree.map(lambda x: x.reshape(accumulate, micro, *x.shape[1:]), batch)
            if pt_batch is not None:
                batch["pt"] = pt_batch
                tokens = tokens + batch_tokens(pt_batch)
            grads, metrics = accumulated_gradients(lambda p, b, k: loss(p, teacher_params, b, k), state.params, batch)
            state, opt_metrics = apply_gradients(state, grads, tx, schedule)
            return state, {**metrics, **opt_metrics, "tokens": tokens}

        state, metrics = jax.lax.scan(train_step, state, (batches, pt))
        return state, {**metrics, **stats}

    return update


class RolloutFeed:
    """Each round's prompts ([N, P], left-padded to a bucket) and, with a plain-text stream, its L_PT
    batches stacked [S, A, b, ...]; resumable (prompt order and the stream's position)."""

    def __init__(self, data, num_rollouts: int, seed: int, buckets, pretrain=None, *, steps: int = 0,
                 accumulate: int = 1):
        self.data, self.buckets, self.pretrain = data, buckets, pretrain
        self.steps, self.accumulate = steps, accumulate
        self.order = Order(len(data), num_rollouts, seed)

    def next(self) -> dict:
        prompts = [self.data.prompts[i] for i in self.order.next()]
        ids, mask = sampling.pad_prompts(prompts, self.buckets, self.data.pad_token_id)
        inputs = {"prompt": ids, "prompt_mask": mask}
        if self.pretrain is not None:
            inputs["pt"] = stack([self._pt_batch() for _ in range(self.steps)])
        return inputs

    def _pt_batch(self) -> dict:
        batch = text_batch(next(self.pretrain)["tokens"])
        rows = batch["prompt"].shape[0] // self.accumulate
        return stack([{k: v[i:i + rows] for k, v in batch.items()} for i in range(0, rows * self.accumulate, rows)])

    def example(self) -> dict:
        return {"prompt": np.zeros((self.order.group, self.buckets[-1]), np.int32)}

    def state(self) -> dict:
        saved = {"position": self.order.position}
        if self.pretrain is not None:
            saved["pretrain"] = self.pretrain.state()
        return saved

    def restore(self, saved: dict) -> None:
        self.order.epoch, self.order.index = (int(p) for p in saved["position"])
        if self.pretrain is not None:
            self.pretrain.restore(saved["pretrain"])

    def after_validation(self, metrics: dict) -> None:
        pass


def pretrain_stream(setup) -> PackedText | None:
    """The L_PT stream: `data.pretrain` (a file or dataset; "@train" = the answers of data.train), packed
    into `pretrain_length`-token chunks, shuffled (`pretrain_shuffle` documents buffered), resumable."""
    run = setup.config
    d = run.data
    if not d.pretrain or not run.method.pt_coef:
        return None
    source, field = (d.train, d.fields.output) if d.pretrain == "@train" else (d.pretrain, d.pretrain_field)
    return PackedText([source], setup.tokenizer, seq_len=d.pretrain_length, batch_size=run.batch_size,
                      text_field=field, seed=run.seed, shuffle_buffer=d.pretrain_shuffle)


def build(setup) -> Method:
    """The MiniLLM method: rollout prompts are the training prompts (filtered on prompt length only)."""
    run, config = setup.config, setup.config.method
    steps = steps_per_round(config, run.batch_size)
    feed = RolloutFeed(setup.train, config.num_rollouts, run.seed, setup.sampling.prompt_buckets,
                       pretrain_stream(setup), steps=steps, accumulate=run.accumulate_steps)
    return Method(update=round_update_fn(setup, config), steps_per_update=steps, feed=feed)


__all__ = ["MiniLLMConfig", "RolloutFeed", "build", "minillm_loss", "rescore", "round_update_fn", "rollout_buffer",
           "steps_per_round"]
