"""How many requests a burst sends: a measured burst, so that its middle is a steady state,
and a calibration pass, so that its factors are not one moment's reading of the machine.

A burst measures a schedule only if it holds several running batches for every worker
replica: B_D is ONE replica's batch, and a burst that fills each replica once measures a fill
and a drain (a static-like run whose latencies are short and whose throughput is not the
schedule's). So a burst is MEASURED_BATCHES running batches of every worker replica, and also
lasts at least `steady_s` at the predicted rate, within MIN_REQUESTS..`max_requests`.
`benchmarks/schedules.py` uses the rule as is; `exegpt demo` with a shorter steady time and a
lower cap (exegpt/commands/demo.py says why).

A calibration pass (exegpt/commands/calibration_pass.py) prices a whole pass's steps against the
profile, kind by kind, so its factors are only as steady as the window it reads: on a shared
machine a neighbour's burst of load moves a 2-second window's factors by a third (a pass of 96
short requests read decode x2.58 where the passes beside it read x1.67-2.04). A pass is
therefore sized in time and in decode steps, not only in batches: the most of
CALIBRATION_BATCHES running batches per worker replica, CALIBRATION_S at the predicted rate and
CALIBRATION_DECODE_STEPS decode steps on every worker replica, within
MIN_CALIBRATION_REQUESTS..`max_requests`. The predicted rate is the profile's before the pass:
an uncalibrated profile that predicts too high a rate (1.3-1.8x here) lengthens the pass, never
shortens it. The decode steps are counted as the pass's decode rows, requests x (mean output
tokens - 1) (the first token comes with the prefill), over the B_D rows of a full step on each
replica (static batching runs more steps than that: a batch decodes until its longest output
ends). The term binds where steps are slow (CALIBRATION_S holds fewer steps than it asks) or
outputs short against B_D, where the cap (MAX_CALIBRATION_REQUESTS) stops it: a static plan of
B_D 807 on 2 replicas at 8.4 output tokens would ask for 13959 requests.
`benchmarks/fidelity.py` and `benchmarks/schedules.py` use the rule as is; `exegpt demo` with
its own steady time, capped at half its measured burst.
"""

from __future__ import annotations

import math

from exegpt.plan_file import PlanFile

MEASURED_BATCHES = 4  # running batches per worker replica in a measured burst
MIN_REQUESTS = 64
MAX_REQUESTS = 4000
STEADY_S = 15.0  # a measured burst also lasts at least this long at the predicted rate

CALIBRATION_BATCHES = 2  # running batches per worker replica in a calibration pass
CALIBRATION_S = 5.0  # a calibration pass also lasts at least this long at the predicted rate
CALIBRATION_DECODE_STEPS = 64  # ... and runs at least this many decode steps on each replica
MIN_CALIBRATION_REQUESTS = 32
MAX_CALIBRATION_REQUESTS = 2000  # 15 s or more at the rates served here: time enough


def running_sequences(plan: PlanFile, copies: int = 1) -> int:
    """B_D x workers: the sequences all worker replicas of `copies` copies of `plan` run at
    once (each copy runs the plan's R data-parallel replicas)."""
    return plan.schedule.decode_batch_size * plan.num_workers(copies)


def measured_burst(
    running: int,
    predicted_seq_s: float,
    *,
    steady_s: float = STEADY_S,
    max_requests: int = MAX_REQUESTS,
) -> int:
    """MEASURED_BATCHES x `running` sequences, and `steady_s` at `predicted_seq_s`, whichever
    is more, within MIN_REQUESTS..`max_requests`."""
    if running < 1 or not predicted_seq_s >= 0 or steady_s < 0 or max_requests < MIN_REQUESTS:
        raise ValueError(
            f"a burst needs running >= 1, a rate and steady time >= 0 and a cap >= "
            f"{MIN_REQUESTS} (got {running}, {predicted_seq_s}, {steady_s}, {max_requests})"
        )
    wanted = max(MIN_REQUESTS, MEASURED_BATCHES * running, int(steady_s * predicted_seq_s))
    return min(max_requests, wanted)


def calibration_pass_size(
    running: int,
    predicted_seq_s: float,
    mean_output_tokens: float,
    *,
    steady_s: float = CALIBRATION_S,
    max_requests: int = MAX_CALIBRATION_REQUESTS,
) -> int:
    """The requests of a calibration pass for `running` sequences over all worker replicas
    (B_D x R) at `predicted_seq_s`, on a workload of `mean_output_tokens`: the most of
    CALIBRATION_BATCHES x `running`, `steady_s` at the predicted rate and enough decode rows
    for CALIBRATION_DECODE_STEPS full steps on every replica (running / (mean output tokens
    - 1) requests per step: the first token comes with the prefill), within
    MIN_CALIBRATION_REQUESTS..`max_requests`."""
    if (
        running < 1
        or not 0 <= predicted_seq_s < math.inf
        or not 0 < mean_output_tokens < math.inf
        or steady_s < 0
        or max_requests < MIN_CALIBRATION_REQUESTS
    ):
        raise ValueError(
            f"a calibration pass needs running >= 1, a finite rate and a steady time >= 0, "
            f"a finite mean output > 0 and a cap >= {MIN_CALIBRATION_REQUESTS} (got {running}, "
            f"{predicted_seq_s}, {mean_output_tokens}, {steady_s}, {max_requests})"
        )
    # A sequence decodes all but its first token (that one comes with the prefill).
    decodes_per_request = mean_output_tokens - 1
    wanted = max(
        MIN_CALIBRATION_REQUESTS,
        CALIBRATION_BATCHES * running,
        math.ceil(steady_s * predicted_seq_s),
        math.ceil(CALIBRATION_DECODE_STEPS * running / decodes_per_request)
        if decodes_per_request > 0
        else 0,
    )
    return min(max_requests, wanted)


def plan_calibration_pass(
    plan: PlanFile,
    predicted_seq_s: float,
    copies: int = 1,
    *,
    steady_s: float = CALIBRATION_S,
    max_requests: int = MAX_CALIBRATION_REQUESTS,
) -> int:
    """`calibration_pass_size` for `copies` copies of `plan`, each at `predicted_seq_s` (the
    plan's predicted rate), on its workload's mean output length."""
    return calibration_pass_size(
        running_sequences(plan, copies),
        copies * predicted_seq_s,
        plan.mean_output_tokens or math.nan,  # a plan file without it is refused
        steady_s=steady_s,
        max_requests=max_requests,
    )
