"""`atlas-vla` command line: one subcommand per user task.

Each subcommand is a small `_add_<name>` function that declares its arguments and a `_run_<name>`
handler that calls the library; the library does the work, so everything here is also usable from
Python. A user mistake raises `ValueError`/`FileNotFoundError` in the library and is printed here as
one line with exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

# Each entry: (name, help, add_arguments, run). Subcommands register below, one section each.
_COMMANDS: list[tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = []


def _command(name: str, help: str):
    """Register `add_arguments` for subcommand `name`; the run handler is attached with `.runner`."""

    def decorator(add_arguments: Callable[[argparse.ArgumentParser], None]):
        def attach(run: Callable[[argparse.Namespace], int]):
            _COMMANDS.append((name, help, add_arguments, run))
            return run

        add_arguments.runner = attach  # type: ignore[attr-defined]
        return add_arguments

    return decorator


# ----------------------------------------------------------------------------------------------
# data commands (data-info, convert-libero-hdf5, compute-stats, make-synthetic-libero)
# ----------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------
# policy commands (predict, export)
# ----------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------
# evaluation commands (eval-offline, eval-libero)
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The `atlas-vla` parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="atlas-vla", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help, add_arguments, run in _COMMANDS:
        sub = subparsers.add_parser(name, help=help, description=help)
        add_arguments(sub)
        sub.set_defaults(_run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `atlas-vla` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError) as error:
        print(f"atlas-vla {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
