"""The run's config, typed and validated once: `RunConfig.from_dict(ml_collections config)` turns the
locked ConfigDict of `configs/*.py` into frozen dataclasses, or raises `ConfigError` naming the
`--config.` key, before any file or model is read. Everything downstream takes these dataclasses; nothing
converts config values again.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Any

from minillm_jax.data.hub import DATA_FILE_SUFFIXES
from minillm_jax.data.instructions import FieldMap
from minillm_jax.models.config import DTYPES
from minillm_jax.sampling import KV_CACHE_DTYPES
from minillm_jax.trainers.distillm import DistiLLMConfig
from minillm_jax.trainers.gkd import GKDConfig
from minillm_jax.trainers.kd import KDConfig
from minillm_jax.trainers.minillm import WHITEN, MiniLLMConfig
from minillm_jax.trainers.sft import SFTConfig

TRAINING_TASKS = ("sft", "kd", "seqkd", "minillm", "gkd", "distillm")
TASKS = TRAINING_TASKS + ("generate", "eval")
NEEDS_TEACHER = ("kd", "seqkd", "minillm", "gkd", "distillm")
TEACHER_GENERATES = ("minillm", "seqkd", "generate", "eval")

DATA_SUFFIXES = DATA_FILE_SUFFIXES + (".txt",)

# Keys a resumed run may change; any other difference from the checkpointed config refuses the resume (among
# the sampler's options, those that leave the samples as they were: an int8 KV cache rounds keys and values, so
# the rest of a run would train on rollouts from another distribution)
RESUMABLE_CHANGES = ("steps", "eval_every", "checkpoint_every", "keep_checkpoints", "resume",
                     "overwrite", "hang_timeout_s", "compilation_cache_dir", "logging.", "eval.", "export.",
                     "data.valid_examples", "mesh.", "attention", "scan_layers", "sampling.cache_segments",
                     "sampling.split_layers")
# Keys added to the config after runs were saved without them, each with the value that behaves as those runs
# did: a saved run that lacks the key resumes while the key keeps that value (any other value is a difference).
ADDED_KEYS = {"student_layers_source": "",  # 3eb9688: until then the cut came from the teacher
              "attention": "xla",  # until then XLA's attention everywhere
              "scan_layers": True,  # until then every model looped over its layers
              "sampling.cache_segments": 1,  # until then decoding attended over every cache slot
              "sampling.split_layers": False,  # until then decoding scanned over the stacked layer weights
              "sampling.kv_cache_dtype": "auto"}  # until then KV caches in the compute dtype


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float
    warmup_steps: int
    schedule: str
    end_learning_rate: float
    weight_decay: float
    b1: float
    b2: float
    eps: float
    max_grad_norm: float


@dataclasses.dataclass(frozen=True)
class DataConfig:
    root: str
    train: str
    valid: str
    split: str
    valid_split: str
    fields: FieldMap
    template: str
    max_prompt_length: int
    max_length: int
    max_train_examples: int
    valid_examples: int
    holdout: int
    on_error: str
    add_special_tokens: bool
    length_buckets: int
    pretrain: str
    pretrain_field: str
    pretrain_length: int
    pretrain_shuffle: int


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    cache_segments: int  # SamplingConfig.cache_segments
    split_layers: bool  # SamplingConfig.split_layers
    kv_cache_dtype: str  # SamplingConfig.kv_cache_dtype


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int
    fsdp: int
    tensor: int
    teacher_rules: str


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    model: str
    sets: tuple[tuple[str, str], ...]
    seeds: tuple[int, ...]
    max_new_tokens: int
    no_repeat_ngram_size: int
    batch_size: int
    limit: int
    exposure_bias: bool
    exposure_bias_prompts: int
    calibration: str


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    enabled: bool
    select: str
    dtype: str
    format: str
    gguf_type: str


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    progress: bool
    tensorboard: bool
    wandb: bool
    wandb_project: str


@dataclasses.dataclass(frozen=True)
class RunConfig:
    task: str
    teacher: str
    student: str
    student_layers: tuple[int, ...]
    student_layers_source: str  # the model student_layers are cut from; "" = the teacher
    tokenizer: str
    dtype: str
    compute_dtype: str
    remat: str
    attention: str  # "xla" or "cudnn": ModelConfig.attention of every model the run loads
    scan_layers: bool  # ModelConfig.scan_layers of every model the run loads
    seed: int
    steps: int
    batch_size: int
    accumulate_steps: int
    logits_chunk_size: int
    checkpoint_every: int
    keep_checkpoints: int
    eval_every: int
    best_metric: str
    best_mode: str
    resume: bool
    overwrite: bool
    hang_timeout_s: float
    compilation_cache_dir: str  # "auto", a folder, or "" (off)
    mesh: MeshConfig
    optimizer: OptimizerConfig
    data: DataConfig
    sampling: SamplingSettings
    method: Any  # the task's own config: SFTConfig, KDConfig, MiniLLMConfig, GKDConfig, DistiLLMConfig or None
    eval: EvalConfig
    export: ExportConfig
    logging: LoggingConfig
    raw: dict = dataclasses.field(compare=False, repr=False)  # the ConfigDict as a plain dict (config.json)

    @classmethod
    def from_dict(cls, c) -> "RunConfig":
        """Validate a ConfigDict (or a plain nested dict) and build the typed config."""
        return _build(c)

    @property
    def trains(self) -> bool:
        return self.task in TRAINING_TASKS


def _fail(key: str, message: str):
    raise ConfigError(f"--config.{key}: {message}")


def _choice(c, key: str, options) -> str:
    value = _get(c, key)
    if value not in options:
        _fail(key, f"{value!r} is not one of {', '.join(map(str, options))}")
    return value


def _get(c, key: str):
    value = c
    for part in key.split("."):
        value = value[part]
    return value


def _bool(c, key: str) -> bool:
    value = _get(c, key)
    if not isinstance(value, bool):
        _fail(key, f"{value!r}: expected True or False")
    return value


def _int(c, key: str, minimum: int | None = None) -> int:
    value = _get(c, key)
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(key, f"{value!r} is not an integer")
    if minimum is not None and value < minimum:
        _fail(key, f"{value} must be >= {minimum}")
    return value


def _float(c, key: str, low: float | None = None, high: float | None = None, *, open_low: bool = False) -> float:
    value = _get(c, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(key, f"{value!r} is not a finite number")
    value = float(value)
    if low is not None and (value <= low if open_low else value < low):
        _fail(key, f"{value} must be {'>' if open_low else '>='} {low}")
    if high is not None and value > high:
        _fail(key, f"{value} must be <= {high}")
    return value


def _method(c, task: str):
    if task in ("sft", "seqkd"):
        return SFTConfig()
    if task == "kd":
        return KDConfig(kd_ratio=_float(c, "kd.kd_ratio", 0.0, 1.0))
    if task == "gkd":
        return GKDConfig(beta=_float(c, "gkd.beta", 0.0, 1.0), lmbda=_float(c, "gkd.lmbda", 0.0, 1.0))
    if task == "distillm":
        return DistiLLMConfig(
            divergence=_choice(c, "distillm.divergence", ("skew_kl", "skew_reverse_kl")),
            skew_alpha=_float(c, "distillm.skew_alpha", 0.0, 1.0),
            initial_sgo_prob=_float(c, "distillm.initial_sgo_prob", 0.0, 1.0),
            sgo_prob_step=_float(c, "distillm.sgo_prob_step", 0.0, 1.0),
            max_sgo_prob=_float(c, "distillm.max_sgo_prob", 0.0, 1.0),
            replay_capacity=_int(c, "distillm.replay_capacity", 1),
            replay_reuse=_float(c, "distillm.replay_reuse", 0.0, 1.0))
    if task == "minillm":
        m = c["minillm"]
        config = MiniLLMConfig(
            num_rollouts=_int(c, "minillm.num_rollouts", 1), ppo_epochs=_int(c, "minillm.ppo_epochs", 1),
            mix_alpha=_float(c, "minillm.mix_alpha", 0.0, 1.0), gamma=_float(c, "minillm.gamma", 0.0, 1.0),
            clip=_float(c, "minillm.clip", 0.0) or None, length_norm=bool(m["length_norm"]),
            include_current_reward=bool(m["include_current_reward"]),
            whiten=_choice(c, "minillm.whiten", WHITEN), whiten_over_padding=bool(m["whiten_over_padding"]),
            single_step=bool(m["single_step"]), single_step_weights=bool(m["single_step_weights"]),
            importance=_choice(c, "minillm.importance", ("token", "sequence")),
            pt_coef=_float(c, "minillm.pt_coef", 0.0), kd_ratio=_float(c, "minillm.kd_ratio", 0.0, 1.0))
        if config.mix_alpha >= 1.0:
            _fail("minillm.mix_alpha", "1.0 would sample from the teacher alone (w = 0): use < 1")
        if config.num_rollouts % c["batch_size"]:
            _fail("minillm.num_rollouts", f"{config.num_rollouts} is not a multiple of batch_size={c['batch_size']} "
                  "(the PPO mini-batch: rollouts per optimizer step)")
        return config
    return None


def _build(c) -> RunConfig:
    task = _choice(c, "task", TASKS)
    teacher, student, layers = c["teacher"], c["student"], tuple(c["student_layers"])
    layers_source = c["student_layers_source"]
    if task in NEEDS_TEACHER and not teacher:
        _fail("teacher", f"task {task!r} needs a teacher (--config.teacher=<HF dir, hub name or .gguf>)")
    evaluation = c["eval"]
    needs_student = task in TRAINING_TASKS or (task == "eval" and evaluation["model"] in ("student", "both")) or \
        (task == "generate" and not teacher)
    if needs_student and not student and not layers:
        _fail("student", "set a student model, or student_layers to initialise it from teacher layers")
    if layers and not teacher and not layers_source:
        _fail("student_layers", "initialising the student from teacher layers needs --config.teacher (or "
              "--config.student_layers_source, the model to cut them from)")
    if layers_source and not layers:
        _fail("student_layers_source", f"{layers_source!r} is set but --config.student_layers is empty: name the "
              "layers to keep, or clear it")
    if student and layers:
        _fail("student_layers", f"give either --config.student ({student}) or --config.student_layers, not both "
              '(clear it with --config.student_layers="()")')
    if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in layers):
        _fail("student_layers", f"{layers}: expected non-negative layer indices")
    for key in ("dtype",):
        _choice(c, key, DTYPES)
    if c["compute_dtype"]:
        _choice(c, "compute_dtype", DTYPES)
    _choice(c, "remat", ("none", "full", "dots"))
    _choice(c, "attention", ("xla", "cudnn"))
    _bool(c, "scan_layers")
    steps, batch, accumulate = _int(c, "steps", 1), _int(c, "batch_size", 1), _int(c, "accumulate_steps", 1)
    if batch % accumulate:
        _fail("accumulate_steps", f"{accumulate} does not divide batch_size={batch} (each update splits its batch "
              "into accumulate_steps micro-batches)")
    checkpoint_every, eval_every = _int(c, "checkpoint_every", 0), _int(c, "eval_every", 0)
    keep = _int(c, "keep_checkpoints", 1)
    best_metric = c["best_metric"]
    if best_metric and not best_metric.startswith("valid/"):
        _fail("best_metric", f"{best_metric!r}: expected a validation key such as valid/rouge_l or valid/loss")
    best_mode = _choice(c, "best_mode", ("max", "min"))

    o = c["optimizer"]
    optimizer = OptimizerConfig(
        learning_rate=_float(c, "optimizer.learning_rate", 0.0, open_low=True),
        warmup_steps=_int(c, "optimizer.warmup_steps", 0),
        schedule=_choice(c, "optimizer.schedule", ("constant", "cosine")),
        end_learning_rate=_float(c, "optimizer.end_learning_rate", 0.0),
        weight_decay=_float(c, "optimizer.weight_decay", 0.0),
        b1=_float(c, "optimizer.b1", 0.0, 1.0), b2=_float(c, "optimizer.b2", 0.0, 1.0),
        eps=_float(c, "optimizer.eps", 0.0, open_low=True), max_grad_norm=_float(c, "optimizer.max_grad_norm", 0.0))
    if o["schedule"] == "cosine" and optimizer.end_learning_rate > optimizer.learning_rate:
        _fail("optimizer.end_learning_rate", f"{optimizer.end_learning_rate} exceeds learning_rate")

    d = c["data"]
    if task in TRAINING_TASKS and not d["train"]:
        _fail("data.train", "training needs a data file or hub dataset (e.g. --config.data.train=mine.jsonl)")
    data = DataConfig(
        root=d["root"], train=_resolve(d["root"], d["train"]), valid=_resolve(d["root"], d["valid"]),
        split=d["split"], valid_split=d["valid_split"],
        fields=FieldMap(instruction=d["instruction_field"], input=d["input_field"] or None, output=d["output_field"],
                        messages=d["messages_field"] or None),
        template=_choice(c, "data.template", ("alpaca", "chat")),
        max_prompt_length=_int(c, "data.max_prompt_length", 1), max_length=_int(c, "data.max_length", 2),
        max_train_examples=_int(c, "data.max_train_examples", 0), valid_examples=_int(c, "data.valid_examples", 0),
        holdout=_int(c, "data.holdout", 0), on_error=_choice(c, "data.on_error", ("fail", "skip")),
        add_special_tokens=bool(d["add_special_tokens"]), length_buckets=_int(c, "data.length_buckets", 1),
        pretrain=_resolve(d["root"], d["pretrain"]), pretrain_field=d["pretrain_field"],
        pretrain_length=_int(c, "data.pretrain_length", 2), pretrain_shuffle=_int(c, "data.pretrain_shuffle", 0))
    if data.max_prompt_length >= data.max_length:
        _fail("data.max_length", f"{data.max_length} leaves no room for an answer after max_prompt_length="
              f"{data.max_prompt_length}")

    s = c["sampling"]
    sampling = SamplingSettings(max_new_tokens=_int(c, "sampling.max_new_tokens", 1),
                                temperature=_float(c, "sampling.temperature", 0.0, open_low=True),
                                top_k=_int(c, "sampling.top_k", 0), top_p=_float(c, "sampling.top_p", 0.0, 1.0,
                                                                                 open_low=True),
                                cache_segments=_int(c, "sampling.cache_segments", 1),
                                split_layers=_bool(c, "sampling.split_layers"),
                                kv_cache_dtype=_choice(c, "sampling.kv_cache_dtype", KV_CACHE_DTYPES))
    if task == "minillm" and (sampling.top_k or sampling.top_p < 1.0):
        _fail("sampling.top_k" if sampling.top_k else "sampling.top_p",
              "MiniLLM's loss, ratio and single-step term use the full distribution the rollouts are drawn from; "
              "top-k/top-p would make them differ (set --config.sampling.top_k=0 --config.sampling.top_p=1.0)")
    del s
    method = _method(c, task)

    m = c["mesh"]
    sizes = [m["data"], m["fsdp"], m["tensor"]]
    if sizes.count(-1) > 1 or any(not isinstance(v, int) or v == 0 or v < -1 for v in sizes):
        _fail("mesh", f"sizes data={sizes[0]}, fsdp={sizes[1]}, tensor={sizes[2]}: each must be >= 1, and at most "
              "one may be -1 (the remaining devices)")
    mesh = MeshConfig(data=m["data"], fsdp=m["fsdp"], tensor=m["tensor"],
                      teacher_rules=_choice(c, "mesh.teacher_rules", ("auto", "sample", "train")))

    e = evaluation
    eval_model = _choice(c, "eval.model", ("student", "teacher", "both"))
    if task == "eval" and eval_model in ("teacher", "both") and not teacher:
        _fail("teacher", "eval.model includes the teacher but --config.teacher is empty")
    sets = tuple((name, _resolve(d["root"], path)) for name, path in e["sets"].items() if path)
    if task == "eval" and not sets:
        _fail("eval.sets", "no evaluation set given (e.g. --config.eval.sets.dolly=data/dolly/test.jsonl, or "
              "--config.data.root=DIR for a preset's sets)")
    eval_config = EvalConfig(
        model=eval_model, sets=sets, seeds=tuple(int(x) for x in e["seeds"]),
        max_new_tokens=_int(c, "eval.max_new_tokens", 1), no_repeat_ngram_size=_int(c, "eval.no_repeat_ngram_size", 0),
        batch_size=_int(c, "eval.batch_size", 1), limit=_int(c, "eval.limit", 0),
        exposure_bias=bool(e["exposure_bias"]),
        exposure_bias_prompts=_int(c, "eval.exposure_bias_prompts", 1), calibration=e["calibration"])
    if not eval_config.seeds:
        _fail("eval.seeds", "give at least one seed")

    x = c["export"]
    export = ExportConfig(enabled=bool(x["enabled"]), select=_choice(c, "export.select", ("best", "last")),
                          dtype=x["dtype"], format=_choice(c, "export.format", ("hf", "gguf", "both")),
                          gguf_type=x["gguf_type"])
    if export.dtype:
        _choice(c, "export.dtype", DTYPES)
    g = c["logging"]
    logging_config = LoggingConfig(progress=bool(g["progress"]), tensorboard=bool(g["tensorboard"]),
                                   wandb=bool(g["wandb"]), wandb_project=g["wandb_project"])
    if task in TRAINING_TASKS and best_metric and not eval_every:
        _fail("best_metric", f"{best_metric!r} ranks checkpoints by validation, but eval_every=0 never validates "
              "(set eval_every, or best_metric='' to keep the latest)")
    return RunConfig(
        task=task, teacher=teacher, student=student, student_layers=layers, student_layers_source=layers_source,
        tokenizer=c["tokenizer"], dtype=c["dtype"],
        compute_dtype=c["compute_dtype"] or c["dtype"], remat=c["remat"], attention=c["attention"],
        scan_layers=c["scan_layers"],
        seed=_int(c, "seed"), steps=steps,
        batch_size=batch, accumulate_steps=accumulate, logits_chunk_size=_int(c, "logits_chunk_size", 0),
        checkpoint_every=checkpoint_every, keep_checkpoints=keep, eval_every=eval_every,
        best_metric=best_metric, best_mode=best_mode, resume=bool(c["resume"]),
        overwrite=bool(c["overwrite"]), hang_timeout_s=_hang_timeout(c),
        compilation_cache_dir=_compilation_cache_dir(c), mesh=mesh, optimizer=optimizer, data=data,
        sampling=sampling, method=method,
        eval=eval_config, export=export, logging=logging_config, raw=_plain(c))


def _hang_timeout(c) -> float:
    value = c.get("hang_timeout_s", 0) or 0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        _fail("hang_timeout_s", f"{value!r}: expected seconds >= 0 (0 turns the hang watchdog off)")
    return float(value)


def _compilation_cache_dir(c) -> str:
    value = c.get("compilation_cache_dir", "")
    if not isinstance(value, str):
        _fail("compilation_cache_dir", f"{value!r}: expected 'auto', a folder, or '' (off)")
    folder = pathlib.Path(value).expanduser()
    if value not in ("", "auto") and folder.exists() and not folder.is_dir():
        _fail("compilation_cache_dir", f"{value!r} exists and is not a folder")
    return value


def _resolve(root: str, path: str) -> str:
    """A data path: relative data-file paths are under `data.root` when one is set (hub dataset names and
    absolute paths stay as they are)."""
    if not path or not root or pathlib.Path(path).is_absolute() or pathlib.Path(path).suffix not in DATA_SUFFIXES:
        return path
    return str(pathlib.Path(root) / path)


def _plain(c) -> dict:
    return c.to_dict() if hasattr(c, "to_dict") else dict(c)


__all__ = ["ADDED_KEYS", "ConfigError", "NEEDS_TEACHER", "RESUMABLE_CHANGES", "RunConfig", "TASKS", "TEACHER_GENERATES",
           "TRAINING_TASKS"]
