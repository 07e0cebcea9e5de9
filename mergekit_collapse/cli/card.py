"""`mergekit-collapse card MERGED_DIR`: write the mergeability card (README.md) of a merged
model."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("card")
@click.argument("merged_dir", type=click.Path(path_type=Path))
@click.option("--template", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A Jinja template of your own (default: the packaged hub_cards template).")
@click.option("--config", "config_path",
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The mergekit YAML to show (default: MERGED_DIR/mergekit_config.yml).")
@click.option("--model-name",
              help="The card's title and model-index name (default: the folder's name).")
def card(merged_dir: Path, template: Path | None, config_path: Path | None,
         model_name: str | None) -> None:
    """Write MERGED_DIR/README.md: the model card with the guard's numbers as Hub metadata."""
    from mergekit_collapse.publish.card import write_card

    path = write_card(merged_dir, template=template, config_path=config_path, model_name=model_name)
    click.echo(f"wrote {path}")
