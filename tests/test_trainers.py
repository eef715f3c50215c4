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
