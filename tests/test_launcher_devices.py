"""The device each worker of `exegpt up` is told to compute on (its argument list; no GPU
needed to check it)."""

from __future__ import annotations

import shutil

from exegpt.launcher import Deployment, DeploymentConfig
from exegpt.topology import Topology


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
