"""The ``dblocks`` command. Each subcommand validates all of its inputs before any work starts: a bad
value prints one line naming the option and what is allowed, exits with code 2 and writes nothing.

One module per group of commands (:mod:`~dblocks.cli.data`, :mod:`~dblocks.cli.training`,
:mod:`~dblocks.cli.tracking`, :mod:`~dblocks.cli.models`, :mod:`~dblocks.cli.evaluation`,
:mod:`~dblocks.cli.reports`) adds its commands to the parser and runs them; the errors a command reports in
one line, and their exit codes, are :mod:`dblocks.errors`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from dblocks.cli import data, evaluation, models, reports, tracking, training
from dblocks.errors import EXIT_USAGE, exit_code

#: the command groups, in the order ``dblocks --help`` lists their commands
GROUPS = (data, training, tracking, models, evaluation, reports)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad option is reported like every other bad value: one line and exit code 2 (the
    default prints the whole usage first, which for the training commands is a dozen lines)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="dblocks", description=__doc__.split(".")[0] + ".", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func: Callable, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.set_defaults(func=func)
        return p

    for group in GROUPS:
        group.register(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; ``argv`` None: the process's own arguments (the ``dblocks`` command, ``python -m
    dblocks``), after which the process ends (see :func:`_ending`)."""
    code = _run(argv)
    if argv is None:
        _ending()
    return code


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a bad option already reported in one line
        return int(exc.code or 0)
    try:
        args.func(args)
    except Exception as exc:
        code = exit_code(exc)
        if code is None:
            raise
        print(f"dblocks {args.command}: error: {exc}", file=sys.stderr)
        return code
    return 0


def _ending() -> None:
    """The command has finished and the process exits next: spare it the interpreter's last garbage
    collections over everything torch (and MLflow) allocated, ~0.4 s of every job on two busy cores that
    would only free memory the operating system takes back anyway. Everything the command wrote is closed by
    now; atexit handlers still run and the standard streams are still flushed (only unreachable cycles are
    left to the exit). Never on a call from Python (tests), whose process goes on, nor where triton was loaded
    (torch-fidelity's import pulls it in): its nanobind extensions print pages of "leaked instance" warnings
    at exit when their objects are left uncollected."""
    import gc

    if "triton" not in sys.modules:
        gc.freeze()
