"""Writes that are whole or absent: files and folders are built under a temporary name, then renamed;
reads that are checked (a cache entry whose checksum fails is not used); a lock for writers.

An interrupted run (an error, Ctrl-C, a killed process between two renames at worst) leaves the old
file or folder as it was, never a half-written one.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, flush it to disk, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def staged_folder(final: str | Path) -> Iterator[Path]:
    """A fresh folder to build `final` in; it takes `final`'s place only when the block succeeds.

    The folder is `<parent>/.<name>.tmp-XXXX/<name>` (the same name, so tools that record their
    output folder's name record the right one). On success an existing `final` is renamed aside, the
    new folder renamed in, the old one deleted; on any exception (KeyboardInterrupt included) the
    temporary folder is removed and `final` is left as it was.

    Yields:
        The folder to write into.
    """
    final = Path(final)
    target = final.resolve() if final.is_symlink() else final  # replace the folder, keep the link
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        yield tmp / target.name
        built = tmp / target.name
        built.mkdir(exist_ok=True)
        if not target.exists():
            os.replace(built, target)
            return
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
        os.replace(target, old / target.name)
        try:
            os.replace(built, target)
        except BaseException:
            os.replace(old / target.name, target)  # put the old folder back
            old.rmdir()
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_lock(folder: Path) -> Any:
    """An inter-process lock on a cache folder. Writers re-read, merge and replace under it, so
    concurrent processes (a multi-process run, two runs at once) lose no update; readers need no
    lock (`atomic_write_bytes` replaces whole files)."""
    from filelock import FileLock

    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(folder / ".lock")


def read_npz(path: Path, *, warn: bool = True) -> dict[str, np.ndarray] | None:
    """A cache entry's arrays, or None when it is missing or corrupt (a warning says so: recomputed).

    Every member's CRC-32 is checked before loading (`ZipFile.testzip`), so a truncated, emptied or
    bit-flipped entry is never used.
    """
    if not path.exists():
        return None
    try:
        with zipfile.ZipFile(path) as zf:
            if (bad := zf.testzip()) is not None:
                raise ValueError(f"checksum mismatch in {bad}")
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        if warn:
            log.warning("recomputing corrupt cache entry %s (%s)", path, type(e).__name__)
        return None
