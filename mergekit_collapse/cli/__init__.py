"""`mergekit-collapse`: a thin click layer over the API. Commands load lazily so `--help` stays
fast."""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any, NoReturn

import click

from mergekit_collapse import _console
from mergekit_collapse.errors import (
    EXIT_BAD_INPUT,
    EXIT_INTERRUPTED,
    EXIT_UNEXPECTED,
    INTERRUPTED,
    CollapseError,
)

#: command name -> ("module:attribute" of its click command, one-line help for `--help`);
#: `--help` reads the help from here and imports no command module (some import torch).
COMMANDS = {
    "check": ("mergekit_collapse.cli.check:check",
              "Predict collapse for mergekit configs: HiddenSim, MDS, exact bounds, verdict."),
    "validate": ("mergekit_collapse.cli.validate:validate",
                 "Fast config checks without a model (YAML, mergekit and guard schemas, paths)."),
    "schema": ("mergekit_collapse.cli.schema:schema",
               "Print the JSON Schema of the guard: section, report.json or the card metadata."),
    "merge": ("mergekit_collapse.cli.merge:merge",
              "Guard, re-organise if over budget, and merge with mergekit (mergekit-yaml flags)."),
    "evaluate": ("mergekit_collapse.cli.evaluate:evaluate",
                 "lm-eval on a merge and its constituents; merging loss (Eq. 1)."),
    "plan": ("mergekit_collapse.cli.plan:plan",
             "The best mergekit config of a pool of fine-tunes, found without labels."),
    "run": ("mergekit_collapse.cli.run:run",
            "guard -> merge -> evaluate -> card -> push, resumable."),
    "demo": ("mergekit_collapse.cli.demo:demo",
             "The offline demo on SmolLM2-135M and its task-adapter zoo."),
    "card": ("mergekit_collapse.cli.card:card", "Write the mergeability model card (README.md)."),
    "push": ("mergekit_collapse.cli.push:push", "Push a merged folder to the Hub in one commit."),
    "conflicts": ("mergekit_collapse.cli.conflicts:conflicts",
                  "Parameter-conflict metrics (Eqs. 4-7), pairwise, streamed."),
    "stats": ("mergekit_collapse.cli.stats:stats",
              "Correlation, AUROC and ANOVA of metrics against merging loss."),
    "calibrate": ("mergekit_collapse.cli.calibrate:calibrate",
                  "Fit the default budget and risk bands from merge records."),
    "zoo": ("mergekit_collapse.cli.zoo:zoo", "The demo's SmolLM2 task zoo: export, train, score."),
}


class LazyGroup(click.Group):
    """A click group whose commands are imported on first use; maps our errors to exit codes."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name][0].split(":")
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, COMMANDS[name][1]) for name in self.list_commands(ctx)])

    def make_context(self, info_name: str | None, args: list[str],
                     parent: click.Context | None = None, **extra: Any) -> click.Context:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as e:  # our own options (`mergekit-collapse --bogus`)
            usage_error(e)

    def invoke(self, ctx: click.Context):
        # before any command module is imported: tqdm reads TQDM_DISABLE on its first import
        _console.set_verbose(bool(ctx.params.get("verbose") or ctx.params.get("debug")))
        _console.quiet_tqdm()
        _console.quiet_third_party()
        try:
            return super().invoke(ctx)
        except CollapseError as e:
            if ctx.params.get("debug"):
                raise
            click.echo(f"error: {_console.one_line(str(e))}", err=True)
            sys.exit(e.exit_code)
        except click.UsageError as e:
            if ctx.params.get("debug"):
                raise
            usage_error(e)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            click.echo(INTERRUPTED, err=True)
            sys.exit(EXIT_INTERRUPTED)
        except Exception as e:  # noqa: BLE001 - last resort: one line, exit 1
            if ctx.params.get("debug"):
                raise
            click.echo(f"unexpected error: {type(e).__name__}: {_console.one_line(str(e))} "
                       "(rerun with --debug)", err=True)
            sys.exit(EXIT_UNEXPECTED)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--verbose", is_flag=True,
              help="Let the progress bars, warnings and logs of transformers, datasets, lm-eval, "
                   "huggingface_hub, accelerate and mergekit through.")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs (implies --verbose).")
@click.version_option(package_name="mergekit-collapse")
def main(verbose: bool, debug: bool) -> None:
    """Predict merging collapse from hidden-state geometry before you merge.

    Exit codes: 0 mergeable/ok, 1 unexpected error, 2 bad input or usage,
    3 the guard stopped the merge (over budget), 4 Hub error.
    """
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def usage_error(e: click.UsageError) -> NoReturn:
    """Print a usage error as one line (click prints the usage, a hint and the error) and exit 2;
    a command run without arguments still prints its help."""
    if isinstance(e, getattr(click.exceptions, "NoArgsIsHelpError", ())):
        raise e
    see = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
    click.echo(f"error: {' '.join(e.format_message().split())}{see}", err=True)
    sys.exit(e.exit_code)


def usage_exit_code() -> int:
    """click's usage errors already exit 2, which is our bad-input code."""
    return EXIT_BAD_INPUT
