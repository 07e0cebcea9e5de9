"""`validate`: the fast checks of a config, no model loaded (the pre-commit hook's work).

YAML syntax, mergekit's own `MergeConfiguration`, our `guard:` schema (did-you-mean included),
every constituent has a task with probes, and every local path the config names exists.
YAML files that are not mergekit configs (workflows, lm-eval tasks, multi-document files) are
skipped, so the hook can run on every `*.yml` of a repository.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mergekit_collapse.ci.locate import Span, locate_key, locate_message, model_sites
from mergekit_collapse.errors import BadInputError
from mergekit_collapse.guard.config import parse_ref
from mergekit_collapse.models.loading import looks_local

__all__ = ["Problem", "validate_file"]


@dataclass(frozen=True)
class Problem:
    """The first thing wrong with a config file."""

    file: Path
    message: str
    span: Span | None = None

    def line(self, display: str) -> str:
        """`file:line: message`, the shape editors and pre-commit users click on."""
        at = f":{self.span.line}" if self.span else ""
        return f"{display}{at}: {self.message}"


def _kind(text: str) -> str:
    """`malformed` (broken YAML that mentions merge_method), `config`, `guarded` (with a `guard:`
    section), or `other` (not a single mergekit mapping)."""
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError:
        return "malformed" if "merge_method" in text else "other"
    if len(docs) != 1 or not isinstance(docs[0], dict) or "merge_method" not in docs[0]:
        return "other"
    return "guarded" if "guard" in docs[0] else "config"


def _missing_paths(cfg: Any, source: str) -> Problem | None:
    """Local model folders (relative to the working directory, as mergekit reads them) that are
    absent."""
    for site in model_sites(source):
        ref = parse_ref(site.value)
        parts = [] if ref is None else [ref.model.path] + ([ref.lora.path] if ref.lora else [])
        for part in map(str, parts):
            if looks_local(part) and not Path(part).expanduser().exists():
                return Problem(cfg.path, f"model '{part}' ({site.where}) is a local path that does "
                               "not exist (relative to the working directory)", site.span)
    return None


def _task_problem(cfg: Any, source: str) -> Problem | None:
    """Every constituent has a task with probes; probe files and include paths exist."""
    from mergekit_collapse.guard.config import ProbeFile, ProbeLmEval

    for model in cfg.models:
        try:
            spec = cfg.task_of(model)
        except BadInputError as e:
            span = locate_message(source, str(e)) or locate_key(source, "guard.tasks")
            return Problem(cfg.path, f"{e}: every merged model needs a task with probes", span)
        key = next(k for k in cfg.guard.tasks if parse_ref(k) == model)
        span = locate_key(source, f"guard.tasks.{key}")
        probes = spec.probes
        if probes is None or (isinstance(probes, list) and not any(str(p).strip() for p in probes)):
            return Problem(cfg.path, f"guard.tasks '{key}' (task {spec.name}) has no probes", span)
        files = ([("probe file", probes.file)] if isinstance(probes, ProbeFile) else
                 [("include_path", probes.include_path)] if isinstance(probes, ProbeLmEval) else [])
        if spec.eval and spec.eval.endswith((".yaml", ".yml")):
            files.append(("eval task YAML", spec.eval))
        for what, rel in files:
            if rel and not cfg.resolve(rel).exists():
                return Problem(cfg.path, f"guard.tasks '{key}': {what} '{rel}' not found "
                               "(relative to the config's folder)", span)
    return None


def _mergekit_problem(path: Path, source: str) -> Problem | None:
    """mergekit's own validation error with where it is (`models.0.model: Field required`)."""
    from mergekit.config import MergeConfiguration
    from pydantic import ValidationError

    try:
        raw = yaml.safe_load(source)
        raw.pop("guard", None)
        MergeConfiguration.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err.get("loc", ()))
        return Problem(path, f"invalid mergekit config: {loc + ': ' if loc else ''}{err['msg']}",
                       locate_key(source, loc) if loc else None)
    except Exception:  # noqa: BLE001 - anything else: parse_config's own message stands
        return None
    return None


def validate_file(path: Path, *, require_guard: bool = False) -> Problem | None | bool:
    """Validate one YAML file without loading any model.

    Args:
        path: the file.
        require_guard: a mergekit config without a `guard:` section is a problem (else it passes).

    Returns:
        The first problem, None when the config is valid, or False when the file is not a mergekit
        config at all (skipped).
    """
    from mergekit_collapse.guard.config import parse_config

    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return Problem(path, f"cannot read: {getattr(e, 'strerror', None) or e}")
    kind = _kind(source)
    if kind == "other":
        return False
    if kind == "config" and require_guard:
        return Problem(path, "no guard: section (every config must be guarded)")
    try:
        cfg = parse_config(source, path)
    except BadInputError as e:
        msg = str(e).removeprefix(f"{path}: ")
        return _mergekit_problem(path, source) or Problem(path, msg, locate_message(source, msg))
    if kind == "guarded":
        if not cfg.guard.tasks:
            return Problem(path, "guard: has no tasks: every merged model needs a task with probes",
                           locate_key(source, "guard"))
        problem = _task_problem(cfg, source)
        if problem is not None:
            return problem
    return _missing_paths(cfg, source)
