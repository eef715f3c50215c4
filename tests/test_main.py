"""The main job end to end on the `tiny` preset of configs/demo.py: every task through `loop.run`
in-process (seconds each), the CLI itself in a subprocess, and each config-validation error."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from minillm_jax import experiment, loop

ROOT = pathlib.Path(__file__).resolve().parents[1]


def config_from(file: str, preset: str | None = None, **overrides):
    spec = importlib.util.spec_from_file_location("config_under_test", ROOT / "configs" / file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(preset)
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for name in parents:
            node = node[name]
        node[leaf] = value
    return config


def tiny(**overrides):
    return config_from("demo.py", "tiny", **overrides)


def metrics_rows(workdir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("task", ["sft", "kd", "seqkd", "minillm", "gkd", "distillm"])
def test_every_training_task_runs_logs_checkpoints_and_exports(task, tmp_path):
    config = tiny(task=task)
    experiment.validate(config)
    result = loop.run(config, str(tmp_path))
    rows = metrics_rows(tmp_path)
    losses = [r["loss"] for r in rows if r.get("loss") is not None]
    assert len(losses) == config.steps and np.isfinite(losses).all()
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert {"valid/rouge_l", "valid/reverse_kl", "valid/loss"} <= set(result)
    assert any("sample" in r for r in rows)
    assert (tmp_path / "checkpoints").is_dir() and (tmp_path / "tensorboard").is_dir()
    assert (tmp_path / "hf" / "config.json").exists() and (tmp_path / "summary.md").exists()
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(r.get("tokens_per_second", 0) > 0 for r in rows)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["task"] == task


def test_exported_student_loads_in_transformers_with_our_logits(tmp_path):
    import torch
    import transformers

    from minillm_jax.models import load_pretrained

    config = tiny(task="sft", **{"export.select": "last"})
    loop.run(config, str(tmp_path))
    ours = load_pretrained(tmp_path / "hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = tokenizer("Name three colours.", return_tensors="np")["input_ids"].astype(np.int32)
    with torch.no_grad():
        reference = theirs(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours(ids, np.ones_like(ids))), reference, atol=1e-4)
    # and it generates
    out = theirs.generate(torch.from_numpy(ids.astype(np.int64)), max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 4


def test_generate_and_eval_tasks(tmp_path):
    result = loop.run(tiny(task="generate"), str(tmp_path / "gen"))
    rows = [json.loads(line) for line in (tmp_path / "gen" / "generations.jsonl").read_text().splitlines()]
    assert result["count"] == len(rows) == 4 and all("generated" in r for r in rows)

    results = loop.run(tiny(task="eval", **{"eval.model": "both"}), str(tmp_path / "eval"))
    assert set(results) == {"teacher", "student"}
    assert (tmp_path / "eval" / "results.json").exists()
    assert list((tmp_path / "eval").glob("*.md"))


def test_resume_continues_from_the_latest_checkpoint(tmp_path):
    loop.run(tiny(task="sft", steps=2, eval_every=0), str(tmp_path))
    loop.run(tiny(task="sft", steps=4, eval_every=0), str(tmp_path))
    steps = [r["step"] for r in metrics_rows(tmp_path) if "loss" in r]
    assert steps == [1, 2, 3, 4]


@pytest.mark.parametrize("task,overrides", [("gkd", {}), ("distillm", {"distillm.initial_sgo_prob": 0.8})])
def test_resume_is_exact_for_tasks_with_host_side_coins(task, overrides, tmp_path):
    """GKD flips a coin per step (gold or the student's own answers); DistiLLM also keeps a replay buffer of
    student answers. Both are saved with the checkpoint, so a resumed run continues exactly."""
    common = dict(task=task, eval_every=0, sample_every=0, checkpoint_every=2, **{"export.enabled": False},
                  **overrides)
    loop.run(tiny(steps=4, **common), str(tmp_path / "whole"))
    loop.run(tiny(steps=2, **common), str(tmp_path / "split"))
    loop.run(tiny(steps=4, **common), str(tmp_path / "split"))
    whole = {r["step"]: r for r in metrics_rows(tmp_path / "whole") if "loss" in r}
    split = {r["step"]: r for r in metrics_rows(tmp_path / "split") if "loss" in r}
    sources = ("on_policy",) if task == "gkd" else ("student_generated",)
    assert {whole[s][sources[0]] for s in whole} == {0.0, 1.0}, whole  # both kinds of batch occur
    for step in (3, 4):
        for key in ("loss", "grad_norm", *sources):
            assert split[step][key] == whole[step][key], (step, key, split[step], whole[step])


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "minillm_jax.main", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})


def test_cli_runs_the_tiny_preset(tmp_path):
    done = run_cli("--config", "configs/demo.py:tiny", "--workdir", str(tmp_path), "--config.task=sft",
                   "--config.steps=2", "--config.export.enabled=false")
    assert done.returncode == 0, done.stderr[-3000:]
    assert len([r for r in metrics_rows(tmp_path) if "loss" in r]) == 2


@pytest.mark.parametrize("flag, message", [
    ("--config.no_such_key=1", "no_such_key"),
    ("--config.steps=many", "steps"),
    ("--config.teacher=", "config.teacher"),
    ("--config.task=distil", "config.task"),
])
def test_cli_rejects_bad_config_with_a_clear_message(flag, message, tmp_path):
    done = run_cli("--config", "configs/demo.py:tiny", "--workdir", str(tmp_path), "--config.task=minillm", flag)
    assert done.returncode != 0
    assert message in done.stderr, done.stderr[-2000:]


def test_different_tokenizers_are_refused(tmp_path, smollm2_gguf):
    from minillm_jax.models import load_tokenizer, save_pretrained
    from minillm_jax.models.tiny import byte_tokenizer, random_model

    smol = load_tokenizer(smollm2_gguf)
    byte = byte_tokenizer()
    save_pretrained(random_model("random:llama:layers=1,hidden=32", len(smol)), tmp_path / "a", tokenizer=smol)
    save_pretrained(random_model("random:llama:layers=1,hidden=32", len(byte)), tmp_path / "b", tokenizer=byte)
    config = tiny(task="kd", tokenizer="", teacher=str(tmp_path / "a"), student=str(tmp_path / "b"))
    with pytest.raises(experiment.ConfigError, match="different tokenizers"):
        loop.run(config, str(tmp_path / "run"))


@pytest.mark.parametrize("overrides, key", [
    (dict(task="kd", teacher=""), "config.teacher"),
    (dict(student="", student_layers=()), "config.student"),
    (dict(batch_size=0), "config.batch_size"),
    (dict(**{"data.template": "vicuna"}), "config.data.template"),
    (dict(**{"minillm.num_rollouts": 6}), "config.minillm.num_rollouts"),
    (dict(**{"mesh.data": -1, "mesh.fsdp": -1}), "config.mesh"),
    (dict(**{"distillm.initial_sgo_prob": 1.5}), "config.distillm.initial_sgo_prob"),
    (dict(**{"gkd.lmbda": -0.1}), "config.gkd.lmbda"),
])
def test_validation_names_the_key(overrides, key):
    with pytest.raises(experiment.ConfigError, match=key.replace(".", r"\.")):
        experiment.validate(tiny(**overrides))


@pytest.mark.parametrize("file, preset", [("gpt2.py", "minillm-120m"), ("gpt2.py", "sft-340m"),
                                          ("opt.py", "kd-1.3b"), ("llama.py", "minillm-7b"),
                                          ("qwen.py", "gkd-0.5b"), ("demo.py", None)])
def test_paper_configs_are_valid(file, preset):
    experiment.validate(config_from(file, preset))


def test_unknown_preset_is_refused():
    with pytest.raises(ValueError, match="preset"):
        config_from("gpt2.py", "minillm-9b")


def test_demo_config_shortened_on_the_real_model(tmp_path, smollm2_gguf):
    """configs/demo.py as shipped, through the CLI on one CPU device, cut to 2 steps and 4 held-out prompts:
    SmolLM2 teacher, a student from its layers, the project's own data, before/after summary and an export
    transformers loads. (A subprocess: in this 8-fake-device process both models would be replicated 8x.)"""
    import transformers

    overrides = dict(teacher=str(smollm2_gguf), steps=2, eval_every=2, checkpoint_every=2, batch_size=4,
                     **{"data.holdout": 4, "sampling.max_new_tokens": 8, "minillm.num_rollouts": 8,
                        "minillm.minibatch_size": 4, "minillm.ppo_epochs": 1, "data.pretrain_length": 32})
    done = run_cli("--config", "configs/demo.py", "--workdir", str(tmp_path),
                   *[f"--config.{key}={value}" for key, value in overrides.items()])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "before" in done.stdout and "student after" in done.stdout
    rows = metrics_rows(tmp_path)
    assert np.isfinite([r["valid/reverse_kl"] for r in rows if "valid/reverse_kl" in r]).all()
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert model.config.num_hidden_layers == len(config_from("demo.py").student_layers)


@pytest.mark.parametrize("task", ["sft", "kd"])
def test_sharded_run_matches_the_replicated_run(task, tmp_path):
    """Batch rows split over (data, fsdp) and weights over fsdp/tensor give the losses of a run whose batch
    is replicated on every device (mesh data=8 with batch 4 cannot split it)."""
    common = dict(task=task, eval_every=0, sample_every=0, **{"export.enabled": False})
    loop.run(tiny(**common), str(tmp_path / "replicated"))
    loop.run(tiny(**common, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}), str(tmp_path / "sharded"))
    reference = [r["loss"] for r in metrics_rows(tmp_path / "replicated") if "loss" in r]
    sharded = [r["loss"] for r in metrics_rows(tmp_path / "sharded") if "loss" in r]
    np.testing.assert_allclose(sharded, reference, rtol=2e-5)


def test_batches_are_split_over_the_batch_axes():
    from types import SimpleNamespace

    from jax.sharding import PartitionSpec as P

    from minillm_jax import sharding, tasks

    batch = {"tokens": np.zeros((4, 64), np.int32)}
    placed = tasks.Context.place(SimpleNamespace(mesh=sharding.make_mesh(2, 2, 2)), batch)
    assert placed["tokens"].sharding.spec == P(("data", "fsdp"), None)
    kept = tasks.Context.place(SimpleNamespace(mesh=sharding.make_mesh(8, 1, 1)), batch)
    assert kept["tokens"].is_fully_replicated  # 4 rows cannot split 8 ways


def test_summary_shows_the_question_for_both_record_layouts():
    from minillm_jax.data import FieldMap

    record = {"instruction": "Sum these.", "input": "1, 2", "output": "3"}
    assert loop.shown_prompt(record, FieldMap()) == "Sum these.\n\n1, 2"
    assert loop.shown_prompt({"instruction": "Hi?", "input": "", "output": "x"}, FieldMap()) == "Hi?"
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
                         {"role": "assistant", "content": "Blue."}]}
    assert loop.shown_prompt(chat, FieldMap(messages="messages")) == "Name a colour."
