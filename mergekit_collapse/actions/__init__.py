"""Re-organising a task set the guard predicts to collapse: abort, warn, drop, split, replace, order.

`get_action(name)` returns the registered action; `register` (a class decorator) adds one, and other
packages add theirs through the `mergekit_collapse.actions` entry-point group, e.g. in their
pyproject.toml: `[project.entry-points."mergekit_collapse.actions"] keep-best = "pkg.mod:KeepBest"`.
"""

from mergekit_collapse.actions.base import (
    ACTIONS,
    ActionContext,
    ActionPlan,
    PlannedMerge,
    ReorganiseAction,
    get_action,
    register,
)
from mergekit_collapse.actions.builtin import Abort, Drop, Order, Replace, Split, Warn

__all__ = ["ACTIONS", "Abort", "Drop", "Order", "Replace", "Split", "Warn", "ActionContext", "ActionPlan", "PlannedMerge", "ReorganiseAction",
           "get_action", "register"]
