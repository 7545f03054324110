"""``sparseattn`` command line: one thin module per subcommand under ``sparseattn.cli``.

Each subcommand module defines ``add_parser(subparsers)`` (registering its arguments and setting
``func``) and keeps heavy imports inside its run function, so ``sparseattn --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand name -> module under sparseattn.cli
COMMANDS: dict[str, str] = {
    "quick-test": "quick_test",
    "accuracy": "accuracy",
    "eval": "eval_cmd",
    "niah": "niah",
    "collect": "collect",
    "validate": "validate",
    "compare": "compare",
    "bench": "bench",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparseattn", description="Block-sparse attention: kernels, predictors, accuracy.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        try:
            mod = importlib.import_module(f"sparseattn.cli.{module}")
        except ModuleNotFoundError as exc:  # a subcommand still under construction is simply absent
            if exc.name != f"sparseattn.cli.{module}":
                raise
            continue
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from sparseattn import __version__

        print(__version__)
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
