"""`mergekit-collapse evaluate MERGED_DIR CONFIG`: lm-eval on the merge and its constituents."""

from __future__ import annotations

from pathlib import Path

import click

from mergekit_collapse._constants import REPORT_DIR


@click.command("evaluate")
@click.argument("merged_dir", type=click.Path(file_okay=False))
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Documents per task (quick runs).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--with-base", is_flag=True, help="Also score the base model.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
              show_default=True, help="Scoring dtype of the merge and its constituents alike.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Where to write evaluation.json (default MERGED_DIR/mergeability).")
@click.option("--no-progress", is_flag=True)
def evaluate(merged_dir: str, config: str, limit: int | None, batch_size: int, with_base: bool,
             dtype: str, out_dir: str | None, no_progress: bool) -> None:
    """Evaluate MERGED_DIR and each constituent of CONFIG on their tasks; report merging loss
    (Eq. 1)."""
    from tabulate import tabulate

    from mergekit_collapse.evaluate.observed import evaluate_merge, write_evaluation
    from mergekit_collapse.guard.config import load_config
    from mergekit_collapse.guard.report import GuardReport

    out = Path(out_dir) if out_dir else Path(merged_dir) / REPORT_DIR
    report_path = Path(merged_dir) / REPORT_DIR / "report.json"
    report = GuardReport.read(report_path) if report_path.exists() else None
    evaluation = evaluate_merge(merged_dir, load_config(config), limit=limit, batch_size=batch_size,
                                with_base=with_base, report=report, progress=not no_progress,
                                dtype=dtype)
    paths = write_evaluation(evaluation, out, report)
    rows = [[t.task, t.metric, t.constituent, t.merged, t.loss, t.observed_retention]
            for t in evaluation.tasks]
    click.echo(tabulate(rows, headers=["task", "metric", "own", "merged", "loss %", "obs.ret"],
                        floatfmt=("", "", ".3f", ".3f", "+.1f", ".3f"), numalign="right",
                        missingval="—"))
    if evaluation.mean_loss is not None:
        click.echo(f"mean merging loss: {evaluation.mean_loss:+.1f}%")
    click.echo(f"wrote {', '.join(str(p) for p in paths.values())}", err=True)
