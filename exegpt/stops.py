"""Stop strings on detokenized text: the output ends before the first stop string found.

Text arrives in pieces (a stream). `StopMatcher.feed` returns what may be sent now: it
holds back a tail that could still grow into a stop string, so a client never receives
the start of a stop that is then cut.
"""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(stop for stop in stops if stop)
        self._held = ""  # received, not yet released
        self.stopped = False

    def feed(self, text: str, final: bool = False) -> str:
        """The text to release after `text` arrived; sets `stopped` at a stop string."""
        if self.stopped:
            return ""
        pending = self._held + text
        cut = min((i for i in (pending.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return pending[:cut]
        keep = 0 if final else self._longest_prefix_tail(pending)
        self._held = pending[len(pending) - keep :]
        return pending[: len(pending) - keep]

    def _longest_prefix_tail(self, text: str) -> int:
        """Length of the longest tail of `text` that begins some stop string."""
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if stop.startswith(text[-size:]):
                    longest = size
                    break
        return longest
