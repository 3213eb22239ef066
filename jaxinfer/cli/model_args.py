"""The model-loading flags every command that takes a model shares."""

from __future__ import annotations

import argparse


def add_model_args(parser: argparse.ArgumentParser, default_help: str = "the embedded SmolLM2-135M-Instruct") -> None:
    parser.add_argument("model", nargs="?", default=None,
                        help=f"HF directory, .gguf file or converted directory (default: {default_help})")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="weight dtype (default: float32 on CPU, bfloat16 on GPU). On CPU activations stay "
                             "float32: bfloat16 weights halve memory and speed up batches of 4+ sequences, not one")
    parser.add_argument("--model-format", choices=("hf", "awq", "gguf"), default=None,
                        help="what MODEL holds; 'awq' is required to load HF AutoAWQ checkpoints")
    parser.add_argument("--keep-quantized", action=argparse.BooleanOptionalAction, default=None,
                        help="keep a GGUF's Q4_0/Q4_1/Q8_0 linear weights as integer codes (default: on GPU only; "
                             "on CPU dequantized weights run faster)")


def loader_options(args: argparse.Namespace) -> dict:
    return {"dtype": args.dtype, "model_format": args.model_format, "keep_quantized": args.keep_quantized}
