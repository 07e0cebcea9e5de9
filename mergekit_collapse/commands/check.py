"""`mergekit-collapse check CONFIG`: the guard alone, for CI jobs and PR comments."""

from __future__ import annotations

import sys

import click

from mergekit_collapse.commands.options import guard_kwargs, guard_options
from mergekit_collapse.errors import EXIT_GUARD_STOPPED, EXIT_OK


def format_text(report) -> str:  # noqa: ANN001 - GuardReport, imported lazily
    """A terminal summary: verdict, bounds, per-model table."""
    b = report.bounds
    lines = [
        f"verdict: {report.verdict.upper()} (decided by {report.decided_by})",
        f"budget:  {report.budget.absolute:.4g} ({report.budget.mode} {report.budget.value:g})",
        f"risk:    {report.risk.score} (calibrated AUROC {report.risk.auroc or float('nan'):.2f}); "
        f"bands elevated ≥ {report.risk.elevated:.3g}, collapse ≥ {report.risk.collapse:.3g}"
        if report.risk else "risk:    —",
        f"bounds:  converse Δ²/4 {b.converse:.4g} ≤ exact r*² {b.exact:.4g} ≤ "
        f"Jung {b.jung:.4g} (n={b.jung_n});  uniform average {b.uniform:.4g}",
        f"probes:  {report.probes.count} (k={report.probes.k}), layer {report.layer}, "
        f"{report.pooling} pooling, {report.dtype}",
        "",
        f"{'model':<40} {'task':<14} {'MDS':>6} {'dist α*':>9} {'α*':>6} {'retention':>9} {'risk':>16}",
    ]
    for m in report.models:
        mds = "—" if m.mds is None else ("inf" if m.mds == float("inf") else f"{m.mds:.3f}")
        ret = "—" if m.retention is None else f"{m.retention:.3f}"
        risk = "—" if m.risk_band is None else f"{m.risk_band} {m.risk_score:.3g}"
        lines.append(f"{m.name[-40:]:<40} {m.task[:14]:<14} {mds:>6} {m.distortion_optimal:>9.4g} "
                     f"{report.weights[m.name]:>6.3f} {ret:>9} {risk:>16}")
    for note in ([report.hidden_sim_note] if report.hidden_sim_note else []) + report.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


@click.command("check")
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Also write report.json, report.md and hidden_sim.png here.")
@click.option("--format", "fmt", type=click.Choice(["text", "json", "markdown"]), default="text",
              show_default=True, help="What to print on stdout.")
@guard_options
def check(config: str, out_dir: str | None, fmt: str, **params) -> None:
    """Compute HiddenSim, MDS and the exact distortion bounds for CONFIG; exit 3 if over budget."""
    from mergekit_collapse.guard import check as run_check
    from mergekit_collapse.report import to_markdown

    report = run_check(config, **guard_kwargs(params))
    if out_dir:
        paths = report.write(out_dir)
        click.echo(f"wrote {', '.join(str(p) for p in paths.values())}", err=True)
    if fmt == "json":
        click.echo(report.model_dump_json(indent=2))
    elif fmt == "markdown":
        click.echo(to_markdown(report))
    else:
        click.echo(format_text(report))
    sys.exit(EXIT_OK if report.verdict == "mergeable" else EXIT_GUARD_STOPPED)
