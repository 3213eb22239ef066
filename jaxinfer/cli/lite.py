"""``jaxinfer lite auto_awq|rtn MODEL --work-dir OUT``: 4-bit (or 8-bit) weight quantization,
with LMDeploy's flags. OUT is a normal jaxinfer checkpoint that every command loads."""

from __future__ import annotations

import sys


def add_parser(commands) -> None:
    p = commands.add_parser("lite", help="quantize a model's weights (AWQ or round-to-nearest)")
    methods = p.add_subparsers(dest="method", required=True, metavar="METHOD")
    for name, help_text in (("auto_awq", "activation-aware weight quantization (AWQ)"),
                            ("rtn", "plain round-to-nearest quantization (the baseline)")):
        m = methods.add_parser(name, help=help_text, description=f"{help_text}; writes a jaxinfer checkpoint")
        m.add_argument("model", help="HF directory, .gguf file or converted directory (float weights)")
        m.add_argument("--work-dir", required=True, help="output checkpoint directory")
        m.add_argument("--w-bits", type=int, default=4, choices=(4, 8), help="bits per weight (default 4)")
        m.add_argument("--w-group-size", type=int, default=128, choices=(32, 64, 128),
                       help="input channels sharing a scale and bias (default 128)")
        m.add_argument("--force", action="store_true", help="replace --work-dir if it exists")
        if name == "auto_awq":
            m.add_argument("--calib-dataset", default=None,
                           help="calibration text: a .txt or .jsonl ('text' fields) file (default: Python's pydoc topics)")
            m.add_argument("--calib-samples", type=int, default=128, help="calibration sequences (default 128)")
            m.add_argument("--calib-seqlen", type=int, default=2048,
                           help="tokens per calibration sequence, clipped to the model (default 2048)")
            m.add_argument("--search-scale", action="store_true",
                           help="search AWQ's scale exponent per layer group (default: fixed 0.5)")
            m.add_argument("--batch-size", type=int, default=1, help="calibration sequences run at once (default 1)")
        m.set_defaults(run=run)


def run(args) -> int:
    import jax
    import numpy as np

    from converters.awq import awq_scale, quantize_params
    from converters.calibration import calibration_tokens
    from converters.checkpoint import atomic_output_dir, write_checkpoint
    from converters.errors import CheckpointError
    from converters.loader import load_model

    try:
        loaded = load_model(args.model, np.float32)
        if loaded.config.weight_quant is not None:
            raise ValueError(f"{args.model} is already quantized ({loaded.config.weight_quant.method})")
        params = jax.tree.map(np.asarray, loaded.params)
        method = "awq" if args.method == "auto_awq" else "rtn"
        if method == "awq":
            if loaded.tokenizer is None:
                raise ValueError("AWQ calibration needs the model's tokenizer")
            seqlen = min(args.calib_seqlen, loaded.config.max_position_embeddings)
            calib = calibration_tokens(loaded.tokenizer, args.calib_dataset, args.calib_samples, seqlen)
            params = awq_scale(params, loaded.config, calib, args.w_bits, args.w_group_size,
                               args.search_scale, args.batch_size)
        params, config = quantize_params(params, loaded.config, args.w_bits, args.w_group_size, method)
        with atomic_output_dir(args.work_dir, args.force) as tmp:
            write_checkpoint(tmp, config, params, np.float32, loaded.path)
            if loaded.tokenizer is not None:
                loaded.tokenizer.save(tmp)
    except (CheckpointError, FileExistsError, ValueError) as e:
        print(f"jaxinfer lite: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.work_dir} ({method}, {args.w_bits}-bit, group {args.w_group_size})")
    return 0
