"""`lmforge <command>`: thin wrappers over the library. User errors print one line and exit 2."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable

from lmforge.errors import LmforgeError

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(
    name: str, help: str, add_args: Callable[[argparse.ArgumentParser], None]
) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    """Register a command: its one-line help, its argument builder and (decorated) its runner."""

    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = (help, add_args, run)
        return run

    return register


# --- entry point -----------------------------------------------------------------------------------
def _register_commands() -> None:
    """Import the command modules; each registers its commands with `@command` on import."""
    import lmforge.commands.data
    import lmforge.commands.eval
    import lmforge.commands.finetune
    import lmforge.commands.generate
    import lmforge.commands.model
    import lmforge.commands.plan
    import lmforge.commands.prune
    import lmforge.commands.quantize
    import lmforge.commands.serve
    import lmforge.commands.train  # noqa: F401


# The order of `lmforge --help`: the path from a checkpoint to a served model.
ORDER = (
    "info",
    "convert",
    "tokenizer",
    "prepare",
    "pretrain",
    "finetune",
    "dpo",
    "distill",
    "generate",
    "chat",
    "eval",
    "bench",
    "serve",
    "plan",
    "quantize",
    "prune",
    "quickstart",
)


def _order(name: str) -> int:
    return ORDER.index(name) if name in ORDER else len(ORDER)


def build_parser() -> argparse.ArgumentParser:
    _register_commands()
    parser = argparse.ArgumentParser(
        prog="lmforge", description="Train, load, run and evaluate Llama 3, Qwen 2.5 and GLM-4 style models."
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, (help_text, add_args, run) in sorted(COMMANDS.items(), key=lambda item: _order(item[0])):
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # inside the try: a reader that went away is seen here, not at exit
        return code
    except BrokenPipeError:
        # The reader closed the pipe (`lmforge info --list | head -1`): stop quietly, as the Python docs
        # recommend (signal module, "Note on SIGPIPE"): point stdout at devnull so the interpreter's final
        # flush cannot raise again, and exit 128 + SIGPIPE like a command the signal stopped.
        with contextlib.suppress(OSError, ValueError):  # a stdout replaced by an object without a descriptor
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except LmforgeError as e:
        print(f"lmforge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lmforge {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # `python -m lmforge.cli`: use the module's registry, not __main__'s copy
    from lmforge.cli import main as _main

    sys.exit(_main())
