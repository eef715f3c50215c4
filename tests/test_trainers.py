"""Tiny end-to-end runs on CPU: each method's loss falls; MiniLLM lowers the reverse KL to the teacher on
held-out prompts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from minillm_jax.models import ModelConfig, Transformer
from minillm_jax.sampling import SamplingConfig, generate
from minillm_jax.trainers import kd, minillm, sft
from minillm_jax.trainers.common import create_train_state, make_optimizer, sequence_reverse_kl

CONFIG = ModelConfig(model_type="llama", vocab_size=16, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                     head_dim=16, intermediate_size=64, max_position_embeddings=64, tie_word_embeddings=False)


def _teacher(seed=1, sharpness=12.0) -> Transformer:
    """A random model made confident, so there is something definite to learn from it."""
    model = Transformer(CONFIG, rngs=nnx.Rngs(seed))
    model.lm_head[...] = model.lm_head[...] * sharpness
    return model


def _prompts(n, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 16, size=int(rng.integers(2, 6))).tolist() for _ in range(n)]


def _sequences(n=16, seed=0):
    """Left-padded prompt + response batches with a response loss mask."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 16, size=(n, 10)).astype(np.int32)
    attention = np.ones((n, 10), np.int32)
    attention[::2, :2] = 0
    tokens[attention == 0] = 0
    loss_mask = np.zeros((n, 10), np.int32)
    loss_mask[:, 6:] = 1
    return {"tokens": jnp.asarray(tokens), "attention_mask": jnp.asarray(attention),
            "loss_mask": jnp.asarray(loss_mask)}


def test_sft_loss_falls():
    tx, schedule = make_optimizer(learning_rate=3e-3, warmup_steps=2)
    graphdef, state = create_train_state(Transformer(CONFIG, rngs=nnx.Rngs(0)), tx)
    step = sft.make_train_step(graphdef, tx, schedule)
    batch = _sequences()
    history = []
    for _ in range(40):
        state, metrics = step(state, batch)
        history.append(float(metrics["loss"]))
    assert history[-1] < 0.5 * history[0], history[::8]
    assert int(state.step) == 40


@pytest.mark.parametrize("kd_ratio", [0.5, 1.0])
def test_kd_loss_falls_and_pure_kd_approaches_the_teacher(kd_ratio):
    teacher = _teacher()
    teacher_def, teacher_params = nnx.split(teacher)
    tx, schedule = make_optimizer(learning_rate=3e-3, warmup_steps=2)
    graphdef, state = create_train_state(Transformer(CONFIG, rngs=nnx.Rngs(0)), tx)
    step = kd.make_train_step(graphdef, teacher_def, tx, schedule, kd_ratio=kd_ratio)
    batch = _sequences()
    first = None
    for _ in range(40):
        state, metrics = step(state, teacher_params, batch)
        first = first or {k: float(v) for k, v in metrics.items()}
    if kd_ratio == 1.0:  # soft CE = forward KL + the teacher's entropy: the KL part must vanish
        assert float(metrics["forward_kl"]) < 0.3 * first["forward_kl"]
    else:
        assert float(metrics["loss"]) < 0.7 * first["loss"]


def _held_out_reverse_kl(student, teacher, prompts, sampling, seed=123):
    out = generate(student, prompts, sampling, jax.random.key(seed), teacher=teacher, mix_alpha=0.0)
    return float(sequence_reverse_kl(out.logprobs, out.teacher_logprobs, out.mask))


@pytest.mark.parametrize("importance,single_step", [("token", True), ("sequence", False)])
def test_minillm_lowers_reverse_kl_on_held_out_prompts(importance, single_step):
    """Also with the policy-gradient term alone (no single-step term), so a wrong sign there fails."""
    teacher = _teacher()
    student = Transformer(CONFIG, rngs=nnx.Rngs(0))
    sampling = SamplingConfig(max_new_tokens=6, eos_token_id=0, prompt_buckets=(8,))
    config = minillm.MiniLLMConfig(minibatch_size=32, ppo_epochs=2, importance=importance, single_step=single_step)
    tx, schedule = make_optimizer(learning_rate=1e-2, warmup_steps=2)
    graphdef, state = create_train_state(student, tx)
    step = minillm.make_train_step(graphdef, nnx.graphdef(teacher), tx, schedule, config)
    held_out = _prompts(256, seed=99)
    before = _held_out_reverse_kl(student, teacher, held_out, sampling)
    rng = jax.random.key(0)
    for round_index in range(8):
        state, stats, metrics = minillm.train_round(state, graphdef, teacher, _prompts(64, round_index), sampling,
                                                    jax.random.fold_in(rng, round_index), config, step)
        assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(stats["rollout/reverse_kl"]))
    after = _held_out_reverse_kl(nnx.merge(graphdef, state.params), teacher, held_out, sampling)
    assert after < 0.7 * before, (before, after)
    assert {"pg", "entropy", "grad_norm", "lr"} | ({"single_step"} if single_step else set()) <= set(metrics)


def _eval_divergence(graphdef, state, teacher, batch, fn):
    from minillm_jax.trainers.common import shifted_logits

    student = nnx.merge(graphdef, state.params)
    s = shifted_logits(student, batch["tokens"], batch["attention_mask"])
    t = shifted_logits(teacher, batch["tokens"], batch["attention_mask"])
    return float(fn(s, t, batch["loss_mask"][:, 1:]))


def test_gkd_mixes_on_policy_batches_and_lowers_jsd():
    from minillm_jax import losses
    from minillm_jax.trainers import gkd

    teacher = _teacher()
    config = gkd.GKDConfig(beta=0.5, lmbda=0.5)
    tx, schedule = make_optimizer(learning_rate=3e-3, warmup_steps=2)
    graphdef, state = create_train_state(Transformer(CONFIG, rngs=nnx.Rngs(0)), tx)
    step = gkd.make_train_step(graphdef, nnx.graphdef(teacher), tx, schedule, config)
    gold, prompts = _sequences(), _prompts(16, seed=5)
    sampling = SamplingConfig(max_new_tokens=6, eos_token_id=0, prompt_buckets=(8,))
    held_out = _sequences(seed=7)

    def jsd(s, t, m):
        return losses.jsd(s, t, m, 0.5)

    before = _eval_divergence(graphdef, state, teacher, held_out, jsd)
    coin, kinds = np.random.default_rng(0), []
    for i in range(30):
        batch, on_policy = gkd.choose_batch(gold, prompts, state, graphdef, sampling, jax.random.key(i), config, coin)
        kinds.append(on_policy)
        state, metrics = step(state, nnx.state(teacher), batch)
    assert 5 < sum(kinds) < 25  # both kinds of batch were used
    assert _eval_divergence(graphdef, state, teacher, held_out, jsd) < 0.7 * before


def test_distillm_adaptive_off_policy_and_skew_reverse_kl():
    from minillm_jax import losses
    from minillm_jax.trainers import distillm
    from minillm_jax.trainers.batches import from_samples

    config = distillm.DistiLLMConfig(initial_sgo_prob=0.5)
    schedule_state = distillm.AdaptiveOffPolicy(config)
    assert schedule_state.update(1.0) == 0.5  # improved: unchanged
    assert schedule_state.update(1.2) == pytest.approx(0.6)  # worse: more student-generated outputs
    assert schedule_state.update(0.9) == pytest.approx(0.6)

    teacher = _teacher()
    tx, schedule = make_optimizer(learning_rate=3e-3, warmup_steps=2)
    graphdef, state = create_train_state(Transformer(CONFIG, rngs=nnx.Rngs(0)), tx)
    step = distillm.make_train_step(graphdef, nnx.graphdef(teacher), tx, schedule, config)
    gold, prompts = _sequences(), _prompts(16, seed=6)
    sampling = SamplingConfig(max_new_tokens=6, eos_token_id=0, prompt_buckets=(8,))
    held_out = _sequences(seed=8)

    def srkl(s, t, m):
        return losses.skew_reverse_kl(s, t, m, 0.1)

    before = _eval_divergence(graphdef, state, teacher, held_out, srkl)
    kinds = []
    for i in range(30):
        def fresh(i=i):
            return from_samples(generate(nnx.merge(graphdef, state.params), prompts, sampling, jax.random.key(i)))

        batch, kind = schedule_state.choose(gold, fresh)
        kinds.append(kind)
        state, _ = step(state, nnx.state(teacher), batch)
    assert {"gold", "fresh", "replay"} <= set(kinds)
    assert _eval_divergence(graphdef, state, teacher, held_out, srkl) < 0.7 * before


def test_seqkd_writes_teacher_answers_and_sft_learns_them(tmp_path):
    import json

    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    from minillm_jax.sampling import SampleOutput
    from minillm_jax.trainers import seqkd
    from minillm_jax.trainers.batches import from_samples

    vocab = {f"w{i}": i for i in range(16)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w1"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="w0", unk_token="w1")

    teacher = _teacher()
    prompts = _prompts(24, seed=11)
    sampling = SamplingConfig(max_new_tokens=6, eos_token_id=0, prompt_buckets=(8,))
    answers = seqkd.teacher_answers(teacher, prompts, sampling, jax.random.key(0), batch_size=8)
    records = [{"instruction": " ".join(f"w{t}" for t in p), "output": "gold"} for p in prompts]
    path = seqkd.write_teacher_data(tmp_path / "seqkd.jsonl", records, answers, tokenizer)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 24 and lines[3]["instruction"] == records[3]["instruction"]
    assert lines[3]["output"] == " ".join(f"w{t}" for t in answers[3] if t != 0)

    # SFT on the teacher's answers (the second SeqKD stage) learns them.
    width = max(map(len, answers))
    tokens = np.zeros((24, width), np.int32)
    mask = np.zeros((24, width), bool)
    for i, answer in enumerate(answers):
        tokens[i, : len(answer)], mask[i, : len(answer)] = answer, True
    from minillm_jax.sampling import pad_prompts

    prompt_ids, prompt_mask = pad_prompts(prompts, (8,), 0)
    batch = from_samples(SampleOutput(tokens=jnp.asarray(tokens), mask=jnp.asarray(mask), lengths=None,
                                      logprobs=None, prompt_tokens=jnp.asarray(prompt_ids),
                                      prompt_mask=jnp.asarray(prompt_mask)))
    tx, schedule = make_optimizer(learning_rate=3e-3, warmup_steps=2)
    graphdef, state = create_train_state(Transformer(CONFIG, rngs=nnx.Rngs(0)), tx)
    step = sft.make_train_step(graphdef, tx, schedule)
    losses_seen = []
    for _ in range(30):
        state, metrics = step(state, batch)
        losses_seen.append(float(metrics["loss"]))
    assert losses_seen[-1] < 0.6 * losses_seen[0]


def test_gradient_accumulation_equals_one_large_batch():
    batch = _sequences(n=16)
    halves = [{k: v[:8] for k, v in batch.items()}, {k: v[8:] for k, v in batch.items()}]
    # the two halves hold the same number of loss tokens, so the mean of means is the global mean
    assert int(halves[0]["loss_mask"][:, 1:].sum()) == int(halves[1]["loss_mask"][:, 1:].sum())

    def run(batches, accumulate):
        tx, schedule = make_optimizer(learning_rate=1e-2, accumulate_steps=accumulate)
        graphdef, state = create_train_state(Transformer(CONFIG, rngs=nnx.Rngs(0)), tx)
        step = sft.make_train_step(graphdef, tx, schedule)
        for b in batches:
            state, _ = step(state, b)
        return state.params

    one = run([batch, batch], 1)
    accumulated = run(halves + halves, 2)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(accumulated)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-4)  # Adam amplifies ~1e-7
    moved = run([batch], 1)
    assert not all(np.allclose(np.asarray(a), np.asarray(b)) for a, b in
                   zip(jax.tree.leaves(moved), jax.tree.leaves(run([], 1))))


def test_learning_rate_schedules():
    _, constant = make_optimizer(learning_rate=0.1)
    assert float(constant(0)) == pytest.approx(0.1)
    _, warm = make_optimizer(learning_rate=0.1, warmup_steps=10)
    assert [round(float(warm(s)), 4) for s in (0, 5, 10, 500)] == [0.0, 0.05, 0.1, 0.1]
    _, cosine = make_optimizer(learning_rate=0.1, warmup_steps=10, schedule="cosine", total_steps=110,
                               end_learning_rate=1e-7)
    assert float(cosine(60)) == pytest.approx(0.05, rel=1e-3) and float(cosine(110)) == pytest.approx(1e-7, rel=1e-2)
    _, accumulated = make_optimizer(learning_rate=0.1, warmup_steps=10, accumulate_steps=4)
    assert float(accumulated(20)) == pytest.approx(0.05)  # micro-step 20 belongs to update 5


def test_chunked_logits_train_like_full_logits():
    """KD with logits made a time-chunk at a time takes the same steps as with whole [B, T, V] logits."""
    teacher = _teacher()
    batch = _sequences()

    def run(chunk):
        tx, schedule = make_optimizer(learning_rate=3e-3)
        graphdef, state = create_train_state(Transformer(CONFIG, rngs=nnx.Rngs(0)), tx)
        step = kd.make_train_step(graphdef, nnx.graphdef(teacher), tx, schedule, logits_chunk_size=chunk)
        for _ in range(3):
            state, metrics = step(state, nnx.state(teacher), batch)
        return state.params, metrics

    (full, full_metrics), (chunked, chunked_metrics) = run(None), run(4)
    for name in ("loss", "ce", "soft_ce", "forward_kl"):
        np.testing.assert_allclose(chunked_metrics[name], full_metrics[name], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(chunked)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_minillm_chunked_logits_match_full_logits():
    teacher = _teacher()
    student = Transformer(CONFIG, rngs=nnx.Rngs(0))
    sampling = SamplingConfig(max_new_tokens=6, eos_token_id=0, prompt_buckets=(8,))
    results = []
    for chunk in (None, 4):
        config = minillm.MiniLLMConfig(minibatch_size=16, ppo_epochs=1, logits_chunk_size=chunk)
        rollouts, _ = minillm.make_rollouts(student, teacher, _prompts(16, 3), sampling, jax.random.key(0), config)
        graphdef, params = nnx.split(student)
        pt_batch = _sequences()
        grad_fn = jax.value_and_grad(minillm.minillm_loss, has_aux=True)
        (_, metrics), grads = grad_fn(params, graphdef, nnx.graphdef(teacher), nnx.state(teacher), rollouts, pt_batch,
                                      config)
        results.append((metrics, grads))
    (full_metrics, full_grads), (chunked_metrics, chunked_grads) = results
    for name in ("loss", "pg", "single_step", "pt", "entropy"):
        np.testing.assert_allclose(chunked_metrics[name], full_metrics[name], rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(full_grads), jax.tree.leaves(chunked_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_student_from_teacher_layers_can_be_trained_without_touching_the_teacher():
    """Training donates the student's buffers; a student cut from the teacher must not alias them."""
    from minillm_jax.models import select_layers

    teacher = _teacher()
    before = np.asarray(teacher(_sequences()["tokens"]))
    tx, schedule = make_optimizer(learning_rate=1e-2)
    graphdef, state = create_train_state(select_layers(teacher, [1]), tx)
    step = sft.make_train_step(graphdef, tx, schedule)
    state, _ = step(state, _sequences())
    np.testing.assert_array_equal(np.asarray(teacher(_sequences()["tokens"])), before)
