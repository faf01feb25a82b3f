"""Same-host hand-off with ZeroMQ I/O threads at the normal policy against SCHED_BATCH.

`data_plane_context()` (exegpt/transport.py) runs a context's I/O threads at SCHED_BATCH so
that waking one never preempts the sender. This benchmark measures what that buys, side by
side in one run, rounds interleaved so that load on a shared machine hits both alike:

- bandwidth: a sender here streams tensors through `shm+ipc://` to a receiver process that
  decodes each one (as benchmarks/transport.py does), with both processes' contexts plain
  (`zmq.Context()`) or both from `data_plane_context()`; each against an in-process memcpy;
- send: the sender's time in one `send` of a small message after a pause, the case of a
  stage that sends its step's output after computing it.

    .venv/bin/python benchmarks/io_thread_policy.py                 # ~30 s here
    .venv/bin/python benchmarks/io_thread_policy.py --sizes 1M --rounds 15
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import torch
import zmq

from exegpt.transport import TensorMessage, TensorSocket, data_plane_context

POLICIES = ("plain", "batch")
ROUND_END = "round_end"


def make_context(policy: str) -> zmq.Context:
    return data_plane_context() if policy == "batch" else zmq.Context()


def receiver_main(address: str, policy: str, report: Connection) -> None:
    """Decode every message; report each round's end."""
    context = make_context(policy)
    receiver = TensorSocket(context, zmq.PULL, max_message_bytes=2**31)
    try:
        report.send(receiver.bind(address))
        while (message := receiver.recv()).kind != "stop":
            if message.kind == ROUND_END:
                report.send(True)
            del message  # hands its slot back
    finally:
        receiver.close()
        context.term()


class Link:
    """A sender here and a receiver process, both with one policy's contexts."""

    def __init__(self, policy: str, slot_bytes: int, directory: Path) -> None:
        spawn = multiprocessing.get_context("spawn")
        self._report, child_end = spawn.Pipe()
        address = f"shm+ipc://{directory}/{policy}-{time.time_ns()}.sock"
        self._process = spawn.Process(target=receiver_main, args=(address, policy, child_end))
        self._process.start()
        self._context = make_context(policy)
        self.sender = TensorSocket(
            self._context, zmq.PUSH, max_message_bytes=2**31, shm_slot_bytes=slot_bytes
        )
        if not self._report.poll(60):
            raise RuntimeError("the receiver process did not start within 60 s")
        self.sender.connect(self._report.recv())

    def stream(self, tensor: torch.Tensor, count: int) -> float:
        """Seconds to hand `count` messages over, until the receiver decoded the last."""
        start_s = time.perf_counter()
        for _ in range(count):
            self.sender.send(TensorMessage("activations", {"hidden": tensor}))
        self.sender.send(TensorMessage(ROUND_END, {}))
        if not self._report.poll(120):
            raise RuntimeError("the receiver did not finish a round within 120 s")
        self._report.recv()
        return time.perf_counter() - start_s

    def paced_send_s(self, count: int, pause_s: float) -> float:
        """Median seconds one small send takes when sends are `pause_s` of busy work apart."""
        message = TensorMessage("tokens", {"token_ids": torch.zeros(32, dtype=torch.int64)})
        times_s = []
        for _ in range(count):
            busy_until_s = time.perf_counter() + pause_s
            while time.perf_counter() < busy_until_s:
                pass
            start_s = time.perf_counter()
            self.sender.send(message)
            times_s.append(time.perf_counter() - start_s)
        return statistics.median(times_s)

    def close(self) -> None:
        self.sender.send(TensorMessage("stop", {}))
        self._process.join(30)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self.sender.close()
        self._context.term()


def memcpy_gbps(size_bytes: int, count: int) -> float:
    source = np.ones(size_bytes, dtype=np.uint8)
    target = np.empty_like(source)
    np.copyto(target, source)
    start_s = time.perf_counter()
    for _ in range(count):
        np.copyto(target, source)
    return size_bytes * count / (time.perf_counter() - start_s) / 1e9


def bandwidth_row(links: dict[str, Link], size_bytes: int, rounds: int, round_bytes: int) -> str:
    tensor = torch.ones(size_bytes // 4, dtype=torch.float32)
    count = max(8, round_bytes // size_bytes)
    for link in links.values():
        link.stream(tensor, 8)  # warm-up
    gbps: dict[str, list[float]] = {"memcpy": [], **{policy: [] for policy in links}}
    for _ in range(rounds):
        gbps["memcpy"].append(memcpy_gbps(size_bytes, count))
        for policy, link in links.items():
            gbps[policy].append(size_bytes * count / link.stream(tensor, count) / 1e9)

    def ratio(column: str, reference: str) -> float:
        pairs = zip(gbps[column], gbps[reference], strict=True)
        return statistics.median(value / ref for value, ref in pairs)

    median = {column: statistics.median(values) for column, values in gbps.items()}
    return (
        f"{size_bytes >> 20:>4} MB {median['memcpy']:8.2f} {median['plain']:8.2f} "
        f"{ratio('plain', 'memcpy'):8.2f} {median['batch']:8.2f} {ratio('batch', 'memcpy'):8.2f} "
        f"{ratio('batch', 'plain'):11.2f}"
    )


def parse_sizes(text: str) -> list[int]:
    return [int(float(part.strip().upper().removesuffix("M")) * 2**20) for part in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1M,4M,16M", help="tensor sizes in MiB, e.g. 1M,4M")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--round-mb", type=float, default=64)
    parser.add_argument("--sends", type=int, default=400, help="paced sends per policy")
    args = parser.parse_args()
    sizes_bytes = parse_sizes(args.sizes)
    directory = Path(f"/tmp/exegpt-io-policy-{time.time_ns()}")
    directory.mkdir()
    links = {policy: Link(policy, max(sizes_bytes), directory) for policy in POLICIES}
    try:
        print("shm hand-off, GB/s (median of interleaved rounds; ratios: median per round)")
        print(f"{'size':>7} {'memcpy':>8} {'plain':>8} {'/memcpy':>8} {'batch':>8} "
              f"{'/memcpy':>8} {'batch/plain':>11}")  # fmt: skip
        for size_bytes in sizes_bytes:
            print(bandwidth_row(links, size_bytes, args.rounds, int(args.round_mb * 2**20)))
            sys.stdout.flush()
        send_us: dict[str, list[float]] = {policy: [] for policy in links}
        for _ in range(5):
            for policy, link in links.items():
                send_us[policy].append(link.paced_send_s(args.sends // 5, 200e-6) * 1e6)
        plain, batch = (statistics.median(send_us[p]) for p in POLICIES)
        print(f"one small send after 200 us of work: plain {plain:.1f} us, batch {batch:.1f} us")
    finally:
        for link in links.values():
            link.close()
        for leftover in directory.iterdir():
            leftover.unlink()
        directory.rmdir()


if __name__ == "__main__":
    main()
