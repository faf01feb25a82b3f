"""How many requests a measured burst sends, so that its middle is a steady state.

A burst measures a schedule only if it holds several running batches for every worker
replica: B_D is ONE replica's batch, and a burst that fills each replica once measures a fill
and a drain (a static-like run whose latencies are short and whose throughput is not the
schedule's). So a burst is MEASURED_BATCHES running batches of every worker replica, and also
lasts at least `steady_s` at the predicted rate, within MIN_REQUESTS..`max_requests`.
`benchmarks/schedules.py` uses the rule as is; `exegpt demo` with a shorter steady time and a
lower cap (exegpt/demo.py says why).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from exegpt.autoplan import AutoPlan

MEASURED_BATCHES = 4  # running batches per worker replica in a measured burst
MIN_REQUESTS = 64
MAX_REQUESTS = 4000
STEADY_S = 15.0  # a measured burst also lasts at least this long at the predicted rate


def running_sequences(auto: AutoPlan, copies: int = 1) -> int:
    """B_D x workers: the sequences all worker replicas of `copies` copies of the plan run at
    once (each copy runs the plan's R data-parallel replicas)."""
    return auto.plan.schedule.decode_batch_size * auto.plan.num_workers(copies)


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
