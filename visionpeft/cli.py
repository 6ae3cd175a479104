"""The ``visionpeft`` command line."""
from __future__ import annotations

import argparse
import sys

from visionpeft.methods.base import get_method, registered_names


def _methods(_: argparse.Namespace) -> int:
    for name in registered_names():
        cls = get_method(name)
        if name != cls.name:
            print(f"{name}  (alias of {cls.name})")
            continue
        print(name)
        for option, spec in cls.options.items():
            print(f"  {option:<12} default {spec.default!r:<8} {spec.allowed}. {spec.help}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="visionpeft", description="Parameter-efficient fine-tuning for vision models")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("methods", help="the registered methods and their options").set_defaults(run=_methods)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
