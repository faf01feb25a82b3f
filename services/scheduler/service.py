"""The scheduler's core (asyncio, no grpc): the active plan, its versions and its watchers.

Engines report lengths and stage times; the core keeps them in bounded sliding windows and,
after each report, asks the drift detector whether they still match the active plan. On
drift it re-plans in a worker thread (the report call returns at once), at most once per
`replan_min_interval_s`, and publishes the result as a new version. Watchers hold no queue:
each waits for the version number to move and then reads the newest schedule, so a slow
watcher costs no memory and never misses the latest version. Engines switch schedules
between batches; the core only versions them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from exegpt.errors import ErrorCode, RequestError
from exegpt.placement import Placement
from exegpt.schedule import Schedule
from services.scheduler.calibration import as_scaled, stage_ratio
from services.scheduler.calibration_store import save_calibration
from services.scheduler.config import SchedulerConfig
from services.scheduler.drift import DriftDetector, DriftVerdict, PlannedWorkload, observed_workload
from services.scheduler.observations import (
    ObservationWindows,
    StageKind,
    WorkloadObservations,
)
from services.scheduler.problem import PlanProblem, PlanResult
from services.scheduler.published import PlanOutcome, PublishedSchedule, ReplanReason, ReportAck
from services.scheduler.queries import (
    CostModelCache,
    CostModelLoader,
    PlanQuery,
    build_problem,
    configured_loader,
    invalid,
)

logger = logging.getLogger(__name__)


class Planner(Protocol):
    def __call__(self, problem: PlanProblem, *, exhaustive: bool = False) -> PlanResult: ...


def default_planner(problem: PlanProblem, *, exhaustive: bool = False) -> PlanResult:
    from services.scheduler.search.plan import plan

    return plan(problem, exhaustive=exhaustive)


@dataclass(frozen=True)
class _ActivePlan:
    problem: PlanProblem
    planned: PlannedWorkload


class SchedulerCore:
    def __init__(
        self,
        config: SchedulerConfig,
        *,
        planner: Planner = default_planner,
        cost_model_loader: CostModelLoader | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._planner = planner
        self._cost_models = CostModelCache(cost_model_loader or configured_loader(config))
        self._clock = clock
        self._detector = DriftDetector(config.drift)
        self._windows = ObservationWindows(config.length_window_size, config.stage_window_size)
        self._plan_slots = asyncio.Semaphore(config.max_concurrent_plans)
        self._active: _ActivePlan | None = None
        # The deployment's data-parallel replicas R: every pushed schedule keeps it.
        self._replicas = config.num_replicas
        self._current: PublishedSchedule | None = None
        self._changed = asyncio.Event()
        self._last_replan_s = -float("inf")
        self._replan_task: asyncio.Task[None] | None = None
        self._deferred: asyncio.TimerHandle | None = None
        self._num_watchers = 0
        self._watchers_by_client: dict[str, int] = {}
        self._closed = False

    @property
    def current(self) -> PublishedSchedule | None:
        return self._current

    @property
    def num_watchers(self) -> int:
        return self._num_watchers

    async def start(self) -> None:
        """Plan the configured problem and publish it as version 1 (when a profile is set)."""
        if self.config.profile:
            outcome = await self._plan_and_publish(PlanQuery(), ReplanReason.INITIAL)
            if outcome.version == 0:
                raise ValueError("no feasible schedule for the configured problem")

    async def close(self) -> None:
        """End every watch stream and drop a re-plan in progress."""
        self._closed = True
        self._changed.set()
        if self._deferred is not None:
            self._deferred.cancel()
        if self._replan_task is not None:
            self._replan_task.cancel()
            await asyncio.gather(self._replan_task, return_exceptions=True)

    # ---- Plan ------------------------------------------------------------------------------

    async def plan(self, query: PlanQuery) -> PlanOutcome:
        reason = ReplanReason.REQUESTED if query.activate else None
        return await self._plan_and_publish(query, reason)

    async def _plan_and_publish(self, query: PlanQuery, reason: ReplanReason | None) -> PlanOutcome:
        problem = await asyncio.to_thread(build_problem, query, self.config, self._cost_models)
        if reason is not None:
            try:
                problem = self._keeping_replicas(problem)
            except ValueError as exc:
                raise invalid(str(exc)) from exc
        result = await self._run_planner(problem, exhaustive=query.exhaustive)
        if result.infeasible_reason:
            raise invalid(result.infeasible_reason)  # the model does not fit these devices
        version = 0
        if reason is not None:
            planned = PlannedWorkload(problem.workload)
            published = self._publish(problem, planned, result, reason, None, reason.value)
            version = published.version if published else 0
        return PlanOutcome(result, problem.workload.name, version)

    def _keeping_replicas(self, problem: PlanProblem) -> PlanProblem:
        """`problem` searched at the deployment's R only, once R is known: its replicas
        divide the plan's prediction and would run mis-sized control variables at another."""
        if self._replicas is None:
            return problem
        return dataclasses.replace(problem, replicas=(self._replicas,))

    async def _run_planner(self, problem: PlanProblem, *, exhaustive: bool = False) -> PlanResult:
        async with self._plan_slots:
            try:
                return await asyncio.to_thread(self._planner, problem, exhaustive=exhaustive)
            except ValueError as exc:
                raise invalid(str(exc)) from exc

    def _publish(
        self,
        problem: PlanProblem,
        planned: PlannedWorkload,
        result: PlanResult,
        reason: ReplanReason,
        verdict: DriftVerdict | None,
        detail: str,
    ) -> PublishedSchedule | None:
        prediction = result.chosen or result.lowest_latency
        if prediction is None:
            logger.error("no feasible schedule for %s; keeping the current one", detail)
            return None
        replicas = prediction.schedule.num_replicas
        if self._replicas is not None and replicas != self._replicas:
            logger.error(
                "%s plans %d replicas, not the %d deployed", detail, replicas, self._replicas
            )
            return None
        self._replicas = replicas
        if self._active is None or self._active.problem.cost_model is not problem.cost_model:
            self._windows.clear_stage_ratios()  # ratios were against another cost model
        version = (self._current.version if self._current else 0) + 1
        self._current = PublishedSchedule(
            version=version,
            reason=reason,
            prediction=prediction,
            meets_bound=result.meets_bound,
            problem=problem,
            verdict=verdict,
            detail=detail,
            published_unix_s=time.time(),
            placement=_placement(problem, prediction.schedule),
        )
        self._active = _ActivePlan(problem, planned)
        self._last_replan_s = self._clock()
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        logger.info(
            "schedule v%d (%s): %s, %.2f seq/s, p99 latency %.3f s%s",
            version,
            reason.value,
            prediction.schedule.describe(),
            prediction.throughput_seq_s,
            prediction.latency_s,
            "" if result.meets_bound else " (misses the bound)",
        )
        return self._current

    # ---- WatchSchedule ---------------------------------------------------------------------

    def subscribe(self, replica_id: str, after_version: int = 0, client: str = "") -> Subscription:
        """A watch slot; `client` (the peer's host) holds at most max_subscribers_per_client."""
        if self._closed:
            raise RequestError(ErrorCode.UNAVAILABLE, "the scheduler is shutting down")
        if self._num_watchers >= self.config.max_subscribers:
            raise RequestError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"{self._num_watchers} replicas already watch the schedule "
                f"(limit {self.config.max_subscribers})",
            )
        held = self._watchers_by_client.get(client, 0)
        if held >= self.config.max_subscribers_per_client:
            raise RequestError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"this client already holds {held} WatchSchedule streams "
                f"(limit {self.config.max_subscribers_per_client} per client)",
            )
        self._num_watchers += 1
        self._watchers_by_client[client] = held + 1
        logger.info("replica %r watches the schedule", replica_id or "?")
        return Subscription(self, replica_id, after_version, client)

    def _unsubscribe(self, replica_id: str, client: str = "") -> None:
        self._num_watchers -= 1
        left = self._watchers_by_client.pop(client, 1) - 1
        if left > 0:
            self._watchers_by_client[client] = left
        logger.info("replica %r stopped watching", replica_id or "?")

    async def _updates(self, after_version: int) -> AsyncIterator[PublishedSchedule]:
        last_version = after_version
        while not self._closed:
            changed, current = self._changed, self._current  # read together: no lost wake-up
            if current is not None and current.version > last_version:
                last_version = current.version
                yield current
            else:
                await changed.wait()

    # ---- ReportWorkload --------------------------------------------------------------------

    def report(self, observations: WorkloadObservations) -> ReportAck:
        """Take one report (all of it or, when invalid, none) and re-plan if it drifted."""
        ratios = self._stage_ratios(observations)
        self._windows.add_lengths(observations.input_tokens, observations.output_tokens)
        for stage, ratio in ratios:
            self._windows.add_stage_ratio(stage, ratio)
        self._maybe_replan()
        return ReportAck(
            num_input_lengths=len(observations.input_tokens),
            num_output_lengths=len(observations.output_tokens),
            num_stage_times=len(observations.stage_times),
            current_version=self._current.version if self._current else 0,
        )

    def _stage_ratios(self, observations: WorkloadObservations) -> list[tuple[StageKind, float]]:
        try:
            observations.validate(
                max_items=self.config.max_report_items,
                max_length_tokens=self.config.max_length_tokens,
            )
        except ValueError as exc:
            raise invalid(str(exc)) from exc
        if self._active is None:
            return []  # nothing to compare stage times with yet
        cost_model = self._active.problem.cost_model
        ratios: list[tuple[StageKind, float]] = []
        for observation in observations.stage_times:
            if observation.tp_degree not in cost_model.tp_degrees:
                raise invalid(
                    f"stage time at TP degree {observation.tp_degree}: the profile has "
                    f"{', '.join(map(str, cost_model.tp_degrees))}"
                )
            ratio = stage_ratio(cost_model, observation)
            if ratio is not None:
                ratios.append((observation.stage, ratio))
        return ratios

    def _maybe_replan(self) -> None:
        if self._closed or self._active is None or self._replan_task is not None:
            return
        verdict = self._detector.evaluate(self._windows, self._active.planned)
        if not verdict.drifted:
            return
        wait_s = self._last_replan_s + self.config.replan_min_interval_s - self._clock()
        if wait_s > 0:
            if self._deferred is None:
                logger.info("drift (%s); re-plan in %.1f s", verdict.describe(), wait_s)
                loop = asyncio.get_running_loop()
                self._deferred = loop.call_later(wait_s, self._deferred_check)
            return
        if self._deferred is not None:
            self._deferred.cancel()
            self._deferred = None
        self._last_replan_s = self._clock()
        self._replan_task = asyncio.get_running_loop().create_task(self._replan(verdict))

    def _deferred_check(self) -> None:
        self._deferred = None
        self._maybe_replan()

    async def _replan(self, verdict: DriftVerdict) -> None:
        assert self._active is not None and self._current is not None
        base_version = self._current.version
        problem, planned = self._keeping_replicas(self._active.problem), self._active.planned
        reason = ReplanReason.STAGE_TIME_DRIFT
        if verdict.stage_time_drifted:
            cost_model = as_scaled(problem.cost_model).rescaled(
                verdict.stage_time_ratios, verdict.stage_time_counts
            )
            if cost_model.calibration_path is not None:
                save_calibration(cost_model.calibration_path, cost_model.calibration)
            problem = dataclasses.replace(problem, cost_model=cost_model)
        if verdict.length_drifted:
            reason = ReplanReason.LENGTH_DRIFT
            planned = observed_workload(self._windows, planned, self.config.drift)
            problem = dataclasses.replace(problem, workload=planned.distribution)
            self._clear_judged_lengths()
        detail = verdict.describe()
        logger.info("re-planning: %s", detail)
        try:
            result = await self._run_planner(problem)
        except Exception:
            logger.exception("re-plan after drift failed; keeping schedule v%d", base_version)
            return
        finally:
            self._replan_task = None
            self._last_replan_s = self._clock()
        if self._current.version != base_version:
            logger.info("drift re-plan superseded by schedule v%d", self._current.version)
            return
        self._publish(problem, planned, result, reason, verdict, detail)
        self._maybe_replan()  # judge what arrived while planning without waiting for a report

    def _clear_judged_lengths(self) -> None:
        """Lengths that went into the new plan's distribution start the next window afresh."""
        for window in (self._windows.inputs, self._windows.outputs):
            if len(window) >= self.config.drift.min_observations:
                window.clear()


def _placement(problem: PlanProblem, schedule: Schedule) -> Placement | None:
    """The simulator's layout of `schedule`, for replicas that redeploy to it."""
    from services.scheduler.simulator.predict import Simulator

    try:
        return Simulator(problem).placement(schedule)
    except ValueError as exc:
        logger.warning("no placement for %s: %s", schedule.describe(), exc)
        return None


class Subscription:
    """One watcher's place; use as a context manager so the slot is given back."""

    def __init__(
        self, core: SchedulerCore, replica_id: str, after_version: int, client: str = ""
    ) -> None:
        self._core = core
        self.replica_id = replica_id
        self.client = client
        self._after_version = after_version
        self._open = True

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._open:
            self._open = False
            self._core._unsubscribe(self.replica_id, self.client)

    def __aiter__(self) -> AsyncIterator[PublishedSchedule]:
        return self._core._updates(self._after_version)
