"""From a validated config to the things a task runs on: the mesh, the tokenizer, teacher and student, the
instruction data and the sampling settings. Config validation lives here too, so every bad value is
reported once, at the boundary, naming the key.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib

import jax
from flax import nnx

from minillm_jax import sharding
from minillm_jax.models import Transformer, load_pretrained, load_tokenizer, select_layers
from minillm_jax.models.tiny import byte_tokenizer, parse_random_spec
from minillm_jax.sampling import SamplingConfig

logger = logging.getLogger(__name__)

TASKS = ("sft", "kd", "seqkd", "minillm", "gkd", "distillm", "generate", "eval")
NEEDS_TEACHER = ("kd", "seqkd", "minillm", "gkd", "distillm")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


def validate(config) -> None:
    """Checks that need no files: task, required models, value ranges. Raises ConfigError."""
    def fail(key, message):
        raise ConfigError(f"config.{key}: {message}")

    if config.task not in TASKS:
        fail("task", f"{config.task!r} is not a task (expected one of {', '.join(TASKS)})")
    if config.task in NEEDS_TEACHER and not config.teacher:
        fail("teacher", f"task {config.task!r} needs a teacher (--config.teacher=<HF dir, hub name or .gguf>)")
    needs_student = config.task not in ("eval", "generate") or config.eval.model in ("student", "both")
    if needs_student and not config.student and not config.student_layers:
        fail("student", "set a student model, or student_layers to initialise it from teacher layers")
    if config.student_layers and not config.teacher:
        fail("student_layers", "initialising the student from teacher layers needs config.teacher")
    if config.student and config.student_layers:
        fail("student_layers", "give either config.student or config.student_layers, not both")
    for key in ("steps", "batch_size", "accumulate_steps"):
        if config[key] < 1:
            fail(key, f"{config[key]} must be >= 1")
    if config.optimizer.learning_rate <= 0:
        fail("optimizer.learning_rate", f"{config.optimizer.learning_rate} must be > 0")
    if config.optimizer.schedule not in ("constant", "cosine"):
        fail("optimizer.schedule", f"{config.optimizer.schedule!r}: expected 'constant' or 'cosine'")
    if config.data.template not in ("alpaca", "chat"):
        fail("data.template", f"{config.data.template!r}: expected 'alpaca' or 'chat'")
    if config.data.on_error not in ("fail", "skip"):
        fail("data.on_error", f"{config.data.on_error!r}: expected 'fail' or 'skip'")
    if config.task in ("sft", "kd", "seqkd", "minillm", "gkd", "distillm") and not config.data.train:
        fail("data.train", "training needs a data file or hub dataset")
    if config.minillm.importance not in ("token", "sequence"):
        fail("minillm.importance", f"{config.minillm.importance!r}: expected 'token' or 'sequence'")
    for key in ("minillm.mix_alpha", "gkd.lmbda", "distillm.initial_sgo_prob", "distillm.max_sgo_prob",
                "distillm.replay_reuse"):
        section, name = key.split(".")
        if not 0.0 <= config[section][name] <= 1.0:
            fail(key, f"{config[section][name]} must be in [0, 1]")
    if config.task == "minillm" and config.minillm.num_rollouts % config.minillm.minibatch_size:
        fail("minillm.num_rollouts", f"{config.minillm.num_rollouts} is not a multiple of minillm.minibatch_size="
             f"{config.minillm.minibatch_size}")
    if config.distillm.divergence not in ("skew_kl", "skew_reverse_kl"):
        fail("distillm.divergence", f"{config.distillm.divergence!r}: expected 'skew_kl' or 'skew_reverse_kl'")
    if config.eval.model not in ("student", "teacher", "both"):
        fail("eval.model", f"{config.eval.model!r}: expected 'student', 'teacher' or 'both'")
    if config.eval.model in ("teacher", "both") and config.task == "eval" and not config.teacher:
        fail("teacher", "eval.model includes the teacher but config.teacher is empty")
    if config.export.select not in ("best", "last"):
        fail("export.select", f"{config.export.select!r}: expected 'best' or 'last'")
    if config.mesh.teacher_rules not in ("auto", "sample", "train"):
        fail("mesh.teacher_rules", f"{config.mesh.teacher_rules!r}: expected 'auto', 'sample' or 'train'")
    sizes = [config.mesh.data, config.mesh.fsdp, config.mesh.tensor]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        fail("mesh", f"sizes {sizes}: each must be >= 1, and at most one may be -1")


@dataclasses.dataclass
class Models:
    tokenizer: object
    student: nnx.Module | None
    teacher: nnx.Module | None
    mesh: jax.sharding.Mesh


def build_mesh(config) -> jax.sharding.Mesh:
    try:
        return sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    except ValueError as e:
        raise ConfigError(f"config.mesh: {e}") from None


def load_models(config, mesh: jax.sharding.Mesh) -> Models:
    """The tokenizer, the teacher (placed by `teacher_rules`) and the student (training rules), each created or
    loaded straight into its shardings. Teacher and student must share a tokenizer; vocabularies that
    differ only by padding are fine."""
    tokenizer = _load_tokenizer(config)
    dtype, compute = config.dtype, config.compute_dtype or config.dtype
    teacher = _load_model(config.teacher, tokenizer, config, mesh, teacher_rules(config), seed=config.seed + 1) \
        if config.teacher else None
    if config.student_layers:
        student = select_layers(teacher, list(config.student_layers))
        student = sharding.shard_model(_cast(student, dtype, compute, config.remat), mesh, sharding.TRAIN_RULES)
    elif config.student:
        student = _load_model(config.student, tokenizer, config, mesh, sharding.TRAIN_RULES, seed=config.seed)
        if teacher is not None:
            check_same_tokenizer(config)
    else:
        student = None
    for name, model in (("teacher", teacher), ("student", student)):
        if model is not None and model.config.num_real_tokens > len(tokenizer):
            logger.info("%s vocabulary %d > tokenizer %d", name, model.config.num_real_tokens, len(tokenizer))
    return Models(tokenizer=tokenizer, student=student, teacher=teacher, mesh=mesh)


TEACHER_GENERATES = ("minillm", "seqkd", "generate", "eval")


def teacher_rules(config) -> sharding.Rules:
    """The teacher's placement: sampling rules (weights whole along fsdp) where it generates, training
    rules (fsdp-sharded, the least memory) where it only scores teacher-forced batches."""
    choice = config.mesh.teacher_rules
    if choice == "auto":
        choice = "sample" if config.task in TEACHER_GENERATES else "train"
    return sharding.SAMPLE_RULES if choice == "sample" else sharding.TRAIN_RULES


def _load_tokenizer(config):
    if config.tokenizer == "byte":
        return byte_tokenizer()
    source = config.tokenizer or config.student or config.teacher
    if source.startswith("random:"):
        raise ConfigError("config.tokenizer: random models need a tokenizer (e.g. --config.tokenizer=byte)")
    return load_tokenizer(source)


def _load_model(spec: str, tokenizer, config, mesh, rules, seed: int):
    if spec.startswith("random:"):
        model_config = parse_random_spec(spec, len(tokenizer)).replace(
            param_dtype=config.dtype, dtype=config.compute_dtype or config.dtype, remat=config.remat)
        return sharding.create_model(lambda: Transformer(model_config, rngs=nnx.Rngs(seed)), mesh, rules)
    return load_pretrained(spec, dtype=config.dtype, compute_dtype=config.compute_dtype or None, mesh=mesh,
                           rules=rules, remat=config.remat, real_vocab_size=len(tokenizer))


def _cast(model, dtype: str, compute: str, remat: str):
    """The same weights under another config (dtype, remat): select_layers and random models start fp32."""
    graphdef, state = nnx.split(model)
    config = model.config.replace(param_dtype=dtype, dtype=compute, remat=remat)
    if config == model.config:
        return model
    import jax.numpy as jnp

    state = jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)), state)
    skeleton = nnx.eval_shape(lambda: type(model)(config, rngs=nnx.Rngs(0)))
    nnx.update(skeleton, state)
    return skeleton


def check_same_tokenizer(config) -> None:
    """Refuse a teacher and a student whose tokenizers map text to different ids."""
    if config.tokenizer or config.teacher.startswith("random:") or config.student.startswith("random:"):
        return
    teacher_vocab = load_tokenizer(config.teacher).get_vocab()
    student_vocab = load_tokenizer(config.student).get_vocab()
    if teacher_vocab != student_vocab:
        differ = sorted(set(teacher_vocab.items()) ^ set(student_vocab.items()))[:3]
        raise ConfigError(f"config.teacher ({config.teacher}) and config.student ({config.student}) have different "
                          f"tokenizers ({len(teacher_vocab)} vs {len(student_vocab)} entries; e.g. {differ}); "
                          "MiniLLM and KD need one shared vocabulary")


def sampling_config(config, tokenizer, *, max_new_tokens: int | None = None, no_repeat_ngram_size: int = 0
                    ) -> SamplingConfig:
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    longest = config.data.max_prompt_length
    buckets = tuple(b for b in (32, 64, 128, 256, 512, 1024, 2048) if b < longest) + (longest,)
    return SamplingConfig(max_new_tokens=max_new_tokens or config.sampling.max_new_tokens,
                          temperature=config.sampling.temperature, top_k=config.sampling.top_k,
                          top_p=config.sampling.top_p, eos_token_id=eos, pad_token_id=pad,
                          no_repeat_ngram_size=no_repeat_ngram_size, prompt_buckets=buckets)


def workdir_path(workdir: str) -> pathlib.Path:
    if "://" in workdir:
        raise ConfigError(f"--workdir {workdir}: a URL is not a directory here; mount the bucket (e.g. gcsfuse) at "
                          "the same path on every host and give that path")
    path = pathlib.Path(workdir).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path
