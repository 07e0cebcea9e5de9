"""Publish a merged model folder (weights, tokenizer, mergeability card and report) to the Hugging
Face Hub.

Everything goes in ONE `HfApi.create_commit`: the Hub applies a commit all or nothing, so a failure
(401, 403, 5xx, a lost connection) leaves the repository as it was. Large files take the client's
normal LFS (or Xet) path. The token comes from the argument, `HF_TOKEN` or the stored login; it is
never printed, logged or written, and errors name the repository and the HTTP status only.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from mergekit_collapse.errors import BadInputError, HubError, http_status

logger = logging.getLogger(__name__)

#: the Hub stores a file with LFS when it is at least this big
#: (or binary, or matches .gitattributes)
LFS_THRESHOLD_BYTES = 10 * 1024 * 1024
#: suffixes the Hub's default .gitattributes of a model repo sends to LFS
LFS_SUFFIXES = (
    ".7z", ".arrow", ".bin", ".bz2", ".ckpt", ".ftz", ".gguf", ".gz", ".h5", ".joblib", ".mlmodel",
    ".model", ".msgpack", ".npy", ".npz", ".onnx", ".ot", ".parquet", ".pb", ".pickle", ".pkl",
    ".pt", ".pth", ".rar", ".safetensors", ".tar", ".tflite", ".tgz", ".wasm", ".xz", ".zip",
    ".zst",
)
#: folders never pushed (git metadata, huggingface_hub's local upload cache)
SKIP_DIRS = {".git", ".cache", "__pycache__"}
#: files that small are scanned for the token before anything is pushed
_SCAN_LIMIT_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class PlannedFile:
    """One file of the commit plan."""

    path_in_repo: str
    size: int
    lfs: bool


@dataclass
class PushResult:
    """What `push` did (or, with `dry_run`, would do)."""

    repo_id: str
    endpoint: str
    files: list[PlannedFile]
    dry_run: bool
    revision: str | None = None
    create_pr: bool = False
    private: bool = False
    repo_url: str | None = None
    commit_url: str | None = None
    commit_oid: str | None = None
    pr_url: str | None = None
    created_repo: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_text(self) -> str:
        """A human-readable plan (dry run) or summary (after the push)."""
        target = (f"{self.repo_id}@{self.revision or 'main'}"
                  + (" (as a pull request)" if self.create_pr else ""))
        n_lfs = sum(f.lfs for f in self.files)
        head = (f"commit plan for {target} on {self.endpoint} (dry run, nothing sent)"
                if self.dry_run else f"pushed to {target}")
        lines = [head, f"{len(self.files)} files, {_human(self.total_bytes)}, {n_lfs} via LFS "
                       "(predicted; the Hub decides at pre-upload)" if self.dry_run else
                 f"{len(self.files)} files, {_human(self.total_bytes)}, {n_lfs} via LFS"]
        if self.dry_run:
            width = max((len(f.path_in_repo) for f in self.files), default=0)
            lines += [f"  {f.path_in_repo:<{width}}  {_human(f.size):>10}  "
                      f"{'LFS' if f.lfs else 'regular'}"
                      for f in self.files]
        for label, value in (("commit", self.commit_url), ("pull request", self.pr_url)):
            if value:
                lines.append(f"{label}: {value}")
        lines += self.notes
        return "\n".join(lines)


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def _is_binary(path: Path) -> bool:
    with path.open("rb") as f:
        sample = f.read(512)  # what the client sends to the Hub's pre-upload as `sample`
    if b"\x00" in sample:
        return True
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError as e:
        # a multi-byte character cut at the sample's end is still text
        return e.start < len(sample) - 3
    return False


def predict_lfs(path: Path, size: int) -> bool:
    """Whether the Hub will store a file with LFS: big, binary, or an LFS suffix of the default
    .gitattributes.

    Args:
        path: the local file.
        size: its size in bytes.

    Returns:
        True when the file is expected to go through LFS (the Hub's pre-upload has the last word).
    """
    if size == 0:
        return False  # the client commits empty files as regular ones
    return size >= LFS_THRESHOLD_BYTES or path.suffix.lower() in LFS_SUFFIXES or _is_binary(path)


def plan_files(out_dir: str | Path) -> list[tuple[Path, PlannedFile]]:
    """Every file under `out_dir` that would be pushed, in a stable order.

    Args:
        out_dir: the merged model folder.

    Returns:
        (local path, planned file) pairs, sorted by path in the repo.

    Raises:
        BadInputError: `out_dir` is not a folder or holds no file, a symlink in it points outside
            it (nothing outside the folder is ever pushed), or a file is not a regular one (a named
            pipe would hang the upload).
    """
    root = Path(out_dir)
    if not root.is_dir():
        raise BadInputError(f"not a folder: {root}")
    real = root.resolve()
    planned = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            if p.is_symlink() and p.exists() and not p.resolve().is_relative_to(real):
                raise BadInputError(f"refusing to push {p.relative_to(root).as_posix()}: "
                                    "it is a symlink to outside the folder; remove it or copy "
                                    "the file in")
        for name in filenames:
            p = Path(dirpath) / name
            if p.is_symlink() and not p.exists():
                continue
            rel = p.relative_to(root).as_posix()
            st = p.stat()
            # reading a named pipe or a device would hang or never end
            if not stat.S_ISREG(st.st_mode):
                raise BadInputError(f"refusing to push {rel}: not a regular file (a named pipe, "
                                    "socket or device); remove it from the folder")
            size = st.st_size
            planned.append((p, PlannedFile(rel, size, predict_lfs(p, size))))
    if not planned:
        raise BadInputError(f"nothing to push: {root} has no files")
    return sorted(planned, key=lambda x: x[1].path_in_repo)


def _scrub(text: str, token: str | None) -> str:
    """One line, without the token."""
    line = " ".join(str(text).split())
    return line.replace(token, "***") if token else line


def _refuse_files_with_token(files: Iterable[tuple[Path, PlannedFile]], token: str | None,
                             repo_id: str) -> None:
    """Never publish the credentials: refuse if a file's name, or a (small) file's content, holds
    the token (the refusal names the file with the token redacted)."""
    if not token:
        return
    needle = token.encode()
    for path, pf in files:
        if token in pf.path_in_repo:
            raise HubError(f"refusing to push {pf.path_in_repo.replace(token, '***')}: a file name "
                           "holds the Hub token; rename the file", repo_id=repo_id)
        if pf.size <= _SCAN_LIMIT_BYTES and needle in path.read_bytes():
            raise HubError(f"refusing to push: {pf.path_in_repo} contains the Hub token",
                           repo_id=repo_id)


_STATUS_TEXT = {
    400: "bad request", 401: "unauthorized: the token was rejected",
    403: "forbidden: the token may not write to this repository", 404: "not found",
    409: "conflict", 413: "payload too large", 422: "unprocessable", 429: "rate limited",
}


def _hub_error(exc: BaseException, repo_id: str, endpoint: str, token: str | None,
               step: str) -> HubError:
    """Map any client error to one line naming the repo and the status, never the token.

    The HubError carries `status` (the HTTP status, None when the Hub never answered) and `repo_id`.
    """
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    status = http_status(exc)
    if status is not None:
        what = _STATUS_TEXT.get(status, "server error" if status >= 500 else "error")
        server = ""
        if isinstance(exc, HfHubHTTPError) and exc.server_message:
            server = f" ({_scrub(exc.server_message, token)[:200]})"
        return HubError(f"push to {repo_id} failed at {step}: HTTP {status} {what}{server}; "
                        "nothing was committed", status=status, repo_id=repo_id)
    if isinstance(exc, OfflineModeIsEnabled):
        return HubError(f"push to {repo_id}: HF_HUB_OFFLINE is set, the Hub cannot be reached",
                        repo_id=repo_id)
    if isinstance(exc, _transport_errors()):
        return HubError(f"push to {repo_id} failed at {step}: cannot reach {endpoint} "
                        f"({type(exc).__name__}); nothing was committed", repo_id=repo_id)
    return HubError(f"push to {repo_id} failed at {step}: {type(exc).__name__}: "
                    f"{_scrub(str(exc), token).split(' - ')[0][:200]}; nothing was committed",
                    repo_id=repo_id)


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Network errors of whichever HTTP library this huggingface_hub uses (httpx2 in 2.x, httpx in
    1.x)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError, OSError]
    for module in ("httpx2", "httpx", "requests"):
        try:
            lib = __import__(module)
        except ImportError:
            continue
        for name in ("HTTPError", "RequestException"):
            if isinstance(getattr(lib, name, None), type):
                errors.append(getattr(lib, name))
    return tuple(errors)


def resolve_endpoint(endpoint: str | None = None) -> str:
    """The Hub to talk to: the argument, else `HF_ENDPOINT` read now, else huggingface_hub's
    default.

    huggingface_hub reads `HF_ENDPOINT` once, when it is imported; reading it again here lets a
    caller set it later (tests, notebooks).

    Args:
        endpoint: an explicit endpoint, or None.

    Returns:
        The endpoint URL without a trailing slash.
    """
    from huggingface_hub import constants

    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def published_bytes(files: list[tuple[Path, PlannedFile]], clean: Callable[[str], str]
                    ) -> dict[Path, bytes]:
    """The text files whose published copy differs from the local one: no absolute local path of
    this machine goes to the Hub (`card.public_text`: model references become their display names,
    other paths relative ones). The local files keep theirs.

    Args:
        files: `plan_files`' pairs. clean: the text filter.

    Returns:
        Local path -> the bytes to upload instead, for the files that change.
    """
    out = {}
    for path, planned in files:
        if planned.lfs:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if (public := clean(text)) != text:
            out[path] = public.encode("utf-8")
    return out


def push(out_dir: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         create_pr: bool = False, exist_ok: bool = False, dry_run: bool = False,
         token: str | None = None, endpoint: str | None = None,
         commit_message: str | None = None) -> PushResult:
    """Push a merged model folder to a Hub model repository in one atomic commit.

    Args:
        out_dir: the merged model folder (run `write_card` first so README.md is the mergeability
            card).
        repo_id: the target repository, `namespace/name`.
        private: create the repository private (ignored when it already exists).
        revision: the branch to commit to (created from main when missing); default main.
        create_pr: open a pull request with the commit instead of committing to the branch.
        exist_ok: allow pushing into a repository that already exists (refused otherwise).
        dry_run: only compute the commit plan (files, sizes, LFS or not); contacts nothing.
        token: a Hub token; default `HF_TOKEN`, then the stored login. Never printed or logged.
        endpoint: the Hub URL; default `HF_ENDPOINT`, then huggingface.co.
        commit_message: the commit's title.

    Returns:
        A `PushResult` with the plan and, unless `dry_run`, the commit (and pull request) URL.

    Raises:
        BadInputError: `out_dir` is not a folder or is empty, holds a file that is not a regular one
            (a named pipe), or `repo_id` is malformed.
        HubError: no token; a file name or small file holds the token; the repository exists and
            `exist_ok` is False; any HTTP error (401, 403, 404, 5xx) or network error, as one line
            with the repository and the status (also as its `status` and `repo_id` attributes;
            `status` is None when the Hub never answered). Nothing is committed when it is raised.
    """
    _check_repo_id(repo_id)
    from mergekit_collapse.publish.card import public_text_for

    token = token or _stored_token()
    try:
        files = plan_files(out_dir)
    except BadInputError as e:  # it names a file: never print the token a name may hold
        raise BadInputError(_scrub(str(e), token)) from None
    _refuse_files_with_token(files, token, repo_id)
    public = published_bytes(files, public_text_for(out_dir))
    files = [(p, PlannedFile(pf.path_in_repo, len(public[p]), pf.lfs) if p in public else pf)
             for p, pf in files]
    url = resolve_endpoint(endpoint)
    result = PushResult(repo_id=repo_id, endpoint=url, files=[pf for _, pf in files],
                        dry_run=dry_run, revision=revision, create_pr=create_pr, private=private)
    if dry_run:
        logger.info("dry run: %d files for %s, nothing sent", len(files), repo_id)
        return result
    if not token:
        raise HubError(f"push to {repo_id}: no Hub token (set HF_TOKEN or run `hf auth login`)",
                       repo_id=repo_id)
    message = commit_message or f"Upload merged model ({len(files)} files) with mergekit-collapse"
    return _push(files, public, result, token=token, exist_ok=exist_ok, commit_message=message)


def _check_repo_id(repo_id: str) -> None:
    """Refuse a malformed repo id, or one without a namespace."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise BadInputError(f"bad repo id {repo_id!r}: {str(e).splitlines()[0]}") from None
    if "/" not in repo_id:
        raise BadInputError(f"bad repo id {repo_id!r}: use namespace/name")


def _stored_token() -> str | None:
    """HF_TOKEN, then the stored login (huggingface_hub's own lookup, read now)."""
    from huggingface_hub import get_token

    return get_token()


def _push(files: list[tuple[Path, PlannedFile]], public: dict[Path, bytes], result: PushResult, *,
          token: str, exist_ok: bool, commit_message: str) -> PushResult:
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    repo_id, url = result.repo_id, result.endpoint
    api = HfApi(endpoint=url, token=token)
    step = "create repo"
    try:
        try:
            repo_url = api.create_repo(repo_id, private=result.private, exist_ok=False, token=token)
            result.created_repo = True
        except HfHubHTTPError as e:
            if http_status(e) != 409:
                raise
            if not exist_ok:
                raise HubError(f"push to {repo_id} refused: the repository already exists "
                               "(pass --exist-ok / exist_ok=True to commit into it)",
                               status=409, repo_id=repo_id) from None
            repo_url = f"{url}/{repo_id}"
        result.repo_url = str(repo_url)
        if result.revision and not result.create_pr:
            step = f"create branch {result.revision}"
            api.create_branch(repo_id, branch=result.revision, exist_ok=True, token=token)
        step = "commit"
        operations = [CommitOperationAdd(path_in_repo=pf.path_in_repo,
                                         path_or_fileobj=public.get(p, str(p))) for p, pf in files]
        info = api.create_commit(repo_id, operations=operations, commit_message=commit_message,
                                 revision=result.revision, create_pr=result.create_pr, token=token)
    except HubError:
        raise
    except Exception as e:  # noqa: BLE001 - every client failure becomes one HubError line
        err = _hub_error(e, repo_id, url, token, step)
        if result.created_repo:
            _delete_created_repo(api, repo_id, token)
        raise err from None
    result.commit_url, result.commit_oid = info.commit_url, info.oid
    result.pr_url = info.pr_url
    # the plan's LFS column becomes what the Hub actually decided at pre-upload
    modes = {op.path_in_repo: op._upload_mode for op in operations}
    result.files = [PlannedFile(pf.path_in_repo, pf.size,
                                modes.get(pf.path_in_repo, "lfs" if pf.lfs else None) == "lfs")
                    for pf in result.files]
    logger.info("pushed %d files to %s", len(files), repo_id)
    return result


def _delete_created_repo(api, repo_id: str, token: str) -> None:
    """Best effort: a repository this call created and could not fill is removed again (nothing
    half-pushed)."""
    try:
        api.delete_repo(repo_id, token=token, missing_ok=True)
    except Exception as e:  # noqa: BLE001 - cleanup must not hide the real error
        logger.warning("could not remove the empty repository %s after the failed push (%s)",
                       repo_id, type(e).__name__)
