"""The ``flashstep`` command line."""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def _cmd_info(args: argparse.Namespace) -> int:
    from .system_info import info

    details = info()
    print(json.dumps(details.as_dict(), indent=2) if args.json else details)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashstep", description="One-step diffusion SR and generation, fast.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    info_parser = commands.add_parser("info", help="version, build, devices and the backends of every op")
    info_parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info_parser.set_defaults(handler=_cmd_info)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
