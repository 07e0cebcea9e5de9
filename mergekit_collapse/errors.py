"""Typed errors. The CLI maps each to one exit code and one line of text (traceback only with
--debug).

Like huggingface_hub's, they are also the standard error they resemble: a `BadInputError` is a
`ValueError`, a `ModelNotFoundError` a `FileNotFoundError`, so `except ValueError` in user code
catches a malformed config as it would from any other library.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_BAD_INPUT = 2
EXIT_GUARD_STOPPED = 3
EXIT_HUB = 4
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT
INTERRUPTED = ("interrupted (Ctrl-C): outputs and cache entries are written whole or not at all; "
               "rerun to go on from the cache")


class CollapseError(Exception):
    """Base class of every error this package raises on purpose."""

    exit_code = EXIT_UNEXPECTED


class BadInputError(CollapseError, ValueError):
    """Malformed config, missing or mismatched models, empty probes, NaNs, unsafe weights."""

    exit_code = EXIT_BAD_INPUT


class ConfigError(BadInputError):
    """The config is not valid: YAML, mergekit's own schema, or the `guard:` section."""


class ModelNotFoundError(BadInputError, FileNotFoundError):
    """A model path, Hub id or input file that cannot be found (or fetched from the Hub)."""


class CacheError(BadInputError):
    """The cache (MERGEKIT_COLLAPSE_CACHE, --cache-dir) or an output cannot be written: a read-only
    file system, a full disk, a folder that is a file."""


class GuardStoppedError(CollapseError):
    """The guard predicted a collapse and its action stopped the merge."""

    exit_code = EXIT_GUARD_STOPPED

    def __init__(self, message: str, report: object | None = None):
        super().__init__(message)
        self.report = report


class HubError(CollapseError):
    """Talking to the Hugging Face Hub failed (no token, 401/403/404, network). Never carries a
    token."""

    exit_code = EXIT_HUB

    def __init__(self, message: str, *, status: int | None = None, repo_id: str | None = None):
        super().__init__(message)
        self.status = status  # the HTTP status, when the Hub answered
        self.repo_id = repo_id


def http_status(exc: BaseException) -> int | None:
    """The HTTP status of a huggingface_hub error, looking through wrappers (LFS uploads and
    `snapshot_download` wrap the error the Hub answered); None when no answer came."""
    from huggingface_hub.errors import HfHubHTTPError

    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, HfHubHTTPError) and e.response is not None:
            return e.response.status_code
        e = e.__cause__ or e.__context__
    return None
