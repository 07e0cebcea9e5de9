"""Click options generated from pydantic fields: one place per option.

The `guard:` settings a flag can override come from `GuardSettings` (and `Budget`): the help is
the field's description, the choices its `Literal` (the actions: `action_names()`, entry points
included), the type its annotation. The flags that are not `guard:` settings (device, dtype, cache
dir...) are the fields of `RuntimeOptions`. `check` takes them bare (`--budget`); `merge`, `run` and
the `mergekit-yaml` hook with the `guard-` prefix (`--guard-budget`). Every guard flag defaults to
None, so the YAML decides unless the flag is given.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import click
from pydantic import BaseModel, Field, ValidationError

from mergekit_collapse.guard.config import Budget, GuardSettings, action_names
from mergekit_collapse.runtime import Runtime

#: the `guard:` settings a flag overrides: option key -> (model, field). The keys are the keyword
#: arguments of `guard.assess.apply_overrides` (the budget's two fields have keys of their own).
GUARD_FLAGS: dict[str, tuple[type[BaseModel], str]] = {
    "budget": (Budget, "relative"),
    "absolute_budget": (Budget, "absolute"),
    "action": (GuardSettings, "action"),
    "weights": (GuardSettings, "weights"),
    "rehearse": (GuardSettings, "rehearse"),
    "layer": (GuardSettings, "layer"),
    "pooling": (GuardSettings, "pooling"),
    "k": (GuardSettings, "k"),
    "seed": (GuardSettings, "seed"),
    "jung_dim": (GuardSettings, "jung_dim"),
    "base": (GuardSettings, "base"),
}

#: the flags' prefix on the commands that also take mergekit's flags (merge, run, mergekit-yaml)
PREFIX = "guard-"

#: a click option before it is built: its declarations and keyword arguments
Spec = tuple[list[str], dict[str, Any]]


class RuntimeOptions(Runtime):
    """The runtime flags: `Runtime`'s fields (but `progress`, which is `--no-progress` here) and
    the flags that are neither `guard:` settings nor the runtime."""

    no_progress: bool = Field(default=False, description="no progress bars")
    report: Path | None = Field(default=None, description=(
        "also write report.json, report.md and hidden_sim.png here (always written to "
        "OUT/mergeability/ when something is merged)"))
    merge_all: bool = Field(default=False, description=(
        "split: merge every group into OUT/group-<k> (default: write their configs)"))
    num_processes: int = Field(default=1, ge=1, description=(
        "extract hidden states on N processes (accelerate launch: one GPU each, else CPU "
        "processes); the first reports"))

    def runtime(self) -> Runtime:
        """The `Runtime` these flags set."""
        fields = self.model_dump(include=set(Runtime.model_fields) - {"progress"})
        return Runtime(**fields, progress=not self.no_progress)


def _click_type(model: type[BaseModel], name: str) -> Any:
    """The click type of a field: a Choice for a Literal (and for the action), else the
    annotation."""
    if model is GuardSettings and name == "action":
        return click.Choice(action_names())
    ann = model.model_fields[name].annotation
    if typing.get_origin(ann) in (typing.Union, types.UnionType):  # `X | None`
        ann = next(a for a in typing.get_args(ann) if a is not type(None))
    if typing.get_origin(ann) is Literal:
        return click.Choice(typing.get_args(ann))
    if ann is Path:
        return click.Path(file_okay=False)
    return ann


def _names(key: str, prefix: str) -> list[str]:
    """`--guard-jung-dim` and its parameter name `guard_jung_dim`."""
    name = f"{prefix}{key}".replace("-", "_")
    return [f"--{name.replace('_', '-')}", name]


def guard_specs(prefix: str = "", only: tuple[str, ...] | None = None,
                **changes: dict) -> list[Spec]:
    """The flags that override `guard:` settings, generated from GuardSettings and Budget.

    Args:
        prefix: put before each flag and parameter name (`guard-`).
        only: these keys of GUARD_FLAGS (default: all).
        **changes: per key, click keyword arguments that replace the generated ones (demo's
            default).

    Returns:
        (declarations, click keyword arguments) per flag, in GUARD_FLAGS order.
    """
    specs = []
    for key, (model, name) in GUARD_FLAGS.items():
        if only is not None and key not in only:
            continue
        where = f"guard.budget.{name}" if model is Budget else f"guard.{name}"
        attrs = {"type": _click_type(model, name), "default": None,
                 "help": f"{where}: {model.model_fields[name].description}"}
        specs.append((_names(key, prefix), attrs | changes.get(key, {})))
    return specs


def runtime_specs(*keys: str, prefix: str = "") -> list[Spec]:
    """The flags of these RuntimeOptions fields, in the order given."""
    specs = []
    for key in keys:
        field = RuntimeOptions.model_fields[key]
        attrs: dict[str, Any] = {"default": field.default, "help": field.description}
        if field.annotation is bool:
            attrs["is_flag"] = True
        else:
            attrs["type"] = _click_type(RuntimeOptions, key)
            attrs["show_default"] = field.default is not None
        specs.append((_names(key, prefix), attrs))
    return specs


def build(specs: list[Spec]) -> list[click.Option]:
    """New click.Option objects (a command owns its parameters: build them per command)."""
    return [click.Option(decls, **attrs) for decls, attrs in specs]


def options(specs: list[Spec]) -> Callable[[Callable], Callable]:
    """A decorator adding these options to a click command, in order."""
    def decorate(f: Callable) -> Callable:
        for decls, attrs in reversed(specs):
            f = click.option(*decls, **attrs)(f)
        return f
    return decorate


def guard_overrides(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The `guard:` overrides among a command's values, as `apply_overrides` takes them.

    Only the given flags (not None): the YAML keeps every setting no flag names.
    """
    found = {key: params.get(_names(key, prefix)[1]) for key in GUARD_FLAGS}
    return {key: value for key, value in found.items() if value is not None}


def runtime_options(params: dict[str, Any], prefix: str = "") -> RuntimeOptions:
    """The RuntimeOptions among a command's values (a flag the command lacks keeps its default)."""
    found = {key: params[_names(key, prefix)[1]] for key in RuntimeOptions.model_fields
             if params.get(_names(key, prefix)[1]) is not None}
    try:
        return RuntimeOptions(**found)
    except ValidationError as e:
        err = e.errors()[0]
        raise click.BadParameter(err["msg"],
                                 param_hint=_names(str(err["loc"][0]), prefix)[0]) from None


def emit(text: str, out: Path | None) -> None:
    """Print `text`, or write it to `out` (parents created) and say where."""
    if out is None:
        click.echo(text, nl=False)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    click.echo(f"wrote {out}")
