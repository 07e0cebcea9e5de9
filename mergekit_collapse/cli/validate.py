"""`mergekit-collapse validate FILES...`: the fast, model-free checks behind the pre-commit hook."""

from __future__ import annotations

import sys

import click

from mergekit_collapse.errors import EXIT_BAD_INPUT, EXIT_OK


@click.command("validate")
@click.argument("paths", nargs=-1, required=True)
@click.option("--format", "fmt", type=click.Choice(["text", "github"]), default="text",
              show_default=True,
              help="text: `file:line: message`; github: ::error workflow commands.")
@click.option("--require-guard", is_flag=True,
              help="A mergekit config without a guard: section is an error.")
def validate(paths: tuple[str, ...], fmt: str, require_guard: bool) -> None:
    """Check configs without loading a model: YAML syntax, mergekit's schema, the guard: schema,
    a task with probes for every model, local paths. One line per broken file; exit 2 if any.

    PATHS are files, globs or folders; YAML that is not a mergekit config is skipped.
    """
    from mergekit_collapse._console import one_line
    from mergekit_collapse.ci.discover import expand
    from mergekit_collapse.ci.github import annotation
    from mergekit_collapse.ci.results import Finding, display_path
    from mergekit_collapse.ci.validate import validate_file

    broken = 0
    for cand in expand(paths):
        problem = validate_file(cand.path, require_guard=require_guard)
        if not problem:  # None: valid; False: not a mergekit config
            continue
        broken += 1
        shown = display_path(cand.path)
        if fmt == "github":
            click.echo(annotation(Finding("error", "bad-config", "mergekit-collapse validate",
                                          problem.message, shown, problem.span)))
        else:
            click.echo(one_line(problem.line(shown)))  # a newline in a name: still one line
    sys.exit(EXIT_BAD_INPUT if broken else EXIT_OK)
