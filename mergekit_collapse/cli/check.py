"""`mergekit-collapse check CONFIGS...`: the guard alone, for CI jobs and PR comments.

One config file prints its report as before; several (files, globs, folders, `--changed-since`)
print one summary table and exit with the most severe status (1 > 4 > 2 > 3 > 0).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from mergekit_collapse._console import one_line
from mergekit_collapse._io import atomic_write_text
from mergekit_collapse.cli.options import (
    guard_overrides,
    guard_specs,
    options,
    runtime_options,
    runtime_specs,
)
from mergekit_collapse.errors import EXIT_UNEXPECTED

if TYPE_CHECKING:
    from mergekit_collapse.ci.results import ConfigResult

logger = logging.getLogger(__name__)


def format_table(results: list[ConfigResult]) -> str:
    """One row per config: verdict, worst band, how it was decided, cache use, exit status (errors
    are printed on stderr, one line each)."""
    from tabulate import tabulate

    from mergekit_collapse.ci.results import report_band

    rows = []
    for r in results:
        name = r.display.replace("\n", " ")
        if r.report is None:
            rows.append([name, "error", "—", "—", "—", r.exit_code])
            continue
        cached = f"{r.cached[0]}/{r.cached[1]}" if r.cached else "—"
        rows.append([name, r.report.verdict, report_band(r.report) or "—", r.report.decided_by,
                     cached, r.exit_code])
    return tabulate(rows,
                    headers=["config", "verdict", "worst band", "decided by", "cached", "exit"],
                    tablefmt="plain", disable_numparse=True)


def _slug(display: str, taken: set[str]) -> str:
    """A folder name for one config's report under --out."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", display.rsplit(".", 1)[0]).strip("_") or "config"
    slug, k = base, 1
    while slug in taken:
        k += 1
        slug = f"{base}-{k}"
    taken.add(slug)
    return slug


def _error_line(r: ConfigResult) -> str:
    return one_line(r.error if r.exit_code == EXIT_UNEXPECTED else f"error: {r.error}")


def _summary_json(results: list[ConfigResult], status: int) -> dict:
    from mergekit_collapse.ci.results import overall_verdict, worst_band

    return {"exit_code": status, "verdict": overall_verdict(results),
            "worst_band": worst_band(results),
            "configs": [{"config": r.display, "exit_code": r.exit_code, "error": r.error,
                         "action": r.action,
                         "action_preview": [{"what": w, "why": y} for w, y in r.action_preview],
                         "report": json.loads(r.report.model_dump_json()) if r.report else None}
                        for r in results]}


def _write_out(out: Path, results: list[ConfigResult], status: int, single: bool, fail_on: str,
               note: str | None) -> list[Path]:
    """Each report (one folder per config unless single), summary.json/.md and results.sarif."""
    from mergekit_collapse.ci.github import step_summary
    from mergekit_collapse.ci.sarif import to_sarif

    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    taken: set[str] = set()
    for r in results:
        if r.report is not None:
            target = out if single else out / _slug(r.display, taken)
            written += r.report.write(target).values()
    files = {"summary.json": json.dumps(_summary_json(results, status), indent=2),
             "summary.md": step_summary(results, fail_on=fail_on, note=note),
             "results.sarif": json.dumps(to_sarif(results), indent=2)}
    for name, text in files.items():
        atomic_write_text(out / name, text)
        written.append(out / name)
    return written


def _select(configs: tuple[str, ...], changed_since: str | None, only_guarded: bool
            ) -> tuple[list, str | None]:
    """The configs to check, and a note on what was skipped or selected."""
    from mergekit_collapse.ci.discover import changed_files, expand, is_guarded_config, touched_by

    cands = expand(configs)
    kept = [c for c in cands if (c.named and not only_guarded) or is_guarded_config(c.path)]
    notes = []
    if len(kept) < len(cands):
        notes.append(f"skipped {len(cands) - len(kept)} YAML file(s) that are not guarded "
                     "mergekit configs")
    if changed_since:
        changed = changed_files(changed_since)
        touched = [c for c in kept if touched_by(c.path, changed)]
        notes.append(f"--changed-since {changed_since}: {len(touched)} of {len(kept)} config(s) "
                     "touched (the config, or a local model or probe file it reads)")
        kept = touched
    return kept, "; ".join(notes) or None


@click.command("check")
@click.argument("configs", nargs=-1, required=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Write report.json, report.md and hidden_sim.png here (a folder per config when "
                   "several), plus summary.json, summary.md and results.sarif.")
@click.option("--format", "fmt", type=click.Choice(["text", "json", "markdown", "github", "sarif"]),
              default="text", show_default=True,
              help="What to print on stdout (github: workflow commands, job summary and outputs).")
@click.option("--fail-on", type=click.Choice(["collapse", "elevated", "never"]), default="collapse",
              show_default=True,
              help="Exit 3 when a verdict is not mergeable (collapse), also when a "
                   "model is in the elevated band (elevated), or never.")
@click.option("--changed-since", metavar="REF", default=None,
              help="Check only configs that `git diff REF` touches (or whose local models or probe "
                   "files it touches).")
@click.option("--only-guarded", is_flag=True,
              help="Skip named files that are not mergekit configs with a guard: section (as is "
                   "always done for folders and globs); for hooks that pass every YAML.")
@click.option("--step-summary/--no-step-summary", default=True, show_default=True,
              help="--format github: append the job summary to $GITHUB_STEP_SUMMARY.")
@options(guard_specs())
@options(runtime_specs("device", "dtype", "cache_dir", "allow_pickle", "trust_remote_code",
                       "no_progress", "num_processes"))
def check(configs: tuple[str, ...], out_dir: str | None, fmt: str, fail_on: str,
          changed_since: str | None, only_guarded: bool, step_summary: bool, **params) -> None:
    """Compute HiddenSim, MDS and the exact distortion bounds for each config in CONFIGS (files,
    globs, folders); exit 3 if one is over budget (see --fail-on), 2 if one is broken."""
    from mergekit_collapse.ci.results import check_config, exit_status
    from mergekit_collapse.guard.assess import prefill_rehearsals
    from mergekit_collapse.guard.config import check_writable
    from mergekit_collapse.guard.distributed import is_main_process, launch, launched

    runtime = runtime_options(params)
    if out_dir:
        check_writable(out_dir, "--out")
    if runtime.num_processes > 1 and not launched():
        sys.exit(launch(sys.argv[1:], runtime.num_processes))  # the same command line, N times
    main = is_main_process()
    selected, note = _select(configs, changed_since, only_guarded)
    if note and main:
        click.echo(one_line(note), err=True)
    kwargs = guard_overrides(params) | {"runtime": runtime.runtime()}
    debug = bool(click.get_current_context().find_root().params.get("debug"))
    if launched() and len(selected) > 1:  # the configs' rehearsals, spread over the processes
        prefill_rehearsals([c.path for c in selected], **{
            **kwargs, "runtime": kwargs["runtime"].model_copy(update={"progress": False})})
    results = [check_config(c.path, fail_on=fail_on, debug=debug, **kwargs) for c in selected]
    if not main:  # another process of a multi-process run: it extracted its share; the main reports
        sys.exit(0)
    status = exit_status([r.exit_code for r in results])
    single = len(configs) == 1 and not changed_since and len(selected) == 1 and selected[0].named
    for r in results:
        if r.error is not None:
            click.echo(_error_line(r), err=True)
    if out_dir:
        paths = _write_out(Path(out_dir), results, status, single, fail_on, note)
        click.echo(one_line(f"wrote {', '.join(str(p) for p in paths)}"), err=True)
    _print(fmt, results, status, single, fail_on, note)
    if fmt == "github":
        _github_files(results, status, fail_on, note, out_dir, step_summary)
    sys.exit(status)


def _print(fmt: str, results: list[ConfigResult], status: int, single: bool, fail_on: str,
           note: str | None) -> None:
    from mergekit_collapse.ci.github import annotations, data, step_summary, verbatim
    from mergekit_collapse.ci.sarif import to_sarif
    from mergekit_collapse.guard.report import to_markdown

    done = [r for r in results if r.report is not None]
    if fmt == "sarif":
        click.echo(json.dumps(to_sarif(results), indent=2))
    elif fmt == "json":
        click.echo(done[0].report.model_dump_json(indent=2) if single and done
                   else json.dumps(_summary_json(results, status), indent=2))
    elif fmt == "markdown":
        click.echo(to_markdown(done[0].report) if single and done
                   else step_summary(results, fail_on=fail_on, note=note), nl=False)
    elif fmt == "github":
        for r in results:  # names are escaped (data) or printed with commands stopped
            click.echo(f"::group::{data(r.display)}: {r.report.verdict if r.report else 'error'}")
            click.echo(verbatim(_text(r)))
            click.echo("::endgroup::")
        for line in annotations(results):
            click.echo(line)
        click.echo(verbatim(format_table(results)))
    elif single:
        if done:
            click.echo(_text(done[0]))
    else:
        click.echo(format_table(results) if results else "no config to check")


def _text(r: ConfigResult) -> str:
    from mergekit_collapse.ci.results import error_message
    from mergekit_collapse.guard.decision import Verdict
    from mergekit_collapse.guard.report import format_text

    if r.report is None:
        return f"error: {r.display}: {error_message(r)}"
    text = format_text(r.report)
    if r.report.verdict != Verdict.MERGEABLE and r.action:
        text += "\n" + "\n".join(f"action:  {r.action}: {what} — {why}"
                                 for what, why in r.action_preview)
    return text


def _github_files(results: list[ConfigResult], status: int, fail_on: str, note: str | None,
                  out_dir: str | None, step_summary: bool) -> None:
    """Append the job summary and the step outputs (verdict, worst-band, report-path)."""
    from mergekit_collapse.ci import github
    from mergekit_collapse.ci.results import overall_verdict, worst_band

    summary_file = os.environ.get("GITHUB_STEP_SUMMARY")
    if step_summary and summary_file:
        try:
            with open(summary_file, "a", encoding="utf-8") as f:
                f.write(github.step_summary(results, fail_on=fail_on, note=note))
        except OSError as e:  # the verdict's exit status matters more than the summary
            _unwritable("GITHUB_STEP_SUMMARY", summary_file, e)
    if output_file := os.environ.get("GITHUB_OUTPUT"):
        try:
            github.append_outputs(output_file, {
                "verdict": overall_verdict(results), "worst-band": worst_band(results),
                "report-path": str(Path(out_dir).resolve()) if out_dir else "",
                "exit-code": str(status)})
        except OSError as e:
            _unwritable("GITHUB_OUTPUT", output_file, e)


def _unwritable(var: str, path: str, e: OSError) -> None:
    logger.warning("cannot write $%s (%s): %s; the exit status is the verdict's", var,
                   one_line(path), e.strerror or type(e).__name__)
