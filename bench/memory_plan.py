"""Compiled memory per device of a distillation train step, from XLA's own memory analysis (CPU, fake
devices; nothing is allocated): the KD step (teacher forward + student forward/backward + AdamW), both
models sharded by the training rules, batch split over (data, fsdp).

    python bench/memory_plan.py --setup llama13b-7b    # 64 devices, mesh data=4 fsdp=16 tensor=1
    python bench/memory_plan.py --setup gpt2xl-124m    # 1 device (an 80 GB GPU), batch 64 x 512

Student parameters and Adam moments in float32, compute in bfloat16; teacher stored in bfloat16.

XLA:CPU has no bfloat16 matmul: it converts bf16 weights to f32 and, by loop-invariant code motion, does
so for a whole stacked [layers, ...] weight before the layer loop, which adds an f32 copy of every bf16
model to the temporaries (twice the teacher's bytes per device) that a GPU/TPU compile never makes. The
bench therefore disables that one pass (`--xla_disable_hlo_passes=while-loop-invariant-code-motion`), so
the conversion stays per layer; `--cpu-hoisting` keeps XLA:CPU's default.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from types import SimpleNamespace

SETUPS = {
    # name: devices, mesh (data, fsdp, tensor), teacher, student, batch, length, remat, logits chunk
    "llama13b-7b": (64, (4, 16, 1), "llama-13b", "llama-7b", 64, 512, "full", 128),
    "gpt2xl-124m": (1, (1, 1, 1), "gpt2-xl", "gpt2", 64, 512, "none", 128),
}


def hf_config(name):
    import transformers

    if name.startswith("llama"):
        size = dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40) \
            if name == "llama-13b" else dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                             num_attention_heads=32)
        return transformers.LlamaConfig(vocab_size=32000, max_position_embeddings=4096, **size)
    size = dict(n_embd=1600, n_layer=48, n_head=25) if name == "gpt2-xl" else dict(n_embd=768, n_layer=12, n_head=12)
    return transformers.GPT2Config(vocab_size=50257, n_positions=1024, **size)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--setup", choices=sorted(SETUPS), default="llama13b-7b")
    parser.add_argument("--remat", choices=("none", "full", "dots"), help="override the setup's remat policy")
    parser.add_argument("--mesh", help="override the mesh: data,fsdp,tensor (product = the setup's devices)")
    parser.add_argument("--teacher-rules", choices=("train", "sample"), default="train",
                        help="the teacher's placement: 'train' (over fsdp, as task kd places it) or 'sample' (whole "
                             "along fsdp, as minillm places it for its mixed sampling)")
    parser.add_argument("--cpu-hoisting", action="store_true",
                        help="keep XLA:CPU's loop-invariant code motion (adds f32 copies of the bf16 weights)")
    args = parser.parse_args()
    devices, mesh_shape, teacher_name, student_name, rows_per_step, length, remat, chunk = SETUPS[args.setup]
    remat = args.remat or remat
    mesh_shape = tuple(int(x) for x in args.mesh.split(",")) if args.mesh else mesh_shape
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if not args.cpu_hoisting:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_disable_hlo_passes=while-loop-invariant-code-motion").strip()
    import jax

    jax.config.update("jax_num_cpu_devices", devices)
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    import jax.numpy as jnp
    from flax import nnx

    from minillm_jax import sharding
    from minillm_jax.checkpoint import abstract_train_state
    from minillm_jax.models import Transformer
    from minillm_jax.models.families import config_from_hf
    from minillm_jax.trainers import kd
    from minillm_jax.trainers.common import apply_gradients, make_optimizer

    mesh = sharding.make_mesh(*mesh_shape)
    teacher_config = config_from_hf(hf_config(teacher_name)).replace(param_dtype="bfloat16", dtype="bfloat16",
                                                                     remat=remat)
    student_config = config_from_hf(hf_config(student_name)).replace(param_dtype="float32", dtype="bfloat16",
                                                                     remat=remat)
    teacher = nnx.eval_shape(lambda: Transformer(teacher_config, rngs=nnx.Rngs(0)))
    student = nnx.eval_shape(lambda: Transformer(student_config, rngs=nnx.Rngs(0)))
    tx, schedule = make_optimizer(learning_rate=1e-5)
    state = abstract_train_state(student, tx, mesh=mesh)
    teacher_rules = sharding.TRAIN_RULES if args.teacher_rules == "train" else sharding.SAMPLE_RULES
    teacher_params = abstract_train_state(teacher, make_optimizer(learning_rate=1.0)[0], mesh=mesh,
                                          rules=teacher_rules).params
    rows = sharding.rows_sharding(mesh, (rows_per_step, length))
    prompt = length // 2
    batch = {"prompt": jax.ShapeDtypeStruct((rows_per_step, prompt), jnp.int32, sharding=rows),
             "prompt_mask": jax.ShapeDtypeStruct((rows_per_step, prompt), bool, sharding=rows),
             "response": jax.ShapeDtypeStruct((rows_per_step, length - prompt), jnp.int32, sharding=rows),
             "response_mask": jax.ShapeDtypeStruct((rows_per_step, length - prompt), bool, sharding=rows)}
    # what kd_loss reads of a trainers.common.Setup
    setup = SimpleNamespace(graphdef=nnx.graphdef(student), teacher_graphdef=nnx.graphdef(teacher),
                            config=SimpleNamespace(logits_chunk_size=chunk))

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state, teacher_params, batch):  # the KD update of trainers/kd.py with one micro-batch
        grad_fn = jax.value_and_grad(kd.kd_loss, has_aux=True)
        (_, metrics), grads = grad_fn(state.params, teacher_params, batch, None, setup=setup, kd_ratio=0.5)
        return apply_gradients(state, grads, tx, schedule)
    started = time.time()
    compiled = step.lower(state, teacher_params, batch).compile()
    memory = compiled.memory_analysis()
    count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
    gib = 2 ** 30
    per_device = memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes + \
        memory.temp_size_in_bytes
    print(f"setup {args.setup}: {devices} devices, mesh {dict(mesh.shape)}; teacher {teacher_name} "
          f"{count(teacher_params) / 1e9:.2f} B params bf16, student {student_name} {count(state.params) / 1e9:.2f} B "
          f"fp32 + AdamW; teacher placed by the {args.teacher_rules} rules; batch {rows_per_step} x {length}; remat "
          f"{remat}; logits chunk {chunk}; compile "
          f"{time.time() - started:.0f} s")
    print(f"per device: arguments {memory.argument_size_in_bytes / gib:.2f} GiB, outputs "
          f"{memory.output_size_in_bytes / gib:.2f} GiB (aliased {memory.alias_size_in_bytes / gib:.2f}), temporaries "
          f"{memory.temp_size_in_bytes / gib:.2f} GiB, peak estimate {per_device / gib:.2f} GiB")


if __name__ == "__main__":
    main()
