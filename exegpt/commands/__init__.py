"""The `exegpt` command line and the orchestration that starts and drives services.

`cli.py` is the `exegpt` entry point: one subcommand per module, the services' own command
lines (`exegpt worker`, `exegpt plan`, ...) among them. `up.py` and `demo.py` start a local
deployment (through exegpt/launcher.py); `autoplan.py` profiles, plans and deploys in one
command, running the profiler's measurement and the scheduler's search in this process;
`calibration_pass.py` calibrates a profile on a running deployment and plans again from it.

This package is the only part of `exegpt` that imports `services`; neither the rest of
`exegpt` nor any service imports it (tests/test_layering.py checks both).
"""
