"""``sparseattn`` command line: one thin module per subcommand under ``sparseattn.cli``.

Each subcommand module defines ``add_parser(subparsers)`` (registering its arguments and setting
``func``) and keeps heavy imports inside its run function, so ``sparseattn --help`` stays fast.

Errors: a user error — a bad flag or value, a missing or corrupt file, an unknown spec key, a
text too short or a length beyond the model's context — prints **one line** on stderr,
``sparseattn <command>: error: <message>``, and exits with status 2. Only the error types that mean
"bad input" are caught (``ValueError``, the file-system errors of a missing / wrong path,
``NotImplementedError`` — a valid but unsupported combination, e.g. ``--backend triton`` on a CPU
— and :class:`sparseattn.errors.UserError`); anything else is a bug and ends in the usual
traceback. ``sparseattn --debug <command> ...`` (or ``SPARSEATTN_DEBUG=1``) shows the traceback
of user errors too.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NoReturn

from sparseattn.errors import UserError

# subcommand name -> module under sparseattn.cli
COMMANDS: dict[str, str] = {
    "quick-test": "quick_test",
    "accuracy": "accuracy",
    "eval": "eval_cmd",
    "niah": "niah",
    "ruler": "ruler",
    "collect": "collect",
    "validate": "validate",
    "compare": "compare",
    "bench": "bench",
    "bench-model": "bench_model",
    "tune": "tune",
    "train-gate": "train_gate",
    "state-check": "state_check",
    "gen-check": "gen_check",
}

# exceptions that mean "the input is wrong", reported as one line with exit status 2
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, NotImplementedError,
    UserError,
)
EXIT_USER_ERROR = 2


def one_line(message: str, limit: int = 2000) -> str:
    """Collapse whitespace (newlines included) so a message prints as one line."""
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``<prog>: error: <message> (see <prog> --help)``, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sparseattn", description="Block-sparse attention: kernels, predictors, accuracy.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of errors (default: one line on stderr, exit status 2)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, module in COMMANDS.items():
        try:
            mod = importlib.import_module(f"sparseattn.cli.{module}")
        except ModuleNotFoundError as exc:  # a subcommand still under construction is simply absent
            if exc.name != f"sparseattn.cli.{module}":
                raise
            continue
        mod.add_parser(sub)
    for sp in sub.choices.values():  # `sparseattn eval --debug ...` works too
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    parser.subcommands = sub.choices  # type: ignore[attr-defined]  # name -> subparser (for error messages)
    return parser


def _describe(exc: BaseException) -> str:
    msg = one_line(str(exc))
    if isinstance(exc, OSError) and getattr(exc, "filename", None) is not None and str(exc.filename) not in msg:
        msg = f"{msg}: {exc.filename}"
    if not msg:
        msg = type(exc).__name__
    if isinstance(exc, OSError) and not msg.startswith(type(exc).__name__):
        msg = f"{type(exc).__name__}: {msg}"
    return msg


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 a failed check, 2 a user error)."""
    parser = build_parser()
    try:
        args, extras = parser.parse_known_args(argv)
        if extras:  # report them against the subcommand that got them (its --help lists the flags)
            target = getattr(parser, "subcommands", {}).get(getattr(args, "command", None), parser)
            target.error(f"unrecognized arguments: {' '.join(extras)}")
    except SystemExit as exc:  # --help (0) or a bad flag (2, message already printed)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USER_ERROR)
    if args.version:
        from sparseattn._version import __version__

        print(__version__)
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    debug = args.debug or os.environ.get("SPARSEATTN_DEBUG", "") not in ("", "0")
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as exc:
        if debug:
            raise
        prefix = f"sparseattn {args.command}: "
        msg = _describe(exc)
        msg = msg[len(prefix):] if msg.startswith(prefix) else msg
        print(f"{prefix}error: {msg}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
