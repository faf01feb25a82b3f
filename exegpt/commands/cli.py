"""The `exegpt` command line: one subcommand per module, imported only when used.

Each subcommand module exposes `DESCRIPTION: str`, `add_arguments(parser)` and
`run(args) -> int` (the exit code), so `exegpt --help` stays fast and each command's
heavy imports (torch, grpc) happen only when that command runs.
"""

from __future__ import annotations

import sys
from types import ModuleType

from exegpt.command_line import command_main


def load_command(name: str) -> ModuleType:
    """The module of command `name`, imported now: plain imports, kept in this function so
    that `exegpt --help` does not pay for torch or grpc."""
    match name:
        case "demo":
            from exegpt.commands import demo as module
        case "up":
            from exegpt.commands import up as module
        case "worker":
            from services.worker import __main__ as module
        case "stage":
            from services.worker.stage import __main__ as module
        case "router":
            from services.router import __main__ as module
        case "bench":
            from exegpt.bench import cli as module
        case "plan":
            from services.scheduler import plan_cli as module
        case "simulate":
            from services.scheduler import simulate_cli as module
        case "scheduler":
            from services.scheduler import __main__ as module
        case "profile":
            from services.profiler import cli as module
        case "profiler":
            from services.profiler import __main__ as module
        case _:
            raise KeyError(name)
    return module


# Each command and its one-line summary; `load_command` imports its module.
COMMANDS: dict[str, str] = {
    "demo": "start a local deployment, send a few requests, print answers",
    "up": "start the router and N worker replicas and keep them running",
    "worker": "run one worker replica (engine + model)",
    "stage": "run one pipeline stage process (a layer range, one TP rank) of a replica",
    "router": "run the router with its HTTP gateway",
    "bench": "benchmark a running deployment with a workload",
    "plan": "search the best schedule under a latency bound",
    "simulate": "predict what one given schedule delivers",
    "scheduler": "run the scheduler service",
    "profile": "profile the model's layers on a device",
    "profiler": "run the profiler service",
}


def _top_level_help() -> str:
    lines = ["usage: exegpt COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<10} {summary}" for name, summary in COMMANDS.items()]
    lines += ["", "Run `exegpt COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(_top_level_help() + "\n")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        sys.stderr.write(f"exegpt: unknown command {name!r}\n\n{_top_level_help()}\n")
        return 2
    module = load_command(name)
    return command_main(f"exegpt {name}", COMMANDS[name], module.add_arguments, module.run, rest)


if __name__ == "__main__":
    sys.exit(main())
