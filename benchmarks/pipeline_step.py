"""A PP-2 step's wall time against the sum of its two stages' compute, on real stage processes.

`python benchmarks/pipeline_step.py [--batch-size 32] [--steps 40]` starts two stage
processes of the embedded model (one thread each), prefills a batch through them, then times
decode steps one at a time: the engine-side wall time of each step against the compute time
the stages report for it. The difference is the data plane's cost (serialising the batch,
two hand-offs, the return of the tokens); the stage-to-stage hand-off is printed apart.
Target: at most 10% at decode batch 32.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from exegpt.models.batch import prefill_lengths
from exegpt.models.defaults import DEFAULT_MODEL_NAME, default_model_config
from exegpt.models.kv_cache import DEFAULT_BLOCK_SIZE_TOKENS, BlockAllocator, SequenceKV
from exegpt.placement import Placement
from services.worker.executor.pipeline import PipelineExecutor
from services.worker.executor.pipeline_config import PipelineConfig
from services.worker.sampling import RowSampling
from services.worker.step_plan import StepKind, StepPlan, StepResult

NUM_BLOCKS = 2048


def start_stages(directory: Path, count: int) -> tuple[list[subprocess.Popen[bytes]], list[str]]:
    processes, ready_files = [], []
    for index in range(count):
        ready = directory / f"stage-{index}.ready"
        command = [
            sys.executable, "-m", "services.worker.stage", "--port", "0",
            "--torch-threads", "1", "--ready-file", str(ready), "--log-level", "WARNING",
        ]  # fmt: skip
        processes.append(subprocess.Popen(command))
        ready_files.append(ready)
    deadline = time.monotonic() + 120
    while not all(f.exists() for f in ready_files):
        if time.monotonic() > deadline:
            raise RuntimeError("stages did not start")
        time.sleep(0.05)
    return processes, [f.read_text().strip() for f in ready_files]


def wait_result(executor: PipelineExecutor) -> StepResult:
    while (result := executor.next_result(1.0)) is None:
        pass
    if result.error is not None:
        raise RuntimeError(result.error)
    return result


def measure(
    addresses: list[str], batch_size: int, num_steps: int, prompt_tokens: int
) -> list[tuple[float, float, float]]:
    """(wall, stages' compute, stage-to-stage hand-off) seconds of each decode step."""
    config = default_model_config()
    placement = Placement.even(config, 2)
    pipeline = PipelineConfig(
        model=DEFAULT_MODEL_NAME, dtype="float32", placement=placement,
        stage_addresses=tuple((a,) for a in addresses), num_blocks=NUM_BLOCKS,
        block_size_tokens=DEFAULT_BLOCK_SIZE_TOKENS,
    )  # fmt: skip
    executor = PipelineExecutor(pipeline, config)
    executor.start()
    allocator = BlockAllocator(NUM_BLOCKS)
    seqs = [SequenceKV() for _ in range(batch_size)]
    prompts = [[3 + (i * 7 + j) % 300 for j in range(prompt_tokens)] for i in range(batch_size)]
    self_lengths, cross_lengths = prefill_lengths(config, prompts, [[] for _ in seqs])
    allocator.grow(seqs, DEFAULT_BLOCK_SIZE_TOKENS, self_lengths, cross_lengths)

    def plan(step_id: int, kind: StepKind, token_ids: tuple[tuple[int, ...], ...]) -> StepPlan:
        kv = tuple(
            replace(s, self_blocks=list(s.self_blocks), cross_blocks=list(s.cross_blocks))
            for s in seqs
        )
        prefixes = tuple(() for _ in seqs)
        # Greedy rows; the index counts the tokens generated before, as the engine's does.
        greedy = tuple(RowSampling(0.0, 1.0, 0, step_id) for _ in seqs)
        return StepPlan(step_id, kind, tuple(range(len(seqs))), kv, token_ids, prefixes, greedy)

    try:
        executor.submit(plan(0, StepKind.PREFILL, tuple(tuple(p) for p in prompts)))
        tokens = wait_result(executor).token_ids
        for seq, self_len, cross_len in zip(seqs, self_lengths, cross_lengths or [], strict=False):
            seq.num_self_tokens, seq.num_cross_tokens = self_len, cross_len
        samples = []
        for step in range(1, num_steps + 1):
            allocator.grow(
                seqs, DEFAULT_BLOCK_SIZE_TOKENS, [s.num_self_tokens + 1 for s in seqs], None
            )
            start_s = time.perf_counter()
            executor.submit(plan(step, StepKind.DECODE, tuple((t,) for t in tokens)))
            result = wait_result(executor)
            handoff_s = sum(seconds for _, seconds in result.handoffs) if result.handoffs else None
            samples.append((time.perf_counter() - start_s, result.compute_s, handoff_s))
            tokens = result.token_ids
            for seq in seqs:
                seq.num_self_tokens += 1
        return samples
    finally:
        executor.close()


def report(batch_size: int = 32, num_steps: int = 40, prompt_tokens: int = 64) -> str:
    with tempfile.TemporaryDirectory() as directory:
        processes, addresses = start_stages(Path(directory), 2)
        try:
            samples = measure(addresses, batch_size, num_steps, prompt_tokens)
        finally:
            for process in processes:
                process.terminate()
                process.wait(10)
    warm = samples[num_steps // 4 :]  # past the first steps' allocations
    wall_ms = statistics.median(w for w, _, _ in warm) * 1e3
    compute_ms = statistics.median(c for _, c, _ in warm) * 1e3
    overhead = statistics.median((w - c) / c for w, c, _ in warm)
    overhead_ms = statistics.median(w - c for w, c, _ in warm) * 1e3
    # The stage-to-stage hop, as stage 1 measures it (stamp before the send to decoded frame);
    # the rest of the overhead is the engine's two hops and its own work.
    handoffs = [h for _, _, h in warm if h is not None]
    handoff = f"{statistics.median(handoffs) * 1e3:.2f} ms" if handoffs else "not measured"
    return (
        f"PP-2 decode step, batch {batch_size}, {prompt_tokens}-token prompts, {len(warm)} steps: "
        f"wall {wall_ms:.2f} ms, stages' compute {compute_ms:.2f} ms, "
        f"overhead {overhead:+.1%} (median ratio; median difference {overhead_ms:.2f} ms; "
        f"target <= +10%), stage 0 -> 1 hand-off {handoff} ({len(handoffs)} steps measured)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    args = parser.parse_args()
    print(report(args.batch_size, args.steps, args.prompt_tokens))


if __name__ == "__main__":
    main()
