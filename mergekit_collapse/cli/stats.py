"""`mergekit-collapse stats RECORDS`: correlations, AUROC and ANOVA of every metric column of merge
records."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from mergekit_collapse.cli.options import emit
from mergekit_collapse.guard.decision import COLLAPSE_THRESHOLD

if TYPE_CHECKING:
    from mergekit_collapse.analysis.statistics import Records


def read_records_file(path: Path) -> Records:
    """Read and parse a merge-records file (CSV, or JSONL by extension `.jsonl`/`.json`)."""
    from mergekit_collapse.analysis.statistics import parse_records
    from mergekit_collapse.guard.config import read_text

    text = read_text(path, "records")
    fmt = "jsonl" if path.suffix.lower() in {".jsonl", ".json", ".ndjson"} else \
        "csv" if path.suffix.lower() in {".csv", ".tsv"} else None
    return parse_records(text, fmt, source=str(path))


@click.command("stats")
@click.argument("records", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--threshold", type=float, default=COLLAPSE_THRESHOLD, show_default=True,
              help="A record is 'collapsed' when its loss (percent, Eq. 1) is below this.")
@click.option("--format", "fmt", type=click.Choice(["json", "markdown"]), default="markdown",
              show_default=True, help="Output format.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the output to this file instead of stdout.")
def stats(records: Path, threshold: float, fmt: str, out: Path | None) -> None:
    """Per metric column: n, Pearson r/p, Spearman ρ/p, AUROC for collapse; then ANOVA of loss.

    RECORDS is CSV or JSONL, one row per (merge, constituent) with columns group, task, method,
    model, loss and any numeric metric columns (see mergekit_collapse.statistics).
    """
    from mergekit_collapse.analysis.statistics import summarize

    report = summarize(read_records_file(records), threshold=threshold)
    text = report.model_dump_json(indent=2) + "\n" if fmt == "json" else report.to_markdown()
    emit(text, out)
