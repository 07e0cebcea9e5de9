"""`mergekit-collapse run CONFIG OUT`: guard -> merge -> evaluate -> card -> push, resumable."""

from __future__ import annotations

import click
from mergekit.options import add_merge_options


@click.command("run")
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--push", "push_repo", default=None, help="Push the merge to this Hub repo (org/name).")
@click.option("--dry-run", is_flag=True, help="Plan the push; contact nothing.")
@click.option("--private", is_flag=True, help="Create the Hub repo private.")
@click.option("--exist-ok", is_flag=True, help="Allow pushing into an existing repo.")
@click.option("--guard-action", "action", default=None,
              type=click.Choice(["abort", "warn", "drop", "split", "replace", "order"]))
@click.option("--guard-budget", "budget", type=float, default=None, help="Relative budget.")
@click.option("--guard-absolute-budget", "absolute_budget", type=float, default=None)
@click.option("--guard-weights", "weights", type=click.Choice(["none", "suggest", "apply"]), default=None)
@click.option("--guard-merge-all", "merge_all", is_flag=True, help="split: merge every group.")
@click.option("--limit", type=int, default=None, help="lm-eval documents per task.")
@click.option("--no-eval", is_flag=True, help="Skip the lm-eval stage.")
@click.option("--with-base", is_flag=True, help="Also score the base model.")
@click.option("--template", type=click.Path(dir_okay=False), default=None, help="Card template.")
@add_merge_options
def run(merge_options, config: str, out: str, push_repo: str | None, dry_run: bool, private: bool,
        exist_ok: bool, action: str | None, budget: float | None, absolute_budget: float | None,
        weights: str | None, merge_all: bool, limit: int | None, no_eval: bool, with_base: bool,
        template: str | None) -> None:
    """Guard CONFIG, merge it into OUT with mergekit, evaluate, write the card, push.

    A re-run skips the stages whose outputs are intact. Exit 3 when the guard stops the merge.
    """
    from pathlib import Path

    from mergekit_collapse.pipeline import default_merge_options, run_pipeline

    merge_options.apply_global_options()
    if merge_options.lora_merge_cache is None:  # share merged LoRAs across runs
        merge_options = default_merge_options(**merge_options.model_dump(exclude_none=True))
    result = run_pipeline(config, out, merge_options=merge_options, action=action, budget=budget,
                          absolute_budget=absolute_budget, weights=weights, merge_all=merge_all,
                          evaluate=not no_eval, limit=limit, with_base=with_base,
                          push_repo=push_repo, dry_run=dry_run, private=private, exist_ok=exist_ok,
                          template=Path(template) if template else None,
                          echo=lambda s: click.echo(s, err=True))
    for folder, ev in result.evaluations.items():
        if ev.mean_loss is not None:
            click.echo(f"{folder}: mean merging loss {ev.mean_loss:+.1f}%")
    for card in result.cards:
        click.echo(f"card: {card}")
    if result.push is not None:
        click.echo(result.push.to_text())
