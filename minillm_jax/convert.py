"""Checkpoint conversion from the command line.

    python -m minillm_jax.convert gguf-to-hf --gguf model.gguf --output hf_dir [--dtype float32]
    python -m minillm_jax.convert to-hf --workdir run_dir [--step N] [--dtype bfloat16] --output hf_dir
    python -m minillm_jax.convert to-gguf (--workdir run_dir [--step N] | --hf hf_dir) --output f.gguf --type f16

`gguf-to-hf` dequantises a GGUF checkpoint (llama and qwen2 architectures) with numpy and writes an HF
directory (config.json, safetensors, tokenizer files, generation_config.json) without torch.
`to-hf` exports the student of a training run's workdir from its Orbax checkpoint (default step: the best
one by the run's validation metric, else the latest) with the tokenizer the run saved.
`to-gguf` writes a run's student (or an HF directory, hub name or .gguf file) as a GGUF file for llama.cpp
(llama, mistral, qwen2 and gpt2 families; see `models/gguf_export.py`).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_0", "q5_1", "q4_0", "q4_1")  # models/gguf_export.py: TYPES


def gguf_to_hf(gguf: str, output: str, dtype: str = "float32") -> pathlib.Path:
    from minillm_jax.models import load_pretrained, load_tokenizer, save_pretrained

    model = load_pretrained(gguf, dtype=dtype)
    tokenizer = load_tokenizer(gguf)
    return save_pretrained(model, output, tokenizer=tokenizer)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minillm_jax.convert", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    gguf = commands.add_parser("gguf-to-hf", help="GGUF file -> Hugging Face directory")
    gguf.add_argument("--gguf", required=True, help="path to a .gguf file")
    gguf.add_argument("--output", required=True, help="directory to write (created if missing)")
    gguf.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    export = commands.add_parser("to-hf", help="training workdir checkpoint -> Hugging Face directory")
    export.add_argument("--workdir", required=True, help="the run's workdir (student/ and checkpoints/ inside)")
    export.add_argument("--step", type=int, default=None, help="checkpoint step (default: best, else latest)")
    export.add_argument("--output", required=True, help="directory to write (created if missing)")
    export.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="weight dtype to write (default: the dtype the student was trained in)")
    export.add_argument("--force", action="store_true",
                        help="replace --output even when it holds files this tool did not write")
    to_gguf = commands.add_parser("to-gguf", help="training workdir checkpoint or HF directory -> GGUF file")
    source = to_gguf.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="the run's workdir (student/ and checkpoints/ inside)")
    source.add_argument("--hf", help="an HF directory (tokenizer included), hub name or .gguf file")
    to_gguf.add_argument("--step", type=int, default=None, help="with --workdir: checkpoint step (default: best, "
                         "else latest)")
    to_gguf.add_argument("--output", required=True, help="the .gguf file to write")
    to_gguf.add_argument("--type", default="f16", choices=list(GGUF_TYPES),
                         help="tensor type of the matrices (norms and biases stay f32)")
    to_gguf.add_argument("--force", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)
    from minillm_jax.checkpoint import quiet_orbax_logs

    quiet_orbax_logs()
    if args.command == "gguf-to-hf":
        if not args.gguf.endswith(".gguf") or not pathlib.Path(args.gguf).is_file():
            parser.error(f"--gguf {args.gguf!r}: expected an existing .gguf file")
        out = gguf_to_hf(args.gguf, args.output, args.dtype)
        print(f"wrote {out}")
    elif args.command == "to-hf":
        from minillm_jax.checkpoint import export_hf, export_step

        try:
            step = export_step(args.workdir, args.step)
            out = export_hf(args.workdir, args.output, step=step, dtype=args.dtype, force=args.force)
        except FileExistsError as e:
            parser.exit(2, f"{parser.prog} to-hf: error: {e}\n")
        except FileNotFoundError as e:
            parser.error(str(e))
        print(f"exported step {step} of {args.workdir} to {out}")
    elif args.command == "to-gguf":
        from minillm_jax.models import gguf_export

        if args.step is not None and args.workdir is None:
            parser.error("--step goes with --workdir")
        if not args.output.endswith(".gguf"):
            parser.error(f"--output {args.output!r}: expected a file name ending in .gguf")
        if pathlib.Path(args.output).exists() and not args.force:
            parser.error(f"--output {args.output!r} exists; add --force to replace it")
        try:
            if args.workdir is not None:
                out = gguf_export.export_gguf_from_workdir(args.workdir, args.step, args.output, type=args.type,
                                                           force=args.force)
            else:
                out = gguf_export.export_gguf_from_hf(args.hf, args.output, type=args.type, force=args.force)
        except (FileNotFoundError, FileExistsError, IsADirectoryError, ValueError) as e:
            parser.error(str(e))
        print(f"wrote {out} ({args.type}, {out.stat().st_size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
