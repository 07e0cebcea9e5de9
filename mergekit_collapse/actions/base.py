"""What an action sees and decides: its context, its plan, the base class and the registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import numpy as np

from mergekit_collapse.guard.config import ACTION_ENTRY_POINTS as ENTRY_POINT_GROUP
from mergekit_collapse.guard.report import Action, GuardReport

# --------------------------------------------------------------------------------------------
# the actions
# --------------------------------------------------------------------------------------------


@dataclass
class ActionContext:
    """What an action may look at.

    Attributes:
        report: the guard's report for the config as written.
        raw: the mergekit YAML mapping as written (with its guard section).
        refs: the constituents' ModelReferences, in report order.
        budget: the absolute budget (report.budget.absolute).
        merge_method: the config's merge method.
        base: the base model's reference, or None.
        vectors: (refs) -> (N, P, d) hidden states of any extracted references (base, candidates).
        candidates: task name -> candidate reference texts (replace).
        candidate_refs: candidate reference text -> ModelReference.
    """

    report: GuardReport
    raw: dict
    refs: list[Any]
    budget: float
    merge_method: str
    base: Any | None = None
    vectors: Callable[[list[Any]], np.ndarray] | None = None
    candidates: dict[str, list[str]] = field(default_factory=dict)
    candidate_refs: dict[str, Any] = field(default_factory=dict)

    @property
    def sq(self) -> np.ndarray:
        """D of the constituents, from the report's drms."""
        return np.asarray(self.report.distances.rms, dtype=np.float64) ** 2

    @property
    def names(self) -> list[str]:
        """The constituents' names as the report lists them."""
        return self.report.names

    def shown(self, i: int) -> str:
        """Model i as messages show it: its display name (never an absolute local path)."""
        m = self.report.models[i]
        return m.display or m.name

    def describe(self, i: int) -> str:
        """`name` (task, MDS, distortion under α*): the numbers that say why a model was moved."""
        m = self.report.models[i]
        mds = "undefined" if m.mds is None else f"{m.mds:.3g}"
        return f"{m.display or m.name} (task {m.task}, MDS {mds}, distortion {m.distortion_optimal:.4g})"

    def flagged(self) -> list[int]:
        """The models the deciding per-model signal (risk or rehearsal) puts in its collapse band."""
        by = self.report.decided_by
        if by not in ("risk", "rehearsal"):
            return []
        return [i for i, m in enumerate(self.report.models) if m.signal(by)[0] == "collapse"]

    def worst(self) -> int:
        """The outlier: the first flagged model, else highest MDS, else highest distortion under
        the uniform average."""
        models = self.report.models
        if self.flagged():
            return self.flagged()[0]
        if all(m.mds is not None for m in models):
            return max(range(len(models)), key=lambda i: models[i].mds)
        return max(range(len(models)), key=lambda i: models[i].distortion_uniform)

    def over(self) -> str:
        """Why the set is not mergeable, in one clause."""
        r, b = self.report, self.report.bounds
        if r.verdict == "unassessed":
            return ("no validated signal vouches for this merge (no base model for the risk score, "
                    "no rehearsal); set guard.base, allow the rehearsal, or give an explicit budget")
        if self.flagged():
            return (f"predicted collapse: the calibrated {r.decided_by} signal puts "
                    f"{', '.join(r.models[i].task for i in self.flagged())} in the collapse band; "
                    f"outlier {self.describe(self.worst())}")
        return (f"predicted collapse: r*² {b.exact:.4g} > budget {self.budget:.4g} "
                f"(decided by {r.decided_by}); outlier {self.describe(self.worst())}")


@dataclass
class PlannedMerge:
    """One mergekit config to write and (maybe) merge.

    Attributes:
        name: "" for the main output, "group-<k>" for split groups.
        raw: the config mapping.
        members: the constituents (ModelReferences) it merges, for their α* weights.
        changed: False when it is the user's config as written.
        suffix: file-name suffix for the written config ("drop", "split-1", ...).
        merge: merge it (False: only written, e.g. split without --guard-merge-all).
    """

    name: str
    raw: dict
    members: list[Any]
    changed: bool
    suffix: str
    merge: bool = True


@dataclass
class ActionPlan:
    """An action's decision: the merges to run (or a stop), and the records for the report."""

    records: list[Action] = field(default_factory=list)
    merges: list[PlannedMerge] = field(default_factory=list)
    multi_stage: str | None = None  # order: a mergekit-multi YAML (several documents)
    stop: str | None = None  # the guard stops the merge with this message


class ReorganiseAction:
    """Base class: one re-organisation of an over-budget task set (see the registry `ACTIONS`)."""

    name: ClassVar[str]
    description: ClassVar[str]

    def plan(self, ctx: ActionContext, *, merge_all: bool = False) -> ActionPlan:
        """Decide what to merge. A within-budget set is merged as written, whatever the action.

        Args:
            ctx: the report, the config and the distances.
            merge_all: merge every group/stage (split), not only write their configs.

        Returns:
            The plan.
        """
        if ctx.report.verdict == "mergeable":
            return ActionPlan(merges=[as_written(ctx)])
        if ctx.report.verdict == "unassessed" and self.name != "warn":
            return ActionPlan(records=[Action(action=self.name, changed="merge stopped",
                                              reason=ctx.over())],
                              stop=f"guard stopped the merge: {ctx.over()}")
        return self.reorganise(ctx, merge_all=merge_all)

    def reorganise(self, ctx: ActionContext, *, merge_all: bool) -> ActionPlan:
        """The action proper, for an over-budget set."""
        raise NotImplementedError


def as_written(ctx: ActionContext) -> PlannedMerge:
    return PlannedMerge(name="", raw=ctx.raw, members=list(ctx.refs), changed=False, suffix="")




# --------------------------------------------------------------------------------------------
# the registry (cf. mergekit's merge_methods registry)
# --------------------------------------------------------------------------------------------

#: action name -> class; the built-ins register themselves, other packages through ENTRY_POINT_GROUP
ACTIONS: dict[str, type[ReorganiseAction]] = {}
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

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in ACTIONS:
            register(ep.load())


def get_action(name: str) -> ReorganiseAction:
    """An instance of the registered action `name` (built-in or from an entry point).

    Raises:
        KeyError: no such action.
    """
    import mergekit_collapse.actions.builtin  # noqa: F401 - registers the built-ins

    if name not in ACTIONS:
        _load_entry_points()
    return ACTIONS[name]()
