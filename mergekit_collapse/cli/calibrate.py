"""`mergekit-collapse calibrate RECORDS`: fit the default risk score's bands and relative budget."""

from __future__ import annotations

from pathlib import Path

import click

from mergekit_collapse.guard.calibration import DEFAULT_BUDGET_COLUMN
from mergekit_collapse.guard.decision import COLLAPSE_THRESHOLD, comparison


@click.command("calibrate")
@click.argument("records", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--score",
              help="The score column to band (default: the metric column with the best AUROC).")
@click.option("--direction", type=click.Choice(["higher", "lower"]),
              help="Which score values are riskier (default: from the AUROC).")
@click.option("--threshold", type=float, default=COLLAPSE_THRESHOLD, show_default=True,
              help="A record is 'collapsed' when its loss (percent, Eq. 1) is below this.")
@click.option("--sensitivity", type=click.FloatRange(0, 1, min_open=True), default=0.9,
              show_default=True,
              help="Minimum share of collapsed records the 'elevated' edge must flag.")
@click.option("--budget-column", default=DEFAULT_BUDGET_COLUMN, show_default=True,
              help="The column holding r*² / base probe spread (what a relative budget bounds).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the calibration JSON (default: <cache>/calibration.json).")
def calibrate(records: Path, score: str | None, direction: str | None, threshold: float,
              sensitivity: float, budget_column: str, out: Path | None) -> None:
    """Fit risk bands (low / elevated / collapse) and the default relative budget from RECORDS."""
    from mergekit_collapse._io import probe_writable
    from mergekit_collapse.analysis.fitting import fit_calibration_file

    if out is not None:
        probe_writable(out.expanduser().absolute().parent, "--out", target=out)
    cal, path = fit_calibration_file(records, out=out, score=score, direction=direction,
                                     threshold=threshold, sensitivity=sensitivity,
                                     budget_column=budget_column)
    op = comparison(cal.direction)
    v = cal.validity
    auc = f"{v.auroc:.3f}" if v and v.auroc is not None else "—"
    budget = cal.relative_budget if cal.relative_budget is None else f"{cal.relative_budget:.4g}"
    click.echo(f"score {cal.score} ({cal.direction} = riskier, AUROC {auc}): "
               f"elevated {op} {cal.bands.elevated:.4g}, collapse {op} {cal.bands.collapse:.4g}; "
               f"relative budget {budget}")
    click.echo(f"wrote {path}")
