"""`mergekit-yaml config.yml OUT --guard ...`: the guard options on mergekit's own console script.

The `.pth` hook (`_mergekit_collapse_hook`) calls `install_guard` when mergekit imports
`mergekit.scripts.run_yaml`. Without any `--guard*` option mergekit's own code path runs,
untouched; with one, `mergekit_collapse.merge.guarded_merge` runs. The report goes to
`OUT/mergeability/` (and `--guard-report DIR`), where the card reads it.
"""

from __future__ import annotations

import functools
import logging
import sys
import typing
from typing import Any

import click

from mergekit_collapse.cli.options import (
    PREFIX,
    build,
    guard_overrides,
    guard_specs,
    runtime_options,
    runtime_specs,
)
from mergekit_collapse.errors import EXIT_INTERRUPTED, INTERRUPTED, CollapseError

LOG = logging.getLogger(__name__)

#: the help section of our options in mergekit's PrettyPrintHelp
HELP_CATEGORY = "Merge Guard (mergekit-collapse)"
#: marks a click command that already has the guard options
_INSTALLED = "_mergekit_collapse_guard"


def guard_click_options(*, switch: bool = True) -> list[click.Option]:
    """The `--guard-*` options shared by the mergekit-yaml hook, `merge` and `run` (see
    cli.options).

    Args:
        switch: include `--guard` itself (mergekit-yaml); `merge` always guards.

    Returns:
        New click.Option objects (a command owns its parameters, so build them per command).
    """
    opts = build(guard_specs(PREFIX) + runtime_specs("report", "merge_all", "cache_dir",
                                                     prefix=PREFIX))
    if switch:
        opts.insert(0, click.Option(
            ["--guard"], is_flag=True, default=False,
            help="Predict merging collapse first (mergekit-collapse); stop or re-organise the "
                 "merge when over budget. Any --guard-* option implies it."))
    return opts


GUARD_PARAM_NAMES = tuple(o.name for o in guard_click_options())


def wants_guard(params: dict[str, Any]) -> bool:
    """True when `--guard` or any `--guard-*` option was given."""
    # `is not`, not `in`: a budget of 0 is given (and then refused), not absent (0 == False)
    return any(params.get(n) is not None and params.get(n) is not False for n in GUARD_PARAM_NAMES)


def register_help_category(names: typing.Iterable[str]) -> None:
    """List our options under their own heading in mergekit's PrettyPrintHelp."""
    from mergekit.options import OPTION_CATEGORIES

    for name in names:
        OPTION_CATEGORIES.setdefault(name, HELP_CATEGORY)


def install_guard(module: Any) -> None:
    """Add the guard options to `module.main` (mergekit-yaml's click command); idempotent.

    Without any guard option the command runs mergekit's own callback with exactly the arguments
    it had before. Called by the `.pth` import hook, which logs and ignores any exception.

    Args:
        module: the imported `mergekit.scripts.run_yaml` module.

    Raises:
        TypeError: `module.main` is not a click command with a callback (an unknown mergekit).
        RuntimeError: mergekit already has an option with one of our names.
    """
    cmd = getattr(module, "main", None)
    if not isinstance(cmd, click.Command) or cmd.callback is None:
        raise TypeError("mergekit.scripts.run_yaml.main is not a click command")
    if getattr(cmd, _INSTALLED, False):
        return
    params = guard_click_options(switch=True)
    clash = {p.name for p in cmd.params} & {p.name for p in params}
    if clash:
        raise RuntimeError(f"mergekit-yaml already has options {sorted(clash)}")
    original = cmd.callback

    @functools.wraps(original)
    def callback(*args: Any, **kwargs: Any) -> Any:
        guard = {n: kwargs.pop(n, None) for n in GUARD_PARAM_NAMES}
        if not wants_guard(guard):
            return original(*args, **kwargs)  # plain mergekit, untouched
        return run_guarded_cli(kwargs["config_file"], kwargs["out_path"],
                               merge_options_from(kwargs), guard, switch=True)

    register_help_category(p.name for p in params)
    cmd.params.extend(params)
    cmd.callback = callback
    cmd.make_context = _one_line_usage(cmd.make_context)  # type: ignore[method-assign]
    setattr(cmd, _INSTALLED, True)


def _one_line_usage(make_context: Any) -> Any:
    """A bad value for one of OUR options is one line and exit 2 (click would print mergekit's
    usage block); mergekit's own options keep mergekit's behaviour."""

    @functools.wraps(make_context)
    def wrapper(*args: Any, **kwargs: Any) -> click.Context:
        try:
            return make_context(*args, **kwargs)
        except click.UsageError as e:
            param = getattr(e, "param", None)
            if param is None or param.name not in GUARD_PARAM_NAMES:
                raise
            click.echo(f"mergekit-collapse: {' '.join(e.format_message().split())}", err=True)
            sys.exit(e.exit_code)

    return wrapper


def merge_options_from(params: dict[str, Any]) -> Any:
    """mergekit's MergeOptions from a command's parameters, as `add_merge_options` builds it."""
    from mergekit.options import MergeOptions

    return MergeOptions(**{k: params[k] for k in MergeOptions.model_fields if k in params})


def run_guarded_cli(config_file: str, out_path: str, merge_options: Any, guard: dict[str, Any], *,
                    switch: bool) -> None:
    """The guarded path of a click command: `guarded_merge`, a summary, our exit codes.

    Args:
        config_file: the mergekit YAML. out_path: the output folder.
        merge_options: mergekit's MergeOptions.
        guard: the `--guard-*` values (by parameter name, `guard_budget`).
        switch: called from mergekit-yaml (print our errors here, as one line, and exit).

    Raises:
        CollapseError: from `mergekit-collapse merge` (its CLI group maps it to an exit code).
    """
    from mergekit_collapse.merge import guarded_merge, merge_runtime

    merge_options.apply_global_options()
    runtime = runtime_options(guard, PREFIX)
    try:
        result = guarded_merge(
            config_file, out_path, merge_options, report_dir=runtime.report,
            merge_all=runtime.merge_all,
            runtime=merge_runtime(merge_options, cache_dir=runtime.cache_dir),
            **guard_overrides(guard, PREFIX))
    except CollapseError as e:
        if not switch:
            raise
        click.echo(f"mergekit-collapse: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        if not switch:
            raise
        click.echo(f"mergekit-collapse: {INTERRUPTED}", err=True)
        sys.exit(EXIT_INTERRUPTED)
    click.echo(result.summary(), err=True)

