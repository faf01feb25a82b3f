"""Rings of SIGKILLed senders do not pile up (exegpt/shm_sweep.py).

Real processes make real rings; one is SIGKILLed so its finalizer never runs. The next ring
made in that directory removes the dead sender's segment, never a live sender's, and a
receiver that had already mapped the dead segment still reads the slot it leased.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from exegpt.shm_ring import ShmReader, ShmRing, SlotRef
from exegpt.shm_sweep import sweep_dead_segments
from tests.common.test_shm_ring import ROOT

PAYLOAD = bytes(range(64))

# Makes a ring, publishes PAYLOAD in one slot, prints the slot's reference, then waits.
SENDER_SCRIPT = textwrap.dedent(
    f"""
    import sys
    from pathlib import Path
    from exegpt.shm_ring import ShmRing

    ring = ShmRing(slot_bytes=4096, num_slots=2, directory=Path(sys.argv[1]))
    slot = ring.reserve({len(PAYLOAD)})
    ring.slot_view(slot, {len(PAYLOAD)})[:] = list({PAYLOAD!r})
    ref = ring.publish(slot, {len(PAYLOAD)})
    print(ref.segment, ref.slot, ref.ticket, ref.payload_bytes, flush=True)
    sys.stdin.read()  # keep the ring until stdin closes, then exit cleanly
    """
)


def start_sender(directory: Path) -> tuple[subprocess.Popen[str], SlotRef]:
    child = subprocess.Popen(
        [sys.executable, "-c", SENDER_SCRIPT, str(directory)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    segment, *numbers = child.stdout.readline().split()
    return child, SlotRef(segment, *map(int, numbers))


def test_a_new_ring_sweeps_killed_senders_segments_and_keeps_live_ones(tmp_path: Path) -> None:
    killed, killed_ref = start_sender(tmp_path)
    live, live_ref = start_sender(tmp_path)
    killed_segment, live_segment = tmp_path / killed_ref.segment, tmp_path / live_ref.segment
    reader = ShmReader(directory=tmp_path, max_payload_bytes=4096)
    leased = None
    try:
        reader.check(killed_ref)
        leased = reader.lease(killed_ref)
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
        assert killed.returncode == -signal.SIGKILL
        assert killed_segment.exists()  # a SIGKILLed sender cannot unlink its ring

        # Limited to one creator (as the launcher sweeps a child it saw die): a live one's stays.
        assert sweep_dead_segments(tmp_path, pid=live.pid) == []
        ring = ShmRing(slot_bytes=4096, num_slots=1, directory=tmp_path)
        assert not killed_segment.exists()
        assert sorted(tmp_path.glob("exegpt-shm-*")) == sorted([live_segment, ring.path])
        assert bytes(leased) == PAYLOAD  # unlinked, yet still mapped by its receiver
        ring.close()

        reader.check(live_ref)  # the live sender's ring still opens for a new receiver
        assert bytes(reader.lease(live_ref)) == PAYLOAD
        live.communicate(timeout=30)
        assert live.returncode == 0 and not live_segment.exists()
    finally:
        for child in (killed, live):
            if child.poll() is None:
                child.kill()
                child.wait()
        del leased  # the receiver unmaps once its last view is gone
        reader.close()
