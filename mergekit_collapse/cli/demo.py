"""`mergekit-collapse demo`: the whole product on the real SmolLM2-135M, offline, on CPU."""

from __future__ import annotations

import click

from mergekit_collapse.cli.options import guard_specs, options, runtime_specs

#: the actions the demo's narration covers, and its default
DEMO_ACTION = {"type": click.Choice(["drop", "split", "warn", "abort"]), "default": "drop",
               "show_default": True}


@click.command("demo")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              default="mergekit-collapse-demo", show_default=True,
              help="Where the zoo, the merge and the card go.")
@click.option("--fast", is_flag=True, help="Fewer evaluation documents (CI).")
@click.option("--config", type=click.Path(dir_okay=False), default=None,
              help="Run the same flow on your own config instead of the zoo group.")
@options(guard_specs(only=("action",), action=DEMO_ACTION))
@click.option("--limit", type=int, default=None,
              help="lm-eval documents per task (default 40; 8 with --fast).")
@options(runtime_specs("no_progress"))
def demo(out_dir: str, fast: bool, config: str | None, action: str, limit: int | None,
         no_progress: bool) -> None:
    """Predict a collapse, act on it, merge, evaluate, write the card, plan the push."""
    from mergekit_collapse.demo.run import run_demo, summary

    found = run_demo(out_dir, fast=fast, config=config, action=action, limit=limit,
                     progress=not no_progress, echo=lambda s: click.echo(s, err=True))
    click.echo(summary(found))
