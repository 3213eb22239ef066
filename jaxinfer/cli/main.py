"""Entry point of the ``jaxinfer`` console script."""

from __future__ import annotations

import argparse
import sys

from jaxinfer.cli import chat, convert, evaluate, lite, serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxinfer", description="LLM inference and serving on JAX/XLA")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (chat, convert, serve, lite, evaluate):
        module.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
