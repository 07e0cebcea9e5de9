"""`mergekit-collapse merge CONFIG OUT [mergekit-yaml options] [--guard-* options]`: guard, then
merge.

The same as `mergekit-yaml CONFIG OUT --guard ...`: mergekit's own `add_merge_options` gives every
mergekit-yaml flag, the `--guard-*` flags come from `cli.options` (generated from the `guard:`
model), and `mergekit_collapse.merge.guarded_merge` does the work. The mergekit options are built
on first use, so `mergekit-collapse --help` does not import mergekit (and torch).
"""

from __future__ import annotations

from typing import Any

import click

HELP = ("Run the guard on CONFIG, then merge into OUT with mergekit's run_merge (or stop, exit 3, "
        "or re-organise the models per --guard-action). Takes every mergekit-yaml option.")


def _merge(merge_options: Any, config_file: str, out_path: str, **guard: Any) -> None:
    """The command body: every option reaches `guarded_merge`."""
    from mergekit_collapse.cli.mergekit_yaml import run_guarded_cli

    run_guarded_cli(config_file, out_path, merge_options, guard, switch=False)


class MergeCommand(click.Command):
    """A click command whose mergekit options are attached on first use (parse or help)."""

    def __init__(self) -> None:
        super().__init__("merge", callback=None, params=[], help=HELP,
                         short_help="Guard, then merge with mergekit (every mergekit-yaml option).")
        self._built = False

    def _build(self) -> None:
        if self._built:
            return
        from mergekit.options import add_merge_options

        from mergekit_collapse.cli.mergekit_yaml import guard_click_options, register_help_category

        guard = guard_click_options(switch=False)
        register_help_category(p.name for p in guard)
        self.callback = add_merge_options(_merge)
        self.params = [click.Argument(["config_file"], type=click.Path(dir_okay=False)),
                       click.Argument(["out_path"], type=click.Path(file_okay=False)),
                       *reversed(self.callback.__click_params__), *guard]
        self._built = True

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        self._build()
        return super().get_params(ctx)

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from mergekit.options import PrettyPrintHelp

        self._build()
        PrettyPrintHelp.format_options(self, ctx, formatter)  # mergekit's categorised help


merge = MergeCommand()
