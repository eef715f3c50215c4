"""Each method through its production update (the function the CLI compiles) on tiny models: the loss falls
or the student moves towards the teacher; MiniLLM's round has the reference's structure; gradients
accumulate exactly; the teacher is never touched; an update compiles once per input shape."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import kit
import numpy as np
import pytest
from flax import nnx

from minillm_jax import losses
from minillm_jax.models import select_layers
from minillm_jax.sampling import generate
from minillm_jax.trainers import minillm
from minillm_jax.trainers.common import TRACE_COUNTS, make_optimizer, step_keys


def _held_out_reverse_kl(student, teacher, prompts, seed=123):
    out = generate(student, prompts, kit.sampling(), jax.random.key(seed), teacher=teacher)
    mask = np.asarray(out.mask, np.float64)
    return float(np.mean(np.sum((np.asarray(out.logprobs) - np.asarray(out.teacher_logprobs)) * mask, axis=1)))


def _teacher_forced(graphdef, params, teacher, batch, fn):
    """The mean of fn(log_q, log_p) over the response tokens of a sequence batch, in float64 numpy."""
    from minillm_jax.trainers.common import response_hidden

    student = nnx.merge(graphdef, params)

    def log_probs(model):
        logits = np.asarray(model.unembed(response_hidden(model, batch)), np.float64)
        logits -= logits.max(-1, keepdims=True)
        return logits - np.log(np.exp(logits).sum(-1, keepdims=True))

    values = np.asarray(fn(jnp.asarray(log_probs(student)), jnp.asarray(log_probs(teacher))))
    mask = np.asarray(batch["response_mask"], np.float64)
    return float((values * mask).sum() / mask.sum())


def _held_out_batch(seed=7):
    from minillm_jax.data.batches import sequence_batch

    data = kit.data(16, seed)
    return sequence_batch(data.prompts, data.responses, 8, 8, 0)


def test_sft_loss_falls():
    config = kit.run_config(task="sft", batch_size=16, **{"optimizer.learning_rate": 3e-3})
    method, state, update, _ = kit.compile_method(config, kit.student_model(), None, kit.data(16))
    state, history = kit.run_updates(method, state, update, None, 40)
    losses_seen = [float(h["loss"][0]) for h in history]
    assert losses_seen[-1] < 0.5 * losses_seen[0], losses_seen[::8]
    assert int(state.step) == 40


@pytest.mark.parametrize("kd_ratio", [0.5, 1.0])
def test_kd_loss_falls_and_pure_kd_approaches_the_teacher(kd_ratio):
    config = kit.run_config(task="kd", batch_size=16, **{"optimizer.learning_rate": 3e-3, "kd.kd_ratio": kd_ratio})
    method, state, update, teacher_params = kit.compile_method(config, kit.student_model(), kit.teacher_model(),
                                                               kit.data(16))
    state, history = kit.run_updates(method, state, update, teacher_params, 40)
    first, last = history[0], history[-1]
    if kd_ratio == 1.0:  # soft CE = forward KL + the teacher's entropy: the KL part must vanish
        assert float(last["forward_kl"][0]) < 0.3 * float(first["forward_kl"][0])
    else:
        assert float(last["loss"][0]) < 0.7 * float(first["loss"][0])


@pytest.mark.parametrize("importance,single_step", [("token", True), ("sequence", False)])
def test_minillm_rounds_lower_reverse_kl_on_held_out_prompts(importance, single_step):
    """The production round; also with the policy-gradient term alone, so a wrong sign there fails."""
    teacher, student = kit.teacher_model(), kit.student_model()
    held_out = kit.prompts(256, seed=99)
    before = _held_out_reverse_kl(student, teacher, held_out)
    config = kit.run_config(task="minillm", batch_size=32, **{
        "optimizer.learning_rate": 1e-2, "optimizer.warmup_steps": 2, "minillm.num_rollouts": 64,
        "minillm.ppo_epochs": 2, "minillm.importance": importance, "minillm.single_step": single_step,
        "data.pretrain": ""})
    method, state, update, teacher_params = kit.compile_method(config, student, teacher, kit.data(256, seed=3))
    state, history = kit.run_updates(method, state, update, teacher_params, 8)
    assert int(state.step) == 8 * 4  # 2 epochs x 64 rollouts / 32 per step, per round
    for h in history:
        assert all(np.all(np.isfinite(v)) for v in h.values())
    after = _held_out_reverse_kl(nnx.merge(nnx.graphdef(student), state.params), teacher, held_out)
    assert after < 0.7 * before, (before, after)
    assert {"pg", "entropy", "grad_norm", "lr", "policy_ratio_deviation", "clip_fraction"} | (
        {"single_step"} if single_step else set()) <= set(history[-1])


def test_minillm_round_structure():
    """A round makes ppo_epochs x num_rollouts / batch_size optimizer steps, each epoch sees every rollout
    once (the answer tokens of an epoch's steps add up to the round's), the rescored first step has ratio
    1 and nothing clipped, and L_PT takes one batch of the plain-text stream per step."""
    teacher = kit.teacher_model()
    config = kit.run_config(task="minillm", batch_size=8, **{"minillm.num_rollouts": 32, "minillm.ppo_epochs": 3,
                                                             "data.pretrain": ""})
    method, state, update, teacher_params = kit.compile_method(config, kit.student_model(), teacher, kit.data(64))
    assert method.steps_per_update == 12
    inputs = method.feed.next()
    state, metrics = update(state, teacher_params, inputs)
    metrics = jax.device_get(metrics)
    tokens = np.asarray(metrics["tokens"]).reshape(3, 4).sum(axis=1)  # per epoch
    assert tokens[0] == tokens[1] == tokens[2]
    assert tokens[0] == int(np.sum(inputs["prompt_mask"])) + int(round(32 * float(metrics["rollout/length_mean"])))
    assert float(metrics["policy_ratio_deviation"][0]) < 1e-5 and float(metrics["clip_fraction"][0]) == 0.0
    assert int(state.step) == 12


def test_minillm_pretrain_stream_gives_each_step_its_own_batch(tmp_path):
    path = tmp_path / "corpus.txt"
    rng = np.random.default_rng(0)
    path.write_text("\n\n".join(" ".join(f"w{int(i)}" for i in rng.integers(0, 15, size=12)) for _ in range(40)))
    tokenizer = _word_tokenizer()
    config = kit.run_config(task="minillm", batch_size=4, **{"minillm.num_rollouts": 8, "minillm.ppo_epochs": 2,
                                                             "data.pretrain": str(path), "data.pretrain_length": 6,
                                                             "data.pretrain_shuffle": 0})
    s, _ = kit.setup(config, kit.student_model(), kit.teacher_model(), kit.data(16))
    s = dataclasses.replace(s, tokenizer=tokenizer)
    stream = minillm.pretrain_stream(s)
    expected = [next(stream)["tokens"] for _ in range(4)]
    pt = minillm.build(s).feed.next()["pt"]
    assert pt["prompt"].shape[:2] == (4, 1)  # one batch per step of the round, one micro-batch each
    for step in range(4):
        np.testing.assert_array_equal(np.concatenate([pt["prompt"][step, 0], pt["response"][step, 0]], axis=1),
                                      expected[step])


def _word_tokenizer():
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(16)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w1"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="w0", unk_token="w1")


def _on_and_off_policy_training(task, overrides, divergence, source_key, held_out_seed):
    """30 updates of `task`: both kinds of batch (gold and the student's own, per `source_key`) occur, and
    the teacher-forced `divergence` on held-out sequences falls by 30%; returns the final state."""
    teacher = kit.teacher_model()
    config = kit.run_config(task=task, batch_size=16, **{"optimizer.learning_rate": 3e-3, **overrides})
    method, state, update, teacher_params = kit.compile_method(config, kit.student_model(), teacher, kit.data(16))
    held_out = _held_out_batch(held_out_seed)
    graphdef = nnx.graphdef(kit.student_model())
    before = _teacher_forced(graphdef, state.params, teacher, held_out, divergence)
    state, history = kit.run_updates(method, state, update, teacher_params, 30)
    chosen = sum(float(h[source_key][0]) for h in history)
    assert 5 < chosen < 25, chosen
    assert _teacher_forced(graphdef, state.params, teacher, held_out, divergence) < 0.7 * before
    return state, chosen


def test_gkd_mixes_on_policy_batches_and_lowers_jsd():
    _on_and_off_policy_training("gkd", {"gkd.lmbda": 0.5}, lambda log_q, log_p: losses.jsd(log_q, log_p, 0.5),
                                "on_policy", 7)


def test_gkd_batches_are_sized_by_their_kind_and_the_coins_resume():
    """Sampled batches are exactly the sampler's width and never the gold answers' (the GKD bench's Dolly
    answers would pad 64 sampled tokens to hundreds: 3x the step time), gold batches keep their buckets, the
    share of sampled updates follows lmbda, and a feed restored from its state draws the same coins."""
    from minillm_jax.trainers import METHODS

    long_gold = kit.data(16, response_length=(30, 40))
    config = kit.run_config(task="gkd", batch_size=8, **{"gkd.lmbda": 0.5, "data.length_buckets": 2})
    s, _ = kit.setup(config, kit.student_model(), kit.teacher_model(), long_gold)  # the sampler: 6 new tokens
    feed = METHODS["gkd"](s).feed
    inputs = [feed.next() for _ in range(40)]
    sampled = [x["prompts"] for x in inputs if "prompts" in x]
    gold = [x["gold"] for x in inputs if "gold" in x]
    assert 10 <= len(sampled) <= 30 and len(sampled) + len(gold) == 40
    assert {b["response"].shape[-1] for b in sampled} == {6}
    assert all(not b["response_mask"].any() for b in sampled)
    assert {b["response"].shape[-1] for b in gold} <= set(feed.widths.response)
    assert all(b["response"].shape[-1] >= 30 for b in gold)

    resumed = METHODS["gkd"](s).feed
    for _ in range(25):
        resumed.next()
    saved = json.loads(json.dumps(resumed.state()))
    again = METHODS["gkd"](s).feed
    again.restore(saved)
    for expected in inputs[25:]:
        got = again.next()
        assert got.keys() == expected.keys()
        jax.tree.map(np.testing.assert_array_equal, got, expected)

    for lmbda, kind in ((1.0, "prompts"), (0.0, "gold")):
        config = kit.run_config(task="gkd", batch_size=8, **{"gkd.lmbda": lmbda})
        s, _ = kit.setup(config, kit.student_model(), kit.teacher_model(), long_gold)
        feed = METHODS["gkd"](s).feed
        assert all(list(feed.next()) == [kind] for _ in range(10)), lmbda


def test_distillm_adaptive_off_policy_replay_and_skew_reverse_kl():
    from minillm_jax.trainers import distillm

    feed = distillm.AdaptiveFeed(kit.data(8), 8, 1, 0, _widths(), config=distillm.DistiLLMConfig(initial_sgo_prob=0.5),
                                 new_tokens=6)
    feed.after_validation({"valid/loss": 1.0})
    assert feed.sgo_prob == 0.5  # improved: unchanged
    feed.after_validation({"valid/loss": 1.2})
    assert feed.sgo_prob == pytest.approx(0.6)  # worse: more student-generated outputs
    feed.after_validation({"valid/loss": 0.9})
    assert feed.sgo_prob == pytest.approx(0.6)

    state, generated = _on_and_off_policy_training(
        "distillm", {"distillm.initial_sgo_prob": 0.5}, lambda log_q, log_p: losses.skew_reverse_kl(log_q, log_p, 0.1),
        "student_generated", 8)
    assert int(state.extra["stored"]) >= 1  # fresh samples went into the replay buffer ...
    assert int(state.extra["stored"]) < generated  # ... and some updates replayed one instead


def _widths():
    from minillm_jax.data.batches import Widths

    return Widths(prompt=(8,), response=(8,))


def test_seqkd_trains_on_the_teacher_token_ids_and_resumes_its_answers(tmp_path):
    from minillm_jax.trainers import seqkd

    teacher = kit.teacher_model()
    train = kit.data(24, seed=11)
    config = kit.run_config(task="seqkd", batch_size=8, **{"optimizer.learning_rate": 3e-3})
    s, _ = kit.setup(config, kit.student_model(), teacher, train, workdir=tmp_path)
    method = seqkd.build(s)
    answers = seqkd.read_answers(tmp_path / seqkd.ANSWERS)
    assert len(answers) == 24
    key = jax.random.fold_in(step_keys(config.seed, 0)["sample"], 0)  # the first batch of answers
    direct = generate(teacher, train.prompts[:8], s.sampling, key)
    first = [np.asarray(row)[:n].tolist() for row, n in zip(direct.tokens, direct.lengths)]
    assert answers[:8] == first  # exactly the sampled ids: no decode / re-tokenise round trip
    assert method.feed.data.responses[:8] == first
    # an interrupted answer file (one batch and a torn line) is continued to the same answers
    lines = (tmp_path / seqkd.ANSWERS).read_text().splitlines()
    (tmp_path / seqkd.ANSWERS).write_text("\n".join(lines[:8]) + "\n" + lines[8][:5])
    seqkd.build(s)
    assert seqkd.read_answers(tmp_path / seqkd.ANSWERS) == answers
    _, state, update, _ = kit.compile_method(config, kit.student_model(), teacher, train, workdir=tmp_path)
    state, history = kit.run_updates(method, state, update, None, 30)
    assert float(history[-1]["loss"][0]) < 0.6 * float(history[0]["loss"][0])


@pytest.mark.slow  # >= 12 s on the 2-core machine; CI's second step
def test_gradient_accumulation_equals_one_large_batch():
    """accumulate_steps=2 over the same 16 rows takes the same optimizer steps as one batch of 16 (the
    halves hold equally many answer tokens, so the mean of the micro-batch means is the global mean)."""
    train = kit.data(16, response_length=(3, 4))

    def run(accumulate):
        config = kit.run_config(task="sft", batch_size=16, accumulate_steps=accumulate,
                                **{"optimizer.learning_rate": 1e-2})
        method, state, update, _ = kit.compile_method(config, kit.student_model(), None, train)
        state, history = kit.run_updates(method, state, update, None, 2)
        return state, history

    (one, one_history), (two, two_history) = run(1), run(2)
    assert int(one.step) == int(two.step) == 2
    np.testing.assert_allclose(two_history[0]["loss"], one_history[0]["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-4)  # Adam amplifies ~1e-7


@pytest.mark.slow  # >= 12 s on the 2-core machine; CI's second step
def test_minillm_accumulation_keeps_the_number_of_optimizer_steps():
    """accumulate_steps splits each PPO mini-batch into micro-batches: the same rollouts, the same number of
    optimizer steps, each step over the whole mini-batch (its tokens)."""
    teacher = kit.teacher_model()

    def run(accumulate):
        config = kit.run_config(task="minillm", batch_size=8, accumulate_steps=accumulate,
                                **{"minillm.num_rollouts": 16, "data.pretrain": ""})
        method, state, update, teacher_params = kit.compile_method(config, kit.student_model(), teacher,
                                                                   kit.data(32))
        return kit.run_updates(method, state, update, teacher_params, 1)

    (one, one_history), (two, two_history) = run(1), run(2)
    assert int(one.step) == int(two.step) == 2
    np.testing.assert_array_equal(two_history[0]["tokens"], one_history[0]["tokens"])
    np.testing.assert_allclose(two_history[0]["rollout/seq_log_ratio"], one_history[0]["rollout/seq_log_ratio"],
                               rtol=1e-6)
    np.testing.assert_allclose(two_history[0]["policy_ratio_deviation"][0], 0.0, atol=1e-6)


def test_learning_rate_schedules():
    _, constant = make_optimizer(learning_rate=0.1)
    assert float(constant(0)) == pytest.approx(0.1)
    _, warm = make_optimizer(learning_rate=0.1, warmup_steps=10)
    assert [round(float(warm(s)), 4) for s in (0, 5, 10, 500)] == [0.0, 0.05, 0.1, 0.1]
    _, cosine = make_optimizer(learning_rate=0.1, warmup_steps=10, schedule="cosine", total_steps=110,
                               end_learning_rate=1e-7)
    assert float(cosine(60)) == pytest.approx(0.05, rel=1e-3) and float(cosine(110)) == pytest.approx(1e-7, rel=1e-2)


@pytest.mark.slow  # >= 12 s on the 2-core machine; CI's second step
@pytest.mark.parametrize("task", ["kd", "minillm"])
def test_chunked_logits_train_like_full_logits(task):
    """Logits made a time-chunk at a time take the same optimizer steps as whole [B, T, V] logits."""
    teacher = kit.teacher_model()

    def run(chunk):
        config = kit.run_config(task=task, batch_size=8, logits_chunk_size=chunk,
                                **{"minillm.num_rollouts": 8, "data.pretrain": ""})
        method, state, update, teacher_params = kit.compile_method(config, kit.student_model(), teacher,
                                                                   kit.data(16))
        return kit.run_updates(method, state, update, teacher_params, 2)

    (full, full_history), (chunked, chunked_history) = run(0), run(3)
    for name in full_history[-1]:
        np.testing.assert_allclose(chunked_history[-1][name], full_history[-1][name], rtol=1e-4, atol=1e-6,
                                   err_msg=name)
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(chunked.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("task", ["sft", "kd", "seqkd", "minillm", "gkd", "distillm"])
def test_updates_never_touch_the_teacher_and_compile_once(task, tmp_path):
    """Training donates the student's buffers: a student cut from the teacher must not alias them, and no
    update may change the teacher. An update compiles once per kind and shape of its inputs."""
    teacher = kit.teacher_model()
    before = jax.tree.map(np.array, nnx.state(teacher))
    student = select_layers(teacher, [1])
    config = kit.run_config(task=task, batch_size=8, **{"minillm.num_rollouts": 8, "data.pretrain": "",
                                                        "data.length_buckets": 1})
    method, state, update, teacher_params = kit.compile_method(config, student, teacher, kit.data(16),
                                                               workdir=tmp_path)
    shapes, feed_next = set(), method.feed.next

    def recorded():  # the kinds and shapes of inputs the updates see (GKD and DistiLLM: gold or sampled)
        inputs = feed_next()
        shapes.add(str(jax.tree.map(lambda x: (np.shape(x), np.asarray(x).dtype.name), inputs)))
        return inputs

    method.feed.next = recorded
    traced = TRACE_COUNTS[task]
    kit.run_updates(method, state, update, teacher_params, 3)
    assert TRACE_COUNTS[task] - traced == len(shapes)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(nnx.state(teacher))):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_response_hidden_runs_the_model_over_whole_bucket_widths(monkeypatch):
    """The teacher-forced states of the response come from a forward pass over all P + R tokens (bucket widths,
    multiples of 8: even lengths, which cuDNN's fused attention needs in training and a GPU's batched matmuls
    take without padding copies), and equal the states a pass without the last token gives (causal)."""
    from minillm_jax.data.batches import sequence_batch
    from minillm_jax.trainers.common import response_hidden

    model = kit.student_model()
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(1, 50, n)) for n in (3, 8, 5)]
    responses = [list(rng.integers(1, 50, n)) for n in (8, 2, 6)]
    batch = {k: jnp.asarray(v) for k, v in sequence_batch(prompts, responses, 8, 8, pad_id=0).items()}
    widths, real = [], model.hidden_states

    def hidden_states(ids, mask, **kwargs):
        widths.append(ids.shape[1])
        return real(ids, mask, **kwargs)
    monkeypatch.setattr(model, "hidden_states", hidden_states)
    hidden = np.asarray(response_hidden(model, batch))
    assert widths == [16]
    tokens = jnp.concatenate([batch["prompt"], batch["response"]], axis=1)
    mask = jnp.concatenate([batch["prompt_mask"], batch["response_mask"]], axis=1)
    shorter = np.asarray(real(tokens[:, :-1], mask[:, :-1]))[:, 7:]  # position t predicts response token t
    np.testing.assert_allclose(hidden, shorter, rtol=1e-5, atol=1e-5)
