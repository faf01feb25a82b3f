"""exegpt against transformers on one replica, with the machine's limit: seq/s, tokens/s, the
engine's busy fraction and MFU, side by side in one run.

Two random models (a t5-small shape and a ~100M Llama shape with grouped-query attention)
get the same seeded requests (the paper's task S and task G, forced output lengths) along
two paths:

- `exegpt up` (one worker, continuous batching, max batch 32, or each of `--exegpt-batches`)
  driven by `exegpt bench` with every request sent at once (saturation);
- transformers `generate` in static batches of 32, in the same dtype, on the same prompts.

MFU is useful model FLOPs per second (matmul FLOPs of the tokens the requests need: prompt
tokens once, output tokens once; attention scores left out) over the machine's GEMM rate in
the run's dtype at the model's own widths, [2048 x d_model]·[d_model x d_ff], measured in
the same run: before the first path, between paths and after the last, the best sample
taken as the machine's rate (a busy machine only ever reads low) and the lowest over the
best printed beside MFU (`min/best`: well under 1, the rate was disturbed during the run and
MFU is less sure). Each exegpt row also splits the engine's busy time (its GetStats step totals)
into non-decode forwards (fresh prefills, prompt chunks and mixed steps alike: every step
that is not a pure decode step), decode forwards and host work, and gives the rows per
non-decode step.

    python benchmarks/vs_transformers.py                          # both models, tasks S and G
    python benchmarks/vs_transformers.py --models llama --tasks S --num-requests 16
    python benchmarks/vs_transformers.py --models llama --tasks S --num-requests 128 \
        --exegpt-batches 32,64,128 --kv-cache-mb 2048     # exegpt's batch at saturation
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from deployments import on_free_ports, run_bench  # noqa: E402
from hf_generate import transformers_runner  # noqa: E402

from exegpt.bench.workload_plan import (  # noqa: E402
    PlanOptions,
    build_plan,
    clamp_to_context,
    parse_workload,
    prompt_token_ids,
)
from exegpt.dtypes import DTYPE_CHOICES, resolve_dtype  # noqa: E402
from exegpt.launcher import Deployment, DeploymentConfig  # noqa: E402
from exegpt.models.checkpoint import Model, create_model, save_weights  # noqa: E402
from exegpt.models.config import ModelConfig  # noqa: E402
from exegpt.security import SecurityConfig, sync_channel  # noqa: E402
from exegpt.v1 import worker_pb2, worker_pb2_grpc  # noqa: E402

MODELS: dict[str, ModelConfig] = {
    "t5": ModelConfig(  # t5-small's shape (60M parameters)
        family="t5", vocab_size=32128, d_model=512, num_heads=8, num_kv_heads=8, head_dim=64,
        d_ff=2048, num_encoder_layers=6, num_decoder_layers=6, ffn="relu",
        tie_word_embeddings=True, norm_eps=1e-6, eos_token_id=1, pad_token_id=0,
        bos_token_id=None, decoder_start_token_id=0, max_context_tokens=1024,
    ),
    "llama": ModelConfig(  # ~100M parameters, 12 query heads sharing 4 KV heads
        family="llama", vocab_size=32000, d_model=768, num_heads=12, num_kv_heads=4,
        head_dim=64, d_ff=2048, num_encoder_layers=0, num_decoder_layers=12, ffn="swiglu",
        tie_word_embeddings=True, norm_eps=1e-5, eos_token_id=2, pad_token_id=0,
        bos_token_id=1, decoder_start_token_id=None, max_context_tokens=1024,
    ),
}  # fmt: skip
SEED = 0
BATCH = 32
GEMM_ROWS = 2048


@dataclass(frozen=True)
class Requests:
    prompts: list[list[int]]
    output_lengths: list[int]


@dataclass(frozen=True)
class EngineRun:
    """One `exegpt up` + `exegpt bench` run at one max batch size."""

    max_batch: int
    wall_s: float  # wall seconds for all requests
    busy_fraction: float | None
    # Of the engine's busy wall time: inside prefill forwards, inside decode forwards, and
    # host work (GetStats step_totals); None where the worker lacks them.
    split: tuple[float, float, float] | None
    prefill_steps: int
    prefill_rows: int


@dataclass(frozen=True)
class GemmRate:
    """The GEMM rate (FLOP/s) sampled over a run; the best is the machine's capability."""

    samples: tuple[float, ...]

    @property
    def best(self) -> float:
        return max(self.samples)

    @property
    def spread(self) -> float:
        """The lowest sample over the best (1.0: undisturbed)."""
        return min(self.samples) / self.best


@dataclass(frozen=True)
class Row:
    model: str
    task: str
    exegpt: tuple[EngineRun, ...]
    transformers_s: float
    useful_flops: float
    gemm: GemmRate
    num_requests: int
    output_tokens: int


def random_model(config: ModelConfig) -> Model:
    """A float32 model with seeded random weights (scaled so activations stay O(1))."""
    model = create_model(config)
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                std = param.shape[-1] ** -0.5
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model


def save_random_model(config: ModelConfig, directory: Path) -> Path:
    """An HF-layout checkpoint with seeded random weights."""
    directory.mkdir(parents=True, exist_ok=True)
    model = random_model(config)
    (directory / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
    save_weights(model, config, directory / "model.safetensors")
    return directory


def seeded_requests(task: str, num: int, config: ModelConfig) -> Requests:
    """Exactly the requests `exegpt bench --workload task:X --seed 0` sends to this model."""
    options = PlanOptions(num_requests=num, seed=SEED)
    planned = build_plan(parse_workload(f"task:{task}"), options)
    planned = clamp_to_context(planned, config.max_context_tokens).requests
    prompts = [prompt_token_ids(p.index, p.input_tokens, config.vocab_size, SEED) for p in planned]
    return Requests(prompts, [p.output_tokens for p in planned])


def useful_flops(config: ModelConfig, requests: Requests) -> float:
    """Matmul FLOPs the requests need: 2 x (weights a token meets) per token."""
    d, inner = config.d_model, config.num_heads * config.head_dim
    kv = config.num_kv_heads * config.head_dim
    self_attn = 2 * d * inner + 2 * d * kv
    ffn = (2 if config.ffn == "relu" else 3) * d * config.d_ff
    head = config.vocab_size * d
    prompt = sum(len(p) for p in requests.prompts)
    out = sum(requests.output_lengths)
    if config.family == "t5":
        encoder = config.num_encoder_layers * (self_attn + ffn)
        cross_kv = config.num_decoder_layers * 2 * d * inner  # once per prompt token
        decoder = config.num_decoder_layers * (self_attn + 2 * d * inner + ffn) + head
        weights = prompt * (encoder + cross_kv) + out * decoder
    else:
        layers = config.num_decoder_layers * (self_attn + ffn)
        fed = prompt + out - len(requests.prompts)  # the last output token is never fed back
        weights = fed * layers + out * head
    return 2.0 * weights


def gemm_rate(config: ModelConfig, dtype: torch.dtype, reps: int = 20) -> float:
    """FLOP/s of [2048 x d_model]·[d_model x d_ff] in `dtype` on this machine, best of reps
    (by wall time: torch.mm runs on all of torch's threads, so one thread's CPU time, as
    decode_attention.best_cpu_s reads it, would not count them)."""
    a = torch.randn(GEMM_ROWS, config.d_model).to(dtype)
    b = torch.randn(config.d_model, config.d_ff).to(dtype)
    torch.mm(a, b)  # oneDNN builds its kernel on first use
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2.0 * GEMM_ROWS * config.d_model * config.d_ff / best


def engine_run(max_batch: int, wall_s: float, address: str) -> EngineRun:
    """The run's figures with the engine's own (Worker.GetStats), where the worker has them."""
    fields = worker_pb2.WorkerStats.DESCRIPTOR.fields_by_name
    if "busy_fraction" not in fields or "step_totals" not in fields:
        return EngineRun(max_batch, wall_s, None, None, 0, 0)
    with sync_channel(address, SecurityConfig()) as channel:
        stats = worker_pb2_grpc.WorkerStub(channel).GetStats(
            worker_pb2.GetStatsRequest(), timeout=10
        )
    totals = {t.kind: t for t in stats.step_totals}
    prefill, decode = totals["prefill"], totals["decode"]
    busy_s = sum(t.forward_s + t.host_s for t in totals.values()) or 1.0
    host_s = sum(t.host_s for t in totals.values())
    split = (prefill.forward_s / busy_s, decode.forward_s / busy_s, host_s / busy_s)
    return EngineRun(
        max_batch, wall_s, float(stats.busy_fraction), split, prefill.num_steps, prefill.num_rows
    )


def run_exegpt(
    checkpoint: Path, task: str, max_batch: int, args: argparse.Namespace, out_dir: Path
) -> EngineRun:
    """`exegpt bench` at saturation on a fresh deployment of max batch `max_batch`."""
    config = DeploymentConfig(
        model=str(checkpoint), max_batch_size=max_batch, dtype=args.dtype,
        kv_cache_mb=args.kv_cache_mb, log_dir=out_dir,
    )  # fmt: skip
    bench_args = [
        "--workload", f"task:{task}", "--num-requests", str(args.num_requests),
        "--rate", "inf", "--seed", str(SEED),
    ]  # fmt: skip
    json_path = out_dir / f"{checkpoint.name}-{task}-b{max_batch}.json"
    with Deployment(on_free_ports(config)) as deployment:
        metrics = run_bench(deployment, bench_args, json_path)
        wall_s = args.num_requests / metrics["throughput"]["sequences_per_s"]
        run = engine_run(max_batch, wall_s, deployment.worker_addresses[0])
    if metrics["num_failed"]:
        raise RuntimeError(f"{metrics['num_failed']} exegpt requests failed; see {out_dir}")
    return run


def measure(name: str, task: str, args: argparse.Namespace, out_dir: Path) -> Row:
    config = MODELS[name]
    checkpoint = save_random_model(config, out_dir / name)
    requests = seeded_requests(task, args.num_requests, config)
    dtype = resolve_dtype(args.dtype)
    run_hf = transformers_runner(checkpoint, dtype, BATCH)
    warmup = requests.prompts[:BATCH]  # oneDNN builds kernels for the shapes it meets first
    run_hf(warmup, [2] * len(warmup))
    rates = [gemm_rate(config, dtype)]  # before the first path, between paths, after the last
    start = time.perf_counter()
    run_hf(requests.prompts, requests.output_lengths)
    transformers_s = time.perf_counter() - start
    del run_hf
    runs = []
    for batch in args.exegpt_batches:
        rates.append(gemm_rate(config, dtype))
        runs.append(run_exegpt(checkpoint, task, batch, args, out_dir))
    rates.append(gemm_rate(config, dtype))
    return Row(
        model=name, task=task, exegpt=tuple(runs), transformers_s=transformers_s,
        useful_flops=useful_flops(config, requests), gemm=GemmRate(tuple(rates)),
        num_requests=args.num_requests, output_tokens=sum(requests.output_lengths),
    )  # fmt: skip


def format_rows(rows: list[Row]) -> str:
    """One line per path; an exegpt line per max batch, labelled with it ('b32' is the batch
    transformers runs), with where the engine's busy time went: non-decode forwards (fresh
    prefills, chunks and mixed steps), decode forwards, host work, and the rows per non-decode
    step. MFU is over the best GEMM sample; `min/best` is the lowest sample over it."""
    header = (
        f"{'model':<7}{'task':<5}{'path':<14}{'seq/s':>8}{'out tok/s':>11}{'ratio':>7}"
        f"{'busy':>7}{'GFLOP/s':>9}{'GEMM GF/s':>11}{'min/best':>9}{'MFU':>7}"
        "   non-decode/decode/host, rows/non-decode"
    )
    lines = [header]
    for row in rows:
        paths = [(f"exegpt b{run.max_batch}", run.wall_s, run) for run in row.exegpt]
        for path, wall_s, run in [*paths, ("transformers", row.transformers_s, None)]:
            ratio = row.transformers_s / wall_s
            busy = "-" if run is None else "n/a"
            if run is not None and run.busy_fraction is not None:
                busy = f"{run.busy_fraction:.0%}"
            flops_s = row.useful_flops / wall_s
            line = (
                f"{row.model:<7}{row.task:<5}{path:<14}{row.num_requests / wall_s:>8.2f}"
                f"{row.output_tokens / wall_s:>11.1f}{ratio:>7.2f}{busy:>7}"
                f"{flops_s / 1e9:>9.1f}{row.gemm.best / 1e9:>11.1f}{row.gemm.spread:>9.2f}"
                f"{flops_s / row.gemm.best:>7.1%}"
            )
            if run is not None and run.split is not None:
                per_step = run.prefill_rows / max(1, run.prefill_steps)
                line += "   " + "/".join(f"{f:.0%}" for f in run.split) + f", {per_step:.1f}"
            lines.append(line)
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="t5,llama", help=f"from {', '.join(MODELS)}")
    parser.add_argument("--tasks", default="S,G", help="the paper's tasks, comma-separated")
    parser.add_argument("--num-requests", type=int, default=64, help="per model and task")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="bfloat16", help="both paths")
    parser.add_argument("--kv-cache-mb", type=float, default=1024.0, help="the worker's KV pool")
    parser.add_argument(
        "--exegpt-batches", default=str(BATCH),
        help=f"exegpt's max batch sizes, comma-separated, a run each ({BATCH}: transformers')",
    )  # fmt: skip
    args = parser.parse_args()
    args.exegpt_batches = [int(b) for b in args.exegpt_batches.split(",")]
    names = args.models.split(",")
    unknown = [name for name in names if name not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; known: {', '.join(MODELS)}")
    out_dir = Path(tempfile.mkdtemp(prefix="exegpt-vs-transformers-"))
    rows = []
    for name in names:
        for task in args.tasks.split(","):
            rows.append(measure(name, task.strip().upper(), args, out_dir))
            sys.stderr.write(format_rows(rows[-1:]) + "\n")  # so far, in case of a long run
    print(
        f"exegpt vs transformers, {args.dtype}, {args.num_requests} requests per task "
        f"(seed {SEED}, forced lengths), transformers in static batches of {BATCH}, exegpt bN "
        f"at max batch N, {torch.get_num_threads()} threads; ratio = seq/s over transformers' "
        "seq/s, MFU = useful FLOP/s over the best of the GEMM rates sampled before, between "
        "and after the paths (min/best: the lowest sample over it; well under 1, the "
        "machine was disturbed)"
    )
    print(format_rows(rows))
    print(f"reports and logs: {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
