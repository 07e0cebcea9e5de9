"""`mergekit-collapse evaluate MERGED_DIR CONFIG`: lm-eval on the merge and its constituents."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("evaluate")
@click.argument("merged_dir", type=click.Path(file_okay=False))
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--limit", type=int, default=None, help="Documents per task (quick runs).")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--with-base", is_flag=True, help="Also score the base model.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
              show_default=True, help="Scoring dtype of the merge and its constituents alike.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Where to write evaluation.json (default MERGED_DIR/mergeability).")
@click.option("--no-progress", is_flag=True)
def evaluate(merged_dir: str, config: str, limit: int | None, batch_size: int, with_base: bool,
             dtype: str, out_dir: str | None, no_progress: bool) -> None:
    """Evaluate MERGED_DIR and each constituent of CONFIG on their tasks; report merging loss (Eq. 1)."""
    from mergekit_collapse.evaluate.observed import evaluate_merge, write_evaluation
    from mergekit_collapse.guard.config import load_config
    from mergekit_collapse.guard.report import GuardReport

    out = Path(out_dir) if out_dir else Path(merged_dir) / "mergeability"
    report_path = Path(merged_dir) / "mergeability" / "report.json"
    report = GuardReport.read(report_path) if report_path.exists() else None
    evaluation = evaluate_merge(merged_dir, load_config(config), limit=limit, batch_size=batch_size,
                                with_base=with_base, report=report, progress=not no_progress,
                                dtype=dtype)
    paths = write_evaluation(evaluation, out, report)
    click.echo(f"{'task':<18} {'metric':<12} {'own':>7} {'merged':>7} {'loss %':>8} {'obs.ret':>8}")
    for t in evaluation.tasks:
        loss = "—" if t.loss is None else f"{t.loss:+.1f}"
        ret = "—" if t.observed_retention is None else f"{t.observed_retention:.3f}"
        click.echo(f"{t.task[:18]:<18} {t.metric[:12]:<12} {t.constituent:>7.3f} {t.merged:>7.3f} "
                   f"{loss:>8} {ret:>8}")
    if evaluation.mean_loss is not None:
        click.echo(f"mean merging loss: {evaluation.mean_loss:+.1f}%")
    click.echo(f"wrote {', '.join(str(p) for p in paths.values())}", err=True)
