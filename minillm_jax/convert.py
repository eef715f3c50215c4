"""Checkpoint conversion from the command line.

    python -m minillm_jax.convert gguf-to-hf --gguf model.gguf --output hf_dir [--dtype float32]

`gguf-to-hf` dequantises a GGUF checkpoint (llama and qwen2 architectures) with numpy and writes an HF
directory (config.json, safetensors, tokenizer files, generation_config.json) without torch.
"""

from __future__ import annotations

import argparse
import pathlib
import sys


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
    args = parser.parse_args(argv)

    if args.command == "gguf-to-hf":
        if not args.gguf.endswith(".gguf") or not pathlib.Path(args.gguf).is_file():
            parser.error(f"--gguf {args.gguf!r}: expected an existing .gguf file")
        out = gguf_to_hf(args.gguf, args.output, args.dtype)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
