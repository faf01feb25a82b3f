"""Files a client names (PlanRequest.profile, `trace:` workloads), confined before reading.

A client may only make the scheduler read regular files under the directories its operator
configured (`--profile-dir`, `--trace-dir`), up to a size limit: `/dev/zero` or a huge file
would exhaust memory, and `/etc/passwd` is none of the client's business. Errors name the
problem and the path the client sent, never what a file contains.
"""

from __future__ import annotations

import stat
from pathlib import Path

from exegpt.errors import ErrorCode, RequestError


def _refuse(message: str) -> RequestError:
    return RequestError(ErrorCode.INVALID_ARGUMENT, message)


def confined_file(
    path: str, directories: tuple[Path, ...], max_bytes: int, what: str, flag: str
) -> Path:
    """`path` (absolute, or relative to one of `directories`) resolved, once it is checked."""
    if not directories:
        raise _refuse(f"{what} files are not accepted in requests (the scheduler has no {flag})")
    if "\x00" in path:
        raise _refuse(f"{what} path contains a NUL character")
    for directory in directories:
        root = directory.resolve()
        # resolve() follows symlinks, so a link inside the directory cannot lead out of it.
        candidate = (root / path).resolve()
        if candidate.is_relative_to(root):
            return _checked(candidate, path, max_bytes, what)
    roots = ", ".join(str(d) for d in directories)
    raise _refuse(f"{what} {path!r} is outside the allowed directories ({roots})")


def _checked(candidate: Path, path: str, max_bytes: int, what: str) -> Path:
    try:
        info = candidate.stat()
    except OSError:
        raise _refuse(f"{what} {path!r} does not exist or cannot be read") from None
    if not stat.S_ISREG(info.st_mode):
        raise _refuse(f"{what} {path!r} is not a regular file")
    if info.st_size > max_bytes:
        raise _refuse(
            f"{what} {path!r} is {info.st_size / 2**20:.1f} MiB, over the limit of "
            f"{max_bytes / 2**20:.0f} MiB"
        )
    return candidate
