"""The one config path: every bad value is one ConfigError naming the --config. key, raised before any data
or model is read; the presets are valid and derive their numbers from the paper's recipe."""

from __future__ import annotations

import math
import pathlib
import re

import pytest
from test_main import config_from, tiny

from minillm_jax import loop
from minillm_jax.config import ConfigError, RunConfig


@pytest.mark.parametrize("overrides, key", [
    (dict(task="kd", teacher=""), "--config.teacher"),
    (dict(student="", student_layers=()), "--config.student"),
    (dict(student_layers=(0, 1)), "--config.student_layers"),
    (dict(batch_size=0), "--config.batch_size"),
    (dict(accumulate_steps=3), "--config.accumulate_steps"),
    (dict(keep_checkpoints=0), "--config.keep_checkpoints"),
    (dict(checkpoint_every=-1), "--config.checkpoint_every"),
    (dict(dtype="fp8"), "--config.dtype"),
    (dict(attention="flash"), "--config.attention"),
    (dict(best_metric="loss"), "--config.best_metric"),
    (dict(best_mode="lowest"), "--config.best_mode"),
    (dict(hang_timeout_s=-1), "--config.hang_timeout_s"),
    (dict(hang_timeout_s=float("nan")), "--config.hang_timeout_s"),
    (dict(compilation_cache_dir=__file__), "--config.compilation_cache_dir"),  # a file, not a folder
    (dict(**{"optimizer.learning_rate": float("nan")}), "--config.optimizer.learning_rate"),
    (dict(**{"optimizer.learning_rate": 0.0}), "--config.optimizer.learning_rate"),
    (dict(**{"sampling.temperature": 0.0}), "--config.sampling.temperature"),
    (dict(**{"sampling.top_p": 1.5}), "--config.sampling.top_p"),
    (dict(**{"sampling.top_k": 5}), "--config.sampling.top_k"),  # MiniLLM refuses a truncated distribution
    (dict(**{"sampling.cache_segments": 0}), "--config.sampling.cache_segments"),
    (dict(**{"data.template": "vicuna"}), "--config.data.template"),
    (dict(**{"data.max_length": 100}), "--config.data.max_length"),
    (dict(**{"minillm.num_rollouts": 6}), "--config.minillm.num_rollouts"),
    (dict(**{"minillm.whiten": "batch"}), "--config.minillm.whiten"),
    (dict(**{"mesh.data": -1, "mesh.fsdp": -1}), "--config.mesh"),
    (dict(task="distillm", **{"distillm.initial_sgo_prob": 1.5}), "--config.distillm.initial_sgo_prob"),
    (dict(task="gkd", **{"gkd.lmbda": -0.1}), "--config.gkd.lmbda"),
    (dict(task="eval", **{"eval.sets.dolly": ""}), "--config.eval.sets"),
])
def test_a_bad_value_names_its_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        tiny(**overrides)


def test_the_temperature_hint_names_a_real_key():
    with pytest.raises(ConfigError) as error:
        tiny(**{"sampling.temperature": -1.0})
    assert "--config.sampling.temperature" in str(error.value)


def test_data_checks_come_before_any_model_loads(tmp_path):
    """A batch larger than the data is reported by its key although the teacher does not even exist: the
    check ran before any model was opened."""
    config = tiny(task="sft", batch_size=64, teacher=str(tmp_path / "no-such-teacher"), tokenizer="byte")
    with pytest.raises(ConfigError, match=r"--config\.batch_size: 64 rows"):
        loop.run(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "config.json").exists()  # nothing written either


def test_student_layers_cut_from_another_model_than_the_teacher(tmp_path):
    """`student_layers_source`: the student keeps those layers of that model (a tuned teacher's base, say);
    the teacher is loaded as the teacher and nothing of it reaches the student."""
    import numpy as np
    from flax import nnx

    from minillm_jax import experiment
    from minillm_jax.models.tiny import random_model

    base_spec = "random:llama:layers=3,hidden=64,heads=4,kv_heads=2,mlp=128"
    config = tiny(task="kd", student="", student_layers=(2, 0), student_layers_source=base_spec, seed=5)
    models = experiment.load_models(config, experiment.build_mesh(config))
    vocab = len(models.tokenizer)
    base = random_model(base_spec, vocab, seed=5)  # what the run's loader builds for that spec and seed
    def layers(model):  # {name: [layers, ...] array} of the stacked layer parameters
        return {path[-1]: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(model.layers))}

    ours, want, teacher = layers(models.student), layers(base), layers(models.teacher)
    assert set(ours) == set(want) and "q_proj" in ours
    for name in ours:
        np.testing.assert_allclose(ours[name], want[name][np.array([2, 0])], rtol=1e-5, atol=1e-7)  # jit vs eager init
    assert not np.array_equal(ours["q_proj"][1], teacher["q_proj"][0])  # the teacher's layer 0 differs
    assert models.student.config.num_layers == 2 and models.teacher.config.num_layers == 2
    with pytest.raises(ConfigError, match=r"--config\.student_layers: \(0, 3\) names a layer beyond the "
                                          r"student_layers_source's 3"):
        experiment.load_models(tiny(task="kd", student="", student_layers=(0, 3), student_layers_source=base_spec),
                               experiment.build_mesh(config))
    with pytest.raises(ConfigError, match=r"--config\.student_layers_source: .* is set but --config\.student_layers "
                                          r"is empty"):
        tiny(student_layers_source=base_spec)


def test_the_attention_setting_reaches_every_model(monkeypatch):
    """--config.attention is the ModelConfig.attention of the teacher and the student; "cudnn" is refused
    by name where there is no NVIDIA GPU to run it (CPU runs take their explicit attention whatever it says).
    --config.scan_layers reaches both models the same way."""
    import jax

    from minillm_jax import experiment

    config = tiny(task="kd", attention="cudnn")
    models = experiment.load_models(config, experiment.build_mesh(config))
    assert models.student.config.attention == "cudnn" and models.teacher.config.attention == "cudnn"
    assert tiny(task="kd").attention == "xla"
    for scan in (False, True):
        layered = tiny(task="kd", scan_layers=scan)
        models = experiment.load_models(layered, experiment.build_mesh(layered))
        assert models.student.config.scan_layers is scan and models.teacher.config.scan_layers is scan
    with pytest.raises(ConfigError, match=r"--config\.scan_layers: 'no': expected True or False"):
        RunConfig.from_dict({**config.raw, "scan_layers": "no"})  # a hand-edited config.json, say
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    with pytest.raises(ConfigError, match=r"--config\.attention=cudnn: cuDNN runs on NVIDIA GPUs, this run's "
                                          r"backend is tpu"):
        experiment.load_models(config, experiment.build_mesh(config))


def test_the_cache_segments_split_layers_and_kv_cache_settings_reach_the_sampler():
    """--config.sampling.cache_segments, .split_layers and .kv_cache_dtype are the SamplingConfig fields of the
    run's sampler (1, False and "auto" unless set)."""
    from minillm_jax import experiment

    changed = {"sampling.cache_segments": 3, "sampling.split_layers": True, "sampling.kv_cache_dtype": "int8"}
    for config, expected in ((tiny(**changed), (3, True, "int8")), (tiny(), (1, False, "auto"))):
        tokenizer = experiment.load_run_tokenizer(config)
        sampler = experiment.sampling_config(config, tokenizer)
        assert (sampler.cache_segments, sampler.split_layers, sampler.kv_cache_dtype) == expected
    with pytest.raises(ConfigError, match=r"--config\.sampling\.split_layers: 1: expected True or False"):
        RunConfig.from_dict({**config.raw, "sampling": {**config.raw["sampling"], "split_layers": 1}})
    with pytest.raises(ConfigError, match=r"--config\.sampling\.kv_cache_dtype: 'fp8' is not one of auto, int8"):
        RunConfig.from_dict({**config.raw, "sampling": {**config.raw["sampling"], "kv_cache_dtype": "fp8"}})


def test_student_layers_beyond_the_teacher_are_named(tmp_path):
    config = tiny(task="sft", student="", student_layers=(0, 7))
    with pytest.raises(ConfigError, match=r"--config\.student_layers: \(0, 7\) names a layer beyond"):
        loop.run(config, str(tmp_path))


def test_tokenizers_are_compared_even_when_config_tokenizer_is_set(tmp_path, smollm2_gguf):
    """A SmolLM2 teacher trained against the byte tokenizer's ids would learn nonsense: refused."""
    from minillm_jax.models import load_tokenizer, save_pretrained
    from minillm_jax.models.tiny import random_model

    smol = load_tokenizer(smollm2_gguf)
    save_pretrained(random_model("random:llama:layers=1,hidden=32", len(smol)), tmp_path / "a", tokenizer=smol)
    config = tiny(task="kd", tokenizer="byte", teacher=str(tmp_path / "a"))
    with pytest.raises(ConfigError, match="--config.teacher .* has a different tokenizer"):
        loop.run(config, str(tmp_path / "run"))


PRESETS = [("gpt2.py", f"{m}-{s}") for m in ("sft_init", "sft", "kd", "seqkd", "minillm") for s in ("120m", "340m")] + [
    ("gpt2.py", "teacher_sft-1.5b"), ("opt.py", "kd-1.3b"), ("opt.py", "sft_init-1.3b"), ("opt.py", "teacher_sft-13b"),
    ("llama.py", "minillm-7b"), ("qwen.py", "gkd-0.5b"), ("qwen.py", "distillm-1.5b"), ("demo.py", None)]


@pytest.mark.parametrize("file, preset", PRESETS)
def test_presets_are_valid(file, preset):
    RunConfig.from_dict(config_from(file, preset))


def test_paper_presets_follow_the_recipe():
    from configs.common import DOLLY_TRAIN

    init = RunConfig.from_dict(config_from("gpt2.py", "sft_init-120m"))
    assert (init.task, init.best_metric, init.best_mode) == ("sft", "valid/loss", "min")
    baseline = RunConfig.from_dict(config_from("gpt2.py", "sft-120m"))
    assert (baseline.best_metric, baseline.best_mode) == ("valid/rouge_l", "max")
    assert baseline.steps == math.ceil(20 * DOLLY_TRAIN / 32)
    minillm = RunConfig.from_dict(config_from("gpt2.py", "minillm-120m"))
    assert minillm.student == "runs/gpt2-120m-sft_init/hf"  # Phase 2 starts from the lowest-loss SFT student
    assert minillm.batch_size == 64 and minillm.method.num_rollouts == 256 and minillm.method.ppo_epochs == 4
    assert minillm.data.train.endswith("data/dolly/train_minillm_exact.jsonl")
    teacher = RunConfig.from_dict(config_from("gpt2.py", "teacher_sft-1.5b"))
    assert teacher.steps == math.ceil(10 * DOLLY_TRAIN / 32)  # 10 epochs for teachers over 1.3B
    for config in (init, minillm, teacher):
        assert config.data.add_special_tokens is False  # the reference encodes prompts without BOS


def test_unknown_preset_is_refused():
    with pytest.raises(ValueError, match="preset"):
        config_from("gpt2.py", "minillm-9b")


# /proc/cpuinfo excerpts: the AMD Zen 4 development machine (avx512_bf16, no AMX), an AVX2-only x86 CPU, an Arm
# Neoverse V1 (bf16 in Features) and an Arm Cortex-A72 (none)
_ZEN4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\nprocessor\t: 1\n"
_AVX2 = "processor\t: 0\nmodel name\t: Intel(R) Core(TM) i7-8700\nflags\t\t: fpu sse2 avx avx2 fma\n"
_NEOVERSE_V1 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes sve asimdbf16 bf16 i8mm\n"
_A72 = "processor\t: 0\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"


def test_cpu_compute_note_only_for_bfloat16_on_a_cpu_without_bf16_units():
    from minillm_jax.experiment import cpu_compute_note

    assert cpu_compute_note("bfloat16", _ZEN4) is None
    assert cpu_compute_note("bfloat16", _NEOVERSE_V1) is None
    assert cpu_compute_note("float32", _AVX2) is None  # nothing to suggest
    assert cpu_compute_note("bfloat16", "") is None  # flags unknown: no claim
    for cpuinfo in (_AVX2, _A72):
        note = cpu_compute_note("bfloat16", cpuinfo)
        assert note and "--config.compute_dtype=float32" in note and "avx512_bf16" in note
    # this machine's own /proc/cpuinfo, read by the function, against a word search of the same file
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if cpuinfo.exists():
        has_units = re.search(r"^(flags|Features)\s*:.*\b(amx_bf16|avx512_bf16|bf16)\b", cpuinfo.read_text(), re.M)
        assert (cpu_compute_note("bfloat16") is None) == bool(has_units)
