"""A worker's Prometheus metrics: vLLM's names where the meaning is the same (so existing
dashboards work), `exegpt:` names for what only exegpt has.

Gauges (queue, running batch, KV use, preemptions, the schedule) are read from the engine
when scraped; counters and histograms are recorded as requests progress (the servicer calls
`on_tokens` / `on_finish`) and as steps come back (`on_step`, an engine step observer that
reads each result: the scheduler link's drained observations are left alone).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from dataclasses import fields

import grpc
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from exegpt.generation import FinishReason
from exegpt.metrics import serve_metrics
from exegpt.security import SecurityConfig
from exegpt.v1 import metrics_pb2, metrics_pb2_grpc
from services.worker.engine import Engine, EngineStats, RequestTimings
from services.worker.step_plan import StepKind, StepResult

# vLLM's buckets, so dashboards built on its histograms read the same.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
TPOT_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
STEP_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


class EngineCollector:
    """Gauges read from the engine at scrape time."""

    def __init__(self, engine: Engine, model_name: str) -> None:
        self._engine = engine
        self._model = model_name

    def collect(self) -> Iterator[Metric]:
        stats = self._engine.stats()
        labels, values = ["model_name"], [self._model]
        gauges = (
            ("vllm:num_requests_running", "Requests in the running batch.", stats.num_running),
            ("vllm:num_requests_waiting", "Requests waiting in the queue.", stats.num_waiting),
            (
                "vllm:kv_cache_usage_perc",
                "KV-cache usage: 1 means 100 percent of the blocks in use.",
                stats.kv_used_bytes / stats.kv_capacity_bytes if stats.kv_capacity_bytes else 0.0,
            ),
        )
        for name, documentation, value in gauges:
            gauge = GaugeMetricFamily(name, documentation, labels=labels)
            gauge.add_metric(values, value)
            yield gauge
        # 0 until the step scheduler preempts; read from its stats when it reports them.
        preemptions = CounterMetricFamily(
            "vllm:num_preemptions", "Cumulative number of preempted requests.", labels=labels
        )
        preemptions.add_metric(values, float(getattr(stats, "num_preemptions", 0)))
        yield preemptions
        yield from self._clock(stats, values)
        ahead = CounterMetricFamily(
            "exegpt:decode_ahead_steps",
            "Pipeline decode steps sent with tensors built ahead (hit) or built at submit (miss).",
            labels=["model_name", "result"],
        )
        for result, count in zip(("hit", "miss"), stats.decode_ahead, strict=True):
            ahead.add_metric([*values, result], float(count))
        yield ahead
        yield from self._schedule()

    @staticmethod
    def _clock(stats: EngineStats, values: list[str]) -> Iterator[Metric]:
        """The engine's busy fraction and its busy time split by step kind."""
        busy = GaugeMetricFamily(
            "exegpt:engine_busy_fraction",
            "Time inside forwards over the engine's wall time while it had work.",
            labels=["model_name"],
        )
        busy.add_metric(values, stats.busy_fraction)
        yield busy
        seconds = CounterMetricFamily(
            "exegpt:engine_seconds",
            "Engine wall time while busy, inside forwards or host work, by step kind.",
            labels=["model_name", "phase", "part"],
        )
        for totals in stats.step_totals:
            seconds.add_metric([*values, totals.kind, "forward"], totals.forward_s)
            seconds.add_metric([*values, totals.kind, "host"], totals.host_s)
        yield seconds

    def _schedule(self) -> Iterator[Metric]:
        config = self._engine.config
        info = GaugeMetricFamily(
            "exegpt:schedule_info",
            "The schedule kind batches form by (1 for the active one).",
            labels=["model_name", "kind"],
        )
        info.add_metric([self._model, str(config.batching)], 1.0)
        yield info
        control = GaugeMetricFamily(
            "exegpt:schedule_control",
            "The active schedule's control variables (B_E, B_D, N_D, B_m, TP) and the "
            "engine's batch limits.",
            labels=["model_name", "variable"],
        )
        variables: dict[str, float] = {
            "max_batch_size": config.max_batch_size,
            "num_micro_batches": self._engine.mode.num_micro_batches,
        }
        if config.schedule is not None:
            for field in fields(config.schedule):
                if field.name != "kind":
                    variables[field.name] = getattr(config.schedule, field.name)
        for name, value in variables.items():
            control.add_metric([self._model, name], float(value))
        yield control


class WorkerMetrics:
    """The registry of one worker and the recorders its servicer and engine call."""

    def __init__(self, engine: Engine, model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._model = model_name
        self.http_runner: web.AppRunner | None = None  # the --metrics-port server
        self.registry.register(EngineCollector(engine, model_name))
        labels = ["model_name"]
        registry = self.registry
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Prefilled prompt tokens.", labels, registry=registry
        ).labels(model_name)
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Generated tokens.", labels, registry=registry
        ).labels(model_name)
        self.request_success = Counter(
            "vllm:request_success", "Finished requests, by finish reason.",
            ["model_name", "finished_reason"], registry=registry,
        )  # fmt: skip
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds", "Arrival to first token.", labels,
            buckets=TTFT_BUCKETS, registry=registry,
        ).labels(model_name)  # fmt: skip
        self.tpot = Histogram(
            "vllm:time_per_output_token_seconds", "Time between two output tokens.", labels,
            buckets=TPOT_BUCKETS, registry=registry,
        ).labels(model_name)  # fmt: skip
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds", "Arrival to last token.", labels,
            buckets=REQUEST_BUCKETS, registry=registry,
        ).labels(model_name)  # fmt: skip
        self.queue = Histogram(
            "vllm:request_queue_time_seconds", "Arrival to admission into the batch.", labels,
            buckets=REQUEST_BUCKETS, registry=registry,
        ).labels(model_name)  # fmt: skip
        self.stage_step = Histogram(
            "exegpt:stage_step_seconds",
            "Compute time of one step at one stage (in process: stage 0, the forward alone).",
            ["model_name", "stage", "phase"], buckets=STEP_BUCKETS, registry=registry,
        )  # fmt: skip
        self.steps = Counter(
            "exegpt:steps", "Steps run, by phase.", ["model_name", "phase"], registry=registry
        )
        self.step_rows = Counter(
            "exegpt:step_rows", "Sequences stepped, summed over steps, by phase.",
            ["model_name", "phase"], registry=registry,
        )  # fmt: skip
        engine.step_observers.append(self.on_step)

    def on_step(self, kind: StepKind, num_rows: int, result: StepResult) -> None:
        phase = kind.value if kind in (StepKind.DECODE, StepKind.MIXED) else "prefill"
        self.steps.labels(self._model, phase).inc()
        self.step_rows.labels(self._model, phase).inc(num_rows)
        for stage, seconds in enumerate(result.stage_s):
            self.stage_step.labels(self._model, str(stage), phase).observe(seconds)

    def on_tokens(
        self, num_prompt_tokens: int, token_times_s: Sequence[float], first: bool
    ) -> None:
        """Tokens delivered to a request; `first`: they include its first token."""
        if first and token_times_s:
            self.prompt_tokens.inc(num_prompt_tokens)
            self.ttft.observe(token_times_s[0])
        self.generation_tokens.inc(len(token_times_s))

    def on_finish(
        self,
        reason: FinishReason,
        token_times_s: Sequence[float],
        timings: RequestTimings | None,
    ) -> None:
        """A request finished; `token_times_s` are all its tokens' times since arrival."""
        self.request_success.labels(self._model, str(reason)).inc()
        for earlier, later in zip(token_times_s, token_times_s[1:], strict=False):
            self.tpot.observe(max(0.0, later - earlier))
        if timings is not None:
            self.e2e.observe(max(0, timings.finished_ns - timings.arrival_ns) / 1e9)
            self.queue.observe(max(0, timings.admitted_ns - timings.arrival_ns) / 1e9)
        elif token_times_s:
            self.e2e.observe(token_times_s[-1])

    def text(self) -> str:
        return generate_latest(self.registry).decode("utf-8")


_BY_ENGINE: weakref.WeakKeyDictionary[Engine, WorkerMetrics] = weakref.WeakKeyDictionary()


def metrics_of(engine: Engine, model_name: str) -> WorkerMetrics:
    """The metrics of `engine`'s worker (made on first use: one registry per engine)."""
    metrics = _BY_ENGINE.get(engine)
    if metrics is None:
        metrics = _BY_ENGINE[engine] = WorkerMetrics(engine, model_name)
    return metrics


class MetricsServicer(metrics_pb2_grpc.MetricsServicer):
    """exegpt.v1.Metrics on the worker's gRPC port: how the gateway aggregates replicas
    (through the channel, API key and TLS it already has)."""

    def __init__(self, metrics: WorkerMetrics) -> None:
        self._metrics = metrics

    async def GetMetrics(  # noqa: N802 (gRPC method name)
        self, request: metrics_pb2.GetMetricsRequest, context: grpc.aio.ServicerContext
    ) -> metrics_pb2.MetricsText:
        return metrics_pb2.MetricsText(text=self._metrics.text())


async def start_metrics_port(
    host: str, port: int | None, security: SecurityConfig, metrics: WorkerMetrics
) -> int | None:
    """Serve the worker's /metrics on its own HTTP port (None: off); returns the port."""
    if port is None:
        return None
    metrics.http_runner, bound = await serve_metrics(metrics.registry, host, port, security)
    return bound


async def stop_metrics_port(engine: Engine) -> None:
    metrics = _BY_ENGINE.get(engine)
    if metrics is not None and metrics.http_runner is not None:
        await metrics.http_runner.cleanup()
        metrics.http_runner = None
