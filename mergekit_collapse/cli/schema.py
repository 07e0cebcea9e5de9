"""`mergekit-collapse schema [guard|report|card]`: print a JSON Schema (the packaged copies
match)."""

from __future__ import annotations

import json

import click

from mergekit_collapse.schemas import NAMES


@click.command("schema")
@click.argument("name", type=click.Choice(NAMES), default="guard")
def schema(name: str) -> None:
    """Print the JSON Schema of NAME: guard (a mergekit YAML's guard: section), report (report.json)
    or card (the mergeability card's metadata)."""
    from mergekit_collapse.schemas import build

    click.echo(json.dumps(build(name), indent=2, ensure_ascii=False))
