"""The jitted train and sample steps, compiled with explicit shardings on 8 fake CPU devices, give the
one-device results: losses, gradients and sampled tokens, for meshes with the vocabulary split over
`tensor` = 2 and 4 (log-softmax, KL and the sampler then reduce across devices), with a padded vocabulary
(ids beyond the tokenizer's size masked) so the real-vocabulary slice crosses shard boundaries."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from minillm_jax import sharding
from minillm_jax.models import Transformer
from minillm_jax.models.tiny import parse_random_spec
from minillm_jax.sampling import SamplingConfig, generate
from minillm_jax.trainers import kd, minillm
from minillm_jax.trainers.common import create_train_state, make_optimizer, sharded_train_state

VOCAB, REAL = 128, 123  # a checkpoint vocabulary padded beyond the tokenizer's 123 ids
TEACHER = parse_random_spec("random:llama:layers=2,hidden=64,heads=4,kv_heads=2,mlp=128", VOCAB).replace(
    real_vocab_size=REAL)
STUDENT = parse_random_spec("random:llama:layers=1,hidden=32,heads=4,kv_heads=4,mlp=64", VOCAB).replace(
    real_vocab_size=REAL)
MESHES = [(1, 2, 4), (2, 1, 4), (1, 4, 2), (2, 2, 2)]
SAMPLING = SamplingConfig(max_new_tokens=6, eos_token_id=3, pad_token_id=0, prompt_buckets=(8,))
MINILLM = minillm.MiniLLMConfig(minibatch_size=8, ppo_epochs=1)


def _models(mesh=None):
    def make(config, seed):
        return lambda: Transformer(config, rngs=nnx.Rngs(seed))

    if mesh is None:
        return make(TEACHER, 1)(), make(STUDENT, 0)()
    return (sharding.create_model(make(TEACHER, 1), mesh, sharding.SAMPLE_RULES),
            sharding.create_model(make(STUDENT, 0), mesh, sharding.TRAIN_RULES))


def _batch() -> dict:
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, REAL, size=(8, 16)).astype(np.int32)
    attention = np.ones((8, 16), np.int32)
    attention[::3, :5] = 0
    tokens[attention == 0] = 0
    loss = np.zeros((8, 16), np.int32)
    loss[:, 9:] = 1
    return {"tokens": tokens, "attention_mask": attention, "loss_mask": loss}


def _prompts():
    rng = np.random.default_rng(1)
    return [rng.integers(4, REAL, size=int(n)).tolist() for n in rng.integers(2, 8, size=8)]


@pytest.fixture(scope="module")
def reference():
    """Everything on one device, no mesh: KD and MiniLLM losses and gradients, samples, one train step."""
    teacher, student = _models()
    tx, schedule = make_optimizer(learning_rate=1e-3)
    graphdef, state = create_train_state(student, tx)
    teacher_def, teacher_params = nnx.split(teacher)
    batch = _batch()
    kd_grad = jax.value_and_grad(kd.kd_loss, has_aux=True)(state.params, graphdef, teacher_def, teacher_params,
                                                           batch, 0.5)
    mixed = generate(student, _prompts(), SAMPLING, jax.random.key(3), teacher=teacher, mix_alpha=0.3)
    greedy = generate(student, _prompts(), dataclasses.replace(SAMPLING, greedy=True), jax.random.key(0),
                      teacher=teacher, mix_alpha=0.3)
    rollouts, _ = minillm.make_rollouts(student, teacher, _prompts(), SAMPLING, jax.random.key(5), MINILLM)
    rollouts = jax.tree.map(np.asarray, rollouts)
    minillm_grad = jax.value_and_grad(minillm.minillm_loss, has_aux=True)(
        state.params, graphdef, teacher_def, teacher_params, rollouts, batch, MINILLM)
    step = kd.make_train_step(graphdef, teacher_def, tx, schedule)
    _, step_metrics = step(jax.tree.map(jnp.copy, state), teacher_params, batch)
    return dict(kd=kd_grad, minillm=minillm_grad, rollouts=rollouts, mixed=jax.tree.map(np.asarray, mixed),
                greedy=jax.tree.map(np.asarray, greedy), step=jax.device_get(step_metrics))


def _assert_tree_close(actual, expected, rtol, atol):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_sharded_steps_match_one_device(mesh_shape, reference):
    mesh = sharding.make_mesh(*mesh_shape)
    teacher, student = _models(mesh)
    tensor = mesh.shape["tensor"]
    # the vocabulary really is split: the embedding over tensor, the teacher's too (sampling rules)
    assert student.embed_tokens[...].sharding.spec[0] == "tensor" and tensor in (2, 4)
    assert "tensor" in teacher.lm_head[...].sharding.spec

    tx, schedule = make_optimizer(learning_rate=1e-3)
    graphdef, state, layout = sharded_train_state(student, tx, mesh)
    layout = layout.with_teacher(teacher)
    teacher_def, teacher_params = nnx.split(teacher)
    batch = sharding.place_batch(_batch(), mesh)
    assert batch["tokens"].sharding.is_equivalent_to(layout.rows(8), 2)

    grad_fn = jax.jit(jax.value_and_grad(kd.kd_loss, has_aux=True), static_argnums=(1, 2, 5),
                      in_shardings=(layout.state.params, layout.teacher, layout.rows(8)))
    (loss, _), grads = grad_fn(state.params, graphdef, teacher_def, teacher_params, batch, 0.5)
    (ref_loss, _), ref_grads = reference["kd"]
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    _assert_tree_close(grads, ref_grads, rtol=2e-4, atol=2e-6)

    rollouts = sharding.place_batch(reference["rollouts"], mesh)
    (loss, metrics), grads = jax.jit(jax.value_and_grad(minillm.minillm_loss, has_aux=True),
                                     static_argnums=(1, 2, 6))(state.params, graphdef, teacher_def, teacher_params,
                                                               rollouts, batch, MINILLM)
    (ref_loss, ref_metrics), ref_grads = reference["minillm"]
    for key in ("pg", "single_step", "pt", "entropy"):
        np.testing.assert_allclose(float(metrics[key]), float(ref_metrics[key]), rtol=1e-5, atol=1e-6, err_msg=key)
    _assert_tree_close(grads, ref_grads, rtol=2e-4, atol=2e-6)

    # sampling with both models' vocabularies split: same greedy tokens, same draws from the mixture
    greedy = generate(student, _prompts(), dataclasses.replace(SAMPLING, greedy=True), jax.random.key(0),
                      teacher=teacher, mix_alpha=0.3)
    np.testing.assert_array_equal(sharding.to_host(greedy.tokens), reference["greedy"].tokens)
    mixed = generate(student, _prompts(), SAMPLING, jax.random.key(3), teacher=teacher, mix_alpha=0.3)
    np.testing.assert_array_equal(sharding.to_host(mixed.tokens), reference["mixed"].tokens)
    for key in ("logprobs", "teacher_logprobs", "weights"):
        np.testing.assert_allclose(sharding.to_host(getattr(mixed, key)), getattr(reference["mixed"], key),
                                   rtol=1e-5, atol=1e-5, err_msg=key)
    assert sharding.to_host(mixed.tokens).max() < REAL  # padded ids are never drawn

    # the compiled train step with explicit in/out shardings (last: it donates the student's buffers): same
    # loss and gradient norm, and the new state stays laid out
    step = kd.make_train_step(graphdef, teacher_def, tx, schedule, layout=layout, batch_rows=8)
    new_state, step_metrics = step(state, teacher_params, batch)
    for key in ("loss", "grad_norm", "soft_ce"):
        np.testing.assert_allclose(float(step_metrics[key]), float(reference["step"][key]), rtol=1e-5, err_msg=key)
    assert new_state.params["embed_tokens"][...].sharding == layout.state.params["embed_tokens"]
    mu = new_state.opt_state[1][0].mu["embed_tokens"][...]
    assert mu.sharding.spec == layout.state.params["embed_tokens"].spec  # Adam's moments sit with their weights
