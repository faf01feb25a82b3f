"""Engine policies: WHO a replica serves next and whom it preempts (one file each,
registered by name). Schedule modes decide HOW batches form and ask the policy for the order
of the waiting queue, whether a request fits, and the preemption victims.

- fcfs (default): arrival order, KV allocated as sequences grow, newest preempted first.
- memory_aware: admit only while the predicted peak KV of everything admitted fits.
- sjf: shortest predicted work first, aged requests first after `max_wait_s`.
"""

from __future__ import annotations

from collections.abc import Callable

from exegpt.output_lengths import OutputLengthModel
from services.worker.policies.base import BasePolicy, KvState, Load
from services.worker.policies.config import EnginePolicy, PolicyConfig
from services.worker.policies.fcfs import FcfsPolicy
from services.worker.policies.memory_aware import MemoryAwarePolicy
from services.worker.policies.sjf import SjfPolicy

__all__ = [
    "ENGINE_POLICIES",
    "BasePolicy",
    "EnginePolicy",
    "KvState",
    "Load",
    "OutputLengthModel",
    "PolicyConfig",
    "make_policy",
]

_REGISTRY: dict[EnginePolicy, Callable[[PolicyConfig, OutputLengthModel], BasePolicy]] = {
    EnginePolicy.FCFS: FcfsPolicy,
    EnginePolicy.MEMORY_AWARE: MemoryAwarePolicy,
    EnginePolicy.SJF: SjfPolicy,
}
ENGINE_POLICIES = tuple(policy.value for policy in EnginePolicy)


def make_policy(config: PolicyConfig, lengths: OutputLengthModel | None = None) -> BasePolicy:
    if lengths is None:  # not `or`: an empty model is falsy (it has a len)
        lengths = OutputLengthModel(config.length_window)
    return _REGISTRY[config.name](config, lengths)
