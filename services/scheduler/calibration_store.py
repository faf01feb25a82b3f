"""A profile's calibration, kept in a small JSON file beside it.

`quick.json` is calibrated by `quick.calibration.json`: the factors per kind of cost that the
scheduler learned from what engines reported (calibration.py). The scheduler writes it when
it re-plans on drifted stage times, and every plan made with the profile (the scheduler's and
`exegpt plan`) starts from it. Analytic profiles have no file and no stored calibration. A
calibration file that cannot be read is reported and ignored: the plan starts uncalibrated.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from services.scheduler.calibration import Calibration

logger = logging.getLogger(__name__)

SUFFIX = ".calibration.json"
MAX_FILE_BYTES = 1 << 16  # a few factors and counts


def calibration_path(profile: str) -> Path | None:
    """Where the calibration of the profile `profile` lives (None: not a profile file)."""
    if profile.startswith("analytic:"):
        return None
    path = Path(profile)
    return path.with_name(path.stem + SUFFIX)


def load_calibration(path: Path | None) -> Calibration | None:
    """The calibration stored at `path`; None when there is none or it is unreadable."""
    if path is None or not path.is_file():
        return None
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise ValueError(f"larger than {MAX_FILE_BYTES} bytes")
        return Calibration.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError) as exc:
        logger.warning("ignoring the calibration %s (starting uncalibrated): %s", path, exc)
        return None


def save_calibration(path: Path, calibration: Calibration) -> bool:
    """Write `calibration` to `path` atomically; False (logged) when it cannot be written."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(json.dumps(calibration.to_dict(), indent=2) + "\n")
        temporary.replace(path)
    except OSError as exc:
        logger.warning("could not keep the calibration beside the profile at %s: %s", path, exc)
        temporary.unlink(missing_ok=True)
        return False
    logger.info("calibration kept at %s: %s", path, calibration.describe())
    return True
