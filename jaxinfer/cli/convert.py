"""``jaxinfer convert SRC OUT``."""

from __future__ import annotations

import sys


def add_parser(commands) -> None:
    from converters.convert import DTYPES

    p = commands.add_parser(
        "convert", help="convert an HF directory or a GGUF file into a jaxinfer checkpoint",
        description="Convert an HF model directory (safetensors) or a .gguf file into a jaxinfer "
        "checkpoint (config, tokenizer, orbax params). The output appears only when complete.",
    )
    p.add_argument("src", help="HF model directory or .gguf file")
    p.add_argument("out", help="output directory (must not exist unless --force)")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="weight dtype (default: the source's; GGUF: float32)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--model-format", choices=("hf", "awq", "gguf"), default=None,
                   help="what SRC holds; 'awq' is required for HF AutoAWQ checkpoints")
    p.add_argument("--keep-quantized", action="store_true",
                   help="keep a GGUF's Q4_0/Q4_1/Q8_0 linear weights as integer codes")
    p.set_defaults(run=run)


def run(args) -> int:
    from converters.convert import convert
    from converters.errors import CheckpointError

    try:
        out = convert(args.src, args.out, args.dtype, overwrite=args.force, model_format=args.model_format,
                      keep_quantized=args.keep_quantized)
    except (CheckpointError, FileExistsError, ValueError) as e:
        print(f"jaxinfer convert: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0
