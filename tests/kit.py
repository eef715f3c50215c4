"""Building blocks for tests of the training methods: the production `build` functions, setups and compiled
updates on tiny models, without going through the CLI."""

from __future__ import annotations

import pathlib

import jax
import numpy as np
from flax import nnx

from configs.demo import get_config
from minillm_jax.config import RunConfig
from minillm_jax.data import InstructionData
from minillm_jax.models import ModelConfig, Transformer
from minillm_jax.sampling import SamplingConfig
from minillm_jax.trainers import METHODS
from minillm_jax.trainers.common import Setup, create_train_state, jit_update, make_optimizer, sharded_train_state

VOCAB = 16
CONFIG = ModelConfig(model_type="llama", vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                     head_dim=16, intermediate_size=64, max_position_embeddings=64, tie_word_embeddings=False)


def teacher_model(seed=1, sharpness=12.0) -> Transformer:
    """A random model made confident, so there is something definite to learn from it."""
    model = Transformer(CONFIG, rngs=nnx.Rngs(seed))
    model.lm_head[...] = model.lm_head[...] * sharpness
    return model


def student_model(seed=0, config: ModelConfig = CONFIG) -> Transformer:
    return Transformer(config, rngs=nnx.Rngs(seed))


def prompts(n, seed, low=2, high=6) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, VOCAB, size=int(rng.integers(low, high))).tolist() for _ in range(n)]


def data(n=32, seed=0, response_length=(2, 5)) -> InstructionData:
    """Prompt/answer examples over the tiny vocabulary (EOS = 0 closes each answer)."""
    rng = np.random.default_rng(seed)
    responses = [rng.integers(1, VOCAB, size=int(rng.integers(*response_length))).tolist() + [0] for _ in range(n)]
    return InstructionData(prompts(n, seed + 1000), responses, 0, 0)


def run_config(**overrides) -> RunConfig:
    """configs/demo.py:tiny with dotted overrides ("minillm.ppo_epochs": 2), typed and validated."""
    c = get_config("tiny")
    for key, value in overrides.items():
        *path, name = key.split(".")
        node = c
        for part in path:
            node = node[part]
        node[name] = value
    return RunConfig.from_dict(c)


def sampling(max_new_tokens=6, buckets=(8,), **changes) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=max_new_tokens, eos_token_id=0, pad_token_id=0, prompt_buckets=buckets,
                          **changes)


def setup(config: RunConfig, student: Transformer, teacher: Transformer | None, train: InstructionData, *,
          sampling_config: SamplingConfig | None = None, mesh=None, workdir: pathlib.Path | None = None,
          tx=None) -> tuple[Setup, object]:
    """(Setup, the student) with the run config's optimizer."""
    o = config.optimizer
    if tx is None:
        tx = make_optimizer(learning_rate=o.learning_rate, warmup_steps=o.warmup_steps, total_steps=config.steps,
                            schedule=o.schedule, weight_decay=o.weight_decay, max_grad_norm=o.max_grad_norm or None)
    return Setup(config=config, graphdef=nnx.graphdef(student), tx=tx[0], schedule=tx[1], teacher=teacher, mesh=mesh,
                 train=train, tokenizer=None, workdir=workdir or pathlib.Path("/nonexistent"),
                 sampling=sampling_config or sampling()), student


def compile_method(config: RunConfig, student, teacher, train: InstructionData, *, mesh=None, **kwargs):
    """(method, state, update, teacher_params): the production method, its initial train state (on the mesh
    when one is given) and its compiled update."""
    s, student = setup(config, student, teacher, train, mesh=mesh, **kwargs)
    method = METHODS[config.task](s)
    if mesh is None:
        _, state = create_train_state(student, s.tx, extra=method.extra)
        update = jit_update(method.update, None, name=config.task)
    else:
        _, state, layout = sharded_train_state(student, s.tx, mesh, extra=method.extra)
        update = jit_update(method.update, layout, s.teacher_layout, name=config.task)
    teacher_params = nnx.state(teacher) if teacher is not None else None
    return method, state, update, teacher_params


def run_updates(method, state, update, teacher_params, count: int, mesh=None):
    """`count` updates fed by the method's own feed; returns (state, list of host metrics per update)."""
    from minillm_jax import sharding

    history = []
    for _ in range(count):
        inputs = method.feed.next()
        if mesh is not None:
            inputs = sharding.place_batch(inputs, mesh)
        state, metrics = update(state, teacher_params, inputs)
        history.append(jax.tree.map(np.asarray, jax.device_get(metrics)))
    return state, history
