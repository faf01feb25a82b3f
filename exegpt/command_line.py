"""What every command line shares, `exegpt COMMAND` and `python -m services.NAME` alike:
help that shows each option's default, one logging format, and `service_main`, the entry
point of a service's `__main__.py` (exegpt/commands/cli.py runs the same module's options
as `exegpt NAME`)."""

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


def configure_logging(args: argparse.Namespace) -> None:
    logging.basicConfig(
        level=getattr(args, "log_level", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def service_main(
    prog: str,
    description: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int],
) -> int:
    """`python -m services.NAME`: the same options and behaviour as `exegpt NAME`."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=DefaultsHelpFormatter
    )
    add_arguments(parser)
    args = parser.parse_args()
    configure_logging(args)
    return run(args)
