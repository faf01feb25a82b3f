"""One rank of the all-reduce measurement, run as its own process by comm.py.

`python -m services.profiler.measure.allreduce_worker --rank R --world-size N --init-method tcp://...`
joins a torch.distributed group (gloo on CPU, NCCL on CUDA), times all_reduce for each size,
and rank 0 prints the timings as one JSON line on stdout. Each repeat's time is the slowest
rank's, so a rank that arrives late cannot make the collective look fast.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m services.profiler.measure.allreduce_worker")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--init-method", required=True, help="tcp://127.0.0.1:PORT")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--sizes-bytes", required=True, help="comma-separated message sizes")
    parser.add_argument("--num-warmup", type=int, default=2)
    parser.add_argument("--num-repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeout-s", type=float, default=120.0)
    return parser.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_allreduce(
    size_bytes: int, device: torch.device, dtype: torch.dtype, num_warmup: int, num_repeats: int
) -> list[float]:
    """Per-repeat times (the slowest rank's) of one all_reduce of `size_bytes`."""
    element_bytes = torch.empty((), dtype=dtype).element_size()
    tensor = torch.ones(max(1, size_bytes // element_bytes), dtype=dtype, device=device)
    for _ in range(num_warmup):
        dist.all_reduce(tensor)
    _sync(device)
    samples_s = []
    for _ in range(num_repeats):
        dist.barrier()  # start together, so no rank's wait for the others is counted
        start = time.perf_counter()
        dist.all_reduce(tensor)
        _sync(device)
        samples_s.append(time.perf_counter() - start)
    slowest = torch.tensor(samples_s, dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return slowest.cpu().tolist()


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", args.rank)
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        init_method=args.init_method,
        rank=args.rank,
        world_size=args.world_size,
        timeout=timedelta(seconds=args.timeout_s),
    )
    try:
        dtype = getattr(torch, args.dtype)
        sizes = [int(size) for size in args.sizes_bytes.split(",")]
        results = [
            time_allreduce(size, device, dtype, args.num_warmup, args.num_repeats) for size in sizes
        ]
    finally:
        dist.destroy_process_group()
    if args.rank == 0:
        payload = {
            "sizes": sizes,
            "samples_s": results,
            "median_s": [statistics.median(samples) for samples in results],
        }
        sys.stdout.write(json.dumps(payload) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
