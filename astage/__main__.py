"""The ``astage`` command: ``astage demo`` (or ``python -m astage demo``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="astage", description="asyncio-native state-dict staging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="train a small GPT and stage a snapshot after every step, next to DCP",
        description="Train a GPT-style model for a few steps on an event loop and stage "
        "{'model', 'optim', 'step'} after each one with astage.Stager while a heartbeat measures "
        "loop lag; then compare with DCP's DefaultStager on the same snapshot.",
    )
    from . import _demo  # torch.nn is only needed by the demo

    _demo.add_arguments(demo)
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _demo.main(args)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
