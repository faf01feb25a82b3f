"""`python -m exegpt.bench --url URL --workload W`: `exegpt bench` (exegpt/bench/cli.py) with
the same options, run without the `exegpt` command line, as the library and the profiler do."""

from __future__ import annotations

import sys

from exegpt.bench import cli
from exegpt.command_line import command_main

if __name__ == "__main__":
    sys.exit(command_main("python -m exegpt.bench", cli.DESCRIPTION, cli.add_arguments, cli.run))
