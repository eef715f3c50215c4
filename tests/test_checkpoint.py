"""Orbax checkpoints of the train state (round trip, retention, resharding, crash safety) and the export of
a run's student to Hugging Face, checked against transformers + torch."""

import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx
from hf_reference import build_hf_model, hf_logits, left_padded_batch, max_diff_on_real
from tokenizers import Tokenizer, models, pre_tokenizers

from minillm_jax import checkpoint, sharding
from minillm_jax.checkpoint import Checkpointer, abstract_train_state, export_hf
from minillm_jax.models import Transformer, load_pretrained
from minillm_jax.models.hf import save_config
from minillm_jax.trainers.common import TrainState, create_train_state, make_optimizer

REPO = pathlib.Path(__file__).resolve().parents[1]
VOCAB = 96


def _batch(seed: int) -> dict:
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, VOCAB, size=(4, 10)).astype(np.int32)
    loss_mask = np.zeros_like(tokens)
    loss_mask[:, 4:] = 1
    return {"tokens": jnp.asarray(tokens), "attention_mask": jnp.ones_like(tokens), "loss_mask": jnp.asarray(loss_mask)}


def _copy(tree):
    """A detached copy: train steps donate their input state."""
    return jax.tree.map(jnp.copy, tree)


def _assert_trees_identical(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(actual)[0], jax.tree.leaves(expected)):
        assert a.dtype == b.dtype and a.shape == b.shape, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


def _sft_step(graphdef, tx):
    """A plain next-token cross-entropy step (the trainers' own steps are tested elsewhere)."""

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state, batch):
        def loss_fn(params):
            logits = nnx.merge(graphdef, params)(batch["tokens"], batch["attention_mask"])[:, :-1]
            nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["tokens"][:, 1:, None], -1)[..., 0]
            mask = batch["loss_mask"][:, 1:]
            return (nll * mask).sum() / mask.sum()

        grads = jax.grad(loss_fn)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                             opt_state=opt_state), None

    return step


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny llama imported from transformers and trained for 3 SFT steps; snapshots after steps 2 and 3."""
    hf_dir = tmp_path_factory.mktemp("hf")
    build_hf_model("llama_gqa").save_pretrained(hf_dir)
    model = load_pretrained(hf_dir)
    tx, _ = make_optimizer(learning_rate=1e-2)
    graphdef, state = create_train_state(model, tx)
    initial_params = _copy(state.params)
    train_step = _sft_step(graphdef, tx)
    snapshots = {}
    for step in range(3):
        state, _ = train_step(state, _batch(step))
        snapshots[step + 1] = _copy(state)
    return dict(hf_dir=hf_dir, config=model.config, graphdef=graphdef, tx=tx, train_step=train_step,
                initial_params=initial_params, snapshots=snapshots)


def _abstract_student(config):
    return nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))


def test_restore_is_bit_identical_and_training_continues_the_same(run, tmp_path):
    snapshot = run["snapshots"][3]
    live = _copy(snapshot)
    meta = {"step": 3, "data": {"epoch": 0, "position": 12}, "rng": jax.random.key_data(jax.random.key(7))}
    checkpoints = Checkpointer(tmp_path / "ckpt")
    assert checkpoints.save(3, live, meta)
    continued, _ = run["train_step"](live, _batch(10))  # `live` is donated while the save may still run
    checkpoints.wait()
    assert checkpoints.all_steps() == [3] and checkpoints.latest_step() == 3

    abstract = abstract_train_state(_abstract_student(run["config"]), run["tx"])
    restored, restored_meta = checkpoints.restore(3, abstract)
    checkpoints.close()
    _assert_trees_identical(restored, snapshot)
    assert int(restored.step) == 3
    assert restored_meta == {"step": 3, "data": {"epoch": 0, "position": 12},
                             "rng": np.asarray(meta["rng"]).tolist()}
    trained = jax.tree.leaves(restored.params)[0]
    assert not np.array_equal(trained, jax.tree.leaves(run["initial_params"])[0])

    from_disk, _ = run["train_step"](restored, _batch(10))
    _assert_trees_identical(from_disk, continued)


def _small_state():
    model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    tx, _ = make_optimizer(learning_rate=1e-3)
    return create_train_state(model, tx)[1]


def test_keeps_the_latest_steps_and_the_best(tmp_path):
    state = _small_state()
    metric = "valid/rouge_l"
    checkpoints = Checkpointer(tmp_path, max_to_keep=2, best_metric=metric, async_save=False)
    scores = {1: 0.1, 2: 0.9, 3: 0.3, 4: 0.5, 5: None}  # step 5 saved without validation
    for step, score in scores.items():
        checkpoints.save(step, state, {"step": step}, metrics=None if score is None else {metric: score, "ce": 1.0})
    checkpoints.wait()
    assert checkpoints.all_steps() == [2, 4, 5]
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [2, 4, 5]
    assert checkpoints.best_step() == 2 and checkpoints.latest_step() == 5
    checkpoints.close()

    resumed = Checkpointer(tmp_path, max_to_keep=2, best_metric=metric, async_save=False)
    assert resumed.all_steps() == [2, 4, 5] and resumed.best_step() == 2
    resumed.save(6, state, {"step": 6}, metrics={metric: float("nan")})  # a NaN never becomes the best
    resumed.save(7, state, {"step": 7}, metrics={metric: 0.95})
    resumed.wait()
    assert resumed.all_steps() == [6, 7] and resumed.best_step() == 7
    resumed.close()


def test_best_mode_min_and_no_metric(tmp_path):
    state = _small_state()
    lowest = Checkpointer(tmp_path / "min", max_to_keep=1, best_metric="loss", best_mode="min", async_save=False)
    for step, loss in ((1, 3.0), (2, 1.0), (3, 2.0)):
        lowest.save(step, state, {}, metrics={"loss": loss})
    lowest.wait()
    assert lowest.all_steps() == [2, 3] and lowest.best_step() == 2
    lowest.close()

    latest_only = Checkpointer(tmp_path / "latest", max_to_keep=2, async_save=False)
    for step in (1, 2, 3):
        latest_only.save(step, state, {}, metrics={"loss": 1.0 / step})
    latest_only.wait()
    assert latest_only.all_steps() == [2, 3] and latest_only.best_step() is None
    latest_only.close()


def test_restore_onto_a_mesh(run, tmp_path):
    state = run["snapshots"][3]
    checkpoints = Checkpointer(tmp_path)
    checkpoints.save(3, state, {})
    checkpoints.wait()

    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    abstract = abstract_train_state(_abstract_student(run["config"]), run["tx"], mesh=mesh)
    restored, _ = checkpoints.restore(3, abstract)
    _assert_trees_identical(restored, state)
    for got, wanted in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract)):
        assert got.sharding == wanted.sharding
    q_proj = restored.params["layers"]["q_proj"].get_value()
    assert q_proj.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    adam_mu = restored.opt_state[1][0].mu["layers"]["q_proj"].get_value()
    assert adam_mu.sharding == q_proj.sharding  # moments live where their parameters do

    params = checkpoints.restore_params(3, abstract.params)
    checkpoints.close()
    _assert_trees_identical(params, state.params)


_CRASHING_RUN = """
import os, sys
import jax.numpy as jnp
from flax import nnx
from minillm_jax.checkpoint import Checkpointer
from minillm_jax.trainers.common import TrainState

def state(n):
    return TrainState(step=jnp.int32(n), params=nnx.State({"w": nnx.Param(jnp.ones((n,)))}), opt_state={})

checkpoints = Checkpointer(sys.argv[1])
checkpoints.save(1, state(8), {"step": 1})
checkpoints.wait()
checkpoints.save(2, state(2**25), {"step": 2})  # 128 MiB, written in the background
os._exit(0)
"""


def _vector_state(n: int) -> TrainState:
    return TrainState(step=jax.ShapeDtypeStruct((), jnp.int32),
                      params=nnx.State({"w": nnx.Param(jax.ShapeDtypeStruct((n,), jnp.float32))}), opt_state={})


def test_a_crash_mid_save_leaves_only_complete_steps(tmp_path):
    """The child process dies right after starting an async save of a large state: every step a fresh
    Checkpointer then reports restores completely, and the resumed run saves on."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", _CRASHING_RUN, str(tmp_path)], check=True, env=env, cwd=REPO, timeout=120)
    left_over = [p.name for p in tmp_path.iterdir() if not p.name.isdigit() and p.name != "metadata"]

    checkpoints = Checkpointer(tmp_path)
    steps = checkpoints.all_steps()
    assert steps == ([1] if left_over else [1, 2]), (steps, left_over)
    assert checkpoints.latest_step() == steps[-1]
    for step in steps:
        restored, meta = checkpoints.restore(step, _vector_state(8 if step == 1 else 2**25))
        assert meta == {"step": step} and bool(jnp.all(restored.params["w"].get_value() == 1.0))
    checkpoints.save(3, restored, {"step": 3})
    checkpoints.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["metadata", *map(str, steps), "3"])


def _word_tokenizer(size: int) -> transformers.PreTrainedTokenizerFast:
    vocab = {f"w{i}": i for i in range(size - 1)} | {"<eos>": size - 1}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", unk_token="w0")


def _workdir(run, path: pathlib.Path, *, tokenizer=True) -> pathlib.Path:
    """What main.py writes: student/ (HF config + tokenizer) and checkpoints/ with steps 2 (best) and 3."""
    save_config(run["config"], path / "student")
    if tokenizer:
        _word_tokenizer(VOCAB).save_pretrained(path / "student")
    checkpoints = Checkpointer(path / "checkpoints", best_metric="valid/rouge_l")
    for step, score in ((2, 0.9), (3, 0.1)):
        checkpoints.save(step, run["snapshots"][step], {"step": step}, metrics={"valid/rouge_l": score})
    checkpoints.wait()
    checkpoints.close()
    return path


def _assert_exported_matches(run, out: pathlib.Path, step: int):
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                                 attn_implementation="eager").eval()
    ids, mask = left_padded_batch(VOCAB, length=12)
    ours = np.asarray(nnx.merge(run["graphdef"], run["snapshots"][step].params)(ids, mask))
    assert max_diff_on_real(hf_logits(reloaded, ids, mask), ours, mask) <= 1e-4
    other = np.asarray(nnx.merge(run["graphdef"], run["snapshots"][5 - step].params)(ids, mask))
    assert max_diff_on_real(other, ours, mask) > 1e-3  # the two candidate steps are distinguishable


def test_export_writes_the_best_step_by_default(run, tmp_path):
    workdir = _workdir(run, tmp_path / "run")
    assert checkpoint.export_step(workdir) == 2
    out = export_hf(workdir, tmp_path / "hf")
    _assert_exported_matches(run, out, step=2)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer("w3 w5")["input_ids"] == [3, 5]
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"

    half = export_hf(workdir, tmp_path / "bf16", step=3, dtype="bfloat16")
    assert json.loads((half / "config.json").read_text())["dtype"] == "bfloat16"


def test_export_from_the_command_line(run, tmp_path):
    workdir = _workdir(run, tmp_path / "run", tokenizer=False)
    out = tmp_path / "hf"
    result = subprocess.run([sys.executable, "-m", "minillm_jax.convert", "to-hf", "--workdir", str(workdir),
                             "--step", "3", "--output", str(out)], capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"exported step 3 of {workdir} to {out}" in result.stdout
    assert "WARNING" not in result.stderr  # Orbax's warnings on read-only opens are not the user's concern
    _assert_exported_matches(run, out, step=3)
    assert not (out / "tokenizer.json").exists()


def test_export_keeps_the_trained_dtype(run, tmp_path):
    model = load_pretrained(run["hf_dir"], dtype="bfloat16")
    _, state = create_train_state(model, run["tx"])
    save_config(model.config, tmp_path / "student")
    checkpoints = Checkpointer(tmp_path / "checkpoints")
    checkpoints.save(1, state, {})
    checkpoints.close()
    out = export_hf(tmp_path, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = load_pretrained(out, dtype="bfloat16")
    _assert_trees_identical(nnx.state(reloaded), state.params)


def test_export_errors_say_what_is_missing(run, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_hf(tmp_path / "nowhere", tmp_path / "out")
    save_config(run["config"], tmp_path / "student")
    with pytest.raises(FileNotFoundError, match="no checkpoints saved"):
        export_hf(tmp_path, tmp_path / "out")
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoints saved"):
        export_hf(tmp_path, tmp_path / "out")

    workdir = _workdir(run, tmp_path / "run", tokenizer=False)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 7; available steps: \[2, 3\]"):
        export_hf(workdir, tmp_path / "out", step=7)
    with pytest.raises(FileNotFoundError, match=r"available steps: \[2, 3\]"):
        Checkpointer(workdir / "checkpoints").restore_params(7, None)
    (workdir / "student" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"student/config.json is missing"):
        export_hf(workdir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # >= 12 s on the 2-core machine; CI's second step
@pytest.mark.parametrize("target", [(2, 2, 2), (1, 2, 4)])
def test_saved_on_one_mesh_restores_onto_another(target, tmp_path):
    """Saved from a (8, 1, 1) layout, restored straight into the (2, 2, 2) / (1, 2, 4) training layout."""
    from minillm_jax.models.tiny import random_model

    tx, _ = make_optimizer(learning_rate=1e-3)
    source = sharding.shard_model(random_model("random:llama:layers=2,hidden=64,heads=4,kv_heads=2", 96),
                                  sharding.make_mesh(8, 1, 1))
    graphdef, state = create_train_state(source, tx)
    state = state.replace(opt_state=jax.tree.map(lambda x: x + 0.5 if jnp.issubdtype(x.dtype, jnp.floating) else x,
                                                 state.opt_state))
    manager = Checkpointer(tmp_path / "checkpoints", async_save=False)
    manager.save(3, state, {"step": 3})
    manager.wait()
    mesh = sharding.make_mesh(*target)
    abstract = abstract_train_state(nnx.merge(graphdef, state.params), tx, mesh=mesh)
    restored, meta = manager.restore(3, abstract)
    assert meta["step"] == 3
    for got, want, spec in zip(jax.tree.leaves(restored), jax.tree.leaves(state), jax.tree.leaves(abstract)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert got.sharding == spec.sharding
    q = restored.params["layers"]["q_proj"][...]
    assert q.sharding.mesh.shape == mesh.shape and "tensor" in str(q.sharding.spec)
    assert checkpoint.fingerprint(restored.opt_state) == checkpoint.fingerprint(state.opt_state)
    manager.close()


# ------------------------------------------------------------------------------------------- integrity


def _random_state(seed: int = 0, n: int = 64 * 256) -> TrainState:
    """Incompressible parameters (so a flipped byte lands in the stored values) and an optimizer state."""
    keys = jax.random.split(jax.random.key(seed), 2)
    params = nnx.State({"w": nnx.Param(jax.random.normal(keys[0], (n // 256, 256))),
                        "b": nnx.Param(jnp.arange(8, dtype=jnp.bfloat16))})
    return TrainState(step=jnp.int32(3), params=params,
                      opt_state={"mu": jax.random.normal(keys[1], (n // 256, 256)), "count": jnp.int32(3)})


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def _data_files(step_dir: pathlib.Path, item: str) -> list[pathlib.Path]:
    """The files holding an item's array bytes (OCDBT data files under `d/`), largest first."""
    files = [p for p in (step_dir / item).rglob("*") if p.is_file() and p.parent.name == "d"]
    return sorted(files, key=lambda p: p.stat().st_size, reverse=True)


def _flip_bytes(file: pathlib.Path, count: int = 64) -> None:
    data = bytearray(file.read_bytes())
    middle = len(data) // 2
    data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
    file.write_bytes(bytes(data))


def test_a_corrupt_param_file_fails_the_restore(tmp_path):
    state = _random_state()
    checkpoints = Checkpointer(tmp_path, async_save=False)
    checkpoints.save(3, state, {"step": 3})
    _flip_bytes(_data_files(tmp_path / "3", "params")[0])
    with pytest.raises(checkpoint.CheckpointCorrupt, match=r"step 3.*params.*w") as info:
        checkpoints.restore(3, _abstract(state))
    assert "fingerprint" in str(info.value)
    with pytest.raises(checkpoint.CheckpointCorrupt, match=r"step 3.*params"):
        checkpoints.restore_params(3, _abstract(state.params))

    checkpoints.save(4, state, {"step": 4})
    (tmp_path / "4" / "opt_state" / "manifest.ocdbt").unlink()
    for file in _data_files(tmp_path / "4", "opt_state"):
        file.write_bytes(file.read_bytes()[:10])  # truncated
    with pytest.raises(checkpoint.CheckpointCorrupt, match=r"step 4.*opt_state"):
        checkpoints.restore(4, _abstract(state))
    assert checkpoints.read_meta(4) == {"step": 4}
    (tmp_path / "4" / "meta" / "metadata").write_text('{"step": 4')
    with pytest.raises(checkpoint.CheckpointCorrupt, match=r"the meta of checkpoint step 4 cannot be read"):
        checkpoints.read_meta(4)
    checkpoints.close()


def test_the_fingerprint_is_exact_across_meshes(tmp_path):
    """The same values laid out on (8, 1, 1) and (2, 2, 2) have the same fingerprint, and a one-bit change in
    any element changes it."""
    from minillm_jax.models.tiny import random_model

    source = sharding.shard_model(random_model("random:llama:layers=2,hidden=64,heads=4,kv_heads=2", 96),
                                  sharding.make_mesh(8, 1, 1))
    params = nnx.state(source)
    tx, _ = make_optimizer(learning_rate=1e-3)
    abstract = abstract_train_state(source, tx, mesh=sharding.make_mesh(2, 2, 2)).params
    moved = jax.device_put(params, jax.tree.map(lambda a: a.sharding, abstract))
    assert checkpoint.fingerprint(moved) == checkpoint.fingerprint(params)
    fingerprint = checkpoint.fingerprint(params)
    q_proj = params["layers"]["q_proj"][...]
    flipped = jax.lax.bitcast_convert_type(q_proj, jnp.uint32).at[1, 5, 2, 3].add(1)
    params["layers"]["q_proj"][...] = jax.lax.bitcast_convert_type(flipped, jnp.float32)
    changed = {path for path, value in checkpoint.fingerprint(params).items() if value != fingerprint[path]}
    assert changed == {"layers.q_proj"}


def test_a_non_finite_state_is_never_saved(tmp_path):
    state = _random_state()
    bad = state.replace(params=jax.tree.map(lambda x: x, state.params),
                        opt_state={**state.opt_state, "mu": state.opt_state["mu"].at[0, 0].set(jnp.inf)})
    bad.params["w"][...] = state.params["w"][...].at[3, 4].set(jnp.nan)
    checkpoints = Checkpointer(tmp_path, async_save=False)
    with pytest.raises(checkpoint.NonFiniteState,
                       match=r"step 5: non-finite values in params\.w, opt_state\.opt_state\.mu"):
        checkpoints.save(5, bad, {"step": 5})
    assert checkpoints.all_steps() == [] and not (tmp_path / "5").exists()
    assert checkpoints.save(5, state, {"step": 5})
    checkpoints.close()


def test_a_save_at_or_before_the_latest_step_raises(tmp_path):
    state = _random_state()
    checkpoints = Checkpointer(tmp_path, async_save=False)
    assert checkpoints.save(6, state, {"step": 6})
    for step in (6, 4):
        with pytest.raises(checkpoint.SaveSkipped, match=rf"step {step}.*latest saved step is 6"):
            checkpoints.save(step, state, {"step": step})
    assert checkpoints.all_steps() == [6]
    checkpoints.close()


def test_a_quarantined_step_is_no_longer_listed_and_can_be_saved_again(run, tmp_path):
    workdir = _workdir(run, tmp_path / "run", tokenizer=False)
    checkpoints = Checkpointer(workdir / "checkpoints", best_metric="valid/rouge_l")
    moved = checkpoints.quarantine(3, "fingerprint mismatch in params")
    assert checkpoints.all_steps() == [2] and checkpoints.latest_step() == 2
    assert moved.parent == workdir / "checkpoints" / "damaged" and moved.name.startswith("3-")
    assert (moved / "reason.txt").read_text().startswith("fingerprint mismatch in params")
    with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 3; available steps: \[2\]"):
        checkpoint.export_step(workdir, 3)
    assert checkpoints.save(3, run["snapshots"][3], {"step": 3}, metrics={"valid/rouge_l": 0.2})
    checkpoints.wait()
    assert checkpoints.all_steps() == [2, 3]
    checkpoints.close()
    assert Checkpointer.reader(workdir / "checkpoints").all_steps() == [2, 3]


def test_an_incompatible_target_is_not_called_damaged(tmp_path):
    state = _random_state()
    checkpoints = Checkpointer(tmp_path, async_save=False)
    checkpoints.save(3, state, {"step": 3})
    wider = _abstract(_random_state(n=128 * 256))
    with pytest.raises(checkpoint.CheckpointIncompatible,
                       match=r"step 3.*params\.w: saved \(64, 256\) float32, expected \(128, 256\) float32"):
        checkpoints.restore(3, wider)
    other = _abstract(state)
    other.params["extra"] = nnx.Param(jax.ShapeDtypeStruct((2,), jnp.float32))
    other.params["b"] = nnx.Param(jax.ShapeDtypeStruct((8,), jnp.float32))
    with pytest.raises(checkpoint.CheckpointIncompatible) as info:
        checkpoints.restore(3, other)
    message = str(info.value)
    assert "params.b: saved (8,) bfloat16, expected (8,) float32" in message
    assert "params.extra: not in the checkpoint" in message
    with pytest.raises(checkpoint.CheckpointIncompatible, match=r"params\.extra: not in the checkpoint"):
        checkpoints.restore_params(3, other.params)
    restored, meta = checkpoints.restore(3, _abstract(state))  # the right target still restores
    assert meta == {"step": 3} and checkpoints.read_meta(3) == {"step": 3}
    _assert_trees_identical(restored, state)
    checkpoints.close()


def test_export_refuses_a_foreign_directory_unless_forced(run, tmp_path):
    workdir = _workdir(run, tmp_path / "run", tokenizer=False)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "model.safetensors").write_bytes(b"their model")
    with pytest.raises(FileExistsError, match="theirs is a non-empty directory"):
        export_hf(workdir, theirs, step=3)
    assert sorted(p.name for p in theirs.iterdir()) == ["model.safetensors"]
    export_hf(workdir, theirs, step=3, force=True)
    _assert_exported_matches(run, theirs, step=3)
    export_hf(workdir, theirs, step=2)  # our own earlier export is replaced without force
    _assert_exported_matches(run, theirs, step=2)
    marker = json.loads((theirs / ".minillm_export.json").read_text())
    assert marker["step"] == 2 and marker["workdir"] == str(workdir)


@pytest.mark.slow  # >= 12 s on the 2-core machine; CI's second step
def test_export_from_the_command_line_refuses_in_one_line(run, tmp_path):
    workdir = _workdir(run, tmp_path / "run", tokenizer=False)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    command = [sys.executable, "-m", "minillm_jax.convert", "to-hf", "--workdir", str(workdir), "--step", "3",
               "--output", str(theirs)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    refused = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"{theirs} is a non-empty directory" in refused.stderr and "--force" in refused.stderr
    assert (theirs / "notes.txt").read_text() == "keep me"
    forced = subprocess.run(command + ["--force"], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert forced.returncode == 0, forced.stderr
    assert not (theirs / "notes.txt").exists()
    _assert_exported_matches(run, theirs, step=3)
