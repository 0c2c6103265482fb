"""Command line: parses flags into the config or a function's arguments and calls one public function.

Each subcommand is a pair registered with :func:`command`: ``add(parser)`` declares its flags and
``run(args)`` calls the public API. User mistakes (:class:`UnetlabError`) print one line and exit with 2;
internal errors exit with 1 and show the traceback only under ``--debug``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from .errors import UnetlabError

log = logging.getLogger("unetlab")

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int | None]]] = {}


def command(name: str, help: str):
    """Register ``run(args)`` as subcommand ``name``; the decorated function's ``.add`` declares its flags."""

    def deco(run):
        def add_default(p: argparse.ArgumentParser) -> None:
            return None

        COMMANDS[name] = (help, getattr(run, "add", add_default), run)
        return run

    return deco


def with_args(add: Callable[[argparse.ArgumentParser], None]):
    """Attach the flag declarations ``add(parser)`` to a command function."""

    def deco(run):
        run.add = add
        return run

    return deco


# --- commands ------------------------------------------------------------------------------------------------
# Each block: the flags, then the call into the public API. Keep logic out of this file.
# (Helpers add their command blocks above the "end of commands" marker.)

# --- end of commands -----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per registered command."""
    parser = argparse.ArgumentParser(prog="unetlab", description="Train and run U-Nets on microscopy images.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add, _run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``unetlab`` console script."""
    from ._runtime import tune_allocator

    tune_allocator()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else (logging.WARNING if args.quiet else logging.INFO),
        format="%(message)s",
        stream=sys.stderr,
    )
    if not args.command:
        parser.print_help()
        return 2
    _help, _add, run = COMMANDS[args.command]
    try:
        rc = run(args)
        return int(rc or 0)
    except UnetlabError as exc:
        if args.debug:
            raise
        print(f"unetlab {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"unetlab {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # internal error: one line unless --debug
        if args.debug:
            raise
        print(
            f"unetlab {args.command}: internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
