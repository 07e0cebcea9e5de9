"""A model's identity: the sha256 of its weight, config and tokenizer files (memoised on disk)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from mergekit_collapse._constants import cache_root
from mergekit_collapse._io import atomic_write_bytes, cache_lock
from mergekit_collapse.models.loading import WEIGHT_SUFFIXES, local_dir

log = logging.getLogger(__name__)

_IDENTITY_FILES = (".json", ".jinja", ".model", ".txt")


def _file_sha256(path: Path, memo: dict[str, str]) -> str:
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    if key not in memo:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        memo[key] = h.hexdigest()
    return memo[key]


def folder_identity(folder: Path) -> str:
    """sha256 over the weight, config and tokenizer files of a folder (hashes memoised on disk)."""
    memo_path = cache_root() / "file_hashes.json"
    memo = _read_memo(memo_path)
    before = len(memo)
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if (f.is_file() and f.name.endswith(WEIGHT_SUFFIXES + _IDENTITY_FILES)
                and f.name != "README.md"):
            h.update(f"{f.name}:{_file_sha256(f, memo)}\n".encode())
    if len(memo) != before:
        with cache_lock(memo_path.parent):  # keep what other processes added since we read
            atomic_write_bytes(memo_path,
                               json.dumps({**_read_memo(memo_path, warn=False), **memo}).encode())
    return h.hexdigest()


def _read_memo(path: Path, *, warn: bool = True) -> dict[str, str]:
    """file_hashes.json: file key -> sha256; an unreadable or malformed one is dropped (with a
    warning unless `warn` is False: the re-read before a write)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        data = None
    memo = {k: v for k, v in data.items() if isinstance(v, str)} if isinstance(data, dict) else {}
    if warn and (not isinstance(data, dict) or len(memo) != len(data)):
        log.warning("recomputing the file hashes of %s: it is unreadable or malformed", path)
    return memo


def model_identity(ref: Any) -> str:
    """Identity of a mergekit ModelReference: content hashes of its base (and LoRA) folders."""
    ident = folder_identity(local_dir(ref.model))
    if ref.lora is not None:
        ident += "+" + folder_identity(local_dir(ref.lora, what="LoRA adapter"))
    return ident
