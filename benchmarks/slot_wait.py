"""How late a sender on a full shared-memory ring resumes after its receiver frees the slot.

A same-host sender whose ring is full waits for a receiver to release a slot (the ring's
back-pressure). Here the ring has one slot: the receiver, in a separate (spawned) process,
keeps each message for `--hold-ms` so that the next send is already waiting, then stamps
the clock and drops the message, which releases the slot. The sender's lateness is the
time from that stamp to its waiting send's return (the send's own small copy and ZeroMQ
send included). Both clocks are CLOCK_MONOTONIC, shared by the processes of one host.
Run it against another checkout by pointing PYTHONPATH there:

    .venv/bin/python benchmarks/slot_wait.py                       # ~3 s
    PYTHONPATH=/path/to/other/tree .venv/bin/python benchmarks/slot_wait.py
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from multiprocessing.connection import Connection

import torch
import zmq

from exegpt.transport import TensorMessage, TensorSocket


def receiver_main(address: str, hold_s: float, report: Connection) -> None:
    """Keep each message `hold_s`, stamp, drop it (the slot goes back), report the stamp."""
    context = zmq.Context()
    receiver = TensorSocket(context, zmq.PULL)
    try:
        report.send(receiver.bind(address))
        while True:
            message = receiver.recv()
            if message.kind == "stop":
                break
            time.sleep(hold_s)
            released_ns = time.perf_counter_ns()
            del message
            report.send(released_ns)
    finally:
        receiver.close()
        context.term()


def lateness_us(count: int, hold_s: float) -> list[float]:
    """Per waiting send: microseconds from the receiver's release to the send's return."""
    spawn = multiprocessing.get_context("spawn")
    report, child_end = spawn.Pipe()
    address = f"shm+ipc:///tmp/exegpt-slot-wait-{time.time_ns()}.sock"
    receiver = spawn.Process(target=receiver_main, args=(address, hold_s, child_end))
    receiver.start()
    context = zmq.Context()
    sender = TensorSocket(context, zmq.PUSH, shm_slot_bytes=4096, shm_num_slots=1, shm_wait_s=5)
    message = TensorMessage("activations", {"x": torch.ones(16)})
    results = []
    try:
        if not report.poll(60):
            raise RuntimeError("the receiver process did not start within 60 s")
        sender.connect(report.recv())
        sender.send(message)  # takes the only slot
        for _ in range(count + 1):
            sender.send(message)  # waits for the receiver to drop the previous message
            returned_ns = time.perf_counter_ns()
            results.append((returned_ns - report.recv()) / 1e3)
        report.recv()  # the last message's release
        if sender.stats.sent_inline:
            raise RuntimeError(f"{sender.stats.sent_inline} sends found no slot within 5 s")
    finally:
        sender.send(TensorMessage("stop", {}))
        receiver.join(30)
        if receiver.is_alive():
            receiver.kill()
        sender.close()
        context.term()
    return results[1:]  # the first wait began before the receiver had warmed up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=300, help="waiting sends")
    parser.add_argument("--hold-ms", type=float, default=2.0, help="receiver keeps each message")
    args = parser.parse_args()
    late = sorted(lateness_us(args.count, args.hold_ms / 1e3))
    print(
        f"sender resumes after the release: median {statistics.median(late):.0f} us, "
        f"p90 {late[int(0.9 * (len(late) - 1))]:.0f} us, max {late[-1]:.0f} us "
        f"({len(late)} waiting sends)"
    )


if __name__ == "__main__":
    main()
