"""GitHub Actions output: workflow commands (annotations), the job summary and step outputs.

Formats from GitHub's "Workflow commands for GitHub Actions": `::error file=F,line=L,col=C,
endLine=L2,endColumn=C2,title=T::message`, with `%`, CR and LF escaped in the message and `:`
and `,` also escaped in properties; outputs are appended to `$GITHUB_OUTPUT` as
`name<<DELIMITER` blocks (what `@actions/core` writes), the summary to `$GITHUB_STEP_SUMMARY`.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from mergekit_collapse.ci.results import (
    ConfigResult,
    FailOn,
    Finding,
    error_message,
    exit_status,
    findings,
    model_band,
    overall_verdict,
    report_band,
    worst_band,
)
from mergekit_collapse.guard.decision import Band, at_or_above, icon

__all__ = ["annotation", "annotations", "append_outputs", "data", "step_summary", "verbatim"]

#: a config that could not be checked
ERROR_ICON = "❌"


def _icon(state: str) -> str:
    """The icon of a verdict (`decision.icon`), or of `error`."""
    return ERROR_ICON if state == "error" else icon(state)


def data(text: str) -> str:
    """A workflow command's message: `%`, CR and LF escaped."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _prop(text: str) -> str:
    return data(text).replace(":", "%3A").replace(",", "%2C")


def verbatim(text: str) -> str:
    """Free text (a report naming files and models) for the log, with command processing stopped
    around it (`::stop-commands::`), so no line of it is read as a workflow command."""
    token = f"mergekit-collapse-{uuid.uuid4().hex}"
    return f"::stop-commands::{token}\n{text}\n::{token}::"


def annotation(f: Finding) -> str:
    """One workflow command line for a finding."""
    props = {"file": f.file}
    if f.span is not None:
        props.update(line=str(f.span.line), endLine=str(f.span.end_line), col=str(f.span.column),
                     endColumn=str(f.span.end_column))
    props["title"] = f.title
    return f"::{f.level} {','.join(f'{k}={_prop(v)}' for k, v in props.items())}::{data(f.message)}"


def annotations(results: list[ConfigResult]) -> list[str]:
    """The workflow commands for every finding of every config."""
    return [annotation(f) for r in results for f in findings(r)]


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _row(r: ConfigResult) -> str:
    if r.report is None:
        return (f"| `{_cell(r.display)}` | {ERROR_ICON} error | — | — | {_cell(error_message(r))} "
                f"| {r.exit_code} |")
    rep = r.report
    band = report_band(rep) or "—"
    flagged = ", ".join(m.task for m in rep.models
                        if at_or_above(model_band(rep, m)[0], Band.ELEVATED)) or "—"
    return (f"| `{_cell(r.display)}` | {_icon(rep.verdict)} {rep.verdict} | {band} | "
            f"{rep.decided_by} | {_cell(flagged)} | {r.exit_code} |")


def _details(r: ConfigResult) -> list[str]:
    from mergekit_collapse.guard.report import to_markdown

    passing = r.exit_code == 0
    state = "error" if r.report is None else r.report.verdict
    head = (f"<details{'' if passing else ' open'}><summary><code>{_cell(r.display)}</code>: "
            f"{_icon(state)} {state}</summary>")
    lines = [head, ""]
    if r.report is None:
        lines += ["```", error_message(r), "```"]
    else:
        lines.append(to_markdown(r.report).rstrip())
        lines += ["", f"**What `guard.action: {r.action}` would do** (nothing was merged):", ""]
        lines += [f"- **{_cell(what)}** — {_cell(why)}" for what, why in r.action_preview]
        if r.cached is not None:
            lines += ["", f"Hidden states: {r.cached[0]} of {r.cached[1]} models from the cache."]
    return [*lines, "", "</details>", ""]


def step_summary(results: list[ConfigResult], *, fail_on: FailOn, note: str | None = None) -> str:
    """The job summary (Markdown): the overall verdict, one row per config, then each config's
    bounds, per-model risk table and what its `guard.action` would do.

    Args:
        results: from `check_config`, in order.
        fail_on: the `--fail-on` in force (stated in the summary).
        note: an extra line (e.g. which configs `--changed-since` selected).
    """
    verdict = overall_verdict(results)
    failing = sum(1 for r in results if r.exit_code != 0)
    head = icon("mergeable") if failing == 0 else _icon(verdict)
    lines = [f"## {head} mergekit-collapse: {verdict} "
             f"({len(results)} config{'s' if len(results) != 1 else ''}, {failing} failing)", ""]
    if note:
        lines += [note, ""]
    if results:
        lines += ["| config | verdict | worst band | decided by | flagged | exit |",
                  "|---|---|---|---|---|---|"]
        lines += [_row(r) for r in results]
        lines += ["", f"Fails on: `{fail_on}` · worst band: {worst_band(results)} · exit status "
                      f"{exit_status([r.exit_code for r in results])}", ""]
    for r in results:
        lines += _details(r)
    return "\n".join(lines).rstrip() + "\n"


def append_outputs(path: str | Path, outputs: dict[str, str]) -> None:
    """Append step outputs to a `$GITHUB_OUTPUT` file (heredoc form: safe for any value)."""
    with open(path, "a", encoding="utf-8") as f:
        for name, value in outputs.items():
            delimiter = f"ghadelimiter_{uuid.uuid4()}"
            f.write(f"{name}<<{delimiter}\n{value}\n{delimiter}\n")
