"""The `tokenfuse` command line: `parser` reads the arguments, `commands` runs them, `tables` shows
the results. Every failure the user can fix ends in one red line and exit code 2; Ctrl-C in one line
and exit code 130 (the shell's code for an interrupt)."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape

from ..assets.packages import MissingAsset
from .commands import COMMANDS
from .parser import parser

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    out, err = Console(), Console(stderr=True, soft_wrap=True)  # a message stays one line, in logs too
    if not out.is_terminal:
        out = Console(width=120)  # tables piped to a file or README keep their columns
    try:
        args = parser().parse_args(argv)
        return COMMANDS[args.command](args, out, err)
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    except (ValueError, TypeError, MissingAsset) as e:  # escaped: "[report]" in a hint is not markup
        err.print(f"[red]error:[/red] {escape(str(e))}")
        return 2
