"""Data-plane hand-off bandwidth: in-process copy vs same-host shared memory vs ZeroMQ TCP.

For each tensor size it measures, side by side in one run:
- memcpy: one thread copying the tensor into a preallocated buffer (numpy), and clone: a
  fresh tensor copied from it (torch), both in this process;
- shm: exegpt.transport over `shm+ipc://` (payload through the sender's shared-memory ring,
  header over ZeroMQ), and tcp: the same transport over `tcp://127.0.0.1`, each with the
  sender here and the receiver in a separate (spawned) process that decodes every message.
A transport round streams messages and ends when the receiver reports the last one decoded;
bandwidth is the round's bytes over that time, median of the rounds. The shm column also says
what share of messages went through a slot (the rest fell back inline on a full ring).
Machines here are shared and noisy: read the ratios, not the absolute numbers.

    .venv/bin/python benchmarks/transport.py                       # ~20-30 s here
    .venv/bin/python benchmarks/transport.py --sizes 1M,4M --rounds 9
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import torch
import zmq

from exegpt.transport import TensorMessage, TensorSocket

SIZE_SUFFIXES = {"K": 2**10, "M": 2**20, "G": 2**30}
DEFAULT_SIZES = "64K,256K,1M,4M,16M,64M"
ROUND_END = "round_end"


def parse_size_bytes(text: str) -> int:
    text = text.strip().upper().removesuffix("B")
    if text and text[-1] in SIZE_SUFFIXES:
        return int(float(text[:-1]) * SIZE_SUFFIXES[text[-1]])
    return int(text)


def messages_per_round(size_bytes: int, round_bytes: int) -> int:
    return max(8, round_bytes // size_bytes)


def median_gb_per_s(size_bytes: int, count: int, round_times_s: list[float]) -> float:
    return size_bytes * count / statistics.median(round_times_s) / 1e9


# --- in-process copies -------------------------------------------------------------------


def time_rounds(action: Callable[[], object], count: int, rounds: int) -> list[float]:
    action()  # warm-up: first-touch page faults and allocator growth stay out of the rounds
    times_s = []
    for _ in range(rounds):
        start_s = time.perf_counter()
        for _ in range(count):
            action()
        times_s.append(time.perf_counter() - start_s)
    return times_s


def memcpy_gb_per_s(size_bytes: int, round_bytes: int, rounds: int) -> float:
    source = np.ones(size_bytes, dtype=np.uint8)
    target = np.empty_like(source)
    count = messages_per_round(size_bytes, round_bytes)
    times_s = time_rounds(lambda: np.copyto(target, source), count, rounds)
    return median_gb_per_s(size_bytes, count, times_s)


def clone_gb_per_s(size_bytes: int, round_bytes: int, rounds: int) -> float:
    source = torch.ones(size_bytes, dtype=torch.uint8)
    count = messages_per_round(size_bytes, round_bytes)
    return median_gb_per_s(size_bytes, count, time_rounds(source.clone, count, rounds))


# --- two processes over the transport ------------------------------------------------------


def receiver_main(address: str, report: Connection) -> None:
    """The receiving process: decode every message, report each round's end to the sender."""
    context = zmq.Context()
    receiver = TensorSocket(context, zmq.PULL, max_message_bytes=2**31)
    try:
        report.send(receiver.bind(address))
        while True:
            message = receiver.recv()
            if message.kind == "stop":
                break
            if message.kind == ROUND_END:
                report.send(receiver.stats.received_shm)
    finally:
        receiver.close()
        context.term()


@dataclass
class TransportResult:
    gb_per_s: float
    shm_share: float  # messages through a slot / messages sent


class RemoteReceiver:
    """A receiver in a spawned process, and this process's sending socket connected to it."""

    def __init__(self, address: str, slot_bytes: int, num_slots: int) -> None:
        spawn = multiprocessing.get_context("spawn")
        self._report, child_end = spawn.Pipe()
        self._process = spawn.Process(target=receiver_main, args=(address, child_end))
        self._process.start()
        self._context = zmq.Context()
        self.sender = TensorSocket(
            self._context,
            zmq.PUSH,
            max_message_bytes=2**31,
            shm_slot_bytes=slot_bytes,
            shm_num_slots=num_slots,
        )
        if not self._report.poll(60):
            raise RuntimeError("the receiver process did not start within 60 s")
        self.sender.connect(self._report.recv())

    def one_round(self, tensor: torch.Tensor, count: int) -> float:
        start_s = time.perf_counter()
        for _ in range(count):
            self.sender.send(TensorMessage("activations", {"hidden": tensor}))
        self.sender.send(TensorMessage(ROUND_END, {}))
        if not self._report.poll(120):
            raise RuntimeError("the receiver did not finish a round within 120 s")
        self._report.recv()
        return time.perf_counter() - start_s

    def measure(self, size_bytes: int, round_bytes: int, rounds: int) -> TransportResult:
        tensor = torch.ones(size_bytes // 4, dtype=torch.float32)
        count = messages_per_round(size_bytes, round_bytes)
        self.one_round(tensor, min(count, 8))  # warm-up: ring pages, sockets, allocator
        shm_before, inline_before = self.sender.stats.sent_shm, self.sender.stats.sent_inline
        times_s = [self.one_round(tensor, count) for _ in range(rounds)]
        sent_shm = self.sender.stats.sent_shm - shm_before
        sent_inline = self.sender.stats.sent_inline - inline_before - rounds  # not round ends
        share = sent_shm / max(1, sent_shm + sent_inline)
        return TransportResult(median_gb_per_s(size_bytes, count, times_s), share)

    def close(self) -> None:
        self.sender.send(TensorMessage("stop", {}))
        self._process.join(30)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self.sender.close()
        self._context.term()


# --- PP-2 pipeline step -------------------------------------------------------------------
# The step's wall time against its two stages' compute, on real stage processes
# (benchmarks/pipeline_step.py; target: at most 10% overhead at decode batch 32).


def pp2_step_report() -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from pipeline_step import report

    return report(batch_size=32)


# --- report --------------------------------------------------------------------------------


def format_size(size_bytes: int) -> str:
    for suffix, unit in (("M", 2**20), ("K", 2**10)):
        if size_bytes >= unit and size_bytes % unit == 0:
            return f"{size_bytes // unit} {suffix}B"
    return f"{size_bytes} B"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="comma-separated, e.g. 64K,1M")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per point")
    parser.add_argument("--round-mb", type=float, default=128, help="bytes per round, in MiB")
    parser.add_argument("--slots", type=int, default=8, help="shared-memory ring slots")
    args = parser.parse_args()
    sizes_bytes = [parse_size_bytes(text) for text in args.sizes.split(",")]
    round_bytes = int(args.round_mb * 2**20)
    ipc_path = f"/tmp/exegpt-bench-{time.time_ns()}.sock"
    transports = {
        "shm": RemoteReceiver(f"shm+ipc://{ipc_path}", max(sizes_bytes), args.slots),
        "tcp": RemoteReceiver("tcp://127.0.0.1:0", max(sizes_bytes), args.slots),
    }
    header = (
        f"{'size':>7} {'memcpy':>8} {'clone':>8} {'shm':>8} {'shm/memcpy':>10} {'via slot':>8} "
        f"{'tcp':>8} {'tcp/memcpy':>10}"
    )
    print("hand-off bandwidth, GB/s (shm and tcp: sender and receiver in separate processes)")
    print(header)
    try:
        for size_bytes in sizes_bytes:
            memcpy = memcpy_gb_per_s(size_bytes, round_bytes, args.rounds)
            clone = clone_gb_per_s(size_bytes, round_bytes, args.rounds)
            shm = transports["shm"].measure(size_bytes, round_bytes, args.rounds)
            tcp = transports["tcp"].measure(size_bytes, round_bytes, args.rounds)
            print(
                f"{format_size(size_bytes):>7} {memcpy:8.2f} {clone:8.2f} {shm.gb_per_s:8.2f} "
                f"{shm.gb_per_s / memcpy:10.2f} {shm.shm_share:8.0%} {tcp.gb_per_s:8.2f} "
                f"{tcp.gb_per_s / memcpy:10.2f}",
                flush=True,
            )
    finally:
        for transport in transports.values():
            transport.close()
    print(pp2_step_report())


if __name__ == "__main__":
    main()
