"""The hidden-state cache: one .npz per (model identity, settings), keyed by probe."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from mergekit_collapse._io import atomic_write_bytes, cache_lock, read_npz
from mergekit_collapse.guard.forward import ExtractionSettings

log = logging.getLogger(__name__)

#: bump when what a cached vector means changes
CACHE_VERSION = "1"


def probe_key(text: str, chat_template: bool) -> str:
    return hashlib.sha256(f"{int(chat_template)}\0{text}".encode()).hexdigest()[:32]


class VectorCache:
    """Vectors of one (model identity, settings) pair, keyed by probe, in one .npz file."""

    def __init__(self, identity: str, settings: ExtractionSettings, dtype_name: str, root: Path):
        spec = {"v": CACHE_VERSION, "model": identity, "layer": settings.layer,
                "pooling": settings.pooling, "dtype": dtype_name, "max_length": settings.max_length}
        digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
        self.path = root / "hidden_states" / digest[:2] / f"{digest}.npz"
        self.data: dict[str, np.ndarray] = self._read()

    def _read(self, *, warn: bool = True) -> dict[str, np.ndarray]:
        z = read_npz(self.path, warn=warn)
        if z is None:
            return {}
        keys, vectors = z.get("keys"), z.get("vectors")
        if keys is None or vectors is None or keys.ndim != 1 or vectors.ndim != 2 \
                or len(keys) != len(vectors):
            if warn:
                log.warning("recomputing malformed cache entry %s", self.path)
            return {}
        return dict(zip(keys.tolist(), vectors, strict=True))

    def missing(self, keys: Iterable[str]) -> list[str]:
        return [k for k in keys if k not in self.data]

    def update(self, new: dict[str, np.ndarray]) -> None:
        """Add vectors and rewrite the file, keeping what another process wrote since we read it."""
        if not new:
            return
        import io

        with cache_lock(self.path.parent):
            self.data = {**self._read(warn=False), **self.data, **new}
            keys = list(self.data)
            buf = io.BytesIO()
            np.savez(buf, keys=np.array(keys), vectors=np.stack([self.data[k] for k in keys]))
            atomic_write_bytes(self.path, buf.getvalue())
