"""From a validated `config.RunConfig` to the things a task runs on: the mesh, the tokenizer, teacher and
student (each created or loaded straight into its shardings), and the sampling settings."""

from __future__ import annotations

import dataclasses
import logging
import pathlib

import jax
from flax import nnx

from minillm_jax import sharding
from minillm_jax.config import TEACHER_GENERATES, ConfigError, RunConfig
from minillm_jax.models import Transformer, load_pretrained, load_tokenizer, select_layers
from minillm_jax.models.tiny import byte_tokenizer, parse_random_spec
from minillm_jax.sampling import SamplingConfig

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Models:
    tokenizer: object
    student: nnx.Module | None
    teacher: nnx.Module | None
    mesh: jax.sharding.Mesh


def build_mesh(config: RunConfig) -> jax.sharding.Mesh:
    try:
        return sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    except ValueError as e:
        raise ConfigError(f"config.mesh: {e}") from None


def load_models(config: RunConfig, mesh: jax.sharding.Mesh, tokenizer=None) -> Models:
    """The tokenizer, the teacher (placed by `teacher_rules`) and the student (training rules), each created or
    loaded straight into its shardings. Teacher and student must share a tokenizer; vocabularies that
    differ only by padding are fine. Every model computes attention as `config.attention` says and loops over
    its layers or not as `config.scan_layers` does."""
    if config.attention == "cudnn" and jax.default_backend() not in ("gpu", "cpu"):
        raise ConfigError(f"--config.attention=cudnn: cuDNN runs on NVIDIA GPUs, this run's backend is "
                          f"{jax.default_backend()} (use 'xla')")
    tokenizer = tokenizer if tokenizer is not None else load_run_tokenizer(config)
    check_same_tokenizer(config, tokenizer)
    dtype, compute = config.dtype, config.compute_dtype
    teacher = _load_model(config.teacher, tokenizer, config, mesh, teacher_rules(config), seed=config.seed + 1) \
        if config.teacher else None
    if config.student_layers:
        name, source = "teacher", teacher
        if config.student_layers_source:  # loaded for the cut only, then dropped
            name = "student_layers_source"
            source = _load_model(config.student_layers_source, tokenizer, config, mesh, sharding.TRAIN_RULES,
                                 seed=config.seed)
        if max(config.student_layers) >= source.config.num_layers:
            raise ConfigError(f"--config.student_layers: {config.student_layers} names a layer beyond the {name}'s "
                              f"{source.config.num_layers} (indices 0..{source.config.num_layers - 1})")
        student = select_layers(source, list(config.student_layers))
        del source
        student = sharding.shard_model(_cast(student, dtype, compute, config.remat), mesh, sharding.TRAIN_RULES)
    elif config.student:
        student = _load_model(config.student, tokenizer, config, mesh, sharding.TRAIN_RULES, seed=config.seed)
    else:
        student = None
    for name, model in (("teacher", teacher), ("student", student)):
        if model is None:
            continue
        # static fields, read where traced
        model.config = model.config.replace(attention=config.attention, scan_layers=config.scan_layers)
        if model.config.num_real_tokens > len(tokenizer):
            logger.info("%s vocabulary %d > tokenizer %d", name, model.config.num_real_tokens, len(tokenizer))
    return Models(tokenizer=tokenizer, student=student, teacher=teacher, mesh=mesh)


# CPU feature flags (x86 `flags`, Arm `Features` in /proc/cpuinfo) that give XLA:CPU fast bfloat16 matmuls
_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16", "bf16"})


def cpu_compute_note(compute_dtype: str, cpuinfo: str | None = None) -> str | None:
    """A start-up note when a run computes in bfloat16 on a CPU whose flags show no bfloat16 matrix units:
    the demo took about half float32's time with AMX and 0.6x with AVX512-BF16 alone (bench/RESULTS.md); without
    either XLA:CPU converts to float32 around every bf16 op (not measured on such a CPU). None when the compute
    dtype, the backend or the flags give no reason (or /proc/cpuinfo cannot be read)."""
    if compute_dtype != "bfloat16" or jax.default_backend() != "cpu":
        return None
    if cpuinfo is None:
        try:
            cpuinfo = pathlib.Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    if not flags or flags & _BF16_FLAGS:
        return None
    return ("note: compute_dtype=bfloat16 on a CPU without bfloat16 matrix units (/proc/cpuinfo shows none of "
            f"{', '.join(sorted(_BF16_FLAGS))}): --config.compute_dtype=float32 is likely faster here")


def teacher_rules(config: RunConfig) -> sharding.Rules:
    """The teacher's placement: sampling rules (weights whole along fsdp) where it generates, training
    rules (fsdp-sharded, the least memory) where it only scores teacher-forced batches."""
    choice = config.mesh.teacher_rules
    if choice == "auto":
        choice = "sample" if config.task in TEACHER_GENERATES else "train"
    return sharding.SAMPLE_RULES if choice == "sample" else sharding.TRAIN_RULES


def _tokenizer_source(config: RunConfig) -> str:
    """Where the run's tokenizer comes from (unless it is the built-in "byte" one)."""
    return config.tokenizer or config.student or config.teacher or config.student_layers_source


def load_run_tokenizer(config: RunConfig):
    """The tokenizer of the run: `config.tokenizer` ("byte": the built-in one), else the student's, else the
    teacher's, else that of the model the student's layers are cut from."""
    if config.tokenizer == "byte":
        return byte_tokenizer()
    source = _tokenizer_source(config)
    if source.startswith("random:"):
        raise ConfigError("--config.tokenizer: random models need a tokenizer (e.g. --config.tokenizer=byte)")
    return load_tokenizer(source)


def _load_model(spec: str, tokenizer, config, mesh, rules, seed: int):
    if spec.startswith("random:"):
        model_config = parse_random_spec(spec, len(tokenizer)).replace(
            param_dtype=config.dtype, dtype=config.compute_dtype or config.dtype, remat=config.remat)
        return sharding.create_model(lambda: Transformer(model_config, rngs=nnx.Rngs(seed)), mesh, rules)
    return load_pretrained(spec, dtype=config.dtype, compute_dtype=config.compute_dtype, mesh=mesh,
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


def check_same_tokenizer(config: RunConfig, tokenizer) -> None:
    """Refuse models whose own tokenizers map text to other ids than the run's tokenizer (also when
    `config.tokenizer` overrides them: a model trained on other ids would learn nonsense)."""
    run_source = _tokenizer_source(config)
    for key in ("teacher", "student", "student_layers_source"):
        source = getattr(config, key)
        if not source or source.startswith("random:") or source == run_source:
            continue
        own = load_tokenizer(source).get_vocab()
        if own != tokenizer.get_vocab():
            differ = sorted(set(own.items()) ^ set(tokenizer.get_vocab().items()))[:3]
            run = f"--config.tokenizer={config.tokenizer}" if config.tokenizer else "the other model"
            raise ConfigError(f"--config.{key} ({source}) has a different tokenizer from the run's ({run}: "
                              f"{len(own)} vs {len(tokenizer.get_vocab())} entries; e.g. {differ}); teacher, student "
                              "and data must share one vocabulary")


def sampling_config(config: RunConfig, tokenizer, prompt_buckets=None, **changes) -> SamplingConfig:
    """The run's sampling settings as the sampler's static config; prompts padded to `prompt_buckets`
    (default: a few up to data.max_prompt_length)."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    longest = config.data.max_prompt_length
    buckets = prompt_buckets or tuple(b for b in (32, 64, 128, 256, 512, 1024, 2048) if b < longest) + (longest,)
    s = config.sampling
    return SamplingConfig(**{**dict(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
                                    top_p=s.top_p, cache_segments=s.cache_segments, split_layers=s.split_layers,
                                    kv_cache_dtype=s.kv_cache_dtype,
                                    eos_token_id=eos, pad_token_id=pad,
                                    prompt_buckets=tuple(buckets)), **changes})


def workdir_path(workdir: str) -> pathlib.Path:
    if "://" in workdir:
        raise ConfigError(f"--workdir {workdir}: a URL is not a directory here; mount the bucket (e.g. gcsfuse) at "
                          "the same path on every host and give that path")
    path = pathlib.Path(workdir).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path
