"""Communication costs: TP all-reduce across real processes, and the pipeline hand-off.

The all-reduce runs in `tp_degree` fresh processes (services/profiler/measure/allreduce_worker.py)
joined by torch.distributed over a loopback tcp:// rendezvous, the way TP workers are. The
hand-off sends activations through the workers' ZeroMQ transport (exegpt.transport) over
loopback TCP to a receiving thread, which decodes each message and moves it to the device:
the time from send to usable tensor on the other side.
"""

from __future__ import annotations

import json
import logging
import queue
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
import zmq

from exegpt.transport import TensorMessage, TensorSocket
from services.profiler.measure.timing import Series, stats_of

logger = logging.getLogger(__name__)


class MeasurementError(RuntimeError):
    """A measurement could not be taken (a rank failed, a message never arrived)."""


@dataclass(frozen=True)
class LinearFit:
    """time = latency_s + num_bytes / bytes_per_s (least squares, both terms >= 0)."""

    latency_s: float
    bytes_per_s: float

    def to_dict(self) -> dict[str, float]:
        return {"latency_s": self.latency_s, "bytes_per_s": self.bytes_per_s}


def fit_latency_bandwidth(sizes_bytes: list[int], times_s: list[float]) -> LinearFit:
    sizes = np.asarray(sizes_bytes, dtype=float)
    times = np.asarray(times_s, dtype=float)
    if len(sizes) < 2:
        return LinearFit(float(times[0]), float("inf"))
    slope, intercept = np.polyfit(sizes, times, 1)
    if slope <= 0:  # flat: latency-bound over the whole range
        return LinearFit(float(times.mean()), float("inf"))
    if intercept < 0:  # refit through the origin
        intercept, slope = 0.0, float(np.dot(sizes, times) / np.dot(sizes, sizes))
    return LinearFit(float(intercept), float(1.0 / slope))


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def measure_allreduce(
    tp_degree: int,
    sizes_bytes: tuple[int, ...],
    *,
    device: str,
    dtype: str,
    num_warmup: int,
    num_repeats: int,
    threads_per_rank: int,
    timeout_s: float = 300.0,
) -> Series:
    """All-reduce time per message size across `tp_degree` real processes."""
    if tp_degree < 2:
        raise ValueError(f"an all-reduce needs at least 2 ranks, got {tp_degree}")
    init_method = f"tcp://127.0.0.1:{free_tcp_port()}"
    command = [
        sys.executable,
        "-m",
        "services.profiler.measure.allreduce_worker",
        f"--world-size={tp_degree}",
        f"--init-method={init_method}",
        f"--device={device}",
        f"--dtype={dtype}",
        f"--sizes-bytes={','.join(str(size) for size in sizes_bytes)}",
        f"--num-warmup={num_warmup}",
        f"--num-repeats={num_repeats}",
        f"--threads={threads_per_rank}",
        f"--timeout-s={timeout_s}",
    ]
    ranks = [
        subprocess.Popen(
            [*command, f"--rank={rank}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(tp_degree)
    ]
    outputs = _wait_all(ranks, timeout_s)
    payload = json.loads(outputs[0].strip().splitlines()[-1])
    series = Series()
    for size, samples in zip(payload["sizes"], payload["samples_s"], strict=True):
        series.add((int(size),), stats_of(samples))
    return series


def _wait_all(ranks: list[subprocess.Popen[str]], timeout_s: float) -> list[str]:
    """Stdout of every rank; kills them all and raises if any fails or times out."""
    deadline = time.monotonic() + timeout_s
    outputs = []
    try:
        for rank, process in enumerate(ranks):
            remaining = max(1.0, deadline - time.monotonic())
            stdout, stderr = process.communicate(timeout=remaining)
            if process.returncode != 0:
                tail = stderr.strip().splitlines()[-5:]
                raise MeasurementError(
                    f"all-reduce rank {rank} exited with {process.returncode}: {' | '.join(tail)}"
                )
            outputs.append(stdout)
    except subprocess.TimeoutExpired as exc:
        raise MeasurementError(f"all-reduce ranks did not finish within {timeout_s:.0f} s") from exc
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()
                process.wait()
    return outputs


def measure_transfer(
    sizes_bytes: tuple[int, ...],
    *,
    device: torch.device,
    num_warmup: int,
    num_repeats: int,
    timeout_s: float = 30.0,
) -> Series:
    """Pipeline hand-off time per message size over the ZeroMQ tensor transport."""
    context = zmq.Context()
    receiver = TensorSocket(context, zmq.PULL)
    sender = TensorSocket(context, zmq.PUSH)
    arrivals: queue.Queue[float | BaseException] = queue.Queue()
    stop = threading.Event()
    try:
        address = receiver.bind("tcp://127.0.0.1:0")
        sender.connect(address)
        thread = threading.Thread(
            target=_receive_loop, args=(receiver, device, arrivals, stop), daemon=True
        )
        thread.start()
        series = Series()
        for size in sizes_bytes:
            tensor = torch.ones(max(1, size // 4), dtype=torch.float32, device=device)
            samples = [
                _one_transfer(sender, tensor, device, arrivals, timeout_s)
                for _ in range(num_warmup + num_repeats)
            ]
            series.add((size,), stats_of(samples[num_warmup:]))
        stop.set()
        thread.join(timeout_s)
    finally:
        stop.set()
        sender.close()
        receiver.close()
        context.term()
    return series


def _one_transfer(
    sender: TensorSocket,
    tensor: torch.Tensor,
    device: torch.device,
    arrivals: queue.Queue[float | BaseException],
    timeout_s: float,
) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    sender.send(TensorMessage(kind="activations", tensors={"hidden": tensor}))
    try:
        arrived = arrivals.get(timeout=timeout_s)
    except queue.Empty as exc:
        raise MeasurementError(f"a hand-off message did not arrive within {timeout_s} s") from exc
    if isinstance(arrived, BaseException):
        raise MeasurementError(f"the receiving side failed: {arrived}") from arrived
    return arrived - start


def _receive_loop(
    receiver: TensorSocket,
    device: torch.device,
    arrivals: queue.Queue[float | BaseException],
    stop: threading.Event,
) -> None:
    try:
        while not stop.is_set():
            try:
                message = receiver.recv(timeout_ms=100)
            except TimeoutError:
                continue
            hidden = message.tensors["hidden"].to(device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            del hidden
            arrivals.put(time.perf_counter())
    except Exception as exc:  # reported to the sender, which raises it
        arrivals.put(exc)
