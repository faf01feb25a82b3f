"""Resolve `org/name` to a checkpoint in the local Hugging Face cache, offline.

The cache layout is huggingface_hub's: `<cache>/models--org--name/refs/<ref>` holds a
commit hash and `<cache>/models--org--name/snapshots/<hash>/` the files (links into
`blobs/`). The cache is `HF_HUB_CACHE`, else `HF_HOME/hub`, else
`~/.cache/huggingface/hub` (`XDG_CACHE_HOME` moves `~/.cache`). Nothing is ever downloaded:
fetch a model first with `huggingface-cli download org/name` (or any HF client).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# A Hub repository id, optionally pinned: "org/name", "name", "org/name@revision".
_REPO_ID = re.compile(r"^(?:[\w.-]+/)?[\w.-]+(?:@[\w./-]+)?$")


class HubCacheMissError(ValueError):
    """The model is not in the local Hugging Face cache (nothing is downloaded)."""


def hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "huggingface" / "hub"


def looks_like_repo_id(name: str) -> bool:
    return bool(_REPO_ID.match(name)) and ".." not in name


def resolve_cached_model(name: str) -> Path:
    """The snapshot directory of `org/name[@revision]` (default revision: the `main` ref)."""
    if not looks_like_repo_id(name):
        raise HubCacheMissError(f"{name!r} is not a Hugging Face model id (org/name)")
    repo_id, _, revision = name.partition("@")
    cache = hub_cache_dir()
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    hint = f"fetch it first, e.g. `huggingface-cli download {repo_id}`; exegpt never downloads"
    if not repo_dir.is_dir():
        raise HubCacheMissError(
            f"model {repo_id!r} is not in the local Hugging Face cache {cache} "
            f"(no {repo_dir.name}/; set HF_HUB_CACHE or HF_HOME to the cache in use): {hint}"
        )
    commit = _commit(repo_dir, revision or "main")
    snapshot = repo_dir / "snapshots" / commit
    if not (snapshot / "config.json").is_file():
        raise HubCacheMissError(
            f"model {repo_id!r}: snapshot {commit} in {cache} has no config.json (an incomplete "
            f"download?): {hint}"
        )
    return snapshot


def _commit(repo_dir: Path, revision: str) -> str:
    ref = repo_dir / "refs" / revision
    if ref.is_file():
        return ref.read_text().strip()
    if (repo_dir / "snapshots" / revision).is_dir():  # a commit hash given directly
        return revision
    snapshots = sorted(p.name for p in (repo_dir / "snapshots").glob("*") if p.is_dir())
    if revision == "main" and len(snapshots) == 1:  # a cache written without refs/
        return snapshots[0]
    raise HubCacheMissError(
        f"{repo_dir.name}: no ref or snapshot {revision!r} in the local cache "
        f"(snapshots: {snapshots or 'none'})"
    )


def local_model_directory(name: str) -> Path | None:
    """`name` as a checkpoint directory, or its snapshot in the local cache; None if neither."""
    if Path(name).is_dir():
        return Path(name)
    try:
        return resolve_cached_model(name)
    except HubCacheMissError:
        return None
