"""A directory of profiles: <profile_id>.json each, written atomically, validated on read.

Profile ids come from clients in GetProfile, so only plain names are accepted (letters,
digits, '.', '_', '-'; no path separators, nothing hidden), which keeps every lookup inside
the directory. Summaries are cached by file size and modification time.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from exegpt.errors import ErrorCode, RequestError
from exegpt.profile.format import (
    ProfileData,
    ProfileError,
    check_writable,
    parse_profile,
    write_profile,
)

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
_SUFFIX = ".json"


@dataclass(frozen=True)
class ProfileSummary:
    profile_id: str
    model_name: str
    model_family: str
    config_hash: str
    device: str
    device_name: str
    dtype: str
    grid_name: str
    tp_degrees: tuple[int, ...]
    created_at: str
    profiling_time_s: float
    torch_threads: int
    size_bytes: int

    @classmethod
    def of(cls, data: ProfileData, size_bytes: int) -> ProfileSummary:
        return cls(
            profile_id=data.profile_id,
            model_name=data.model.name,
            model_family=data.model.family,
            config_hash=data.model.config_hash,
            device=data.hardware.device,
            device_name=data.hardware.device_name,
            dtype=data.model.dtype,
            grid_name=data.grid_name,
            tp_degrees=tuple(data.tp_degrees),
            created_at=data.created_at,
            profiling_time_s=data.profiling_time_s,
            torch_threads=data.software.torch_threads,
            size_bytes=size_bytes,
        )


def check_profile_id(profile_id: str) -> str:
    if not _ID.fullmatch(profile_id or ""):
        raise RequestError(
            ErrorCode.INVALID_ARGUMENT,
            f"invalid profile id {profile_id!r}: letters, digits, '.', '_' and '-' only",
        )
    return profile_id


class ProfileStore:
    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).expanduser().resolve()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            message = f"cannot create the profile directory {self.directory}: {exc}"
            raise ValueError(message) from None
        try:
            check_writable(self.directory / "probe.json")
        except ProfileError as exc:
            raise ValueError(f"the profile directory is not writable: {exc}") from None
        self._summaries: dict[str, tuple[tuple[int, int], ProfileSummary | None]] = {}
        remove_stale_temporaries(self.directory)

    def path_of(self, profile_id: str) -> Path:
        return self.directory / f"{check_profile_id(profile_id)}{_SUFFIX}"

    def save(self, data: ProfileData) -> ProfileSummary:
        path = write_profile(data, self.path_of(data.profile_id))
        return self._summary(path, data)

    def read(self, profile_id: str) -> tuple[ProfileSummary, str]:
        """(summary, the file's JSON text); NOT_FOUND when absent."""
        path = self.path_of(profile_id)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise RequestError(ErrorCode.NOT_FOUND, f"no profile {profile_id!r}") from None
        except (OSError, UnicodeDecodeError) as exc:
            message = f"cannot read profile {profile_id}: {exc}"
            raise RequestError(ErrorCode.INTERNAL, message) from None
        data = self._parse(path, text)
        if data is None:
            raise RequestError(
                ErrorCode.INTERNAL, f"stored profile {profile_id} is not a valid profile"
            )
        return self._summary(path, data, len(text.encode())), text

    def list(self) -> tuple[list[ProfileSummary], int]:
        """(summaries of the valid profiles, newest first; the number of invalid files)."""
        summaries, num_invalid = [], 0
        seen = set()
        for path in self.directory.glob(f"*{_SUFFIX}"):
            if not _ID.fullmatch(path.stem):
                continue
            seen.add(path.name)
            summary = self._cached(path)
            if summary is None:
                num_invalid += 1
            else:
                summaries.append(summary)
        for name in set(self._summaries) - seen:  # deleted behind our back
            del self._summaries[name]
        summaries.sort(key=lambda s: (s.created_at, s.profile_id), reverse=True)
        return summaries, num_invalid

    # ---- helpers ---------------------------------------------------------------------------

    def _cached(self, path: Path) -> ProfileSummary | None:
        try:
            stat = path.stat()
        except OSError:
            return None
        key = (stat.st_size, stat.st_mtime_ns)
        cached = self._summaries.get(path.name)
        if cached is not None and cached[0] == key:
            return cached[1]
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError):
            text = ""
        data = self._parse(path, text)
        summary = ProfileSummary.of(data, stat.st_size) if data is not None else None
        self._summaries[path.name] = (key, summary)
        return summary

    def _summary(self, path: Path, data: ProfileData, size: int | None = None) -> ProfileSummary:
        stat = path.stat()
        summary = ProfileSummary.of(data, size if size is not None else stat.st_size)
        self._summaries[path.name] = ((stat.st_size, stat.st_mtime_ns), summary)
        return summary

    @staticmethod
    def _parse(path: Path, text: str) -> ProfileData | None:
        try:
            return parse_profile(json.loads(text), str(path))
        except (ValueError, ProfileError):
            return None


def remove_stale_temporaries(directory: Path) -> int:
    """Delete temporary files a killed writer left (hidden .*.tmp); returns how many."""
    removed = 0
    for path in directory.glob(".*.tmp"):
        try:
            os.unlink(path)
            removed += 1
        except OSError:
            pass
    return removed
