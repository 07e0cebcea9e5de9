"""Which configs to check: files, globs and folders; and `--changed-since REF` with git."""

from __future__ import annotations

import glob
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

from mergekit_collapse._io import check_path
from mergekit_collapse.ci.locate import model_sites
from mergekit_collapse.errors import BadInputError
from mergekit_collapse.guard.config import parse_ref

__all__ = ["Candidate", "changed_files", "expand", "is_guarded_config", "touched_by"]

YAML_SUFFIXES = (".yml", ".yaml")
#: folders never searched for configs (virtual environments, caches, VCS data)
_SKIP_DIRS = {"node_modules", "site-packages", "__pycache__"}


@dataclass(frozen=True)
class Candidate:
    """A config file to check; `named` when the user gave its exact path (not a glob or folder)."""

    path: Path
    named: bool


def _skipped(path: Path, root: Path) -> bool:
    parts = path.relative_to(root).parts[:-1]
    return any(p.startswith(".") or p in _SKIP_DIRS for p in parts)


def expand(patterns: list[str] | tuple[str, ...]) -> list[Candidate]:
    """Files, globs (`**` allowed) and folders (searched for *.yml / *.yaml) -> candidates, in
    order.

    Args:
        patterns: what the user gave.

    Returns:
        Unique candidates in the order given (a folder's and a glob's files sorted).

    Raises:
        BadInputError: a glob or a path that matches nothing.
    """
    out: dict[Path, Candidate] = {}
    for pattern in patterns:
        path = Path(pattern)
        try:
            check_path(pattern, "config")
        except BadInputError:  # reported, one line, when it is checked; the others still run
            out.setdefault(Path(os.path.abspath(pattern)), Candidate(path, True))
            continue
        if path.is_dir():
            found = sorted(f for f in path.rglob("*") if f.suffix in YAML_SUFFIXES and f.is_file()
                           and not _skipped(f, path))
            named = False
        elif path.is_file() or not glob.has_magic(pattern):
            found, named = [path], True  # a missing file is reported when it is checked
        else:
            found = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
            named = False
            if not found:
                raise BadInputError(f"no file matches '{pattern}'")
        for f in found:
            out.setdefault(f.resolve(), Candidate(f, named))
    return list(out.values())


def is_guarded_config(path: Path) -> bool:
    """A single-document YAML mapping with `merge_method` and `guard:` (unreadable or malformed
    YAML that mentions `merge_method` counts, so that its error gets reported)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError:
        return "merge_method" in text
    return (len(docs) == 1 and isinstance(docs[0], dict) and "merge_method" in docs[0]
            and "guard" in docs[0])


def _git(args: list[str], cwd: Path) -> str:
    try:
        res = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise BadInputError("--changed-since needs git, which is not installed") from None
    if res.returncode != 0:
        detail = (res.stderr.strip().splitlines() or ["failed"])[0]
        raise BadInputError(f"--changed-since: git {' '.join(args[:3])}: {detail}")
    return res.stdout


def changed_files(ref: str, cwd: Path | None = None) -> set[Path]:
    """Files that differ between REF and the working tree, plus untracked ones (resolved paths).

    The diff starts at the merge base of REF and HEAD when there is one, so files changed on the
    target branch since the PR branched off do not count.

    Args:
        ref: a commit, branch or tag (`origin/main`, `HEAD~1`, a SHA).
        cwd: a folder inside the repository (default: the working directory).

    Raises:
        BadInputError: not a git repository, or REF is unknown.
    """
    cwd = cwd or Path.cwd()
    root = Path(_git(["rev-parse", "--show-toplevel"], cwd).strip())
    try:
        _git(["rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"], cwd)
    except BadInputError:
        raise BadInputError(f"--changed-since: unknown git ref '{ref}' (in a shallow clone, fetch "
                            "it first, e.g. actions/checkout with fetch-depth: 0)") from None
    try:
        base = _git(["merge-base", ref, "HEAD"], cwd).strip()
    except BadInputError:  # no common history (e.g. a shallow clone): diff against REF itself
        base = ref
    names = _git(["diff", "--name-only", "-z", base, "--"], cwd).split("\0")
    names += _git(["ls-files", "--others", "--exclude-standard", "-z"], root).split("\0")
    return {(root / n).resolve() for n in names if n}


def _inputs(path: Path) -> list[Path]:
    """The local files and folders a config reads: its model folders, probe files, eval YAMLs."""
    try:
        source = path.read_text(encoding="utf-8")
        raw = yaml.safe_load(source)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return []
    here = path.resolve().parent
    texts: list[str] = []
    for site in model_sites(source):
        ref = parse_ref(site.value)
        if ref is not None:
            texts += [str(ref.model.path)] + ([str(ref.lora.path)] if ref.lora is not None else [])
    # model folders resolve against the working directory (as mergekit does) or the config's folder
    found = [p.resolve() for t in texts for p in (Path(t).expanduser(), here / t)]
    guard = raw.get("guard") if isinstance(raw, dict) else None
    tasks = guard.get("tasks") if isinstance(guard, dict) else None
    for spec in (tasks or {}).values() if isinstance(tasks, dict) else []:
        if not isinstance(spec, dict):
            continue
        probes = spec.get("probes")
        rel = [spec.get("eval")] + ([probes.get("file"), probes.get("include_path")]
                                    if isinstance(probes, dict) else [])
        found += [(here / r).resolve() for r in rel if isinstance(r, str)]
    return found


def touched_by(path: Path, changed: set[Path]) -> bool:
    """Did the change set touch this config, or a local model, probe file or eval YAML it reads?"""
    if path.resolve() in changed:
        return True
    inputs = _inputs(path)
    return any(c == p or p in c.parents for c in changed for p in inputs)
