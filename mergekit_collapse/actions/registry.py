"""The actions by name (the shape of mergekit's `merge_methods/registry.py`): the built-ins, those
`register` adds, and those of other packages (the `mergekit_collapse.actions` entry points)."""

from __future__ import annotations

from typing import TypeVar

from mergekit_collapse.actions.base import ReorganiseAction
from mergekit_collapse.actions.builtin import Abort, Drop, Order, Replace, Split, Warn
from mergekit_collapse.errors import ConfigError
from mergekit_collapse.guard.config import ACTION_ENTRY_POINTS, did_you_mean

#: the built-in actions, in the order `guard.config.BUILTIN_ACTIONS` lists their names
BUILTIN: tuple[type[ReorganiseAction], ...] = (Abort, Warn, Drop, Split, Replace, Order)
#: action name -> class; other packages add theirs through ACTION_ENTRY_POINTS
ACTIONS: dict[str, type[ReorganiseAction]] = {cls.name: cls for cls in BUILTIN}
_A = TypeVar("_A", bound=type[ReorganiseAction])


def register(cls: _A) -> _A:
    """Class decorator: make an action available under its `name`.

    Raises:
        ValueError: another action already has that name.
    """
    if cls.name in ACTIONS and ACTIONS[cls.name] is not cls:
        raise ValueError(f"action '{cls.name}' is already registered by {ACTIONS[cls.name]}")
    ACTIONS[cls.name] = cls
    return cls


def _load_entry_points() -> None:
    from importlib.metadata import entry_points

    for ep in entry_points(group=ACTION_ENTRY_POINTS):
        if ep.name not in ACTIONS:
            register(ep.load())


def get_action(name: str) -> ReorganiseAction:
    """An instance of the registered action `name` (built-in or from an entry point).

    Raises:
        ConfigError: no such action (with the nearest name, if one is close).
    """
    if name not in ACTIONS:
        _load_entry_points()
    if name not in ACTIONS:
        raise ConfigError(f"unknown action {name!r}{did_you_mean(name, list(ACTIONS))}; "
                          f"choose one of {', '.join(ACTIONS)}")
    return ACTIONS[name]()
