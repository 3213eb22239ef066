"""``jaxinfer eval ppl MODEL``: perplexity over a text, llama.cpp's way; the last line printed is
``perplexity: <value>``."""

from __future__ import annotations

import sys

from jaxinfer.cli.model_args import add_model_args, loader_options


def add_parser(commands) -> None:
    p = commands.add_parser("eval", help="evaluate a model")
    tasks = p.add_subparsers(dest="task", required=True, metavar="TASK")
    ppl = tasks.add_parser("ppl", help="perplexity over a text (llama.cpp's method: BOS + windows, second halves scored)")
    add_model_args(ppl)
    ppl.add_argument("--text", default=None,
                     help="text file (.txt, or .jsonl with 'text' fields); default: held-out pydoc topics, "
                          "never used for calibration")
    ppl.add_argument("--ctx", type=int, default=512, help="window length in tokens (default 512)")
    ppl.add_argument("--quant-policy", type=int, choices=(0, 4, 8), default=0, help="KV cache quantization")
    ppl.add_argument("--max-windows", type=int, default=None, help="score at most this many windows")
    ppl.set_defaults(run=run)


def run(args) -> int:
    from converters.calibration import pydoc_text, read_text
    from converters.convert import embedded_model_path
    from converters.errors import CheckpointError
    from converters.loader import load_model
    from jaxinfer.perplexity import perplexity

    try:
        m = load_model(args.model or embedded_model_path(), **loader_options(args))
        if m.tokenizer is None:
            raise ValueError(f"{m.path} has no tokenizer: perplexity over text needs one")
        text = read_text(args.text) if args.text else pydoc_text("heldout")
        tokens = m.tokenizer.encode(text, add_special_tokens=False)
        if args.max_windows:
            tokens = tokens[: args.max_windows * args.ctx]
        result = perplexity(m.config, m.params, tokens, args.ctx, args.quant_policy, dtype=m.dtype)
    except (CheckpointError, ValueError) as e:
        print(f"jaxinfer eval: error: {e}", file=sys.stderr)
        return 1
    print(f"windows: {result.windows} x {args.ctx} tokens, scored tokens: {result.scored_tokens}")
    print(f"perplexity: {result.value:.4f}")
    return 0
