"""What a sampling call moves besides its reads: compiles `generate` (abstract weights: nothing is allocated
or run) and lists the large copies and slices in XLA's optimized program, the ones a decode step makes on top
of reading the weights and the KV cache once (a layer scan over stacked weights and a stacked cache may slice
each layer out as a copy before a library matmul: on XLA:CPU it does, which at long answers costs this CPU
~16-20% of a step, bench/RESULTS.md "Evaluation-length decoding"; XLA:GPU does not copy the cache, only each
layer's weights, as `bench/gpu_hlo.py decode` shows by compiling for an H200 from a CPU machine).

    python bench/decode_hlo.py                 # GPT-2 124M, bf16, B 128, prompt 256, 256 new: the GPU suite's case
    python bench/decode_hlo.py --smoke         # tiny shapes, to test the script
    python bench/decode_hlo.py --teacher       # teacher-mixed with the GPT-2 XL teacher

Prints the instructions that copy or slice >= 1 MiB with the computation they sit in (the decode step's ones
run once per layer per step), and, with $OUT set, writes the whole optimized program to $OUT/decode_hlo.txt
(--name).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_hlo import array_bytes  # noqa: E402  (imports no jax)

SHAPES = {
    "gpu": dict(student=dict(n_embd=768, n_layer=12, n_head=12), teacher=dict(n_embd=1600, n_layer=48, n_head=25),
                vocab=50257, batch=128, prompt=256, new=256, dtype="bfloat16"),
    "smoke": dict(student=dict(n_embd=64, n_layer=2, n_head=4), teacher=dict(n_embd=128, n_layer=3, n_head=4),
                  vocab=512, batch=4, prompt=16, new=16, dtype="float32"),
}
# `%name = type[dims]{layout} op(` with the op or the fusion's name saying copy/slice (XLA names a fusion
# after the instructions it holds, e.g. dynamic-slice_bitcast_fusion.7 or wrapped_dynamic-slice)
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.-]+) = (\w+)\[([\d,]*)\]\S* ([\w-]+)\(")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.-]+) ")
_CALLEE = re.compile(r"\b(body|condition|to_apply|calls|true_computation|false_computation)=%([\w.-]+)")


def moves(hlo: str, min_bytes: int = 1 << 20) -> list[tuple[int, str, str, str, int]]:
    """(loop depth, computation, instruction, op, bytes) of every copy, slice or transpose (not an in-place
    update) writing at least `min_bytes` in an optimized HLO module. Fusion bodies are skipped (a fusion
    counts once, by its own name, which XLA builds from what it holds: dynamic-slice_bitcast_fusion.7,
    wrapped_dynamic-slice); the depth counts the while loops around the computation (a decode step's
    layer body sits three deep: chunks, steps in a chunk, layers)."""
    found, parent, computation = [], {}, ""
    for line in hlo.splitlines():
        head = _COMPUTATION.match(line)
        if head:
            computation = head.group(1)
            continue
        for kind, callee in _CALLEE.findall(line):
            parent.setdefault(callee, (computation, kind == "body"))
        for branches in re.findall(r"branch_computations=\{([^}]*)\}", line):
            for callee in re.findall(r"%([\w.-]+)", branches):
                parent.setdefault(callee, (computation, False))
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, dtype, dims, op = match.groups()
        what = f"{op} {name}"
        if "update" in what or not any(word in what for word in ("copy", "slice", "transpose")):
            continue
        size = array_bytes(f"{dtype}[{dims}]")
        if size >= min_bytes:
            found.append((computation, name, op, size))

    def depth(name: str) -> int:
        n = 0
        while name in parent:
            name, is_body = parent[name]
            n += is_body
        return n

    fusions = {callee for callee, (_, is_body) in parent.items() if not is_body}
    return [(depth(c), c, name, op, size) for c, name, op, size in found
            if not (c.startswith(("fused_", "wrapped_")) and c in fusions)]


def generate_program(shapes: dict, teacher: bool, batch: int, segments: int = 1, split_layers: bool = False,
                     kv_cache_dtype: str = "auto", no_repeat_ngram_size: int = 0, attention: str = "model"):
    """(the jitted `generate` of the GPU suite's sampling case at `shapes`, its abstract arguments, its
    SamplingConfig): random GPT-2 student (and GPT-2 XL teacher), nothing allocated; `segments` > 1 sets
    SamplingConfig.cache_segments, `split_layers` SamplingConfig.split_layers, `kv_cache_dtype` (not "auto")
    SamplingConfig.kv_cache_dtype, `no_repeat_ngram_size` (evaluation's n-gram blocking) likewise (each left out
    otherwise, so checkouts from before them build too); `attention` "cudnn": ModelConfig.attention of both
    models (the prompt prefill's attention; decode steps read the cache in the model's own softmax)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from bench.train_mfu import gpt2_builder
    from minillm_jax.sampling import SamplingConfig, _compiled_generate

    def abstract(dims):
        return nnx.split(nnx.eval_shape(gpt2_builder(dims, shapes, attention)))

    student_def, student_state = abstract(shapes["student"])
    teacher_def, teacher_state = abstract(shapes["teacher"]) if teacher else (None, None)
    P = shapes["prompt"]
    option = {"cache_segments": segments} if segments > 1 else {}
    if split_layers:
        option["split_layers"] = True
    if kv_cache_dtype != "auto":
        option["kv_cache_dtype"] = kv_cache_dtype
    if no_repeat_ngram_size:
        option["no_repeat_ngram_size"] = no_repeat_ngram_size
    config = SamplingConfig(max_new_tokens=shapes["new"], prompt_buckets=(P,), **option)
    run = _compiled_generate(student_def, teacher_def, config, shapes["vocab"], None, batch)
    args = (student_state, teacher_state, jax.ShapeDtypeStruct((batch, P), jnp.int32),
            jax.ShapeDtypeStruct((batch, P), jnp.bool_), jax.eval_shape(lambda: jax.random.key(0)),
            jax.ShapeDtypeStruct((), jnp.float32))
    return run, args, config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--teacher", action="store_true", help="teacher-mixed sampling (the GPT-2 XL teacher)")
    parser.add_argument("--name", default="decode_hlo", help="the file written under $OUT: NAME.txt")
    args = parser.parse_args()

    import jax

    shapes = SHAPES["smoke" if args.smoke else "gpu"]
    B, P = shapes["batch"], shapes["prompt"]
    run, program_args, _ = generate_program(shapes, args.teacher, B)
    text = run.lower(*program_args).compile().as_text()
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"{args.name}.txt").write_text(text)
    found = moves(text, 1 << 10 if args.smoke else 1 << 20)
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}: generate B {B} x prompt {P} + {shapes['new']} new, "
          f"{shapes['dtype']}{', teacher-mixed' if args.teacher else ''}; {len(text.splitlines())} HLO lines")
    print("| loop depth | computation | instruction | op | MiB |")
    print("|---|---|---|---|---|")
    for d, computation, name, op, size in sorted(found, key=lambda f: (-f[0], -f[4])):
        print(f"| {d} | {computation} | {name} | {op} | {size / 2**20:.2f} |")
    if not found:
        print("| (none) | | | | |")
    deepest = max((f[0] for f in found), default=0)
    inner = sum(f[4] for f in found if f[0] == deepest)
    print(f"at the deepest loop ({deepest}): {inner / 2**20:.1f} MiB copied or sliced per iteration")


if __name__ == "__main__":
    main()
