"""CPU cost of the same-host frame path per message: encode into a ring slot, and decode.

A pipeline step carries a dozen small tensors (batch indexes, sampling rows) beside its
activations, so a hop's host work is mostly per-tensor. This times, in CPU time of this
thread (so that other processes on a shared machine do not count), `encode_into_ring` +
`decode` + the slot's release, for a decode-step-like message and for one 1 MB tensor; each
figure is the minimum over repeats. No sockets: the transport's own cost. The growing
decode step adds a per-token slot list one token longer every message, as a real decode
step's is, which moves every tensor after it in the slot. Messages are made before the
timer starts: the figures are the frames' cost alone.
Run it against another checkout by pointing PYTHONPATH there:

    .venv/bin/python benchmarks/frame_cost.py
    PYTHONPATH=/path/to/other/tree .venv/bin/python benchmarks/frame_cost.py
"""

from __future__ import annotations

import argparse
import functools
import itertools
import time
import timeit
from collections.abc import Iterator
from dataclasses import replace

import torch

from exegpt.frames import TensorMessage, decode, encode_into_ring
from exegpt.shm_ring import ShmReader, ShmRing

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def step_message(batch_size: int = 32) -> TensorMessage:
    """What a PP stage sends on for a decode step: its batch and sampling tensors, and hidden."""
    tensors = {f"batch.index{i}": torch.zeros(batch_size, dtype=torch.int64) for i in range(10)}
    tensors["batch.cross_kv.read_slots"] = torch.zeros(batch_size, 64, dtype=torch.int64)
    tensors["sampling.floats"] = torch.zeros(batch_size, 4, dtype=torch.float64)
    tensors["sampling.ints"] = torch.zeros(batch_size, 3, dtype=torch.int64)
    tensors["sampling.generated"] = torch.zeros(0, dtype=torch.int64)
    tensors["hidden"] = torch.zeros(batch_size, 1, 512)
    attributes = {"step_id": "12", "load_id": "0" * 32, "sent_s": "1764500000.123"}
    return TensorMessage("decode", tensors, attributes=attributes,
                         trace_context={"traceparent": TRACEPARENT})  # fmt: skip


def growing_messages(batch_size: int = 32, max_tokens: int = 2048) -> Iterator[TensorMessage]:
    """The step message with a self-attention slot list of 1, 2, ... tokens a row, cycling
    (a cycle longer than the receiver's layout cache, as a long generation's is)."""
    message = step_message(batch_size)
    slots = torch.zeros(batch_size * max_tokens, dtype=torch.int64)
    for tokens in itertools.cycle(range(1, max_tokens + 1)):
        grown = {"batch.self_kv.read_slots": slots[: batch_size * tokens].view(batch_size, -1)}
        yield replace(message, tensors={**grown, **message.tensors})


def round_trip_us(messages: Iterator[TensorMessage], number: int, repeats: int) -> float:
    """Microseconds of CPU for encode + decode + the slot's release, best of `repeats` runs
    of `number` messages each. Each run's messages are made before its timer starts, so the
    figure is the frames' cost alone."""
    ring = ShmRing(slot_bytes=2 * 2**20, num_slots=8)
    reader = ShmReader(max_payload_bytes=2**30)

    def round_trips(batch: list[TensorMessage]) -> None:
        for message in batch:
            header = encode_into_ring(message, ring)
            if header is None:
                raise RuntimeError("the ring refused the message")
            decode([header], shm=reader)  # dropped at once: its slot goes back

    try:
        costs = []
        for _ in range(repeats):
            batch = list(itertools.islice(messages, number))
            timer = timeit.Timer(functools.partial(round_trips, batch), timer=time.thread_time)
            costs.append(timer.timeit(number=1))
        return min(costs) / number * 1e6
    finally:
        reader.close()
        ring.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--number", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=11)
    args = parser.parse_args()
    messages = {
        "decode step (15 tensors)": itertools.repeat(step_message()),
        "growing decode step (16)": growing_messages(),
        "1 MB tensor": itertools.repeat(
            TensorMessage("activations", {"hidden": torch.ones(2**18)})
        ),
    }
    for name, message in messages.items():
        cost = round_trip_us(message, args.number, args.repeats)
        print(f"{name:>25}: encode + decode + release {cost:6.1f} us CPU")


if __name__ == "__main__":
    main()
