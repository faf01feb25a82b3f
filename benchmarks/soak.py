"""Soak `exegpt up --replicas 2` at 80% of its measured capacity while faults are injected.

    python benchmarks/soak.py --duration-s 1800

The workers serve the embedded model saved as a checkpoint whose embedding row for one token
is NaN (head untied), so a "poison" request holding that token makes the engine fail that
request alone. Capacity is measured first (closed loop, greedy requests); then requests
arrive open-loop (Poisson) at `--load-fraction` of it, and on a schedule:

- a worker is killed (SIGKILL; `exegpt up` restarts it),
- the other worker is frozen (SIGSTOP for `--freeze-s`, then SIGCONT),
- poison requests are sent (they must fail explicitly, alone),
- slowloris connections trickle header bytes (the gateway must close them).

Every request ends as completed, failed with an explicit error (an HTTP error status with a
JSON body), or lost (no answer: timeout or dropped connection; target 0). Router and worker
RSS are read at the start and the end (target: growth < 10%).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tests.reliability.poison import POISON_TOKEN, save_poisoned_model  # noqa: E402

PROMPTS = [[3, 4, 5], [10, 11, 12, 13], [40, 41], [7, 8, 9, 10, 11, 12]]


@dataclass
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    poison: Counter[str] = field(default_factory=Counter)


@dataclass
class Up:
    process: subprocess.Popen[str]
    http_url: str

    def child_pid(self, name: str) -> int | None:
        """The live child started with `name`.ready (worker-0, worker-1, router)."""
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
                cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if int(stat[1]) == self.process.pid and f"{name}.ready" in cmdline:
                return int(proc.name) if stat[0] != "Z" else None
        return None


def rss_mb(pid: int | None) -> float:
    if pid is None:
        return float("nan")
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_up(model: Path, log_dir: Path, replicas: int) -> Up:
    command = [
        sys.executable, "-m", "exegpt.commands.cli", "up", "--replicas", str(replicas),
        "--model", str(model), "--torch-threads", "1", "--http-port", "0", "--grpc-port", "0",
        "--max-batch-size", "16", "--log-dir", str(log_dir),
    ]  # fmt: skip
    log = open(log_dir / "launcher.log", "w")  # noqa: SIM115 (the child's)
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=log, text=True
    )
    line = process.stdout.readline()  # type: ignore[union-attr]
    match = re.search(r"http=(\S+)", line)
    if not match:
        process.kill()
        raise SystemExit(f"exegpt up failed:\n{(log_dir / 'launcher.log').read_text()[-3000:]}")
    return Up(process, match.group(1))


def body(rng: random.Random, max_tokens: int, poison: bool = False) -> dict[str, object]:
    prompt = list(rng.choice(PROMPTS))
    if poison:
        prompt.append(POISON_TOKEN)
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}


async def one_request(
    client: httpx.AsyncClient, url: str, payload: dict[str, object], timeout_s: float
) -> tuple[str, str]:
    """("completed" | "failed" | "lost", detail)."""
    try:
        response = await client.post(f"{url}/v1/completions", json=payload, timeout=timeout_s)
    except (httpx.TimeoutException, httpx.TransportError) as exc:
        return "lost", type(exc).__name__
    if response.status_code == 200:
        tokens = response.json()["usage"]["completion_tokens"]
        return ("completed", "") if tokens == payload["max_tokens"] else ("lost", "short")
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return "lost", f"HTTP {response.status_code} without a JSON error"
    return "failed", f"{response.status_code} {message[:60]}"


async def measure_capacity(url: str, seconds: float, concurrency: int, max_tokens: int) -> float:
    rng = random.Random(0)
    done = 0
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient() as client:

        async def loop() -> None:
            nonlocal done
            while time.monotonic() < deadline:
                outcome, _ = await one_request(client, url, body(rng, max_tokens), 120)
                done += outcome == "completed"

        start = time.monotonic()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        return done / (time.monotonic() - start)


async def slowloris(url: str, hold_s: float, tally: Tally) -> None:
    """Open a connection, send header bytes slowly; count whether the gateway closed it."""
    host, port = url.split("//")[1].rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
    end = time.monotonic() + hold_s
    try:
        while time.monotonic() < end:
            await asyncio.sleep(5)
            writer.write(b"X-a: b\r\n")
            await writer.drain()
            if reader.at_eof():
                break
        data = await asyncio.wait_for(reader.read(1), timeout=1)
        closed = data == b"" or reader.at_eof()
    except (ConnectionError, TimeoutError, OSError):
        closed = True
    tally.outcomes["slowloris closed by server" if closed else "slowloris still open"] += 1
    writer.close()


async def faults(up: Up, args: argparse.Namespace, tally: Tally, log: list[str]) -> None:
    t0 = time.monotonic()

    async def at(fraction: float) -> None:
        await asyncio.sleep(max(0.0, t0 + fraction * args.duration_s - time.monotonic()))

    async def note(text: str) -> None:
        log.append(f"{time.monotonic() - t0:7.1f}s {text}")

    tasks = [asyncio.create_task(slowloris(up.http_url, 60, tally)) for _ in range(5)]
    await at(0.2)
    victim = up.child_pid("worker-0")
    if victim:
        os.kill(victim, signal.SIGKILL)
        await note(f"SIGKILL worker-0 (pid {victim})")
    await at(0.45)
    frozen = up.child_pid("worker-1")
    if frozen:
        os.kill(frozen, signal.SIGSTOP)
        await note(f"SIGSTOP worker-1 (pid {frozen})")
        await asyncio.sleep(args.freeze_s)
        os.kill(frozen, signal.SIGCONT)
        await note("SIGCONT worker-1")
    await at(0.7)
    tasks += [asyncio.create_task(slowloris(up.http_url, 60, tally)) for _ in range(5)]
    await note("5 more slowloris connections")
    await asyncio.gather(*tasks)


async def poison(up: Up, args: argparse.Namespace, tally: Tally) -> None:
    rng = random.Random(1)
    interval = args.duration_s / args.num_poison
    async with httpx.AsyncClient() as client:
        for index in range(args.num_poison):
            await asyncio.sleep(interval * (0.5 if index == 0 else 1.0))
            payload = body(rng, args.max_tokens, poison=True)
            outcome, detail = await one_request(client, up.http_url, payload, args.timeout_s)
            tally.poison[f"{outcome} {detail}".strip()] += 1


async def load(up: Up, args: argparse.Namespace, rate: float, tally: Tally) -> None:
    rng = random.Random(2)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(limits=limits) as client:
        pending: set[asyncio.Task[None]] = set()

        async def send() -> None:
            outcome, detail = await one_request(
                client, up.http_url, body(rng, args.max_tokens), args.timeout_s
            )
            tally.outcomes[outcome] += 1
            if detail:
                tally.errors[f"{outcome}: {detail}"] += 1

        end = time.monotonic() + args.duration_s
        while time.monotonic() < end:
            await asyncio.sleep(rng.expovariate(rate))
            task = asyncio.create_task(send())
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.gather(*pending)


def rss_row(up: Up) -> dict[str, float]:
    return {name: rss_mb(up.child_pid(name)) for name in ("router", "worker-0", "worker-1")}


async def soak(up: Up, args: argparse.Namespace) -> None:
    capacity = await measure_capacity(
        up.http_url, args.capacity_s, args.concurrency, args.max_tokens
    )
    rate = args.load_fraction * capacity
    print(f"capacity {capacity:.2f} req/s (closed loop, {args.concurrency} clients); "
          f"offered {rate:.2f} req/s for {args.duration_s:.0f}s", flush=True)  # fmt: skip
    pids_start = {name: up.child_pid(name) for name in ("router", "worker-0", "worker-1")}
    rss_start = rss_row(up)
    tally, log = Tally(), []
    await asyncio.gather(load(up, args, rate, tally), faults(up, args, tally, log),
                         poison(up, args, tally))  # fmt: skip
    await asyncio.sleep(2)
    rss_end = rss_row(up)
    pids_end = {name: up.child_pid(name) for name in ("router", "worker-0", "worker-1")}
    report(tally, log, rss_start, rss_end, pids_start, pids_end)


def report(
    tally: Tally,
    log: list[str],
    rss_start: dict[str, float],
    rss_end: dict[str, float],
    pids_start: dict[str, int | None],
    pids_end: dict[str, int | None],
) -> None:
    print("faults:\n  " + "\n  ".join(log))
    total = sum(tally.outcomes[k] for k in ("completed", "failed", "lost"))
    print(f"requests: {total} sent, {tally.outcomes['completed']} completed, "
          f"{tally.outcomes['failed']} failed with an explicit error, "
          f"{tally.outcomes['lost']} lost")  # fmt: skip
    for detail, count in tally.errors.most_common(8):
        print(f"  {count:5d} {detail}")
    print(f"poison requests: {dict(tally.poison)}")
    slow = {k: v for k, v in tally.outcomes.items() if k.startswith("slowloris")}
    print(f"slowloris connections: {slow}")
    print("RSS MiB (start -> end):")
    for name in rss_start:
        growth = (rss_end[name] - rss_start[name]) / rss_start[name] * 100
        restarted = " (restarted: a new process)" if pids_start[name] != pids_end[name] else ""
        print(f"  {name:9s} {rss_start[name]:7.1f} -> {rss_end[name]:7.1f} "
              f"({growth:+.1f}%){restarted}")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=1800.0)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--load-fraction", type=float, default=0.8)
    parser.add_argument("--capacity-s", type=float, default=30.0, help="capacity measurement")
    parser.add_argument("--concurrency", type=int, default=16, help="capacity clients")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--timeout-s", type=float, default=120.0, help="per request")
    parser.add_argument("--freeze-s", type=float, default=20.0)
    parser.add_argument("--num-poison", type=int, default=10)
    parser.add_argument("--log-dir", type=Path, default=None)
    args = parser.parse_args()
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="exegpt-soak-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    model = save_poisoned_model(log_dir / "poisoned-model")
    up = start_up(model, log_dir, args.replicas)
    print(f"exegpt up on {up.http_url}; logs in {log_dir}", flush=True)
    try:
        asyncio.run(soak(up, args))
    finally:
        up.process.send_signal(signal.SIGTERM)
        try:
            up.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            up.process.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
