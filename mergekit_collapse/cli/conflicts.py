"""`mergekit-collapse conflicts CONFIG`: the paper's parameter-conflict metrics (Eqs. 4–7) of a
merge."""

from __future__ import annotations

from pathlib import Path

import click

from mergekit_collapse.cli.options import emit


@click.command("conflicts")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["json", "text"]), default="text",
              show_default=True, help="Output format.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the output to this file instead of stdout.")
@click.option("--allow-pickle", is_flag=True,
              help="Accept pickle-only (*.bin) weights; they are loaded whole (pickle can "
                   "run code).")
@click.option("--chunk-elements", type=click.IntRange(min=1), default=1 << 20, show_default=True,
              help="Most elements of one tensor held per model at a time.")
def conflicts(config: Path, fmt: str, out: Path | None, allow_pickle: bool,
              chunk_elements: int) -> None:
    """Pairwise task-vector conflicts of CONFIG's models against its base_model, streamed from
    safetensors."""
    from mergekit_collapse.analysis.conflicts import conflict_metrics
    from mergekit_collapse.guard.config import load_config

    report = conflict_metrics(load_config(config), allow_pickle=allow_pickle,
                              chunk_elements=chunk_elements)
    text = report.model_dump_json(indent=2) + "\n" if fmt == "json" else report.to_text()
    emit(text, out)
