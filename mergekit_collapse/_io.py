"""Writes that are whole or absent: files and folders are built under a temporary name, then
renamed; reads that are checked (a cache entry whose checksum fails is not used); a lock for
writers.

An interrupted run (an error, Ctrl-C, a killed process between two renames at worst) leaves the old
file or folder as it was, never a half-written one.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from mergekit_collapse._console import one_line
from mergekit_collapse._constants import ENV_CACHE
from mergekit_collapse.errors import BadInputError, CacheError

log = logging.getLogger(__name__)

#: the longest file or folder name (one path component) common file systems allow, in bytes
NAME_MAX = 255

#: what a write meets on a read-only file system, a full disk or quota, an immutable folder
_UNWRITABLE = {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM}


def check_path(path: str | Path, what: str) -> None:
    """Refuse a path no file system can hold, before the OS answers with a traceback.

    Args:
        path: as the user gave it. what: its name for the user (`model`, `probe file`, `--out`).

    Raises:
        BadInputError: the path holds a NUL byte, or a component over NAME_MAX (255) bytes.
    """
    text = str(path)
    if "\0" in text:
        raise BadInputError(f"{what} {one_line(repr(text))} contains a NUL byte: no file can be "
                            "named so; fix the path")
    for part in Path(text).parts:
        if (n := len(os.fsencode(part))) > NAME_MAX:
            raise BadInputError(f"{what} name too long: '{one_line(part[:40])}…' is {n} bytes, and "
                                f"a file or folder name is at most {NAME_MAX}; shorten it")


def why_unwritable(folder: str | Path, error: OSError | None = None) -> str:
    """Why `folder` cannot be created or written, in a few words: the ancestor that is a file,
    else the system's words for `error` ("Read-only file system", "No space left on device")."""
    folder = Path(folder)
    for p in (folder, *folder.parents):
        if p.exists():
            if not p.is_dir():
                return f"{one_line(str(p))} is a file, not a folder"
            break
    if error is None:
        return "not writable"
    return error.strerror or type(error).__name__


def probe_writable(folder: str | Path, what: str, *, target: str | Path | None = None) -> None:
    """Create `folder` and a file in it, or fail before any work is done.

    Args:
        folder: the folder to write in. what: its name for the user (`--out`).
        target: the file that will be written there, named in the message instead of the folder.

    Raises:
        CacheError: one line naming `what`, the folder and why (a file in the way, a read-only
            file system, a full disk).
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:
        shown = one_line(str(target or folder))
        raise CacheError(f"cannot write {what} {shown}: {why_unwritable(folder, e)}") from None


@contextmanager
def cache_lock(folder: str | Path) -> Iterator[None]:
    """The inter-process write lock of a cache folder (`folder/.lock`), created on first use.

    Only writers take it, so a warm cache on a read-only file system still serves reads. A cache
    that cannot be written (read-only, full, a file in the way) is one line, not an OSError.

    Raises:
        CacheError: the folder or its lock cannot be created, or a write under the lock fails so.
    """
    from filelock import FileLock

    folder = Path(folder)

    def fail(e: OSError) -> CacheError:
        return CacheError(f"cannot write the cache at {one_line(str(folder))}: "
                          f"{why_unwritable(folder, e)}; point {ENV_CACHE} (or --cache-dir) at a "
                          "writable folder")

    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(folder / ".lock")
        lock.acquire()
    except OSError as e:
        raise fail(e) from None
    try:
        yield
    except OSError as e:
        if e.errno not in _UNWRITABLE:
            raise
        raise fail(e) from None
    finally:
        lock.release()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, flush it to disk, then rename it over
    `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:200]}.tmp-")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from the group
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


def _umask() -> int:
    """The process's umask (reading it means setting it: put back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_all(changes: dict[Path, bytes | None]) -> None:
    """Write (bytes) or delete (None) several files as one unit: when one change fails, those
    already made are undone, so the folder is as it was before, never half-updated.

    Raises:
        OSError: the change that failed (after the rollback).
    """
    before = {p: (p.read_bytes() if p.is_file() else None) for p in changes}
    done: list[Path] = []
    try:
        for path, data in changes.items():
            done.append(path)
            if data is None:
                path.unlink(missing_ok=True)
            else:
                atomic_write_bytes(path, data)
    except BaseException:
        for path in reversed(done):
            old = before[path]
            try:
                if old is None:
                    path.unlink(missing_ok=True)
                else:
                    atomic_write_bytes(path, old)
            except OSError:
                pass  # the original error says what went wrong
        raise


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


def read_npz(path: Path, *, warn: bool = True) -> dict[str, np.ndarray] | None:
    """A cache entry's arrays, or None when it is missing or corrupt (a warning says so:
    recomputed).

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
