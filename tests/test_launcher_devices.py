"""The device each worker of `exegpt up` is told to compute on, and the chunk budgets it
runs (its argument list; no GPU needed to check it)."""

from __future__ import annotations

import argparse
import shutil

import pytest

from exegpt.commands import up
from exegpt.launcher import Deployment, DeploymentConfig
from exegpt.topology import Topology
from services.worker import __main__ as worker_main


def _worker_args(device: str, index: int, stages: str | None = None, **topology) -> list[str]:
    deployment = Deployment(
        DeploymentConfig(num_replicas=3, topology=Topology(device=device, **topology))
    )
    try:
        return deployment.worker_args(index, stages)
    finally:
        shutil.rmtree(deployment._state_dir, ignore_errors=True)


def _flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def test_in_process_replicas_on_cuda_get_one_gpu_each() -> None:
    assert [_flag(_worker_args("cuda", index), "--device") for index in range(3)] == [
        "cuda:0",
        "cuda:1",
        "cuda:2",
    ]


def test_in_process_replicas_keep_a_named_device() -> None:
    assert _flag(_worker_args("cpu", 2), "--device") == "cpu"
    assert _flag(_worker_args("cuda:1", 0), "--device") == "cuda:1"


def test_a_pipelined_worker_leaves_the_devices_to_its_stages() -> None:
    args = _worker_args("cuda", 1, "127.0.0.1:1,127.0.0.1:2", pipeline_stages=2)
    assert _flag(args, "--stages") == "127.0.0.1:1,127.0.0.1:2"
    assert "--device" not in args


def test_up_hands_the_chunk_budgets_to_every_worker_engine() -> None:
    """`exegpt up --max-tokens-per-step 32 --long-output-tokens-per-step 128` reaches each
    worker's engine config through the launcher's worker flags."""
    up_parser = argparse.ArgumentParser()
    up.add_arguments(up_parser)
    budgets = ["--max-tokens-per-step", "32", "--long-output-tokens-per-step", "128"]
    config = up.config_from_args(up_parser.parse_args(budgets))
    deployment = Deployment(config)
    try:
        args = deployment.worker_args(0)
    finally:
        shutil.rmtree(deployment._state_dir, ignore_errors=True)
    assert _flag(args, "--long-output-tokens-per-step") == "128"
    worker_parser = argparse.ArgumentParser()
    worker_main.add_arguments(worker_parser)
    engine = worker_main.config_from_args(worker_parser.parse_args(args)).engine
    assert (engine.max_tokens_per_step, engine.long_output_tokens_per_step) == (32, 128)
    assert engine.long_output_min_tokens == 16
    # --long-output-min-tokens too, when given.
    config = up.config_from_args(up_parser.parse_args([*budgets, "--long-output-min-tokens", "8"]))
    assert _flag(_deployment_worker_args(config), "--long-output-min-tokens") == "8"


def _deployment_worker_args(config: DeploymentConfig) -> list[str]:
    deployment = Deployment(config)
    try:
        return deployment.worker_args(0)
    finally:
        shutil.rmtree(deployment._state_dir, ignore_errors=True)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--long-output-tokens-per-step", "128"], "needs --max-tokens-per-step"),
        (["--max-tokens-per-step", "32", "--long-output-tokens-per-step", "32"], "must exceed"),
        (["--max-tokens-per-step", "0"], "--max-tokens-per-step must be >= 1"),
        (["--max-tokens-per-step", "8", "--long-output-tokens-per-step", "0"],
         "--long-output-tokens-per-step must be >= 1"),
        (["--long-output-min-tokens", "0"], "--long-output-min-tokens must be >= 1"),
    ],
)  # fmt: skip
def test_up_refuses_a_bad_pair_of_chunk_budgets(
    flags: list[str], message: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The deployment is refused before any process starts (exit 2, the flags named); a 0
    is refused, not dropped from the worker flags."""
    parser = argparse.ArgumentParser()
    up.add_arguments(parser)
    with pytest.raises(ValueError, match=message):
        up.config_from_args(parser.parse_args(flags))
    assert up.run(parser.parse_args(flags)) == 2
    assert message in caplog.text


def test_a_zero_budget_given_to_the_launcher_is_refused_not_dropped() -> None:
    with pytest.raises(ValueError, match="--max-tokens-per-step must be >= 1"):
        DeploymentConfig(max_tokens_per_step=0)
