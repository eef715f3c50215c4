"""Our GPU programs, compiled for an NVIDIA H200 on a machine without one, and read: how many kernels a call
launches, the bytes its kernels read and write, its matmul FLOPs, and a roofline estimate of its time. For
choosing between designs between GPU sessions; an estimate from XLA:GPU's optimized program, never a
measurement (bench/gpu_suite.sh measures).

Needs jax's CUDA plugin beside the CPU jax (about 3.7 GB; no GPU or driver needed), in its own environment:

    python -m venv --system-site-packages /tmp/gpu-hlo
    /tmp/gpu-hlo/bin/pip install "jax-cuda13-plugin[with-cuda]==$(python -c 'import jax; print(jax.__version__)')" \\
        "jax-cuda13-pjrt==$(python -c 'import jax; print(jax.__version__)')"
    /tmp/gpu-hlo/bin/python bench/gpu_hlo.py train                    # GPT-2 124M SFT step, B 16 x 512, bf16
    /tmp/gpu-hlo/bin/python bench/gpu_hlo.py train --attention cudnn  # ModelConfig.attention "cudnn"
    /tmp/gpu-hlo/bin/python bench/gpu_hlo.py train --attention cudnn --unrolled   # and scan_layers False
    /tmp/gpu-hlo/bin/python bench/gpu_hlo.py train --attention "probe cudnn rolled"  # bench/attention_impl.py's
    /tmp/gpu-hlo/bin/python bench/gpu_hlo.py score                    # GPT-2 XL teacher forward, B 16 x 512
    /tmp/gpu-hlo/bin/python bench/gpu_hlo.py decode [--teacher] [--batch 32] [--tree DIR]  # generate, B 128
    /tmp/gpu-hlo/bin/python bench/gpu_hlo.py decode --split-layers --segments 4  # SamplingConfig options
    /tmp/gpu-hlo/bin/python bench/gpu_hlo.py decode --split-layers --segments 4 --kv-cache-dtype int8
    /tmp/gpu-hlo/bin/python bench/gpu_hlo.py decode --batch 32 --no-repeat-ngram 6   # evaluation's sampling
    /tmp/gpu-hlo/bin/python bench/gpu_hlo.py check                    # the accounting on programs of known cost

`--tree DIR` compiles another checkout's minillm_jax (e.g. one with bench/decode_unrolled.patch applied) with
this checkout's bench/.
With $OUT set, the optimized program is written to $OUT/<case>.hlo.txt.

How: jax's deviceless compilation (jax.experimental.topologies with an H200 target description), the
package told it runs on a GPU (`jax.default_backend` answers "gpu", so it takes the paths it takes there:
bf16 KV cache, jax.nn.dot_product_attention). XLA's autotuner needs a device, so matmuls are cuBLAS calls
(Triton GEMM fusion off) where a GPU might choose Triton for some.

The estimate: each kernel (fusion, library call, copy) of the entry computation and of every while-loop body
(times its trip count) costs max(FLOPs / matmul ceiling, bytes / copy bandwidth) plus a launch; bytes are
what it reads and writes, an in-place dynamic-update-slice counting only its update and a fused dynamic-slice
only its slice. Defaults are figures measured on H200/H100 cards (bench/RESULTS.md, architecture.md): 2.53e12
bytes/s read+written (jnp copy, H200), 783e12 bf16 FLOP/s (JAX matmul, H100; the H200 has the same cores;
half that for float32 operands, which XLA gives cuBLAS as TF32), 3 us per kernel (no CUDA-graph capture
assumed). It ignores overlap, caches and kernel efficiency; it ranks designs by the traffic and launches they
cause, which is what separates them at these shapes.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

H200 = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 4800000000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 150754820096 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 10 }
device_description_str: "NVIDIA H200"
"""
BYTES = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
         "s8": 1, "u8": 1, "pred": 1, "f8e4m3fn": 1, "f8e5m2": 1}
_FREE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all", "partition-id",
         "opt-barrier", "replica-id"}
_INSTRUCTION = re.compile(r"^\s*(ROOT )?%([\w.-]+) = (\(.*?\)|\S+) ([\w-]+)\((.*)$")
_HEAD = re.compile(r"^(ENTRY )?%([\w.-]+) ")


def array_bytes(shape: str) -> int:
    """Bytes of an HLO shape string (`bf16[16,512,768]{2,1,0}`, or a tuple of them)."""
    total = 0
    for dtype, dims in re.findall(r"\b([a-z]+\d*(?:e\dm\d\w*)?)\[([\d,]*)\]", shape):
        if dtype in BYTES:
            n = BYTES[dtype]
            for d in filter(None, dims.split(",")):
                n *= int(d)
            total += n
    return total


@dataclasses.dataclass(frozen=True)
class Instruction:
    root: bool
    name: str
    shape: str
    op: str
    rest: str

    @property
    def operands(self) -> list[str]:
        return re.findall(r"%([\w.-]+)", self.rest.split("), ")[0]) if self.op != "parameter" else []

    @property
    def bytes(self) -> int:
        return array_bytes(self.shape)


def computations(hlo: str) -> tuple[str, dict[str, list[Instruction]]]:
    """(entry name, {computation: instructions}) of an optimized HLO module's text."""
    found, current, entry = {}, None, None
    for line in hlo.splitlines():
        head = _HEAD.match(line)
        if head:
            current = head.group(2)
            found[current] = []
            entry = current if head.group(1) else entry
            continue
        match = _INSTRUCTION.match(line)
        if current and match:
            root, name, shape, op, rest = match.groups()
            found[current].append(Instruction(bool(root), name, shape, op, rest))
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return entry, found


def _fusion_traffic(body: list[Instruction], operand_bytes: list[int]) -> tuple[int, int]:
    """Bytes a fusion reads and writes: a parameter read only through slices, dynamic-slices and gathers
    counts what they pick out (the last of a chain of them), the buffer a dynamic-update-slice
    updates in place counts nothing read and only the update written (bitcasts, which move no data, are looked
    through)."""
    by_name = {i.name: i for i in body}
    users = collections.defaultdict(list)
    for instruction in body:
        for position, operand in enumerate(instruction.operands):
            users[operand].append((instruction, position))

    def uses(name: str) -> list[tuple[Instruction, int]]:  # users, through bitcasts
        found = []
        for user, position in users[name]:
            found += uses(user.name) if user.op == "bitcast" else [(user, position)]
        return found

    def picked(name: str) -> int | None:
        """Bytes of `name` that slices, dynamic-slices and gathers pick out (through chains of them: a
        layer's cache, then its filled slots), or None where anything reads it whole."""
        found = uses(name)
        if not found or not all(u.op in ("slice", "dynamic-slice", "gather") and k == 0 for u, k in found):
            return None
        total = 0
        for u, _ in found:
            deeper = None if u.op == "gather" else picked(u.name)
            total += u.bytes if deeper is None else min(deeper, u.bytes)
        return total

    read = 0
    for p in (i for i in body if i.op == "parameter"):
        index = int(re.match(r"(\d+)", p.rest).group(1))
        reads = uses(p.name)
        part = picked(p.name)
        if part is not None:
            read += part
        elif reads and all(u.op == "dynamic-update-slice" and k == 0 for u, k in reads):
            continue
        else:
            read += operand_bytes[index] if index < len(operand_bytes) else p.bytes

    def written(name: str) -> int:
        instruction = by_name[name]
        while instruction.op == "bitcast":
            instruction = by_name[instruction.operands[0]]
        if instruction.op == "dynamic-update-slice":
            return by_name[instruction.operands[1]].bytes
        return by_name[name].bytes

    root = next(i for i in body if i.root)
    return read, sum(written(n) for n in root.operands) if root.op == "tuple" else written(root.name)


@dataclasses.dataclass
class Cost:
    seconds: float = 0.0
    kernels: int = 0
    bytes: float = 0.0
    flops: float = 0.0

    def add(self, seconds, kernels, nbytes, flops):
        self.seconds += seconds
        self.kernels += kernels
        self.bytes += nbytes
        self.flops += flops


def roofline(hlo: str, *, bandwidth: float = 2.53e12, matmul: float = 783e12, launch: float = 3e-6,
             unknown_trips: int | None = None):
    """(total Cost, {(loop, kind): Cost}) of an optimized XLA:GPU module, as the module docstring says. A while
    loop without a known trip count (decode's early exit between chunks) runs `unknown_trips` times."""
    entry, comps = computations(hlo)
    rows: dict[tuple[str, str], Cost] = collections.defaultdict(Cost)
    total = Cost()

    def walk(name: str, times: int, loop: str):
        shapes = {}
        for i in comps[name]:
            shapes[i.name] = i.bytes
            if i.op in _FREE:
                continue
            if i.op == "while":
                body = re.search(r"body=%([\w.-]+)", i.rest).group(1)
                known = re.search(r'"known_trip_count":\{"n":"(\d+)"', i.rest)
                if not known and unknown_trips is None:
                    raise ValueError(f"while loop {i.name}: no known trip count; cannot scale its body")
                trips = int(known.group(1)) if known else unknown_trips
                walk(body, times * trips, f"{loop}/{body}x{trips}" if loop else f"{body}x{trips}")
                continue
            if i.op in ("conditional", "call", "async-start"):
                raise ValueError(f"{i.op} {i.name}: not modelled (which branch runs, or what runs async)")
            operand_bytes = [shapes.get(o, 0) for o in i.operands]
            flops, kind = 0, i.op
            if i.op == "fusion":
                read, write = _fusion_traffic(comps[re.search(r"calls=%([\w.-]+)", i.rest).group(1)],
                                              operand_bytes)
                kind = re.sub(r"[.\d]+$", "", i.name)
            else:
                read, write = sum(operand_bytes), i.bytes
            rate = matmul
            if i.op == "custom-call":
                kind = re.search(r'custom_call_target="([^"]+)"', i.rest).group(1)
                if "matmul" in kind or "gemm" in kind:
                    flops, write, wide = _gemm(i, comps[name])
                    rate = matmul / 2 if wide else matmul  # float32 operands: TF32, half the bf16 rate
            seconds = max(flops / rate, (read + write) / bandwidth) + launch
            for cost in (rows[(loop or "entry", kind)], total):
                cost.add(seconds * times, times, (read + write) * times, flops * times)

    walk(entry, 1, "")
    return total, dict(rows)


def _gemm(call: Instruction, scope: list[Instruction]) -> tuple[int, int, bool]:
    """(FLOPs, bytes written, float32 operands?) of a cuBLAS matmul custom call: FLOPs = 2 x output elements x
    contracted size."""
    out = re.search(r"\b([a-z]+\d*)\[([\d,]*)\]", call.shape)  # the first tuple element is the product
    elements = 1
    for d in filter(None, out.group(2).split(",")):
        elements *= int(d)
    lhs = next(i for i in scope if i.name == call.operands[0])
    dims = [int(d) for d in re.search(r"\[([\d,]*)\]", lhs.shape).group(1).split(",") if d]
    contracting = re.search(r'"lhs_contracting_dimensions":\["(\d+)"', call.rest)
    k = dims[int(contracting.group(1))] if contracting else 1
    return 2 * elements * k, BYTES[out.group(1)] * elements, lhs.shape.startswith("f32")


def _deviceless_mesh():
    from jax.experimental import topologies

    topology = topologies.get_topology_desc(platform="cuda", target_config=H200, topology="1x1x1")
    return topologies.make_mesh(topology, (1,), ("x",))


def _placed(tree, mesh):
    """Abstract arrays (ShapeDtypeStruct) of `tree` replicated on the deviceless mesh."""
    import jax

    everywhere = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=everywhere), tree)


def compile_train(mesh, attention: str, batch: int, length: int, unrolled: bool = False) -> str:
    """The GPU suite's student step (bench/train_mfu.py: SFT loss, AdamW), compiled for the H200."""
    import jax
    import numpy as np
    from flax import nnx

    from bench.train_mfu import SHAPES, gpt2_builder, hook_attention, sft_step
    from minillm_jax.data.batches import text_batch
    from minillm_jax.trainers.common import create_train_state, make_optimizer

    shapes = SHAPES["gpu"]
    hook_attention(attention)
    build = gpt2_builder(shapes["student"], shapes, attention, unrolled)
    tx, schedule = make_optimizer(learning_rate=1e-5)
    graphdef = nnx.graphdef(nnx.eval_shape(build))
    state = jax.eval_shape(lambda: create_train_state(build(), tx)[1])
    inputs = jax.eval_shape(lambda: text_batch(np.zeros((batch, length), np.int32)))
    step = jax.jit(sft_step(graphdef, tx, schedule), donate_argnums=0)
    return step.lower(_placed(state, mesh), _placed(inputs, mesh)).compile().as_text()


def compile_score(mesh, attention: str, batch: int, length: int, unrolled: bool = False) -> str:
    """The GPU suite's teacher scoring (bench/train_mfu.py: forward, log-softmax, gather), for the H200."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from bench.train_mfu import SHAPES, gpt2_builder, hook_attention, score_fn

    shapes = SHAPES["gpu"]
    hook_attention(attention)
    graphdef, state = nnx.split(nnx.eval_shape(gpt2_builder(shapes["teacher"], shapes, attention, unrolled)))
    ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    mask = jax.ShapeDtypeStruct((batch, length), jnp.bool_)
    return jax.jit(score_fn(graphdef, shapes["vocab"])).lower(*_placed((state, ids, mask), mesh)).compile().as_text()


def compile_decode(mesh, teacher: bool, batch: int, segments: int = 1, split_layers: bool = False,
                   kv_cache_dtype: str = "auto", no_repeat_ngram_size: int = 0,
                   attention: str = "model") -> tuple[str, int, int]:
    """`generate` at the GPU suite's sampling case (bench/decode_hlo.py), for the H200: (the program, decode
    steps per chunk, new tokens per row)."""
    from bench.decode_hlo import SHAPES, generate_program

    shapes = SHAPES["gpu"]
    run, args, config = generate_program(shapes, teacher, batch, segments, split_layers, kv_cache_dtype,
                                         no_repeat_ngram_size, attention)
    new = config.max_new_tokens
    return run.lower(*_placed(args, mesh)).compile().as_text(), min(config.decode_chunk, new), new


def check(mesh) -> None:
    """The accounting on programs whose traffic and FLOPs are known by construction."""
    import jax
    import jax.numpy as jnp

    def cost(fn, *shapes):
        return roofline(jax.jit(fn).lower(*_placed(shapes, mesh)).compile().as_text())[0]

    x = jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16)  # 32 MiB
    c = cost(lambda a: a * 2, x)
    assert c.kernels == 1 and c.bytes == 2 * 4096 * 4096 * 2, c
    c = cost(lambda a, b: a @ b, x, x)
    assert c.flops == 2 * 4096 ** 3 and c.bytes == 3 * 4096 * 4096 * 2, c

    slabs = jax.ShapeDtypeStruct((64, 4096, 256), jnp.float32)
    c = cost(lambda a: a[1:3] * 2, slabs)  # 2 of 64 slabs read
    assert c.bytes == 2 * 2 * 4096 * 256 * 4, c
    c = cost(lambda a, i: jax.lax.dynamic_index_in_dim(a, i, keepdims=False)[:1024] * 2, slabs,
             jax.ShapeDtypeStruct((), jnp.int32))  # a quarter of one slab: a layer's cache, its filled slots
    assert c.bytes == 2 * 1024 * 256 * 4 + 4, c  # and the index
    rows = jax.ShapeDtypeStruct((4096, 50257), jnp.float32)  # 823 MB: a pick per row, then its negative
    c = cost(lambda z, i: -jnp.take_along_axis(z[:, :50000], i[:, None], axis=-1), rows,
             jax.ShapeDtypeStruct((4096,), jnp.int32))
    assert c.bytes <= 4 * 4096 * 4, c

    def scan_rows(a):  # writes each of 64 rows of a [64, 4096, 256] buffer in place: 64 x 2 MiB
        def body(buffer, i):
            return jax.lax.dynamic_update_slice(buffer, jnp.full((1, 4096, 256), i, jnp.float32) * 2.0,
                                                (i, 0, 0)), None
        return jax.lax.scan(body, a, jnp.arange(64))[0]
    c = cost(scan_rows, jax.ShapeDtypeStruct((64, 4096, 256), jnp.float32))
    # per step: the update made (4 MiB written), then put in place (read, written): never the 256 MiB buffer
    assert 64 * 2 <= c.kernels <= 64 * 2 + 4 and c.bytes <= 64 * 3 * 4 * 2**20 + 2**20, c
    print(f"check passed: elementwise {2 * 32} MiB, matmul {2 * 4096 ** 3 / 1e9:.1f} GFLOP, in-place scan "
          f"{c.bytes / 2**20:.0f} MiB in {c.kernels} kernels over 64 steps")


def report(name: str, hlo: str, top: int, *, unknown_trips: int | None = None, tokens: int | None = None,
           launch: float = 3e-6) -> None:
    total, rows = roofline(hlo, unknown_trips=unknown_trips, launch=launch)
    rate = f" ({tokens / total.seconds:,.0f} new tok/s)" if tokens else ""
    print(f"## {name}: estimated {total.seconds * 1e3:.2f} ms a call{rate}; {total.kernels} kernels; "
          f"{total.bytes / 1e9:.2f} GB read+written; {total.flops / 1e12:.3f} TFLOP in matmuls "
          f"(matmul time at the ceiling {total.flops / 783e12 * 1e3:.2f} ms)")
    print("| ms | kernels | GB | TFLOP | loop | kind |")
    print("|---|---|---|---|---|---|")
    for (loop, kind), c in sorted(rows.items(), key=lambda kv: -kv[1].seconds)[:top]:
        print(f"| {c.seconds * 1e3:.2f} | {c.kernels} | {c.bytes / 1e9:.2f} | {c.flops / 1e12:.3f} | "
              f"{loop[-48:]} | {kind} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("case", choices=("train", "score", "decode", "check"))
    parser.add_argument("--attention", default="model", help='"model" (XLA), "cudnn" (the model\'s option; '
                        'decode: the prompt prefill\'s attention) or, train/score, "probe NAME" (a '
                        'bench/attention_impl.py design in its place)')
    parser.add_argument("--teacher", action="store_true", help="decode: teacher-mixed (GPT-2 XL)")
    parser.add_argument("--unrolled", action="store_true", help="train/score: the layers unrolled (scan_layers False)")
    parser.add_argument("--segments", type=int, default=1, help="decode: SamplingConfig.cache_segments (equal ones)")
    parser.add_argument("--split-layers", action="store_true",
                        help="decode: SamplingConfig.split_layers (layers unrolled over per-layer weights)")
    parser.add_argument("--kv-cache-dtype", default="auto", help="decode: SamplingConfig.kv_cache_dtype (int8)")
    parser.add_argument("--no-repeat-ngram", type=int, default=0,
                        help="decode: SamplingConfig.no_repeat_ngram_size (evaluation's protocol: 6)")
    parser.add_argument("--batch", type=int, help="rows (default: 16 train/score, 128 decode)")
    parser.add_argument("--length", type=int, default=512, help="train/score: tokens per row")
    parser.add_argument("--tree", help="compile this checkout's minillm_jax instead (this checkout's bench/)")
    parser.add_argument("--top", type=int, default=12, help="rows of the breakdown")
    parser.add_argument("--launch-us", type=float, default=3.0,
                        help="microseconds charged per kernel (3: no CUDA graphs; 1 reproduces what the 2026-12-01 "
                        "H200 measured for decoding, whose loop bodies XLA runs as CUDA graphs)")
    args = parser.parse_args()

    os.environ["JAX_PLATFORMS"] = "cpu"  # the host backend; the H200 exists only as a compile target
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_gpu_enable_triton_gemm=false".strip()  # autotuning needs a GPU
    sys.path.insert(0, str(ROOT))
    import jax

    import bench.decode_hlo  # noqa: F401  (this checkout's bench, whatever --tree says)
    import bench.train_mfu  # noqa: F401

    if args.tree:  # only the package comes from there
        sys.path.insert(0, str(Path(args.tree).resolve()))
    try:
        mesh = _deviceless_mesh()
    except Exception as e:  # no CUDA plugin: say how to get it
        sys.exit(f"cannot describe an H200 to XLA ({type(e).__name__}: {e}); install jax's CUDA plugin as the "
                 "docstring of bench/gpu_hlo.py says")
    jax.default_backend = lambda: "gpu"  # the package takes its GPU paths (see the docstring)
    import minillm_jax

    if args.tree and not Path(minillm_jax.__file__).resolve().is_relative_to(Path(args.tree).resolve()):
        sys.exit(f"--tree {args.tree}: imported {minillm_jax.__file__} instead")
    if args.case == "check":
        return check(mesh)
    if args.case == "decode":
        batch = args.batch or 128
        hlo, chunk, new = compile_decode(mesh, args.teacher, batch, args.segments, args.split_layers,
                                         args.kv_cache_dtype, args.no_repeat_ngram, args.attention)
        chunks = -(-new // chunk)
        if chunks % args.segments:
            sys.exit(f"--segments {args.segments}: the estimate needs equal segments ({chunks} chunks)")
        name = (f"decode B {batch}{' teacher-mixed' if args.teacher else ''}{f' ({args.tree})' if args.tree else ''}"
                f": every row to the end ({chunks} chunks of {chunk} steps"
                f"{f' in {args.segments} cache segments' if args.segments > 1 else ''}"
                f"{', split layers' if args.split_layers else ''}"
                f"{f', {args.kv_cache_dtype} KV cache' if args.kv_cache_dtype != 'auto' else ''}"
                f"{f', {args.no_repeat_ngram}-grams blocked' if args.no_repeat_ngram else ''}"
                f"{f', attention {args.attention}' if args.attention != 'model' else ''})")
        estimate = dict(unknown_trips=chunks // args.segments, tokens=batch * new)
    else:
        estimate = {}
        batch = args.batch or 16
        name = f"{args.case} B {batch} x {args.length}, attention {args.attention}{', unrolled' * args.unrolled}"
        hlo = (compile_train if args.case == "train" else compile_score)(mesh, args.attention, batch, args.length,
                                                                         args.unrolled)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"{re.sub(r'[^A-Za-z0-9]+', '_', name).strip('_')}.hlo.txt").write_text(hlo)
    print(f"NVIDIA H200 (deviceless compile), jax {jax.__version__}")
    report(name, hlo, args.top, launch=args.launch_us * 1e-6, **estimate)


if __name__ == "__main__":
    main()
