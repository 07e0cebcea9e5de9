"""Re-organising a task set the guard predicts to collapse: abort, warn, drop, split, replace,
order.

`get_action(name)` returns the registered action (`registry`); `register` (a class decorator) adds
one, and other packages add theirs through the `mergekit_collapse.actions` entry-point group, e.g.
in their pyproject.toml:
`[project.entry-points."mergekit_collapse.actions"] keep-best = "pkg.mod:KeepBest"`.
"""

from mergekit_collapse.actions.base import ActionContext, MergeJob, Reorganisation, ReorganiseAction
from mergekit_collapse.actions.builtin import Abort, Drop, Order, Replace, Split, Warn
from mergekit_collapse.actions.registry import ACTIONS, get_action, register

__all__ = ["ACTIONS", "Abort", "ActionContext", "Drop", "MergeJob", "Order", "Reorganisation",
           "ReorganiseAction", "Replace", "Split", "Warn", "get_action", "register"]
