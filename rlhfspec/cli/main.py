"""`rlhfspec <command>`: each command module registers its own subparser."""

from __future__ import annotations

import argparse
import sys

from rlhfspec.cli import bench, distill, generate, simulate, train
from rlhfspec.errors import RlhfspecError

COMMANDS = [generate, train, distill, bench, simulate]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlhfspec", description="RLHF with lossless, adaptive speculative decoding.")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.register(sub)
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra  # --section.key value overrides (rlhfspec train)
    sys.stdout.reconfigure(line_buffering=True)  # progress lines show up promptly when piped to a log
    try:
        return args.run(args) or 0
    except RlhfspecError as e:
        print(f"rlhfspec: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
