"""Hypothesis profiles of the fuzz tests: `--hypothesis-profile=soak` runs 1000 cases per
interface (run it on tests/reliability, where this file registers the profile)."""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "soak",
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
