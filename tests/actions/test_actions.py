"""Re-organisation actions on constructed geometries with a known right answer (no models
loaded)."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from mergekit_collapse.actions import ACTIONS, ActionContext, get_action
from mergekit_collapse.actions.grouping import (
    best_replacement,
    clique_cover,
    compatibility_graph,
    confirm,
    largest_within_budget,
    merge_tree,
)
from mergekit_collapse.actions.rewrite import (
    multi_stage_config,
    replace_config,
    subset_config,
    weights_config,
)
from mergekit_collapse.errors import ConfigError
from mergekit_collapse.guard import geometry
from mergekit_collapse.guard.assess import assess
from mergekit_collapse.guard.config import parse_config, parse_ref
from mergekit_collapse.guard.probes import ProbeSet


def sq_of(points: list[list[float]] | np.ndarray) -> np.ndarray:
    """Squared Euclidean distances between points (the D the actions work on)."""
    p = np.asarray(points, dtype=float)
    return ((p[:, None, :] - p[None, :, :]) ** 2).sum(-1)


def triangle(side: float = 2.0) -> np.ndarray:
    """An equilateral triangle: every pair has r² = s²/4, the three together s²/3."""
    return sq_of([[0, 0], [side, 0], [side / 2, side * np.sqrt(3) / 2]])


# ---------------------------------------------------------------- pure graph / clustering work


def test_compatibility_graph_uses_the_pair_radius():
    sq = sq_of([[0.0], [1.0], [3.0]])  # pair radii 0.25, 2.25, 1.0
    g = compatibility_graph(sq, budget=1.0)
    assert sorted(g.edges) == [(0, 1), (1, 2)]


def test_drop_keeps_the_largest_cluster():
    sq = sq_of([[0.0], [0.2], [10.0], [10.1], [10.3]])
    grp = largest_within_budget(sq, budget=0.1)
    assert grp.members == (2, 3, 4)
    assert grp.radius_sq == pytest.approx(0.15**2)
    assert grp.weights == pytest.approx([0.5, 0.0, 0.5], abs=1e-6)


def test_drop_confirms_the_clique_with_the_exact_radius():
    s = 2.0
    sq = triangle(s)  # pair radius 1.0; the three together 4/3
    assert confirm(sq, [0, 1, 2]).radius_sq == pytest.approx(s**2 / 3)
    # every pair is compatible, but the 3-clique fails the exact check: the next size down wins
    grp = largest_within_budget(sq, budget=1.2)
    assert grp.members == (0, 1) and grp.radius_sq == pytest.approx(1.0)
    # with room for the whole triangle it is kept whole
    assert largest_within_budget(sq, budget=1.34).members == (0, 1, 2)


def test_drop_ties_prefer_the_smaller_radius():
    sq = sq_of([[0.0], [1.0], [10.0], [10.5]])
    assert largest_within_budget(sq, budget=0.3).members == (2, 3)  # r² 0.0625 < 0.25


def test_split_covers_with_the_fewest_groups():
    sq = sq_of([[0.0], [0.1], [5.0], [5.2], [0.05]])
    groups = clique_cover(sq, budget=0.05)
    assert [g.members for g in groups] == [(0, 1, 4), (2, 3)]
    assert all(g.radius_sq <= 0.05 for g in groups)


def test_split_breaks_a_colour_class_that_fails_the_exact_check():
    groups = clique_cover(triangle(2.0), budget=1.2)
    assert sorted(len(g.members) for g in groups) == [1, 2]
    assert all(g.radius_sq <= 1.2 for g in groups)
    assert sorted(i for g in groups for i in g.members) == [0, 1, 2]


def test_replace_picks_the_smallest_radius():
    # constituents 0 (at 0) and 1 (far, at 10); candidates for 1 at 4 (index 2) and 1 (index 3)
    sq = sq_of([[0.0], [10.0], [4.0], [1.0]])
    best = best_replacement(sq, [[0], [1, 2, 3]])
    assert best.members == (0, 3) and best.radius_sq == pytest.approx(0.25)


def test_merge_tree_merges_the_closest_first():
    sq = sq_of([[0.0], [1.0], [5.0], [6.5]])
    stages = merge_tree(sq)
    assert [(s.left, s.right) for s in stages] == [(0, 1), (2, 3), (4, 5)]
    assert [s.distance for s in stages] == pytest.approx([1.0, 1.5, 5.25])  # centroids 0.5, 5.75
    assert (stages[-1].left_size, stages[-1].right_size) == (2, 2)


def test_registry_lists_every_action():
    from mergekit_collapse.actions.registry import BUILTIN
    from mergekit_collapse.guard.config import BUILTIN_ACTIONS

    assert sorted(ACTIONS) == ["abort", "drop", "order", "replace", "split", "warn"]
    assert tuple(cls.name for cls in BUILTIN) == BUILTIN_ACTIONS  # the schema's list, in order
    assert all(get_action(name).name == name for name in ACTIONS)


def test_an_entry_point_action_is_selectable(tmp_path, monkeypatch):
    """Another installed package adds an action through the entry-point group; `guard.action`
    accepts it and `get_action` loads it. An unknown name gets a did-you-mean."""
    from pydantic import ValidationError

    from mergekit_collapse.actions import registry
    from mergekit_collapse.guard.config import GuardSettings, action_names

    (tmp_path / "keep_all_action.py").write_text(
        "from mergekit_collapse.actions import Reorganisation, MergeJob, ReorganiseAction\n"
        "class KeepAll(ReorganiseAction):\n"
        "    name = 'keep-all'\n"
        "    description = 'merge as written, with a record'\n"
        "    def reorganise(self, ctx, *, merge_all):\n"
        "        return Reorganisation(merges=[MergeJob(name='', raw=ctx.raw, "
        "members=list(ctx.refs),\n"
        "                                               changed=False, suffix='')])\n")
    dist = tmp_path / "keep_all-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: keep-all\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[mergekit_collapse.actions]\nkeep-all = keep_all_action:KeepAll\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "ACTIONS", dict(registry.ACTIONS))  # the real one stays as it was

    assert action_names()[-1] == "keep-all"
    assert GuardSettings(action="keep-all").action == "keep-all"
    plan = get_action("keep-all").apply(context(FAR, budget=1.0))
    assert plan.stop is None and not plan.merges[0].changed
    with pytest.raises(ValidationError, match="did you mean 'drop'"):
        GuardSettings(action="dorp")
    with pytest.raises(ConfigError, match="unknown action 'dorp'; did you mean 'drop'"):
        get_action("dorp")


# ---------------------------------------------------------------- config rewriting

RAW = """
merge_method: task_arithmetic
base_model: m/base
dtype: bfloat16
parameters: {normalize: true}
models:
  - model: m/a
    parameters: {weight: 1.0}
  - model: m/b
    parameters: {weight: 1.0, density: 0.5}
  - model: m/c
    parameters: {weight: 1.0}
guard:
  budget: {absolute: 1.0}
  tasks:
    m/a: {name: ta, probes: [x1]}
    m/b: {name: tb, probes: [x2]}
    m/c: {name: tc, probes: [x3]}
  candidates:
    tc: [m/c2]
"""


def test_subset_config_keeps_base_dtype_and_consistent_guard():
    raw = yaml.safe_load(RAW)
    out = subset_config(raw, [parse_ref("m/a"), parse_ref("m/b")])
    assert [e["model"] for e in out["models"]] == ["m/a", "m/b"]
    assert out["base_model"] == "m/base" and out["dtype"] == "bfloat16"
    assert list(out["guard"]["tasks"]) == ["m/a", "m/b"] and out["guard"]["candidates"] == {}
    assert raw["models"][2]["model"] == "m/c"  # the input is not modified
    cfg = parse_config(yaml.safe_dump(out))  # still a valid config for mergekit and the guard
    assert [str(m) for m in cfg.models] == ["m/a", "m/b"]


def test_replace_config_swaps_the_model_and_its_task_entry():
    out = replace_config(yaml.safe_load(RAW), {parse_ref("m/c"): "m/c2"})
    assert [e["model"] for e in out["models"]] == ["m/a", "m/b", "m/c2"]
    assert out["guard"]["tasks"]["m/c2"]["name"] == "tc" and "m/c" not in out["guard"]["tasks"]
    assert out["guard"]["candidates"] == {"tc": ["m/c"]}
    parse_config(yaml.safe_dump(out))


def test_weights_config_sets_per_model_weight():
    out = weights_config(yaml.safe_load(RAW), {parse_ref("m/a"): 0.25, parse_ref("m/b"): 0.75})
    assert out["models"][0]["parameters"] == {"weight": 0.25}
    assert out["models"][1]["parameters"] == {"weight": 0.75, "density": 0.5}


def test_multi_stage_config_is_what_mergekit_multi_reads(tmp_path):
    from mergekit.scripts.multimerge import load_config

    raw = yaml.safe_load(RAW.replace("task_arithmetic", "slerp").replace("base_model: m/base",
                                                                          "base_model: m/a"))
    points = [parse_ref(x) for x in ("m/a", "m/b", "m/c")]
    stages = merge_tree(sq_of([[0.0], [1.0], [5.0]]))
    text = multi_stage_config(raw, points, stages)
    docs = list(yaml.safe_load_all(text))
    assert docs[0]["name"] == "stage-1" and "name" not in docs[-1]
    assert docs[0]["models"] == [{"model": "m/a"}, {"model": "m/b"}]
    assert docs[0]["parameters"]["t"] == 0.5
    assert docs[1]["base_model"] == "stage-1" and docs[1]["parameters"]["t"] == pytest.approx(1 / 3)
    configs, deps = load_config(text, str(tmp_path))
    assert deps[None] == {"stage-1"} and deps["stage-1"] == set()


# ---------------------------------------------------------------- the actions on a real report


def context(points: list[list[float]], budget: float, *, method: str = "linear",
            candidates: dict[str, list[list[float]]] | None = None) -> ActionContext:
    """A report computed by the guard's own `assess` from constructed hidden states (one probe)."""
    names = [f"m/{chr(ord('a') + i)}" for i in range(len(points))]
    cand_names = {t: [f"cand/{t}{k}" for k in range(len(v))] for t, v in (candidates or {}).items()}
    raw = {"merge_method": method, "dtype": "float32",
           "models": [{"model": n, "parameters": {"weight": 1.0}} for n in names],
           "guard": {"budget": {"absolute": budget},
                     "tasks": {n: {"name": f"t{i}", "probes": ["x"]} for i, n in enumerate(names)},
                     "candidates": cand_names}}
    if method == "slerp":  # more than two SLERP inputs: a config only the `order` action can merge
        raw["guard"]["action"] = "order"
        raw["parameters"] = {"t": 0.5}
    cfg = parse_config(yaml.safe_dump(raw))
    hidden = np.asarray(points, dtype=float)[:, None, :]
    probes = ProbeSet(texts=("x",), tasks=("t0",), k=1, seed=0, chat_template=False)
    report = assess(cfg, hidden, None, probes=probes, hidden_size=hidden.shape[-1], dtype="float32")
    vectors = {n: hidden[i] for i, n in enumerate(names)}
    refs = {}
    for t, pts in (candidates or {}).items():
        for n, p in zip(cand_names[t], pts, strict=True):
            vectors[n] = np.asarray(p, dtype=float)[None, :]
            refs[n] = parse_ref(n)
    return ActionContext(
        report=report, raw=raw, refs=list(cfg.models), budget=report.budget.absolute,
        merge_method=method, vectors=lambda rs: np.stack([vectors[str(r)] for r in rs]),
        candidates=cand_names, candidate_refs=refs)


FAR = [[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [10.0, 0.0]]  # three close models and one outlier


def test_within_budget_merges_as_written_whatever_the_action():
    ctx = context(FAR[:3], budget=1.0)
    assert ctx.report.verdict == "mergeable"
    for name in ACTIONS:
        plan = get_action(name).apply(ctx)
        assert plan.stop is None and plan.records == []
        assert len(plan.merges) == 1 and not plan.merges[0].changed


def test_abort_stops_and_names_the_outlier():
    plan = get_action("abort").apply(context(FAR, budget=1.0))
    assert plan.stop and not plan.merges
    assert plan.records[0].models == ["m/d"] and "MDS" in plan.records[0].reason


def test_warn_merges_as_written():
    plan = get_action("warn").apply(context(FAR, budget=1.0))
    assert plan.stop is None and not plan.merges[0].changed
    assert "predicted collapse" in plan.records[0].reason


def test_drop_removes_the_outlier():
    plan = get_action("drop").apply(context(FAR, budget=1.0))
    (pm,) = plan.merges
    assert [e["model"] for e in pm.raw["models"]] == ["m/a", "m/b", "m/c"]
    assert list(pm.raw["guard"]["tasks"]) == ["m/a", "m/b", "m/c"]
    assert [r.models for r in plan.records] == [["m/d"]]
    assert "MDS" in plan.records[0].reason and "distortion" in plan.records[0].reason


def test_drop_stops_when_no_pair_fits():
    plan = get_action("drop").apply(context([[0.0], [10.0], [20.0]], budget=1.0))
    assert plan.stop and not plan.merges


def test_split_writes_one_config_per_group():
    pts = [[0.0, 0.0], [0.1, 0.0], [10.0, 0.0], [10.1, 0.0]]
    plan = get_action("split").apply(context(pts, budget=1.0), merge_all=True)
    assert [[e["model"] for e in pm.raw["models"]] for pm in plan.merges] == [
        ["m/a", "m/b"], ["m/c", "m/d"]]
    assert [pm.name for pm in plan.merges] == ["group-1", "group-2"] and all(
        pm.merge for pm in plan.merges)
    assert not any(pm.merge for pm in get_action("split").apply(context(pts, budget=1.0)).merges)


def test_replace_swaps_the_outlier_for_the_closest_candidate():
    ctx = context(FAR, budget=1.0, candidates={"t3": [[5.0, 0.0], [0.2, 0.1]]})
    plan = get_action("replace").apply(ctx)
    (pm,) = plan.merges
    assert [e["model"] for e in pm.raw["models"]] == ["m/a", "m/b", "m/c", "cand/t31"]
    assert "cand/t31" in pm.raw["guard"]["tasks"]
    assert plan.records[0].models == ["m/d", "cand/t31"]


def test_replace_stops_without_a_fitting_candidate():
    ctx = context(FAR, budget=1.0, candidates={"t3": [[5.0, 0.0]]})
    assert get_action("replace").apply(ctx).stop


def test_order_writes_a_multi_stage_plan_closest_first():
    pts = [[0.0], [1.0], [5.0], [6.5]]
    plan = get_action("order").apply(context(pts, budget=0.1, method="slerp"))
    docs = list(yaml.safe_load_all(plan.multi_stage))
    assert [d.get("name") for d in docs] == ["stage-1", "stage-2", None]
    assert [m["model"] for m in docs[0]["models"]] == ["m/a", "m/b"]
    assert [m["model"] for m in docs[1]["models"]] == ["m/c", "m/d"]
    assert docs[2]["base_model"] == "stage-1" and docs[2]["parameters"]["t"] == 0.5
    assert [r.changed for r in plan.records][-1] == "final = stage-1 + stage-2"


def test_exact_radius_agrees_with_geometry():
    sq = sq_of(FAR)
    assert confirm(sq, range(4)).radius_sq == pytest.approx(geometry.enclosing_ball(sq).radius_sq)
