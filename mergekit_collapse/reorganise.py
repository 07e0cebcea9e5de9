"""Re-organising a task set that is over budget (DESIGN.md): abort, warn, drop, split, replace, order.

Each action is one small class in the `ACTIONS` registry (the shape of mergekit's merge-method
registry). An action reads the guard's report and the squared distances D_ij = drms(i,j)² of the
constituents, and returns an `ActionPlan`: the mergekit configs to write and merge, and the
`Action` records that say what changed and why.

The graph and clustering work is pure (numpy, networkx, scipy; no torch, no I/O) and works on D
alone. Models i, j are *compatible* when their pair alone is within budget: the pair's own
minimum-enclosing-ball radius is r*² = D_ij / 4 (Theorem 1 ii is tight for two points). Every group
a graph algorithm proposes is then confirmed with the exact radius of the group
(`geometry.enclosing_ball` on the sub-matrix of D): pairwise compatibility is necessary, not
sufficient (three points at mutual distance s have r*² = s²/3 > s²/4).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from mergekit_collapse import geometry
from mergekit_collapse.report import Action, GuardReport
from mergekit_collapse.weights import _TASK_FAMILY as TASK_FAMILY

#: exact radii within this relative margin of the budget count as within it (solver round-off)
BUDGET_RTOL = 1e-9
#: give up enumerating sub-cliques / replacement combinations beyond this many candidates
MAX_ENUMERATION = 50_000
#: methods that take exactly two models, so a larger set needs a merge order (multi-stage)
PAIRWISE_METHODS = frozenset({"slerp", "nuslerp"})


# --------------------------------------------------------------------------------------------
# pure functions over D (squared drms distances) and a budget (squared hidden-state units)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Group:
    """A set of constituents (indices into D) with its exact radius and optimal weights."""

    members: tuple[int, ...]
    radius_sq: float  # r*² of the group: its best convex merge's worst-case distortion
    weights: np.ndarray  # α* of the group, in `members` order


def within(value: float, budget: float) -> bool:
    """value ≤ budget, allowing solver round-off (BUDGET_RTOL)."""
    return value <= budget * (1.0 + BUDGET_RTOL)


def confirm(sq: np.ndarray, members: Sequence[int]) -> Group:
    """The exact radius r*² and weights α* of a subset (enclosing ball of the sub-matrix of D).

    Args:
        sq: N x N squared distances D.
        members: indices of the subset.

    Returns:
        The Group.
    """
    idx = tuple(sorted(int(i) for i in members))
    ball = geometry.enclosing_ball(np.asarray(sq, dtype=np.float64)[np.ix_(idx, idx)])
    return Group(idx, float(ball.radius_sq), np.asarray(ball.weights))


def compatibility_graph(sq: np.ndarray, budget: float) -> Any:
    """networkx Graph on 0..N-1 with an edge i–j when the pair alone is within budget (D_ij/4).

    Args:
        sq: N x N squared distances D.
        budget: the distortion budget (absolute, squared hidden-state units).

    Returns:
        The undirected compatibility graph.
    """
    import networkx as nx

    d = np.asarray(sq, dtype=np.float64)
    g = nx.Graph()
    g.add_nodes_from(range(d.shape[0]))
    for i, j in itertools.combinations(range(d.shape[0]), 2):
        if within(d[i, j] / 4.0, budget):
            g.add_edge(i, j)
    return g


def _cliques_of_size(maximal: list[tuple[int, ...]], size: int) -> list[tuple[int, ...]]:
    """Every clique of exactly `size` nodes: the size-subsets of the maximal cliques, deduplicated."""
    found: set[tuple[int, ...]] = set()
    for clique in maximal:
        if len(clique) < size:
            continue
        if len(clique) == size:
            found.add(clique)
            continue
        for sub in itertools.combinations(clique, size):
            found.add(sub)
            if len(found) > MAX_ENUMERATION:
                return sorted(found)
    return sorted(found)


def largest_within_budget(sq: np.ndarray, budget: float, *,
                          nodes: Sequence[int] | None = None) -> Group:
    """The largest subset within budget: a maximum clique of the compatibility graph, confirmed exactly.

    Cliques are tried from the largest size down; among the cliques of one size that pass the exact
    check, the one with the smallest r*² wins (ties: the one listed first in the config). A single
    model always passes (r*² = 0).

    Args:
        sq: N x N squared distances D.
        budget: the distortion budget (absolute).
        nodes: restrict to these indices (default: all).

    Returns:
        The chosen Group.
    """
    import networkx as nx

    g = compatibility_graph(sq, budget)
    if nodes is not None:
        g = g.subgraph(list(nodes)).copy()
    if g.number_of_nodes() == 0:
        raise ValueError("no models to choose from")
    maximal = sorted(tuple(sorted(c)) for c in nx.find_cliques(g))
    for size in range(max(len(c) for c in maximal), 0, -1):
        passing = [grp for c in _cliques_of_size(maximal, size)
                   if within((grp := confirm(sq, c)).radius_sq, budget)]
        if passing:
            # radii equal up to round-off tie: then the first in config order
            return min(passing, key=lambda grp: (round(grp.radius_sq / budget, 9), grp.members))
    raise AssertionError("unreachable: a single model is always within budget")


def clique_cover(sq: np.ndarray, budget: float) -> list[Group]:
    """Few groups, each within budget, covering every model: a clique cover of the compatibility graph.

    A clique cover of G is a colouring of its complement; networkx's greedy colourings are tried
    with several strategies and the one with fewest colours kept (a heuristic: the minimum cover is
    NP-hard). Each colour class is then confirmed with its exact radius; a class that fails is split
    by taking its largest within-budget subset repeatedly.

    Args:
        sq: N x N squared distances D.
        budget: the distortion budget (absolute).

    Returns:
        The groups, ordered by their first member.
    """
    import networkx as nx

    g = compatibility_graph(sq, budget)
    complement = nx.complement(g)
    best: dict[int, int] | None = None
    for strategy in ("largest_first", "smallest_last", "independent_set", "DSATUR",
                     "connected_sequential_bfs"):
        colouring = nx.greedy_color(complement, strategy=strategy)
        if best is None or len(set(colouring.values())) < len(set(best.values())):
            best = colouring
    classes: dict[int, list[int]] = {}
    for node, colour in sorted((best or {}).items()):
        classes.setdefault(colour, []).append(node)
    groups: list[Group] = []
    for members in classes.values():
        remaining = sorted(members)
        while remaining:
            grp = confirm(sq, remaining)
            if not within(grp.radius_sq, budget):
                grp = largest_within_budget(sq, budget, nodes=remaining)
            groups.append(grp)
            remaining = [i for i in remaining if i not in grp.members]
    return sorted(groups, key=lambda grp: grp.members)


def best_replacement(sq: np.ndarray, slots: Sequence[Sequence[int]]) -> Group:
    """The choice of one point per slot whose set has the smallest exact radius r*².

    Args:
        sq: squared distances between every point (constituents and candidates).
        slots: per constituent, the indices it may be (its own index first, then its candidates).

    Returns:
        The best Group; `members` sorted, so map back through `slots` (each index is in one slot).

    Raises:
        ValueError: more than MAX_ENUMERATION combinations.
    """
    count = int(np.prod([len(s) for s in slots]))
    if count > MAX_ENUMERATION:
        raise ValueError(f"{count} replacement combinations; at most {MAX_ENUMERATION} are tried")
    best: Group | None = None
    for choice in itertools.product(*slots):
        grp = confirm(sq, choice)
        # strict <: ties keep the earlier combination, i.e. the fewest replacements
        if best is None or grp.radius_sq < best.radius_sq * (1.0 - BUDGET_RTOL):
            best = grp
    assert best is not None
    return best


@dataclass(frozen=True)
class Stage:
    """One pairwise merge of an agglomerative plan; nodes < N are models, node N+k is stage k."""

    left: int
    right: int
    node: int
    distance: float  # drms between the two sides (their size-weighted centroids for clusters)
    left_size: int
    right_size: int


def merge_tree(sq: np.ndarray) -> list[Stage]:
    """An agglomerative merge plan that merges the closest first (scipy.cluster.hierarchy).

    Centroid linkage on drms: under LMC the merge of two groups with size-proportional weights sits
    at their centroid, so the next distance is exactly the distance to that merged model (valid
    because D is a Euclidean distance matrix).

    Args:
        sq: N x N squared distances D (N ≥ 2).

    Returns:
        N − 1 stages in execution order; the last one produces the final model.
    """
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import squareform

    d = np.sqrt(np.maximum(np.asarray(sq, dtype=np.float64), 0.0))
    n = d.shape[0]
    if n < 2:
        raise ValueError("a merge order needs at least two models")
    np.fill_diagonal(d, 0.0)
    z = linkage(squareform(d, checks=False), method="centroid")
    sizes = {i: 1 for i in range(n)}
    stages = []
    for k, (a, b, dist, count) in enumerate(z):
        a, b = int(a), int(b)
        left, right = (a, b) if min(_leaves(a, z, n)) < min(_leaves(b, z, n)) else (b, a)
        stages.append(Stage(left=left, right=right, node=n + k, distance=float(dist),
                            left_size=sizes[left], right_size=sizes[right]))
        sizes[n + k] = int(count)
    return stages


def _leaves(node: int, z: np.ndarray, n: int) -> list[int]:
    if node < n:
        return [node]
    a, b = int(z[node - n, 0]), int(z[node - n, 1])
    return _leaves(a, z, n) + _leaves(b, z, n)


# --------------------------------------------------------------------------------------------
# mergekit config rewriting (plain YAML mappings, as the user wrote them)
# --------------------------------------------------------------------------------------------


def parse_ref(value: Any) -> Any | None:
    """A mergekit ModelReference from a config value (string or mapping), or None if it is not one."""
    from mergekit.common import ModelReference

    try:
        return ModelReference.model_validate(value)
    except Exception:  # noqa: BLE001 - pydantic/ValueError: not a model reference
        return None


def _model_lists(raw: dict) -> list[list]:
    """Every list of `{model: ...}` entries in a mergekit config: models, slice sources, modules."""
    lists = []
    if isinstance(raw.get("models"), list):
        lists.append(raw["models"])
    for s in raw.get("slices") or []:
        if isinstance(s, dict) and isinstance(s.get("sources"), list):
            lists.append(s["sources"])
    for mod in (raw.get("modules") or {}).values():
        if isinstance(mod, dict):
            sub = {"models": mod.get("models"), "slices": mod.get("slices")}
            lists.extend(_model_lists(sub))
    return lists


def _entries_of(raw: dict, refs: Any) -> list[tuple[dict, Any]]:
    """(entry, its ModelReference) for every `{model: ...}` entry whose reference is in `refs`."""
    return [(e, ref) for entries in _model_lists(raw) for e in entries
            if isinstance(e, dict) and (ref := parse_ref(e.get("model"))) in refs]


def subset_config(raw: dict, keep: Sequence[Any]) -> dict:
    """The config restricted to the kept constituents (base model, dtype, parameters unchanged).

    The base model stays wherever it is listed; `guard.tasks` and `guard.candidates` keep only the
    kept models' entries.

    Args:
        raw: the mergekit YAML mapping (with its `guard:` section).
        keep: the ModelReferences to keep.

    Returns:
        A new mapping.
    """
    out = copy.deepcopy(raw)
    base = parse_ref(out.get("base_model")) if out.get("base_model") is not None else None
    kept = set(keep) | ({base} if base is not None else set())
    for entries in _model_lists(out):
        entries[:] = [e for e in entries
                      if not (isinstance(e, dict) and parse_ref(e.get("model")) not in kept)]
    guard = out.get("guard")
    if isinstance(guard, dict):
        tasks = guard.get("tasks") or {}
        guard["tasks"] = {k: v for k, v in tasks.items() if parse_ref(k) in kept}
        names = {_task_name(v) for v in guard["tasks"].values()}
        if guard.get("candidates"):
            guard["candidates"] = {t: c for t, c in guard["candidates"].items() if t in names}
    return out


def _task_name(spec: Any) -> str | None:
    return spec.get("name") if isinstance(spec, dict) else None


def replace_config(raw: dict, mapping: dict[Any, str]) -> dict:
    """The config with constituents swapped: `mapping` old ModelReference -> new reference text.

    The new model keeps the old one's per-model parameters and its `guard.tasks` entry; the used
    candidate leaves `guard.candidates` and the replaced model joins it (so a re-run can swap back).

    Args:
        raw: the mergekit YAML mapping.
        mapping: old reference -> the candidate, as written in guard.candidates.

    Returns:
        A new mapping.
    """
    out = copy.deepcopy(raw)
    for e, ref in _entries_of(out, mapping):
        e["model"] = mapping[ref]
    guard = out.get("guard")
    if isinstance(guard, dict):
        tasks = {}
        for key, spec in (guard.get("tasks") or {}).items():
            ref = parse_ref(key)
            new = mapping.get(ref)
            tasks[new if new is not None else key] = spec
            if new is not None and guard.get("candidates"):
                name = _task_name(spec)
                pool = [c for c in guard["candidates"].get(name, []) if c != new]
                guard["candidates"][name] = [key, *pool]
        guard["tasks"] = tasks
    return out


def weights_config(raw: dict, weights: dict[Any, float]) -> dict:
    """The config with each constituent's `weight:` set (per-model parameters), e.g. to α*.

    Args:
        raw: the mergekit YAML mapping.
        weights: ModelReference -> weight.

    Returns:
        A new mapping.
    """
    out = copy.deepcopy(raw)
    for e, ref in _entries_of(out, weights):
        params = e.get("parameters") if isinstance(e.get("parameters"), dict) else {}
        e["parameters"] = {**params, "weight": round(float(weights[ref]), 6)}
    return out


def dump_config(raw: dict) -> str:
    """YAML text of a config mapping, keys in their original order."""
    import yaml

    return yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)


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

    def describe(self, i: int) -> str:
        """`name` (task, MDS, distortion under α*): the numbers that say why a model was moved."""
        m = self.report.models[i]
        mds = "undefined" if m.mds is None else f"{m.mds:.3g}"
        return f"{m.name} (task {m.task}, MDS {mds}, distortion {m.distortion_optimal:.4g})"

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
            return ActionPlan(merges=[_as_written(ctx)])
        if ctx.report.verdict == "unassessed" and self.name != "warn":
            return ActionPlan(records=[Action(action=self.name, changed="merge stopped",
                                              reason=ctx.over())],
                              stop=f"guard stopped the merge: {ctx.over()}")
        return self.reorganise(ctx, merge_all=merge_all)

    def reorganise(self, ctx: ActionContext, *, merge_all: bool) -> ActionPlan:
        """The action proper, for an over-budget set."""
        raise NotImplementedError


def _as_written(ctx: ActionContext) -> PlannedMerge:
    return PlannedMerge(name="", raw=ctx.raw, members=list(ctx.refs), changed=False, suffix="")


class Abort(ReorganiseAction):
    """Stop: exit 3 with the report, before mergekit writes anything."""

    name = "abort"
    description = "stop the merge (exit 3) and leave no output"

    def reorganise(self, ctx: ActionContext, *, merge_all: bool) -> ActionPlan:
        reason = ctx.over()
        return ActionPlan(
            records=[Action(action=self.name, changed="merge stopped; no output written",
                            reason=reason, models=[ctx.names[ctx.worst()]])],
            stop=f"guard stopped the merge: {reason}")


class Warn(ReorganiseAction):
    """Merge anyway; the report says the predicted risk."""

    name = "warn"
    description = "merge as written; the report records the predicted collapse"

    def reorganise(self, ctx: ActionContext, *, merge_all: bool) -> ActionPlan:
        return ActionPlan(
            records=[Action(action=self.name, changed="nothing: merged as written",
                            reason=ctx.over(), models=[ctx.names[ctx.worst()]])],
            merges=[_as_written(ctx)])


class Drop(ReorganiseAction):
    """Keep the largest subset within budget (maximum clique, confirmed with the exact radius)."""

    name = "drop"
    description = "merge the largest subset of models within budget"

    def reorganise(self, ctx: ActionContext, *, merge_all: bool) -> ActionPlan:
        if ctx.flagged():
            return self._drop_risky(ctx)
        grp = largest_within_budget(ctx.sq, ctx.budget)
        if len(grp.members) < 2:
            return ActionPlan(
                records=[Action(action=self.name, changed="nothing: no two models fit the budget",
                                reason=ctx.over())],
                stop=f"guard stopped the merge: no pair of models is within budget; {ctx.over()}")
        dropped = [i for i in range(len(ctx.refs)) if i not in grp.members]
        kept = [ctx.refs[i] for i in grp.members]
        raw = subset_config(ctx.raw, kept)
        records = [Action(
            action=self.name, changed=f"dropped {ctx.names[i]}",
            reason=(f"{ctx.describe(i)} is outside the largest within-budget subset; the kept "
                    f"{len(kept)} models have r*² {grp.radius_sq:.4g} ≤ budget {ctx.budget:.4g} "
                    f"(was {ctx.report.bounds.exact:.4g})"),
            models=[ctx.names[i]]) for i in dropped]
        return ActionPlan(records=records, merges=[PlannedMerge(
            name="", raw=raw, members=kept, changed=True, suffix=self.name)])


    def _drop_risky(self, ctx: ActionContext) -> ActionPlan:
        """A risk or rehearsal verdict: drop the models the deciding signal puts in its collapse band."""
        models, r = ctx.report.models, ctx.report
        risky = ctx.flagged()
        kept = [ctx.refs[i] for i in range(len(models)) if i not in risky]
        info = r.risk if r.decided_by == "risk" else r.rehearsal
        score = info.score if info is not None else "risk score"
        records = [Action(
            action=self.name, changed=f"dropped {ctx.names[i]}",
            reason=(f"{ctx.describe(i)}: {score} {models[i].signal(r.decided_by)[1]:.3g} is in "
                    f"the calibrated collapse band"), models=[ctx.names[i]]) for i in risky]
        if len(kept) < 2:
            return ActionPlan(records=records, stop="guard stopped the merge: fewer than two models "
                                                    "are outside the collapse band")
        return ActionPlan(records=records, merges=[PlannedMerge(
            name="", raw=subset_config(ctx.raw, kept), members=kept, changed=True, suffix=self.name)])


class Split(ReorganiseAction):
    """Fewest groups each within budget (a clique cover); one mergekit config per group."""

    name = "split"
    description = "one config per within-budget group (merge them with --guard-merge-all)"

    def reorganise(self, ctx: ActionContext, *, merge_all: bool) -> ActionPlan:
        groups = clique_cover(ctx.sq, ctx.budget)
        plan = ActionPlan()
        for k, grp in enumerate(groups, start=1):
            kept = [ctx.refs[i] for i in grp.members]
            plan.merges.append(PlannedMerge(
                name=f"group-{k}", raw=subset_config(ctx.raw, kept), members=kept, changed=True,
                suffix=f"split-{k}", merge=merge_all))
            plan.records.append(Action(
                action=self.name, changed=f"group-{k}: {', '.join(ctx.names[i] for i in grp.members)}",
                reason=(f"group {k} of {len(groups)} (fewest within-budget groups found): r*² "
                        f"{grp.radius_sq:.4g} ≤ budget {ctx.budget:.4g}; the whole set is over: "
                        f"{ctx.over()}"),
                models=[ctx.names[i] for i in grp.members]))
        return plan


class Replace(ReorganiseAction):
    """Swap constituents for candidate checkpoints of the same task (guard.candidates)."""

    name = "replace"
    description = "swap models for guard.candidates of the same task, smallest r*² within budget"

    def reorganise(self, ctx: ActionContext, *, merge_all: bool) -> ActionPlan:
        if not ctx.candidates:
            return ActionPlan(stop="guard stopped the merge: action 'replace' needs guard.candidates "
                                   f"({{task: [model, ...]}}); {ctx.over()}",
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
            return ActionPlan(
                records=[Action(action=self.name, changed="nothing: no combination fits",
                                reason=f"best combination has r*² {best.radius_sq:.4g} > budget "
                                       f"{ctx.budget:.4g}; {ctx.over()}")],
                stop=(f"guard stopped the merge: no candidate combination is within budget (best "
                      f"r*² {best.radius_sq:.4g} > {ctx.budget:.4g}); {ctx.over()}"))
        raw = replace_config(ctx.raw, swaps)
        records = [Action(
            action=self.name, changed=f"replaced {ctx.names[i]} with {texts[p]}",
            reason=(f"{ctx.describe(i)} swapped for a candidate of the same task: the set's r*² "
                    f"goes from {ctx.report.bounds.exact:.4g} to {best.radius_sq:.4g} ≤ budget "
                    f"{ctx.budget:.4g} (the smallest of {int(np.prod([len(s) for s in slots]))} "
                    f"combinations)"),
            models=[ctx.names[i], texts[p]]) for i, p in enumerate(chosen) if p != i]
        members = [parse_ref(texts[p]) if p != i else ctx.refs[i] for i, p in enumerate(chosen)]
        return ActionPlan(records=records, merges=[PlannedMerge(
            name="", raw=raw, members=members, changed=True, suffix=self.name)])


class Order(ReorganiseAction):
    """Merge pairwise, closest first (agglomerative tree), as a mergekit-multi config."""

    name = "order"
    description = "pairwise merges, closest first, as a multi-stage (mergekit-multi) config"

    def plan(self, ctx: ActionContext, *, merge_all: bool = False) -> ActionPlan:
        """Also plans a within-budget set when the method is pairwise and has more than two models
        (mergekit cannot run such a config in one go)."""
        points = self.points(ctx)
        pairwise = ctx.merge_method in PAIRWISE_METHODS
        if ctx.report.verdict == "mergeable" and not (pairwise and len(points) > 2):
            return ActionPlan(merges=[_as_written(ctx)])
        return self.reorganise(ctx, merge_all=merge_all)

    def points(self, ctx: ActionContext) -> list[Any]:
        """The models to order: the constituents, plus the base when it is also listed (slerp)."""
        listed = {parse_ref(e.get("model")) for entries in _model_lists(ctx.raw)
                  for e in entries if isinstance(e, dict)}
        if ctx.base is not None and ctx.base in listed and ctx.base not in ctx.refs:
            return [ctx.base, *ctx.refs]
        return list(ctx.refs)

    def reorganise(self, ctx: ActionContext, *, merge_all: bool) -> ActionPlan:
        points = self.points(ctx)
        if len(points) < 2:
            return ActionPlan(merges=[_as_written(ctx)])
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
        return ActionPlan(records=records, multi_stage=text)


def multi_stage_config(raw: dict, points: list[Any], stages: list[Stage]) -> str:
    """A mergekit-multi YAML (one document per stage, `name: stage-<k>`, the final one unnamed).

    Each stage merges its two sides with the config's own method and global parameters; the
    weights are the sides' model counts, so the tree ends at the group's plain average. slerp takes
    the left side as its base and t = right/(left+right); other methods keep the config's base.

    Args:
        raw: the user's mergekit YAML mapping.
        points: the models (ModelReferences), indices as in `stages`.
        stages: from `merge_tree`.

    Returns:
        The YAML text (documents separated by `---`).
    """
    method = raw.get("merge_method")
    common = {k: copy.deepcopy(v) for k, v in raw.items()
              if k not in {"models", "slices", "modules", "base_model", "parameters", "guard"}}
    params = copy.deepcopy(raw.get("parameters") or {})
    written = {parse_ref(e.get("model")): e.get("model") for entries in _model_lists(raw)
               for e in entries if isinstance(e, dict)}
    if raw.get("base_model") is not None:
        written.setdefault(parse_ref(raw["base_model"]), raw["base_model"])
    ref_text = {i: written.get(p, str(p)) for i, p in enumerate(points)}
    docs = []
    for k, st in enumerate(stages, start=1):
        left, right = ref_text[st.left], ref_text[st.right]
        doc: dict[str, Any] = {}
        if k < len(stages):
            doc["name"] = f"stage-{k}"
        doc["merge_method"] = method
        if method == "slerp":
            doc["base_model"] = left
            doc["models"] = [{"model": left}, {"model": right}]
            doc["parameters"] = {**{p: v for p, v in params.items() if p != "t"},
                                 "t": round(st.right_size / (st.left_size + st.right_size), 6)}
        else:
            if raw.get("base_model") is not None:
                doc["base_model"] = raw["base_model"]
            doc["models"] = [{"model": left, "parameters": {"weight": st.left_size}},
                             {"model": right, "parameters": {"weight": st.right_size}}]
            doc["parameters"] = {p: v for p, v in params.items() if p != "weight"}
            if method == "linear" or method in TASK_FAMILY:
                doc["parameters"]["normalize"] = True  # size-weighted average, not a sum
        doc.update(copy.deepcopy(common))
        docs.append(doc)
        ref_text[st.node] = f"stage-{k}"
    import yaml

    return yaml.safe_dump_all(docs, sort_keys=False, allow_unicode=True)


#: action name -> class (cf. mergekit's merge_methods registry)
ACTIONS: dict[str, type[ReorganiseAction]] = {
    cls.name: cls for cls in (Abort, Warn, Drop, Split, Replace, Order)
}


def get_action(name: str) -> ReorganiseAction:
    """An instance of the registered action `name`.

    Raises:
        KeyError: no such action.
    """
    return ACTIONS[name]()
