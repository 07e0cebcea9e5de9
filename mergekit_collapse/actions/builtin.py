"""The built-in actions: abort, warn, drop, split, replace, order (listed in `actions.registry`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from mergekit_collapse.actions.base import (
    ActionContext,
    MergeJob,
    Reorganisation,
    ReorganiseAction,
    as_written,
)
from mergekit_collapse.actions.grouping import (
    PAIRWISE_METHODS,
    best_replacement,
    clique_cover,
    largest_within_budget,
    merge_tree,
    within,
)
from mergekit_collapse.actions.rewrite import (
    model_lists,
    multi_stage_config,
    replace_config,
    subset_config,
)
from mergekit_collapse.guard import geometry
from mergekit_collapse.guard.config import parse_ref
from mergekit_collapse.guard.decision import DecidedBy, Verdict, flagged, worst
from mergekit_collapse.guard.report import Action


class Abort(ReorganiseAction):
    """Stop: exit 3 with the report, before mergekit writes anything."""

    name = "abort"
    description = "stop the merge (exit 3) and leave no output"

    def reorganise(self, ctx: ActionContext, *, merge_all: bool) -> Reorganisation:
        reason = ctx.over()
        return Reorganisation(
            records=[Action(action=self.name, changed="merge stopped; no output written",
                            reason=reason, models=[ctx.names[worst(ctx.report)]])],
            stop=f"guard stopped the merge: {reason}")


class Warn(ReorganiseAction):
    """Merge anyway; the report says the predicted risk."""

    name = "warn"
    description = "merge as written; the report records the predicted collapse"

    def reorganise(self, ctx: ActionContext, *, merge_all: bool) -> Reorganisation:
        return Reorganisation(
            records=[Action(action=self.name, changed="nothing: merged as written",
                            reason=ctx.over(), models=[ctx.names[worst(ctx.report)]])],
            merges=[as_written(ctx)])


class Drop(ReorganiseAction):
    """Keep the largest subset within budget (maximum clique, confirmed with the exact radius)."""

    name = "drop"
    description = "merge the largest subset of models within budget"

    def reorganise(self, ctx: ActionContext, *, merge_all: bool) -> Reorganisation:
        if flagged(ctx.report):
            return self._drop_risky(ctx)
        grp = largest_within_budget(ctx.sq, ctx.budget)
        if len(grp.members) < 2:
            return Reorganisation(
                records=[Action(action=self.name, changed="nothing: no two models fit the budget",
                                reason=ctx.over())],
                stop=f"guard stopped the merge: no pair of models is within budget; {ctx.over()}")
        dropped = [i for i in range(len(ctx.refs)) if i not in grp.members]
        kept = [ctx.refs[i] for i in grp.members]
        raw = subset_config(ctx.raw, kept)
        records = [Action(
            action=self.name, changed=f"dropped {ctx.shown(i)}",
            reason=(f"{ctx.describe(i)} is outside the largest within-budget subset; the kept "
                    f"{len(kept)} models have r*² {grp.radius_sq:.4g} ≤ budget {ctx.budget:.4g} "
                    f"(was {ctx.report.bounds.exact:.4g})"),
            models=[ctx.names[i]]) for i in dropped]
        return Reorganisation(records=records, merges=[MergeJob(
            name="", raw=raw, members=kept, changed=True, suffix=self.name)])


    def _drop_risky(self, ctx: ActionContext) -> Reorganisation:
        """A risk or rehearsal verdict: drop the models the deciding signal puts in its collapse
        band."""
        models, r = ctx.report.models, ctx.report
        risky = flagged(ctx.report)
        kept = [ctx.refs[i] for i in range(len(models)) if i not in risky]
        info = r.rehearsal if r.decided_by == DecidedBy.REHEARSAL else r.risk
        score = info.score if info is not None else "risk score"
        records = [Action(
            action=self.name, changed=f"dropped {ctx.shown(i)}",
            reason=(f"{ctx.describe(i)}: {score} {models[i].signal(r.decided_by)[1]:.3g} is in "
                    f"the calibrated collapse band"), models=[ctx.names[i]]) for i in risky]
        if len(kept) < 2:
            return Reorganisation(records=records,
                                  stop="guard stopped the merge: fewer than two models "
                                       "are outside the collapse band")
        return Reorganisation(records=records, merges=[MergeJob(
            name="", raw=subset_config(ctx.raw, kept), members=kept, changed=True,
            suffix=self.name)])


class Split(ReorganiseAction):
    """Fewest groups each within budget (a clique cover); one mergekit config per group."""

    name = "split"
    description = "one config per within-budget group (merge them with --guard-merge-all)"

    def reorganise(self, ctx: ActionContext, *, merge_all: bool) -> Reorganisation:
        groups = clique_cover(ctx.sq, ctx.budget)
        outcome = Reorganisation()
        for k, grp in enumerate(groups, start=1):
            kept = [ctx.refs[i] for i in grp.members]
            outcome.merges.append(MergeJob(
                name=f"group-{k}", raw=subset_config(ctx.raw, kept), members=kept, changed=True,
                suffix=f"split-{k}", merge=merge_all))
            outcome.records.append(Action(
                action=self.name,
                changed=f"group-{k}: {', '.join(ctx.shown(i) for i in grp.members)}",
                reason=(f"group {k} of {len(groups)} (fewest within-budget groups found): r*² "
                        f"{grp.radius_sq:.4g} ≤ budget {ctx.budget:.4g}; the whole set is over: "
                        f"{ctx.over()}"),
                models=[ctx.names[i] for i in grp.members]))
        return outcome


class Replace(ReorganiseAction):
    """Swap constituents for candidate checkpoints of the same task (guard.candidates)."""

    name = "replace"
    description = "swap models for guard.candidates of the same task, smallest r*² within budget"

    def reorganise(self, ctx: ActionContext, *, merge_all: bool) -> Reorganisation:
        if not ctx.candidates:
            return Reorganisation(stop="guard stopped the merge: action 'replace' needs "
                                       f"guard.candidates ({{task: [model, ...]}}); {ctx.over()}",
                              records=[Action(action=self.name, changed="nothing: no candidates",
                                              reason=ctx.over())])
        if ctx.vectors is None:
            raise ValueError("replace needs the candidates' hidden states")
        points = list(ctx.refs)
        texts: dict[int, str] = {}
        slots: list[list[int]] = []
        for i, m in enumerate(ctx.report.models):
            slot = [i]
            for text in ctx.candidates.get(m.task, []):
                texts[len(points)] = text
                slot.append(len(points))
                points.append(ctx.candidate_refs[text])
            slots.append(slot)
        sq = geometry.pairwise_distances(ctx.vectors(points)).sq
        best = best_replacement(sq, slots)
        chosen = [next(p for p in best.members if p in slot) for slot in slots]
        swaps = {ctx.refs[i]: texts[p] for i, p in enumerate(chosen) if p != i}
        if not within(best.radius_sq, ctx.budget):
            return Reorganisation(
                records=[Action(action=self.name, changed="nothing: no combination fits",
                                reason=f"best combination has r*² {best.radius_sq:.4g} > budget "
                                       f"{ctx.budget:.4g}; {ctx.over()}")],
                stop=(f"guard stopped the merge: no candidate combination is within budget (best "
                      f"r*² {best.radius_sq:.4g} > {ctx.budget:.4g}); {ctx.over()}"))
        raw = replace_config(ctx.raw, swaps)
        records = [Action(
            action=self.name, changed=f"replaced {ctx.shown(i)} with {texts[p]}",
            reason=(f"{ctx.describe(i)} swapped for a candidate of the same task: the set's r*² "
                    f"goes from {ctx.report.bounds.exact:.4g} to {best.radius_sq:.4g} ≤ budget "
                    f"{ctx.budget:.4g} (the smallest of {int(np.prod([len(s) for s in slots]))} "
                    f"combinations)"),
            models=[ctx.names[i], texts[p]]) for i, p in enumerate(chosen) if p != i]
        members = [parse_ref(texts[p]) if p != i else ctx.refs[i] for i, p in enumerate(chosen)]
        return Reorganisation(records=records, merges=[MergeJob(
            name="", raw=raw, members=members, changed=True, suffix=self.name)])


class Order(ReorganiseAction):
    """Merge pairwise, closest first (agglomerative tree), as a mergekit-multi config."""

    name = "order"
    description = "pairwise merges, closest first, as a multi-stage (mergekit-multi) config"

    def apply(self, ctx: ActionContext, *, merge_all: bool = False) -> Reorganisation:
        """Also orders a within-budget set when the method is pairwise and has more than two models
        (mergekit cannot run such a config in one go)."""
        points = self.points(ctx)
        pairwise = ctx.merge_method in PAIRWISE_METHODS
        if ctx.report.verdict == Verdict.MERGEABLE and not (pairwise and len(points) > 2):
            return Reorganisation(merges=[as_written(ctx)])
        return self.reorganise(ctx, merge_all=merge_all)

    def points(self, ctx: ActionContext) -> list[Any]:
        """The models to order: the constituents, plus the base when it is also listed (slerp)."""
        listed = {parse_ref(e.get("model")) for entries in model_lists(ctx.raw)
                  for e in entries if isinstance(e, dict)}
        if ctx.base is not None and ctx.base in listed and ctx.base not in ctx.refs:
            return [ctx.base, *ctx.refs]
        return list(ctx.refs)

    def reorganise(self, ctx: ActionContext, *, merge_all: bool) -> Reorganisation:
        points = self.points(ctx)
        if len(points) < 2:
            return Reorganisation(merges=[as_written(ctx)])
        if len(points) == len(ctx.refs):
            sq = ctx.sq
        else:
            if ctx.vectors is None:
                raise ValueError("order needs the base model's hidden states")
            sq = geometry.pairwise_distances(ctx.vectors(points)).sq
        stages = merge_tree(sq)
        text = multi_stage_config(ctx.raw, points, stages)
        label = {i: str(p) for i, p in enumerate(points)}
        records = []
        for k, st in enumerate(stages, start=1):
            label[st.node] = "final" if k == len(stages) else f"stage-{k}"
            records.append(Action(
                action=self.name,
                changed=f"{label[st.node]} = {label[st.left]} + {label[st.right]}",
                reason=(f"closest pair left (drms {st.distance:.4g}, pair r*² "
                        f"{st.distance ** 2 / 4:.4g} vs budget {ctx.budget:.4g}); sizes "
                        f"{st.left_size}+{st.right_size} weight the merge to the group average"),
                models=[label[st.left], label[st.right]]))
        return Reorganisation(records=records, multi_stage=text)


