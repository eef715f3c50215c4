"""The training tasks behind `main.py`: each turns the run's data and models into one optimizer step at a
time, `step(state, step) -> (state, metrics)`, and can report and restore its data position. The jitted
train steps themselves live in `trainers/`; this module only feeds them.
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import numpy as np
from flax import nnx

from minillm_jax import sharding
from minillm_jax.data import FieldMap, InstructionData, format_prompt, load_records
from minillm_jax.sampling import SamplingConfig, generate
from minillm_jax.trainers import distillm, gkd, kd, minillm, seqkd, sft
from minillm_jax.trainers.batches import from_samples
from minillm_jax.trainers.common import StepLayout

SEQUENCE_BUCKET = 64  # training sequences are left-padded to a multiple of this, so shapes stay few


@dataclasses.dataclass
class Context:
    """What every task may use; built once by `loop.run`."""

    config: object
    workdir: pathlib.Path
    tokenizer: object
    teacher: nnx.Module | None
    graphdef: nnx.GraphDef
    tx: object
    schedule: object
    train: InstructionData
    records: list
    sampling: SamplingConfig
    pretrain: object | None = None  # an L_PT batch stream (data.PackedText) or None
    mesh: jax.sharding.Mesh | None = None
    layout: StepLayout | None = None  # explicit shardings of the jitted steps (None: let jit place things)

    def place(self, batch):
        """A host batch (every process builds the same one) as global arrays: rows over the mesh's batch
        axes (data, fsdp), each process contributing the rows its devices hold; a batch those axes do not
        divide is replicated."""
        if self.mesh is None:
            return batch
        return sharding.place_batch(batch, self.mesh)

    @property
    def micro_batch(self) -> int:
        return self.config.batch_size // self.config.accumulate_steps

    def key(self, *path: int) -> jax.Array:
        key = jax.random.key(self.config.seed)
        for item in path:
            key = jax.random.fold_in(key, item)
        return key


def pad_to_bucket(batch: dict, pad_id: int, multiple: int = SEQUENCE_BUCKET) -> dict:
    """More left padding so the length is a multiple of `multiple` (one compile per bucket, not per batch)."""
    width = batch["tokens"].shape[1]
    extra = -width % multiple
    if not extra:
        return batch
    return {k: np.pad(v, ((0, 0), (extra, 0)), constant_values=pad_id if k == "tokens" else 0)
            for k, v in batch.items()}


def prompts_of(batch: dict) -> list[list[int]]:
    """The prompt ids of each row of a left-padded prompt + response batch."""
    prompt = (np.asarray(batch["attention_mask"]) > 0) & (np.asarray(batch["loss_mask"]) == 0)
    return [row[m].tolist() for row, m in zip(np.asarray(batch["tokens"]), prompt)]


class SupervisedTask:
    """SFT on gold (or teacher-written) sequences; with a teacher, word-level KD instead."""

    def __init__(self, ctx: Context, data: InstructionData | None = None):
        self.ctx = ctx
        self.data = data or ctx.train
        self.position = (0, 0)
        self._batches = None
        self.train_step = self.make_step()

    def make_step(self):
        return sft.make_train_step(self.ctx.graphdef, self.ctx.tx, self.ctx.schedule, layout=self.ctx.layout,
                                   batch_rows=self.ctx.micro_batch)

    def next_batch(self) -> dict:
        """The next host (numpy) micro-batch, padded to its length bucket."""
        if self._batches is None:
            self._batches = self.data.batches(self.ctx.micro_batch, self.ctx.config.seed, self.position)
        batch, self.position = next(self._batches)
        return pad_to_bucket(batch, self.data.pad_token_id)

    def micro_step(self, state, batch, step):
        return self.train_step(state, self.ctx.place(batch))

    def step(self, state, step: int):
        metrics, tokens = {}, 0
        for micro in range(self.ctx.config.accumulate_steps):
            batch = self.next_batch()
            tokens += int(batch["attention_mask"].sum())
            state, metrics = self.micro_step(state, batch, step)
        return state, {**metrics, "tokens": tokens}

    def get_position(self) -> dict:
        return {"position": list(self.position)}

    def set_position(self, saved: dict) -> None:
        self.position = tuple(saved["position"])
        self._batches = None

    def on_validation(self, metrics: dict) -> None:
        pass


class KDTask(SupervisedTask):
    def make_step(self):
        c = self.ctx.config
        return kd.make_train_step(self.ctx.graphdef, nnx.graphdef(self.ctx.teacher), self.ctx.tx, self.ctx.schedule,
                                  kd_ratio=c.kd.kd_ratio, logits_chunk_size=c.logits_chunk_size or None,
                                  layout=self.ctx.layout, batch_rows=self.ctx.micro_batch)

    def micro_step(self, state, batch, step):
        return self.train_step(state, nnx.state(self.ctx.teacher), self.ctx.place(batch))


class GKDTask(KDTask):
    """Generalised JSD on gold sequences, or with probability lambda on the student's own answers."""

    def __init__(self, ctx: Context):
        c = ctx.config
        self.gkd_config = gkd.GKDConfig(beta=c.gkd.beta, lmbda=c.gkd.lmbda,
                                        logits_chunk_size=c.logits_chunk_size or None)
        self.coin = np.random.default_rng(c.seed)
        super().__init__(ctx)

    def make_step(self):
        return gkd.make_train_step(self.ctx.graphdef, nnx.graphdef(self.ctx.teacher), self.ctx.tx, self.ctx.schedule,
                                   self.gkd_config, layout=self.ctx.layout, batch_rows=self.ctx.micro_batch)

    def micro_step(self, state, batch, step):
        batch, on_policy = gkd.choose_batch(batch, prompts_of(batch), state, self.ctx.graphdef, self.ctx.sampling,
                                            self.ctx.key(step, 1), self.gkd_config, self.coin)
        batch = self.ctx.place(batch)
        state, metrics = self.train_step(state, nnx.state(self.ctx.teacher), batch)
        return state, {**metrics, "on_policy": float(on_policy)}

    def get_position(self) -> dict:  # the coin's state too, so a resume flips the same coins
        return {**super().get_position(), "coin": self.coin.bit_generator.state}

    def set_position(self, saved: dict) -> None:
        super().set_position(saved)
        if "coin" in saved:
            self.coin.bit_generator.state = saved["coin"]


class DistiLLMTask(KDTask):
    """Skew (reverse) KL with adaptive use of student-generated outputs and a replay buffer."""

    def __init__(self, ctx: Context):
        c = ctx.config.distillm
        self.distillm_config = distillm.DistiLLMConfig(
            divergence=c.divergence, skew_alpha=c.skew_alpha, initial_sgo_prob=c.initial_sgo_prob,
            sgo_prob_step=c.sgo_prob_step, max_sgo_prob=c.max_sgo_prob, replay_capacity=c.replay_capacity,
            replay_reuse=c.replay_reuse,
            logits_chunk_size=ctx.config.logits_chunk_size or None)
        self.schedule_state = distillm.AdaptiveOffPolicy(self.distillm_config, seed=ctx.config.seed)
        super().__init__(ctx)

    def make_step(self):
        return distillm.make_train_step(self.ctx.graphdef, nnx.graphdef(self.ctx.teacher), self.ctx.tx,
                                        self.ctx.schedule, self.distillm_config, layout=self.ctx.layout,
                                        batch_rows=self.ctx.micro_batch)

    def micro_step(self, state, batch, step):
        def student_batch():
            student = nnx.merge(self.ctx.graphdef, state.params)
            out = generate(student, prompts_of(batch), self.ctx.sampling, self.ctx.key(step, 2))
            return from_samples(out)

        batch, source = self.schedule_state.choose(batch, student_batch)
        batch = self.ctx.place(batch)
        state, metrics = self.train_step(state, nnx.state(self.ctx.teacher), batch)
        return state, {**metrics, "sgo_prob": self.schedule_state.sgo_prob,
                       "student_generated": float(source != "gold")}

    def on_validation(self, metrics: dict) -> None:
        if "valid/loss" in metrics:
            self.schedule_state.update(float(metrics["valid/loss"]))

    def get_position(self) -> dict:
        return {**super().get_position(), **self.schedule_state.get_state()}

    def set_position(self, saved: dict) -> None:
        super().set_position(saved)
        self.schedule_state.set_state(saved)


def seqkd_task(ctx: Context) -> SupervisedTask:
    """SeqKD: the teacher answers every training prompt once (kept in the workdir, so a restart reuses the
    file), then SFT on those answers."""
    c = ctx.config
    fields = field_map(c)
    path = ctx.workdir / "seqkd" / "teacher_answers.jsonl"
    if not sharding.on_every_process(path.exists()):  # sampling is collective: all processes agree first
        records, prompts = [], []
        for record in ctx.records:
            ids = ctx.tokenizer(format_prompt(record, fields, template=c.data.template, tokenizer=ctx.tokenizer),
                                add_special_tokens=True)["input_ids"]
            if len(ids) <= c.data.max_prompt_length:
                records.append(record)
                prompts.append(ids)
        answers = seqkd.teacher_answers(ctx.teacher, prompts, ctx.sampling, ctx.key(7), batch_size=c.batch_size)
        seqkd.write_teacher_data(path, records, answers, ctx.tokenizer, output_field=fields.output)
    records, _ = load_records(str(path), fields)
    data = InstructionData.build(records, ctx.tokenizer, fields, template=c.data.template,
                                 max_prompt_length=c.data.max_prompt_length, max_length=c.data.max_length)
    return SupervisedTask(ctx, data)


class MiniLLMTask:
    """Rounds of `num_rollouts` teacher-mixed samples, each followed by `ppo_epochs` passes over shuffled
    mini-batches; one optimizer step per mini-batch, plus an L_PT batch when a plain-text source is set."""

    def __init__(self, ctx: Context):
        c = ctx.config.minillm
        self.ctx = ctx
        self.config = minillm.MiniLLMConfig(
            mix_alpha=c.mix_alpha, gamma=c.gamma, clip=c.clip or None, length_norm=c.length_norm, whiten=c.whiten,
            masked_whiten=c.masked_whiten, include_current_reward=c.include_current_reward,
            single_step=c.single_step, single_step_weights=c.single_step_weights, importance=c.importance,
            pt_coef=c.pt_coef if ctx.pretrain is not None else 0.0, kd_ratio=c.kd_ratio, ppo_epochs=c.ppo_epochs,
            minibatch_size=c.minibatch_size, logits_chunk_size=ctx.config.logits_chunk_size or None)
        self.train_step = minillm.make_train_step(ctx.graphdef, nnx.graphdef(ctx.teacher), ctx.tx, ctx.schedule,
                                                  self.config, layout=ctx.layout,
                                                  pt_rows=self.config.minibatch_size if self.config.pt_coef else None)
        self.position = (0, 0)
        self.round = 0
        self._prompts = None
        self._queue: list = []
        self._rollouts = None
        self._stats: dict = {}

    def _new_round(self, state):
        if self._prompts is None:
            self._prompts = self.ctx.train.prompt_batches(self.ctx.config.minillm.num_rollouts, self.ctx.config.seed,
                                                          self.position)
        prompts, self.position = next(self._prompts)
        student = nnx.merge(self.ctx.graphdef, state.params)
        key = self.ctx.key(self.round, 3)
        self._rollouts, self._stats = minillm.make_rollouts(student, self.ctx.teacher, prompts, self.ctx.sampling,
                                                            key, self.config)
        count, size = len(prompts), self.config.minibatch_size
        self._queue = []
        for epoch in range(self.config.ppo_epochs):
            order = np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), count))
            self._queue += [order[i:i + size] for i in range(0, count - size + 1, size)]
        self.round += 1

    def step(self, state, step: int):
        if not self._queue:
            self._new_round(state)
            stats, self._stats = self._stats, {}
        else:
            stats = {}
        pt_batch = self.ctx.place(next(self.ctx.pretrain)) if self.config.pt_coef else None
        batch = self.ctx.place(self._rollouts.take(self._queue.pop(0)))
        state, metrics = self.train_step(state, nnx.state(self.ctx.teacher), batch, pt_batch)
        tokens = batch.prompt_mask.sum() + batch.mask.sum() + (pt_batch["attention_mask"].sum() if pt_batch else 0)
        return state, {**metrics, **stats, "tokens": tokens}

    @property
    def at_round_end(self) -> bool:
        return not self._queue

    def get_position(self) -> dict:
        # saved where a round ends (loop._checkpoint_due), so the next round is sampled from the same state
        # and key as without the interruption
        saved = {"position": list(self.position), "round": self.round}
        if self.ctx.pretrain is not None:
            saved["pretrain"] = self.ctx.pretrain.state()
        return saved

    def set_position(self, saved: dict) -> None:
        self.position, self.round = tuple(saved["position"]), saved["round"]
        self._prompts, self._queue = None, []
        if self.ctx.pretrain is not None and "pretrain" in saved:
            self.ctx.pretrain.restore(saved["pretrain"])

    def on_validation(self, metrics: dict) -> None:
        pass


def field_map(config) -> FieldMap:
    d = config.data
    return FieldMap(instruction=d.instruction_field, input=d.input_field or None, output=d.output_field,
                    messages=d.messages_field or None)


TASKS = {"sft": SupervisedTask, "kd": KDTask, "seqkd": seqkd_task, "minillm": MiniLLMTask, "gkd": GKDTask,
         "distillm": DistiLLMTask}


def make_task(ctx: Context):
    if ctx.config.task not in TASKS:
        raise ValueError(f"task {ctx.config.task!r} does not train (training tasks: {', '.join(TASKS)})")
    return TASKS[ctx.config.task](ctx)


__all__ = ["Context", "field_map", "make_task", "pad_to_bucket", "prompts_of"]
