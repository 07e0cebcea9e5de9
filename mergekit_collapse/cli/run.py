"""`mergekit-collapse run CONFIG OUT`: guard -> merge -> evaluate -> card -> push, resumable."""

from __future__ import annotations

from typing import Any

import click
from mergekit.options import add_merge_options

from mergekit_collapse.cli.options import (
    PREFIX,
    guard_overrides,
    guard_specs,
    options,
    runtime_options,
    runtime_specs,
)


@click.command("run")
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--push", "push_repo", default=None,
              help="Push the merge to this Hub repo (org/name).")
@click.option("--dry-run", is_flag=True, help="Plan the push; contact nothing.")
@click.option("--private", is_flag=True, help="Create the Hub repo private.")
@click.option("--exist-ok", is_flag=True, help="Allow pushing into an existing repo.")
@options(guard_specs(PREFIX) + runtime_specs("merge_all", prefix=PREFIX))
@click.option("--limit", type=int, default=None, help="lm-eval documents per task.")
@click.option("--no-eval", is_flag=True, help="Skip the lm-eval stage.")
@click.option("--with-base", is_flag=True, help="Also score the base model.")
@click.option("--template", type=click.Path(dir_okay=False), default=None, help="Card template.")
@add_merge_options
def run(merge_options, config: str, out: str, push_repo: str | None, dry_run: bool, private: bool,
        exist_ok: bool, limit: int | None, no_eval: bool, with_base: bool, template: str | None,
        **guard: Any) -> None:
    """Guard CONFIG, merge it into OUT with mergekit, evaluate, write the card, push.

    A re-run skips the stages whose outputs are intact. Exit 3 when the guard stops the merge.
    """
    from pathlib import Path

    from mergekit_collapse.pipeline import default_merge_options, run_pipeline

    merge_options.apply_global_options()
    if merge_options.lora_merge_cache is None:  # share merged LoRAs across runs
        merge_options = default_merge_options(**merge_options.model_dump(exclude_none=True))
    result = run_pipeline(config, out, merge_options=merge_options,
                          merge_all=runtime_options(guard, PREFIX).merge_all,
                          evaluate=not no_eval, limit=limit, with_base=with_base,
                          push_repo=push_repo, dry_run=dry_run, private=private, exist_ok=exist_ok,
                          template=Path(template) if template else None,
                          echo=lambda s: click.echo(s, err=True), **guard_overrides(guard, PREFIX))
    for folder, ev in result.evaluations.items():
        if ev.mean_loss is not None:
            click.echo(f"{folder}: mean merging loss {ev.mean_loss:+.1f}%")
    for card in result.cards:
        click.echo(f"card: {card}")
    if result.push is not None:
        click.echo(result.push.to_text())
