"""Same-host data plane: a sender-owned ring of shared-memory slots for tensor payloads.

ZeroMQ over loopback moves a few GB/s; a memcpy moves tens. So on one host a sender copies a
message's tensors into one fixed-size slot of a file it maps under /dev/shm, stamps the slot
with a fresh ticket, and ZeroMQ carries only the protobuf header with the slot's reference.
The receiver checks that reference against the segment's own layout and stamps, then leases
the slot: its tensors are views of the shared bytes (no copy), and when the last of them is
garbage collected the lease ends and writes the ticket into the slot's release word. The
sender reuses a slot only once its release word equals its ticket: no reverse channel is
needed (PUSH/PULL works), releases may come out of order (several receivers, consumers that
keep a message longer), and a slot is never overwritten while a view of it is alive. A full
ring, or a payload larger than a slot, goes inline over ZeroMQ instead (exegpt/frames.py).

Segment layout, native-endian u64 words (both sides are on one host):
  word 0..4  magic, version, num_slots, slot_bytes, data_offset
  word 5, 6  release count (receivers bump it), sender waiting (receivers then wake it)
  slot i     words 8+16i, 9+16i: ticket, payload_bytes (the sender's cache line);
             word 16+16i: released ticket (the receiver's, on its own line to avoid sharing)
  data       slot i's bytes at data_offset + i * slot_bytes
Nothing in a segment is ever unpickled; the receiver reads only the words above and raw bytes.
"""

from __future__ import annotations

import mmap
import os
import secrets
import stat
import struct
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from exegpt.shm_sweep import SEGMENT_NAME, SEGMENT_PREFIX, SHM_DIR, sweep_dead_segments
from exegpt.shm_wait import futex_wait, futex_wake

_MAGIC = int.from_bytes(b"EXEGSHM1", "little")
_VERSION = 1
_HEADER_WORDS = 8
_SLOT_WORDS = 16
_PAGE_BYTES = 4096
ALIGN_BYTES = 64  # each tensor starts on a cache line, which also satisfies every dtype
MAX_ATTACHED_SEGMENTS = 16  # a receiver maps at most this many senders' rings at once

# A sender waiting for a free slot sleeps on the ring's release count (a futex,
# exegpt/shm_wait.py), which each release bumps and wakes; it looks at the slots again at
# least this often, so a wake-up that never comes (a receiver of an older build) costs little.
_WAIT_SLICE_S = 1e-3
_RELEASES_WORD = 5  # bumped by every release; its low half (first 4 bytes here) is the futex
_WAITING_WORD = 6  # nonzero while the sender sleeps on _RELEASES_WORD

_FENCE_LOCK = threading.Lock()


class ShmRefError(ValueError):
    """A shared-memory reference that does not match the segment (refused, never read)."""


def _fence() -> None:
    # A lock round trip is an atomic read-modify-write, a full barrier on x86-64 (and acquire +
    # release on ARM). It keeps the payload copy before the stamp that publishes the slot, and
    # the receiver's copy-out before the release stamp; plain Python stores promise no order.
    with _FENCE_LOCK:
        pass


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def control_bytes(num_slots: int) -> int:
    return _round_up((_HEADER_WORDS + _SLOT_WORDS * num_slots) * 8, _PAGE_BYTES)


def aligned_bytes(num_bytes: int) -> int:
    return _round_up(num_bytes, ALIGN_BYTES)


def _ticket_word(slot: int) -> int:
    return _HEADER_WORDS + _SLOT_WORDS * slot


def _released_word(slot: int) -> int:
    return _HEADER_WORDS + _SLOT_WORDS * slot + _SLOT_WORDS // 2


@dataclass(frozen=True)
class SlotRef:
    """What a header carries to name a slot (mirrors transport.proto's ShmSlotRef)."""

    segment: str
    slot: int
    ticket: int
    payload_bytes: int


class _Mapping:
    """One mapped segment: the control words and the data bytes as views of the same memory.

    On the receiver's side it also keeps the slots leased out as views: it unmaps only once
    the last of them has ended, so closing never pulls memory from under a live tensor.
    """

    def __init__(self, mapped: mmap.mmap, num_slots: int, slot_bytes: int) -> None:
        self.mapped = mapped
        self.num_slots = num_slots
        self.slot_bytes = slot_bytes
        self.view = memoryview(mapped)
        self.words = self.view[: control_bytes(num_slots)].cast("Q")
        self.data = np.frombuffer(mapped, dtype=np.uint8)
        self.address: int = self.data.ctypes.data
        # slot -> weak reference to its lease; the callback ends the lease. Reentrant: a
        # garbage collection inside a locked section may end another lease of this mapping.
        self.leases: dict[int, weakref.ref] = {}
        self._lock = threading.RLock()
        self._closing = False
        self._unmapped = False

    def slot_start(self, slot: int) -> int:
        return control_bytes(self.num_slots) + slot * self.slot_bytes

    def slot_bytes_view(self, slot: int, num_bytes: int) -> np.ndarray:
        start = self.slot_start(slot)
        return self.data[start : start + num_bytes]

    def lease(self, ref: SlotRef) -> memoryview:
        """The slot's payload as a view that releases the slot once it is garbage collected."""
        start = self.slot_start(ref.slot)
        view = self.view[start : start + ref.payload_bytes]
        with self._lock:
            self.leases[ref.slot] = weakref.ref(
                view, lambda _, slot=ref.slot, ticket=ref.ticket: self.end_lease(slot, ticket)
            )
        return view

    def end_lease(self, slot: int, ticket: int) -> None:
        """Hand the slot back to its sender (and unmap if a close was waiting for this)."""
        with self._lock:
            self.leases.pop(slot, None)
            self.release(slot, ticket)
            unmap = self._closing and not self.leases
        if unmap:
            self._unmap()

    def release(self, slot: int, ticket: int) -> None:
        if self._unmapped:
            return  # closed: the sender's segment is no longer ours to write
        _fence()  # the reads of the slot come before the stamp that frees it
        words = self.words
        words[_released_word(slot)] = ticket
        # Bump the count a waiting sender sleeps on, then wake it if it is waiting (two
        # receivers racing here may lose a bump and so a wake: the sender's slice bounds it).
        words[_RELEASES_WORD] = (words[_RELEASES_WORD] + 1) & 0xFFFFFFFF
        _fence()
        if words[_WAITING_WORD]:
            futex_wake(self.address + 8 * _RELEASES_WORD)

    def close(self) -> None:
        with self._lock:
            self._closing = True
            if self.leases:
                return  # the last lease to end unmaps
        self._unmap()

    def _unmap(self) -> None:
        # Views first: an mmap with live exports refuses to close.
        self._unmapped = True
        self.words.release()
        self.view.release()
        del self.data
        self.mapped.close()


def _map_populated(fd: int, num_bytes: int) -> mmap.mmap:
    # Fault every page in now, once, rather than one page fault per 4 KiB of the first
    # messages through each slot (the first pass over a ring ran at a tenth of the speed).
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    return mmap.mmap(fd, num_bytes, flags=flags)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


class ShmRing:
    """The sender's side: a segment it creates, fills slot by slot, and unlinks on close."""

    def __init__(self, *, slot_bytes: int, num_slots: int, directory: Path = SHM_DIR) -> None:
        if num_slots < 1 or slot_bytes < 1:
            raise ValueError("a ring needs at least one slot of at least one byte")
        self.slot_bytes = _round_up(slot_bytes, _PAGE_BYTES)
        self.num_slots = num_slots
        sweep_dead_segments(directory)  # rings of killed senders, before taking more memory
        self.name = f"{SEGMENT_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
        self.path = directory / self.name
        total_bytes = control_bytes(num_slots) + num_slots * self.slot_bytes
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(self.path, flags, 0o600)
        # Unlinked on close, on garbage collection and at exit; after a SIGKILL, by a sweep.
        self._unlinker = weakref.finalize(self, _unlink_quietly, self.path)
        try:
            # Reserve the pages now: a full /dev/shm then fails here, not as SIGBUS mid-copy.
            os.posix_fallocate(fd, 0, total_bytes)
            mapped = _map_populated(fd, total_bytes)
        except BaseException:
            self._unlinker()
            raise
        finally:
            os.close(fd)
        self._map: _Mapping | None = _Mapping(mapped, num_slots, self.slot_bytes)
        header = (_MAGIC, _VERSION, num_slots, self.slot_bytes, control_bytes(num_slots))
        for index, value in enumerate(header):
            self._map.words[index] = value
        self._next_ticket = 1

    def reserve(self, payload_bytes: int, *, wait_s: float = 0.0) -> int | None:
        """A free slot for `payload_bytes`, or None: too big, or no slot freed within `wait_s`.

        Waiting is the ring's back-pressure: a sender that outruns its receiver would otherwise
        push everything inline, which makes the receiver's side slower still. It sleeps until
        a receiver releases a slot, not for a fixed pause.
        """
        if payload_bytes > self.slot_bytes:
            return None
        slot = self._free_slot()
        if slot is not None or wait_s <= 0:
            return slot
        return self._wait_for_slot(time.monotonic() + wait_s)

    def _wait_for_slot(self, deadline_s: float) -> int | None:
        # Flag the wait, then look again: a receiver stamps its release before it reads the
        # flag and this side flags before it reads the stamps, each with a fence between, so
        # on x86-64 (a full barrier) a release is either seen here or followed by a wake-up.
        # Where a wake can be lost (ARM's weaker fence, two releasers racing on the count),
        # the wait ends after _WAIT_SLICE_S anyway: a lost wake costs at most one slice.
        mapping = self._live()
        words = mapping.words
        releases_address = mapping.address + 8 * _RELEASES_WORD
        try:
            while True:
                seen = words[_RELEASES_WORD] & 0xFFFFFFFF
                words[_WAITING_WORD] = 1
                _fence()
                slot = self._free_slot()
                remaining_s = deadline_s - time.monotonic()
                if slot is not None or remaining_s <= 0:
                    return slot
                futex_wait(releases_address, seen, min(remaining_s, _WAIT_SLICE_S))
        finally:
            if not mapping._unmapped:  # closed under the wait: report that, not this write
                words[_WAITING_WORD] = 0

    def _free_slot(self) -> int | None:
        # Lowest free index first, not round robin: a streaming sender then cycles through
        # the few slots its receiver keeps up with, whose bytes are still in the shared cache,
        # instead of through the whole ring's megabytes (this doubled 4 MB hand-offs here).
        words = self._live().words
        for slot in range(self.num_slots):
            if words[_released_word(slot)] == words[_ticket_word(slot)]:
                _fence()  # read the release before overwriting what the receiver read
                return slot
        return None

    def slot_view(self, slot: int, payload_bytes: int) -> np.ndarray:
        """The slot's first `payload_bytes` as a writable uint8 array (valid until publish)."""
        return self._live().slot_bytes_view(slot, payload_bytes)

    def slot_address(self, slot: int) -> int:
        """The address of the slot's first byte in this process (valid until close)."""
        mapping = self._live()
        return mapping.address + mapping.slot_start(slot)

    def publish(self, slot: int, payload_bytes: int) -> SlotRef:
        """Stamp a filled slot so a receiver may read it; returns the reference to send."""
        ticket = self._next_ticket
        self._next_ticket += 1
        words = self._live().words
        _fence()
        words[_ticket_word(slot) + 1] = payload_bytes
        words[_ticket_word(slot)] = ticket
        return SlotRef(self.name, slot, ticket, payload_bytes)

    def _live(self) -> _Mapping:
        if self._map is None:
            raise RuntimeError(f"ring {self.name} is closed")
        return self._map

    def close(self) -> None:
        self._unlinker()
        if self._map is not None:
            self._map.close()
            self._map = None


class ShmReader:
    """The receiver's side: maps the segments named in headers, after checking them."""

    def __init__(self, *, directory: Path = SHM_DIR, max_payload_bytes: int) -> None:
        self.directory = directory
        self.max_payload_bytes = max_payload_bytes
        self._attached: OrderedDict[str, _Mapping] = OrderedDict()

    def check(self, ref: SlotRef) -> None:
        """Raise ShmRefError unless `ref` names a slot its sender published and nobody holds."""
        mapping = self._attach(ref.segment)
        if ref.slot >= mapping.num_slots:
            raise ShmRefError(f"slot {ref.slot} out of range ({mapping.num_slots} slots)")
        if ref.payload_bytes > min(mapping.slot_bytes, self.max_payload_bytes):
            raise ShmRefError(f"payload of {ref.payload_bytes} bytes exceeds the slot or limit")
        _fence()
        words = mapping.words
        stamped_ticket = words[_ticket_word(ref.slot)]
        stamped_bytes = words[_ticket_word(ref.slot) + 1]
        if ref.ticket == 0 or stamped_ticket != ref.ticket:
            raise ShmRefError(f"slot {ref.slot} holds ticket {stamped_ticket}, not {ref.ticket}")
        if words[_released_word(ref.slot)] == ref.ticket:
            raise ShmRefError(f"slot {ref.slot} ticket {ref.ticket} was already read")
        if ref.slot in mapping.leases:  # a replayed reference: one lease per slot
            raise ShmRefError(f"slot {ref.slot} ticket {ref.ticket} is still leased")
        if stamped_bytes != ref.payload_bytes:
            raise ShmRefError(
                f"slot {ref.slot} holds {stamped_bytes} bytes, not {ref.payload_bytes}"
            )

    def lease(self, ref: SlotRef) -> memoryview:
        """A checked slot's payload bytes, shared with the sender (no copy). The slot goes back
        to the sender once this view, and every tensor made from it, is garbage collected."""
        return self._attached[ref.segment].lease(ref)

    def release(self, ref: SlotRef) -> None:
        """Hand a checked slot straight back to the sender without leasing it."""
        self._attached[ref.segment].release(ref.slot, ref.ticket)

    def close(self) -> None:
        while self._attached:
            _, mapping = self._attached.popitem()
            mapping.close()

    def _attach(self, name: str) -> _Mapping:
        mapping = self._attached.get(name)
        if mapping is not None:
            self._attached.move_to_end(name)
            return mapping
        if not SEGMENT_NAME.match(name):
            raise ShmRefError(f"segment name {name!r} is not a ring segment")
        mapping = self._map_checked(self.directory / name)
        self._attached[name] = mapping
        if len(self._attached) > MAX_ATTACHED_SEGMENTS:
            # The oldest is most likely a sender that has gone; its memory frees on unmap.
            self._attached.popitem(last=False)[1].close()
        return mapping

    def _map_checked(self, path: Path) -> _Mapping:
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise ShmRefError(f"segment {path.name!r} cannot be opened: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
                raise ShmRefError(f"segment {path.name!r} is not a file of this user")
            if info.st_size < control_bytes(1):
                raise ShmRefError(f"segment {path.name!r} is too small ({info.st_size} bytes)")
            mapped = _map_populated(fd, info.st_size)
        finally:
            os.close(fd)
        return _checked_layout(mapped, path.name)


def _checked_layout(mapped: mmap.mmap, name: str) -> _Mapping:
    magic, version, num_slots, slot_bytes, data_offset = struct.unpack_from("=5Q", mapped)
    size_ok = (
        num_slots >= 1
        and data_offset == control_bytes(num_slots)
        and data_offset + num_slots * slot_bytes == len(mapped)
    )
    if magic != _MAGIC or version != _VERSION or not size_ok:
        mapped.close()
        raise ShmRefError(f"segment {name!r} does not have a ring's layout")
    return _Mapping(mapped, num_slots, slot_bytes)
