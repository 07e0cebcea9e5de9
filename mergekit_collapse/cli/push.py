"""`mergekit-collapse push MERGED_DIR REPO_ID`: publish a merged model folder to the Hub in one
commit."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("push")
@click.argument("merged_dir", type=click.Path(path_type=Path))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repository private.")
@click.option("--revision", help="Branch to commit to (created from main when missing).")
@click.option("--create-pr", is_flag=True,
              help="Open a pull request instead of committing to the branch.")
@click.option("--exist-ok", is_flag=True,
              help="Allow pushing into a repository that already exists.")
@click.option("--dry-run", is_flag=True,
              help="Print the commit plan (files, sizes, LFS) and contact nothing.")
def push(merged_dir: Path, repo_id: str, private: bool, revision: str | None, create_pr: bool,
         exist_ok: bool, dry_run: bool) -> None:
    """Push MERGED_DIR (weights, tokenizer, card, mergeability/) to REPO_ID in one atomic commit.

    The token comes from HF_TOKEN or the stored login (`hf auth login`), never from the command
    line; HF_ENDPOINT selects the Hub. Write the card first with
    `mergekit-collapse card MERGED_DIR`.
    """
    from mergekit_collapse.publish.hub import push as push_folder

    result = push_folder(merged_dir, repo_id, private=private, revision=revision,
                         create_pr=create_pr, exist_ok=exist_ok, dry_run=dry_run)
    click.echo(result.to_text())
