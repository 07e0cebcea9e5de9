"""Grouping models by cliques of the compatibility graph: what drop, split, replace and order
compute on the squared distances D_ij = drms(i,j)² of the constituents (DESIGN.md).

The graph and clustering work is pure (numpy, networkx, scipy; no torch, no I/O) and works on D
alone. Models i, j are *compatible* when their pair alone is within budget: the pair's own
minimum-enclosing-ball radius is r*² = D_ij / 4 (Theorem 1 ii is tight for two points). Every group
a graph algorithm proposes is then confirmed with the exact radius of the group
(`geometry.enclosing_ball` on the sub-matrix of D): pairwise compatibility is necessary, not
sufficient (three points at mutual distance s have r*² = s²/3 > s²/4).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mergekit_collapse.guard import geometry

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
    """Every clique of exactly `size` nodes: the size-subsets of the maximal cliques,
    deduplicated."""
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
    """The largest subset within budget: a maximum clique of the compatibility graph, confirmed
    exactly.

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
    """Few groups, each within budget, covering every model: a clique cover of the compatibility
    graph.

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
    """One pairwise merge of an agglomerative tree; nodes < N are models, node N+k is stage k."""

    left: int
    right: int
    node: int
    distance: float  # drms between the two sides (their size-weighted centroids for clusters)
    left_size: int
    right_size: int


def merge_tree(sq: np.ndarray) -> list[Stage]:
    """An agglomerative merge tree that merges the closest first (scipy.cluster.hierarchy).

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


