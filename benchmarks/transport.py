"""Data-plane hand-off bandwidth: in-process copy vs same-host shared memory vs ZeroMQ TCP.

For each tensor size it measures, side by side in one run:
- memcpy: one thread copying the tensor into a preallocated buffer (numpy), again and again:
  both buffers stay in the caches (L2/L3 up to a few MB), as a just-computed activation is;
- cold: the same copy, round robin over enough buffer pairs (>= 96 MiB of each) that none is
  still cached: what a copy of data no core has touched lately costs (DRAM bandwidth);
- clone: a fresh tensor copied from it (torch; large sizes pay the allocator's page faults),
  all three in this process;
- shm: exegpt.transport over `shm+ipc://` (payload through the sender's shared-memory ring,
  header over ZeroMQ), and tcp: the same transport over `tcp://127.0.0.1`, each with the
  sender here and the receiver in a separate (spawned) process that decodes every message.
A transport round streams messages and ends when the receiver reports the last one decoded
(the receiver's tensors are views of the slot; dropping them hands it back); bandwidth is the
round's bytes over that time. Rounds are interleaved, one of each column in turn, so a burst
of load on a shared machine hits every column alike; each column prints its median, and each
ratio is the median of per-round ratios. The shm column also says what share of messages
went through a slot (the rest fell back inline on a full ring). Machines here are shared
and noisy: read the ratios, not the absolute numbers.

    .venv/bin/python benchmarks/transport.py                       # ~20-30 s here
    .venv/bin/python benchmarks/transport.py --sizes 1M,4M --rounds 9 --no-step
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


# --- in-process copies -------------------------------------------------------------------


def timed_round(action: Callable[[], object], count: int) -> float:
    start_s = time.perf_counter()
    for _ in range(count):
        action()
    return time.perf_counter() - start_s


COLD_BYTES = 96 * 2**20  # well past this machine's caches (32 MiB of L3 here)


class InProcessCopies:
    """The references: a numpy memcpy into a preallocated buffer (hot, and cold over many
    buffer pairs), and a torch clone."""

    def __init__(self, size_bytes: int) -> None:
        self._source = np.ones(size_bytes, dtype=np.uint8)
        self._target = np.empty_like(self._source)
        num_cold = max(2, -(-COLD_BYTES // size_bytes))
        self._cold = [(np.ones(size_bytes, np.uint8), np.ones(size_bytes, np.uint8))
                      for _ in range(num_cold)]  # fmt: skip
        self._next_cold = 0
        self._tensor = torch.ones(size_bytes, dtype=torch.uint8)
        self.memcpy()  # warm-up: first-touch page faults and allocator growth
        self.clone()

    def memcpy(self) -> None:
        np.copyto(self._target, self._source)

    def cold(self) -> None:
        source, target = self._cold[self._next_cold]
        self._next_cold = (self._next_cold + 1) % len(self._cold)
        np.copyto(target, source)

    def clone(self) -> None:
        self._tensor.clone()


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


@dataclass
class Point:
    """One tensor size: per-round GB/s of each column, rounds interleaved across columns."""

    size_bytes: int
    rounds: dict[str, list[float]]
    shm_share: float  # messages through a slot / messages sent

    def median(self, column: str) -> float:
        return statistics.median(self.rounds[column])

    def ratio(self, column: str, reference: str = "memcpy") -> float:
        """Median over rounds of column / reference, each pair measured back to back."""
        pairs = zip(self.rounds[column], self.rounds[reference], strict=True)
        return statistics.median(value / ref for value, ref in pairs)


def measure_point(
    size_bytes: int, round_bytes: int, rounds: int, transports: dict[str, RemoteReceiver]
) -> Point:
    """Round by round, each column in turn: on a shared machine a burst of load then hits
    every column alike instead of one, and each ratio compares rounds taken back to back."""
    copies = InProcessCopies(size_bytes)
    tensor = torch.ones(size_bytes // 4, dtype=torch.float32)
    count = messages_per_round(size_bytes, round_bytes)
    for transport in transports.values():
        transport.one_round(tensor, min(count, 8))  # warm-up: ring pages, sockets, allocator
    shm = transports["shm"].sender.stats
    shm_before, inline_before = shm.sent_shm, shm.sent_inline
    columns: dict[str, list[float]] = {
        "memcpy": [], "cold": [], "clone": [], **{k: [] for k in transports}
    }  # fmt: skip
    for _ in range(rounds):
        times_s = {"memcpy": timed_round(copies.memcpy, count)}
        times_s["cold"] = timed_round(copies.cold, count)
        times_s["clone"] = timed_round(copies.clone, count)
        for name, transport in transports.items():
            times_s[name] = transport.one_round(tensor, count)
        for name, time_s in times_s.items():
            columns[name].append(size_bytes * count / time_s / 1e9)
    sent_shm = shm.sent_shm - shm_before
    sent_inline = shm.sent_inline - inline_before - rounds  # not the round ends
    return Point(size_bytes, columns, sent_shm / max(1, sent_shm + sent_inline))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="comma-separated, e.g. 64K,1M")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per point")
    parser.add_argument("--round-mb", type=float, default=128, help="bytes per round, in MiB")
    parser.add_argument("--slots", type=int, default=8, help="shared-memory ring slots")
    parser.add_argument("--no-step", action="store_true", help="skip the PP-2 step report")
    args = parser.parse_args()
    sizes_bytes = [parse_size_bytes(text) for text in args.sizes.split(",")]
    round_bytes = int(args.round_mb * 2**20)
    ipc_path = f"/tmp/exegpt-bench-{time.time_ns()}.sock"
    transports = {
        "shm": RemoteReceiver(f"shm+ipc://{ipc_path}", max(sizes_bytes), args.slots),
        "tcp": RemoteReceiver("tcp://127.0.0.1:0", max(sizes_bytes), args.slots),
    }
    header = (
        f"{'size':>7} {'memcpy':>8} {'cold':>8} {'clone':>8} {'shm':>8} {'shm/memcpy':>10} "
        f"{'shm/cold':>8} {'via slot':>8} {'tcp':>8} {'tcp/memcpy':>10}"
    )
    print("hand-off bandwidth, GB/s, median of rounds (shm and tcp: sender and receiver in")
    print("separate processes; ratios: median of per-round ratios, rounds interleaved;")
    print("the target, shm >= 0.5 x memcpy at >= 1 MB, is against the cached memcpy)")
    print(header)
    try:
        for size_bytes in sizes_bytes:
            point = measure_point(size_bytes, round_bytes, args.rounds, transports)
            print(
                f"{format_size(size_bytes):>7} {point.median('memcpy'):8.2f} "
                f"{point.median('cold'):8.2f} {point.median('clone'):8.2f} "
                f"{point.median('shm'):8.2f} {point.ratio('shm'):10.2f} "
                f"{point.ratio('shm', 'cold'):8.2f} {point.shm_share:8.0%} "
                f"{point.median('tcp'):8.2f} {point.ratio('tcp'):10.2f}",
                flush=True,
            )
    finally:
        for transport in transports.values():
            transport.close()
    if not args.no_step:
        print(pp2_step_report())


if __name__ == "__main__":
    main()
