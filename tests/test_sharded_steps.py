"""The production updates and the sampler, compiled with explicit shardings on 8 fake CPU devices, give the
one-device results, with the vocabulary split over `tensor` (log-softmax, KL and sampling then reduce
across devices) and a padded vocabulary (ids beyond the tokenizer's size masked, so the real-vocabulary
slice crosses shard boundaries): KD on four meshes, and a MiniLLM round, on-policy GKD and DistiLLM with a
fresh student sample on (2, 2, 2)."""

import dataclasses
import re

import jax
import kit
import numpy as np
import pytest
from flax import nnx

from minillm_jax import sampling, sharding
from minillm_jax.models import Transformer
from minillm_jax.models.tiny import parse_random_spec
from minillm_jax.sampling import SamplingConfig, generate

pytestmark = pytest.mark.slow  # every update on several mesh shapes: many compiles; CI runs it in the slow step

VOCAB, REAL = 128, 123  # a checkpoint vocabulary padded beyond the tokenizer's 123 ids
TEACHER = parse_random_spec("random:llama:layers=2,hidden=64,heads=4,kv_heads=2,mlp=128", VOCAB).replace(
    real_vocab_size=REAL)
STUDENT = parse_random_spec("random:llama:layers=1,hidden=32,heads=4,kv_heads=4,mlp=64", VOCAB).replace(
    real_vocab_size=REAL)
SAMPLING = SamplingConfig(max_new_tokens=6, eos_token_id=3, pad_token_id=0, prompt_buckets=(8,))
OVERRIDES = {
    "kd": {},
    "minillm": {"minillm.num_rollouts": 16, "minillm.ppo_epochs": 1, "data.pretrain": ""},
    "gkd": {"gkd.lmbda": 1.0},
    "distillm": {"distillm.initial_sgo_prob": 1.0},
}


def _models(mesh=None, teacher_rules=sharding.SAMPLE_RULES):
    def make(config, seed):
        return lambda: Transformer(config, rngs=nnx.Rngs(seed))

    if mesh is None:
        return make(TEACHER, 1)(), make(STUDENT, 0)()
    return (sharding.create_model(make(TEACHER, 1), mesh, teacher_rules),
            sharding.create_model(make(STUDENT, 0), mesh, sharding.TRAIN_RULES))


def _update(task, mesh=None):
    """(metrics of one update, the new state) of `task`'s production update."""
    teacher, student = _models(mesh, sharding.SAMPLE_RULES if task == "minillm" else sharding.TRAIN_RULES)
    config = kit.run_config(task=task, batch_size=8, **{"data.length_buckets": 1, "optimizer.warmup_steps": 0,
                                                        **OVERRIDES[task]})
    method, state, update, teacher_params = kit.compile_method(config, student, teacher, kit.data(16), mesh=mesh,
                                                               sampling_config=SAMPLING)
    state, history = kit.run_updates(method, state, update, teacher_params, 1, mesh=mesh)
    return history[0], state


@pytest.fixture(scope="module")
def reference():
    """Everything on one device, no mesh."""
    teacher, student = _models()
    prompts = kit.prompts(8, 1)
    return {task: _update(task) for task in OVERRIDES} | {
        "mixed": jax.tree.map(np.asarray, generate(student, prompts, SAMPLING, jax.random.key(3), teacher=teacher,
                                                   mix_alpha=0.3)),
        "greedy": jax.tree.map(np.asarray, generate(student, prompts, dataclasses.replace(SAMPLING, greedy=True),
                                                    jax.random.key(0), teacher=teacher, mix_alpha=0.3)),
        "int8": jax.tree.map(np.asarray, generate(student, prompts,
                                                  dataclasses.replace(SAMPLING, kv_cache_dtype="int8"),
                                                  jax.random.key(3), teacher=teacher, mix_alpha=0.3))}


def _assert_same_update(actual, expected, names):
    (metrics, state), (ref_metrics, ref_state) = actual, expected
    for name in names:
        np.testing.assert_allclose(np.asarray(metrics[name]), np.asarray(ref_metrics[name]), rtol=2e-5, atol=1e-6,
                                   err_msg=name)
    # one Adam step of lr 1e-3 normalises each gradient entry, so an entry near zero may move by up to ~lr
    # on float32 noise; a wrong gradient moves many entries by ~lr
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(state.params), jax.tree.leaves(ref_state.params)):
        np.testing.assert_allclose(sharding.to_host(a), np.asarray(b), rtol=1e-4, atol=1e-4,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("mesh_shape", [(1, 2, 4), (2, 1, 4), (1, 4, 2), (2, 2, 2)],
                         ids=lambda s: "x".join(map(str, s)))
def test_kd_update_and_sampling_match_one_device(mesh_shape, reference):
    mesh = sharding.make_mesh(*mesh_shape)
    teacher, student = _models(mesh)
    # the vocabulary really is split: the embedding over tensor, the teacher's too
    assert student.embed_tokens[...].sharding.spec[0] == "tensor" and mesh.shape["tensor"] in (2, 4)
    assert "tensor" in teacher.lm_head[...].sharding.spec
    metrics, state = _update("kd", mesh)
    _assert_same_update((metrics, state), reference["kd"], ("loss", "ce", "soft_ce", "grad_norm"))
    embed = state.params["embed_tokens"][...].sharding
    assert embed.spec[0] == "tensor"  # the new state stays laid out
    assert state.opt_state[1][0].mu["embed_tokens"][...].sharding.spec == embed.spec  # Adam's moments sit with it

    prompts = kit.prompts(8, 1)
    greedy = generate(student, prompts, dataclasses.replace(SAMPLING, greedy=True), jax.random.key(0),
                      teacher=teacher, mix_alpha=0.3)
    np.testing.assert_array_equal(sharding.to_host(greedy.tokens), reference["greedy"].tokens)
    mixed = generate(student, prompts, SAMPLING, jax.random.key(3), teacher=teacher, mix_alpha=0.3)
    np.testing.assert_array_equal(sharding.to_host(mixed.tokens), reference["mixed"].tokens)
    for key in ("logprobs", "teacher_logprobs", "weights"):
        np.testing.assert_allclose(sharding.to_host(getattr(mixed, key)), getattr(reference["mixed"], key),
                                   rtol=1e-5, atol=1e-5, err_msg=key)
    assert sharding.to_host(mixed.tokens).max() < REAL  # padded ids are never drawn
    # split layers (per-layer weights, query/key/value joined along the sharded heads): the same samples, also
    # where the teacher's 2 key/value heads do not divide the tensor axis and its 4 query heads do
    split = generate(student, prompts, dataclasses.replace(SAMPLING, split_layers=True), jax.random.key(3),
                     teacher=teacher, mix_alpha=0.3)
    np.testing.assert_array_equal(sharding.to_host(split.tokens), reference["mixed"].tokens)
    np.testing.assert_allclose(sharding.to_host(split.teacher_logprobs), reference["mixed"].teacher_logprobs,
                               rtol=1e-5, atol=1e-5)
    # int8 KV caches (their scales laid out with them) with split layers: the one-device int8 tokens, the
    # log-probabilities within 2e-3 (float32 noise of the sharded program can move a key or value element across
    # a rounding boundary: one int8 step; the int8 cache itself is checked against transformers in test_kv_cache)
    int8 = generate(student, prompts, dataclasses.replace(SAMPLING, split_layers=True, kv_cache_dtype="int8"),
                    jax.random.key(3), teacher=teacher, mix_alpha=0.3)
    np.testing.assert_array_equal(sharding.to_host(int8.tokens), reference["int8"].tokens)
    for key in ("logprobs", "teacher_logprobs"):
        np.testing.assert_allclose(sharding.to_host(getattr(int8, key)), getattr(reference["int8"], key),
                                   rtol=0, atol=2e-3, err_msg=key)


def _loop_all_gathers(hlo: str) -> list[tuple[int, ...]]:
    """The shapes that all-gathers inside while loops (and what those loops call) gather, in a compiled
    program's text."""
    computations, current = {}, None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%([\w.-]+) ", line)
        if head:
            current = computations.setdefault(head.group(1), [])
        elif current is not None and " = " in line:
            current.append(line)
    inside = {b for lines in computations.values() for line in lines for b in re.findall(r"body=%([\w.-]+)", line)}
    todo = list(inside)
    while todo:
        for line in computations[todo.pop()]:
            for callee in re.findall(r"(?:calls|to_apply|body|condition|branch_computations)=\{?%([\w.-]+)", line):
                if callee not in inside:
                    inside.add(callee)
                    todo.append(callee)
    return [tuple(int(d) for d in re.match(r"\w+\[([\d,]*)\]", line.split(" = ")[1]).group(1).split(",") if d)
            for name in inside for line in computations[name] if re.search(r" all-gather(-start)?\(", line)]


def test_the_decode_loop_gathers_no_logits_across_the_tensor_axis():
    """With the vocabulary split over a tensor axis of 4, the sampler's decode heads give whole 128-id blocks on
    each shard (512 logits a row), so each step's draw gathers the blocks' statistics, never logits: no
    all-gather inside the decode loops has a dimension as long as the vocabulary (with 128 logits a row, a
    block spans the four shards and every step gathers them: checked)."""
    mesh = sharding.make_mesh(1, 2, 4)
    teacher, student = _models(mesh)
    (student_def, student_state), (teacher_def, teacher_state) = nnx.split(student), nnx.split(teacher)
    ids, mask = sharding.place_batch(sampling.pad_prompts(kit.prompts(8, 1), SAMPLING.prompt_buckets, 0), mesh,
                                     sharding.SAMPLE_RULES)

    def run(student_state, teacher_state, ids, mask):
        return sampling.sample(nnx.merge(student_def, student_state), nnx.merge(teacher_def, teacher_state), ids,
                               mask, jax.random.key(3), 0.3, config=SAMPLING, num_real=REAL, mesh=mesh)

    gathered = _loop_all_gathers(jax.jit(run).lower(student_state, teacher_state, ids, mask).compile().as_text())
    assert gathered  # the per-row statistics are gathered in the loop
    assert all(max(shape, default=0) < VOCAB for shape in gathered), gathered


@pytest.mark.parametrize("task,names", [
    ("minillm", ("pg", "single_step", "entropy", "policy_ratio_deviation", "rollout/length_mean",
                 "rollout/seq_log_ratio", "tokens", "grad_norm")),
    ("gkd", ("loss", "on_policy", "tokens", "grad_norm")),
    ("distillm", ("loss", "student_generated", "grad_norm"))])
def test_sampling_updates_match_one_device(task, names, reference):
    mesh = sharding.make_mesh(2, 2, 2)
    actual = _update(task, mesh)
    _assert_same_update(actual, reference[task], names)
    if task != "minillm":
        assert float(actual[0][names[1]][0]) == 1.0  # the sampled branch ran
