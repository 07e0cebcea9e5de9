"""Configuration from the environment, in one place (documented in the README)."""

from __future__ import annotations

import os
from pathlib import Path

#: Set to 1 to switch off the `mergekit-yaml --guard` hook entirely.
ENV_DISABLE = "MERGEKIT_COLLAPSE_DISABLE"
#: Root of the on-disk caches (hidden states, converted base model, evaluation scores).
ENV_CACHE = "MERGEKIT_COLLAPSE_CACHE"

#: 1.1: timings and the date moved to `run_info` (was rehearsal.seconds); the rest is deterministic
REPORT_SCHEMA_VERSION = "1.1"
#: the folder inside a merged model that holds the report, the evaluation and the plots
REPORT_DIR = "mergeability"
#: the folder inside REPORT_DIR with the guard's re-check of a config an action re-organised and
#: that was merged (the merge shipped); REPORT_DIR/report.json stays the config as written
SHIPPED_DIR = "shipped"


#: the variables launchers set to the number of processes (torchrun, MPI implementations)
_WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launched() -> bool:
    """Is this process one of several started by a launcher?"""
    return any(int(os.environ.get(v, "1") or 1) > 1 for v in _WORLD_SIZE_VARS)


def hook_disabled() -> bool:
    """True when the user switched the mergekit hook off."""
    return os.environ.get(ENV_DISABLE, "").strip().lower() in {"1", "true", "yes", "on"}


def cache_root() -> Path:
    """The cache root: $MERGEKIT_COLLAPSE_CACHE, else $XDG_CACHE_HOME/mergekit_collapse, else
    ~/.cache/...

    Raises:
        CacheError: the root, or the nearest of its folders that exists, is a file (nothing could be
            cached; a read-only or full one is said when it is first written: `_io.cache_lock`).
    """
    if os.environ.get(ENV_CACHE):
        root, named = Path(os.environ[ENV_CACHE]).expanduser(), f"${ENV_CACHE}"
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "mergekit_collapse"
        named = "the cache root"
    existing = next((p for p in (root, *root.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        from mergekit_collapse.errors import CacheError

        shown = str(existing).replace("\n", "\\n")
        raise CacheError(f"cannot use {named} {str(root)!r} as the cache: {shown} is a file, not a "
                         f"folder; point {ENV_CACHE} at a folder")
    return root
