"""What an action sees and decides: its context, its outcome (the merges to run) and the base
class."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from mergekit_collapse.guard.decision import Verdict, flagged, worst
from mergekit_collapse.guard.report import Action, GuardReport

if TYPE_CHECKING:
    from mergekit.common import ModelReference

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
    refs: list[ModelReference]
    budget: float
    merge_method: str
    base: ModelReference | None = None
    vectors: Callable[[list[ModelReference]], np.ndarray] | None = None
    candidates: dict[str, list[str]] = field(default_factory=dict)
    candidate_refs: dict[str, ModelReference] = field(default_factory=dict)

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
        return (f"{m.display or m.name} (task {m.task}, MDS {mds}, "
                f"distortion {m.distortion_optimal:.4g})")

    def over(self) -> str:
        """Why the set is not mergeable, in one clause."""
        r, b = self.report, self.report.bounds
        if r.verdict == Verdict.UNASSESSED:
            return ("no validated signal vouches for this merge (no base model for the risk score, "
                    "no rehearsal); set guard.base, allow the rehearsal, or give an "
                    "explicit budget")
        if risky := flagged(r):
            return (f"predicted collapse: the calibrated {r.decided_by} signal puts "
                    f"{', '.join(r.models[i].task for i in risky)} in the collapse band; "
                    f"outlier {self.describe(worst(r))}")
        return (f"predicted collapse: r*² {b.exact:.4g} > budget {self.budget:.4g} "
                f"(decided by {r.decided_by}); outlier {self.describe(worst(r))}")


@dataclass
class MergeJob:
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
    members: list[ModelReference]
    changed: bool
    suffix: str
    merge: bool = True


@dataclass
class Reorganisation:
    """An action's decision: the merges to run (or a stop), and the records for the report."""

    records: list[Action] = field(default_factory=list)
    merges: list[MergeJob] = field(default_factory=list)
    multi_stage: str | None = None  # order: a mergekit-multi YAML (several documents)
    stop: str | None = None  # the guard stops the merge with this message


class ReorganiseAction:
    """Base class: one re-organisation of an over-budget task set (see `actions.registry`)."""

    name: ClassVar[str]
    description: ClassVar[str]

    def apply(self, ctx: ActionContext, *, merge_all: bool = False) -> Reorganisation:
        """Decide what to merge. A within-budget set is merged as written, whatever the action.

        Args:
            ctx: the report, the config and the distances.
            merge_all: merge every group/stage (split), not only write their configs.

        Returns:
            The merges to run (or a stop) and the records.
        """
        if ctx.report.verdict == Verdict.MERGEABLE:
            return Reorganisation(merges=[as_written(ctx)])
        if ctx.report.verdict == Verdict.UNASSESSED and self.name != "warn":
            return Reorganisation(records=[Action(action=self.name, changed="merge stopped",
                                              reason=ctx.over())],
                              stop=f"guard stopped the merge: {ctx.over()}")
        return self.reorganise(ctx, merge_all=merge_all)

    def reorganise(self, ctx: ActionContext, *, merge_all: bool) -> Reorganisation:
        """The action proper, for an over-budget set."""
        raise NotImplementedError


def as_written(ctx: ActionContext) -> MergeJob:
    return MergeJob(name="", raw=ctx.raw, members=list(ctx.refs), changed=False, suffix="")
