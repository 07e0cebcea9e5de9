"""Many configs, one verdict: run the guard on each config, and turn the reports into findings.

A finding is one thing to point at in a YAML file (a model in the collapse band, an over-budget
set's outlier, a broken config); the GitHub and SARIF writers only format findings.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mergekit_collapse.ci.locate import Span, locate_key, locate_message, locate_model
from mergekit_collapse.errors import (
    EXIT_BAD_INPUT,
    EXIT_GUARD_STOPPED,
    EXIT_HUB,
    EXIT_OK,
    EXIT_UNEXPECTED,
    CollapseError,
)
from mergekit_collapse.guard.decision import (
    BOUNDS,
    Band,
    DecidedBy,
    Verdict,
    at_or_above,
    comparison,
    outlier,
    shown_signal,
    worst_verdict,
)
from mergekit_collapse.guard.decision import worst_band as _highest

if TYPE_CHECKING:
    from mergekit_collapse.guard.assess import GuardRun
    from mergekit_collapse.guard.report import GuardReport, ModelEntry

__all__ = ["ConfigResult", "FailOn", "Finding", "check_config", "display_path", "error_message",
           "exit_status", "fails", "findings", "model_band", "overall_verdict", "report_band",
           "worst_band"]

FailOn = Literal["collapse", "elevated", "never"]
#: the most severe status wins: a config that could not be checked outranks a risky one
SEVERITY = (EXIT_UNEXPECTED, EXIT_HUB, EXIT_BAD_INPUT, EXIT_GUARD_STOPPED, EXIT_OK)


@dataclass
class ConfigResult:
    """One config's outcome: its report (or the error that stopped it) and its exit status."""

    path: Path
    display: str  # the path as annotations name it (relative to the workspace)
    exit_code: int = EXIT_OK
    report: GuardReport | None = None
    error: str | None = None
    source: str | None = None  # the YAML text, to locate lines
    action: str | None = None  # guard.action
    action_preview: list[tuple[str, str]] = field(default_factory=list)  # (what, why) it would do
    cached: tuple[int, int] | None = None  # (models served from the cache, models)


@dataclass(frozen=True)
class Finding:
    """Something to annotate: a level, a rule, a message and where in which file."""

    level: Literal["error", "warning", "notice"]
    rule: str  # collapse-band | elevated-band | over-budget | not-mergeable | bad-config
    title: str
    message: str
    file: str
    span: Span | None = None
    model: str | None = None


def display_path(path: Path, root: Path | None = None) -> str:
    """`path` relative to the workspace (GITHUB_WORKSPACE, else the working directory), POSIX
    style."""
    root = (root or Path(os.environ.get("GITHUB_WORKSPACE") or Path.cwd())).resolve()
    full = path.resolve()
    try:
        return full.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def fails(report: GuardReport, fail_on: FailOn) -> bool:
    """Does this report fail the check? Any verdict other than `mergeable` fails `collapse`."""
    if fail_on == "never":
        return False
    if report.verdict != Verdict.MERGEABLE:
        return True
    return fail_on == "elevated" and at_or_above(report_band(report), Band.ELEVATED)


def exit_status(codes: list[int]) -> int:
    """The most severe status: 1 (crash) > 4 (Hub) > 2 (bad input) > 3 (collapse) > 0."""
    return min(codes, key=lambda c: SEVERITY.index(c) if c in SEVERITY else 0, default=EXIT_OK)


def model_band(report: GuardReport, m: ModelEntry) -> tuple[str | None, float | None]:
    """(band, score) of one model under the signal summaries show (None, None when it has none)."""
    return m.signal(shown_signal(report))


def _edges(report: GuardReport, band: str) -> tuple[str, str, float | None]:
    """(score name, comparison, edge) of a band under the signal summaries show."""
    info = report.rehearsal if shown_signal(report) == DecidedBy.REHEARSAL else report.risk
    if info is None:
        return "risk score", comparison("higher"), None
    return str(info.score), comparison(info.direction), getattr(info, band, None)


def report_band(report: GuardReport) -> str | None:
    """The highest band of any model of one report."""
    band = _highest(model_band(report, m)[0] for m in report.models)
    return band.value if band else None


def worst_band(results: list[ConfigResult]) -> str:
    """The highest band of any model of any config, or `none`."""
    band = _highest(report_band(r.report) for r in results if r.report)
    return band.value if band else "none"


def overall_verdict(results: list[ConfigResult]) -> str:
    """`error` if a config could not be checked, else the most severe verdict (collapse >
    unassessed > mergeable); `none` when nothing was checked."""
    if not results:
        return "none"
    if any(r.report is None for r in results):
        return "error"
    return worst_verdict(r.report.verdict for r in results if r.report).value


def _action_preview(run: GuardRun) -> list[tuple[str, str]]:
    """(what, why) the config's `guard.action` would do with this report (nothing is written)."""
    import yaml

    from mergekit_collapse.actions import ActionContext, get_action

    report, cfg = run.report, run.cfg
    if report.verdict == Verdict.MERGEABLE and cfg.guard.action != "order":
        return [("merge as written", f"verdict {report.verdict}")]
    if cfg.guard.action == "replace":
        return [("swap models for guard.candidates of the same task",
                 "`mergekit-collapse merge` extracts the candidates and picks the swap")]
    ctx = ActionContext(report=report, raw=yaml.safe_load(cfg.source), refs=list(cfg.models),
                        budget=report.budget.absolute, merge_method=cfg.merge.merge_method,
                        base=cfg.base, vectors=run.vectors)
    try:
        outcome = get_action(cfg.guard.action).apply(ctx)
    except Exception as e:  # noqa: BLE001 - a preview must never fail the check
        return [("could not plan", f"{type(e).__name__}: {e}")]
    lines = [(r.changed, r.reason) for r in outcome.records]
    if outcome.stop and not lines:
        lines.append(("stop the merge", outcome.stop))
    return lines or [("merge as written", f"verdict {report.verdict}")]


def check_config(path: Path, *, fail_on: FailOn = "collapse", debug: bool = False,
                 display: str | None = None, **guard_kwargs: Any) -> ConfigResult:
    """Run the guard on one config and keep everything CI output needs; errors become results.

    Args:
        path: the mergekit YAML.
        fail_on: what fails the check (see `fails`).
        debug: re-raise errors instead of recording them.
        display: the path annotations name (default: `display_path(path)`).
        **guard_kwargs: `guard.run_guard` options (budget, runtime, overrides).

    Returns:
        The result; `exit_code` is 0, 3 (fails), or the error's code (2 bad input, 4 Hub, 1 other).
    """
    from mergekit_collapse.guard.assess import run_guard

    result = ConfigResult(path=path, display=display or display_path(path))
    try:
        result.source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        result.source = None
    try:
        run = run_guard(path, **guard_kwargs)
    except CollapseError as e:
        if debug:
            raise
        result.error, result.exit_code = str(e), e.exit_code
        return result
    except Exception as e:  # noqa: BLE001 - one line per config, like the CLI's last resort
        if debug:
            raise
        result.error = f"unexpected error: {type(e).__name__}: {e} (rerun with --debug)"
        result.exit_code = EXIT_UNEXPECTED
        return result
    if run is None:  # another process of a multi-process run: the main process reports
        return result
    result.report = run.report
    result.action = run.cfg.guard.action
    result.action_preview = _action_preview(run)
    computed = run.extraction.computed
    result.cached = (sum(1 for n in computed.values() if n == 0), len(computed))
    result.exit_code = EXIT_GUARD_STOPPED if fails(run.report, fail_on) else EXIT_OK
    return result


def _locator(result: ConfigResult) -> Callable[[str], Span | None]:
    source = result.source or ""
    return lambda name: locate_model(source, name) if source else None


_PREFIX = re.compile(r"^(?:error: )?")


def error_message(result: ConfigResult) -> str:
    """The error without a leading `<path>: ` (the annotation names the file already)."""
    msg = _PREFIX.sub("", result.error or "")
    for prefix in (f"{result.path}: ", f"{result.path.resolve()}: "):
        msg = msg.removeprefix(prefix)
    return msg


def _model_finding(r: GuardReport, i: int, over: bool, action: str, file: str,
                   where: Callable[[str], Span | None]) -> Finding | None:
    """A model's finding: its band (collapse: error when the verdict is not mergeable, else a
    warning; elevated: warning) and/or being the outlier of a set over budget by the bounds."""
    m = r.models[i]
    band, score = model_band(r, m)
    flagged = at_or_above(band, Band.ELEVATED) and score is not None
    if not (flagged or over):
        return None
    parts = [f"{m.name} (task {m.task}):"]
    if flagged:
        name, cmp, edge = _edges(r, band)
        parts.append(f"{name} {score:.3g} is in the {band} band"
                     + (f" ({cmp} {edge:.3g})." if edge is not None else "."))
    if over:
        mds = "undefined" if m.mds is None else f"{m.mds:.3g}"
        parts.append(f"The set is over budget (r*² {r.bounds.exact:.4g} > {r.budget.absolute:.4g}) "
                     f"and this model is its outlier (MDS {mds}).")
    parts.append(f"Verdict {r.verdict.upper()} (decided by {r.decided_by}).{action}")
    error = over or (band == Band.COLLAPSE and r.verdict != Verdict.MERGEABLE)
    rule = f"{band}-band" if flagged else "over-budget"
    title = (f"mergekit-collapse: {m.task} would collapse" if error and flagged
             else f"mergekit-collapse: {m.task} is the outlier of an over-budget set" if over
             else f"mergekit-collapse: {m.task} in the {band} band")
    return Finding("error" if error else "warning", rule, title, " ".join(parts), file,
                   where(m.name), m.name)


def findings(result: ConfigResult) -> list[Finding]:
    """What to annotate for one config: models in the collapse or elevated band, the outlier of a
    set over budget by the bounds, a verdict that is neither, or why the config was not checked.

    Args:
        result: from `check_config`.

    Returns:
        The findings, in model order.
    """
    file = result.display
    source = result.source or ""
    if result.report is None:
        msg = error_message(result)
        return [Finding("error", "bad-config", "mergekit-collapse: config not checked", msg, file,
                        locate_message(source, msg) if source else None)]
    r = result.report
    action = ""
    if result.action and r.verdict != Verdict.MERGEABLE and result.action_preview:
        action = (f" guard.action {result.action} would: "
                  f"{'; '.join(w for w, _ in result.action_preview)}.")
    by_bounds = r.decided_by in BOUNDS
    blamed = outlier(r) if (r.verdict != Verdict.MERGEABLE and by_bounds and r.models) else -1
    found = [f for i in range(len(r.models))
             if (f := _model_finding(r, i, i == blamed, action, file, _locator(result)))]
    if r.verdict not in (Verdict.MERGEABLE, Verdict.COLLAPSE) and not found:
        notes = " ".join(r.notes) or "no note"
        span = locate_key(source, "models") or locate_key(source, "slices")
        found.append(Finding("error", "not-mergeable", f"mergekit-collapse: verdict {r.verdict}",
                             f"Verdict {r.verdict.upper()} (decided by {r.decided_by}). "
                             f"{notes}{action}",
                             file, span))
    return found
