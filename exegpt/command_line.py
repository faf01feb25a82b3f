"""What every command line shares, `exegpt COMMAND`, `python -m services.NAME` and
`python -m exegpt.bench` alike: help that shows each option's default, one logging format, and
`command_main`, which builds a command's parser from its module, parses, sets up logging and
runs it (exegpt/commands/cli.py calls it for `exegpt NAME`; each `__main__.py` calls it)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Append each option's default to its help, unless it has none worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = not any(action.default is hidden for hidden in (None, False, argparse.SUPPRESS))
        if action.option_strings and shown and "default" not in text.lower():
            text = f"{text} (default: %(default)s)".strip()
        return text


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1 (a count of threads, of items)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not at least 1")
    return value


def configure_logging(args: argparse.Namespace) -> None:
    """One log format for every process, at the command's `--log-level` (INFO when it has
    none)."""
    logging.basicConfig(
        level=getattr(args, "log_level", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def command_main(
    prog: str,
    description: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int | None],
    argv: list[str] | None = None,
) -> int:
    """Run one command: its options from `add_arguments`, parsed from `argv` (the process's
    arguments when None), then `run`; the exit code (0 when `run` returns None). `exegpt NAME`
    and `python -m MODULE` of the same module therefore take the same options."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=DefaultsHelpFormatter
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging(args)
    return int(run(args) or 0)
