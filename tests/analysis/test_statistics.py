"""Statistics over merge records: hand-computed correlations, AUROC, ANOVA, degenerate inputs,
CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mergekit_collapse.analysis.statistics import (
    anova,
    auroc,
    beyond_task,
    collapsed,
    correlation,
    parse_records,
    summarize,
)
from mergekit_collapse.errors import BadInputError


def test_correlation_hand_computed() -> None:
    # dx = [-1.5,-.5,.5,1.5], dy = [20,10,-10,-20]: Σdxdy = -70, Σdx² = 5, Σdy² = 1000
    c = correlation([1, 2, 3, 4], [-10, -20, -40, -50])
    assert c.n == 4 and c.reason is None
    assert c.pearson_r == pytest.approx(-70 / math.sqrt(5000))
    assert c.spearman_rho == pytest.approx(-1.0)
    assert 0 < c.pearson_p < 0.05


def test_correlation_missing_inf_and_degenerate() -> None:
    c = correlation([1, 2, float("nan"), 3, 4], [-10, -20, -99, -40, -50])
    assert c.n == 4 and c.pearson_r == pytest.approx(-70 / math.sqrt(5000))
    inf = correlation([1, 2, 3, float("inf")], [-10, -20, -40, -50])  # MDS may be +inf
    assert inf.spearman_rho == pytest.approx(-1.0) and inf.pearson_r is not None
    for bad, why in (([1, 2], "n = 2"), ([5, 5, 5, 5], "constant")):
        d = correlation(bad, [-1, -2, -3, -4][: len(bad)])
        assert d.pearson_r is None and d.spearman_rho is None and why in d.reason


def test_auroc_orientation_and_ties() -> None:
    labels = collapsed([-10, -20, -40, -50])  # below −30
    assert labels.tolist() == [False, False, True, True]
    assert collapsed([-30.0]).tolist() == [False]  # strictly below
    a = auroc([1, 2, 3, 4], labels)
    assert a.auroc == pytest.approx(1.0) and a.direction == "higher"
    low = auroc([4, 3, 2, 1], labels)  # lower values go with collapse (a similarity)
    assert low.auroc == pytest.approx(0.0) and low.direction == "lower" and low.auroc_best == 1.0
    # pos {2, 3} vs neg {1, 2}: 1 + ½ + 1 + 1 of 4 pairs
    tie = auroc([1, 2, 2, 3], [False, True, False, True])
    assert tie.auroc == pytest.approx(3.5 / 4)
    one = auroc([1, 2, 3], [False, False, False])
    assert one.auroc is None and "one class" in one.reason
    const = auroc([2, 2, 2], [False, True, True])
    assert const.auroc is None and "constant" in const.reason


def test_one_way_anova_hand_computed() -> None:
    # A: [1, 3], B: [5, 7]: SSB = 16 (df 1), SSW = 4 (df 2): F = 8, p = 1 − √(8/10) (F(1,2) = t²₂)
    res = anova([1, 3, 5, 7], ["A", "A", "B", "B"], ["m", "m", "m", "m"])
    task = res.one_way[0]
    assert (task.factor == "task" and task.f_value == pytest.approx(8.0)
            and task.sum_sq == pytest.approx(16))
    assert task.p == pytest.approx(1 - math.sqrt(0.8))
    method = res.one_way[1]
    assert method.f_value is None and "1 level" in method.reason
    assert res.two_way == [] and "≥ 2 methods" in res.two_way_reason


def test_two_way_additive_anova_hand_computed() -> None:
    # balanced 2×2, two replicates: SS_task = 32, SS_method = 2, SS_total = 42, resid 8 on 5 df
    loss = [1, 3, 2, 4, 5, 7, 6, 8]
    task = ["A"] * 4 + ["B"] * 4
    method = ["m", "m", "n", "n"] * 2
    res = anova(loss, task, method)
    two = {r.factor: r for r in res.two_way}
    assert two["task"].f_value == pytest.approx(32 / (8 / 5)) and two["task"].df_resid == 5
    assert two["method"].f_value == pytest.approx(2 / (8 / 5))
    from scipy import stats

    assert two["method"].p == pytest.approx(stats.f.sf(1.25, 1, 5))
    one = {r.factor: r for r in res.one_way}  # one-way leaves the other factor in the residual
    assert one["task"].f_value == pytest.approx(32 / (10 / 6))
    assert one["method"].f_value == pytest.approx(2 / (40 / 6))
    const = anova([3, 3, 3, 3, 3], ["A", "A", "B", "B", "B"], ["m", "n", "m", "n", "m"])
    assert const.one_way[0].f_value is None and const.two_way_reason == "constant loss"
    # each task constant within: SS_task = 2·2.4² + 3·1.6² = 19.2 is defined, F = SS / 0 is not
    flat = anova([1, 1, 5, 5, 5], ["A", "A", "B", "B", "B"], ["m", "n", "m", "n", "m"]).one_way[0]
    assert (flat.f_value is None and flat.reason.startswith("F undefined")
            and flat.sum_sq == pytest.approx(19.2))


def test_beyond_task_separates_task_identity_from_within_task_signal() -> None:
    rng = np.random.default_rng(0)
    task = np.repeat(["easy", "mid", "hard"], 20)
    effect = np.repeat([0.0, -10.0, -80.0], 20)
    within = rng.normal(size=60)
    loss = effect - 5 * within + rng.normal(scale=0.5, size=60)
    # a metric that only knows the task: perfect AUROC, nothing beyond the task
    labels_only = -effect + rng.normal(size=60)  # + noise unrelated to the loss
    only = beyond_task(labels_only, loss, task)
    assert auroc(labels_only, collapsed(loss)).auroc == pytest.approx(1.0)
    assert only.p > 0.01 and abs(only.within_rho) < 0.4
    assert beyond_task(-effect, loss, task).reason == "no variation within tasks"
    # a metric that tracks the within-task variation: strongly beyond the task
    tracks = beyond_task(within, loss, task)
    assert tracks.within_rho < -0.9 and tracks.p < 1e-10 and tracks.partial_r2 > 0.9
    # hand check of the partial F on a tiny design: task A [0, 2] vs x [0, 1], B [5, 9] vs x [0, 1]
    res = beyond_task([0, 1, 0, 1, 7], [0, 2, 5, 9, 4], ["A", "A", "B", "B", "C"])
    # task-only residual: A ±1, B ±2, C 0 -> RSS 10;
    # with x (within slope 3): ±0.5 four times -> RSS 1
    assert res.f_value == pytest.approx((10 - 1) / (1 / 1)) and res.partial_r2 == pytest.approx(0.9)
    assert beyond_task([1, 2, 3], [1, 2, 3], ["A", "B", "C"]).reason.startswith("no residual")
    assert beyond_task([1, 1, 2, 2], [3, 3, 4, 4],
                       ["A", "A", "B", "B"]).reason == "no variation within tasks"
    # a constant score (MergeLens's 99.9 on every zoo model) says nothing, despite float rounding
    assert beyond_task([99.9] * 6, [0, -50, -5, -90, 0, -40], list("AABBCC")).within_rho is None


CSV = """group,task,method,model,loss,mds,retention,note
g1,cola,linear,a,-10,1.1,0.9,ok
g1,wnli,linear,b,-60,2.5,0.2,
g2,cola,ties,a,-5,1.0,0.95,x
g2,wnli,ties,b,-45,,0.3,y
g3,rte,linear,c,-20,1.4,0.7,z
g3,wnli,linear,b,-70,3.0,0.1,w
"""


def test_parse_records_csv_and_jsonl() -> None:
    rec = parse_records(CSV)
    assert rec.n == 6 and rec.metrics == ["mds", "retention"]  # `note` is text
    assert np.isnan(rec.column("mds")[3])
    lines = "\n".join(json.dumps(r) for r in rec.rows)
    again = parse_records(lines)
    assert (again.metrics == rec.metrics
            and again.column("loss").tolist() == rec.column("loss").tolist())
    js = parse_records('{"group": 1, "task": "t", "method": "m", "model": "a", "loss": -3, '
                       '"x": null}\n'
                       '{"group": 1, "task": "u", "method": "m", "model": "b", "loss": -4, '
                       '"x": 0.5}')
    assert js.metrics == ["x"]
    with pytest.raises(BadInputError, match="missing required"):
        parse_records("group,task,loss\n1,a,-3\n")
    with pytest.raises(BadInputError, match="not a number"):
        parse_records("group,task,method,model,loss\n1,a,m,x,bad\n")
    with pytest.raises(BadInputError, match="not JSON"):
        parse_records("{broken", "jsonl")
    with pytest.raises(BadInputError, match="not JSON"):
        parse_records('{"group": 1}\n[1, 2]\n', "jsonl")
    for extra in ("group,task,method,model,loss\n1,a,m,x,-3,9\n",
                  "group,task,method,model,loss\n1,a,m,x,-3\n2,b,m,y,-4,9\n"):
        with pytest.raises(BadInputError, match="more cells than the header"):
            parse_records(extra)
    with pytest.raises(BadInputError, match="no records"):
        parse_records("group,task,method,model,loss\n")
    # a short row's missing cells and a JSON line's missing keys are missing values
    short = parse_records("group,task,method,model,loss,x\n1,a,m,p,-3,0.5\n2,b,m,q,-4\n")
    assert short.metrics == ["x"] and np.isnan(short.column("x")[1])
    sparse = parse_records('{"group": 1, "task": "t", "method": "m", "model": "a", "loss": -3}\n'
                           '{"group": 2, "task": "t", "method": "m", "model": "b", "loss": -4, '
                           '"x": 2}')
    assert (sparse.metrics == ["x"] and np.isnan(sparse.column("x")[0])
            and sparse.labels("group") == ["1", "2"])


def _table_rows(md: str) -> list[list[str]]:
    """The cells of every Markdown table row of `md` (header and separator rows included)."""
    return [[c.strip() for c in line.strip()[1:-1].split("|")] for line in md.splitlines()
            if line.startswith("|")]


def test_summarize_and_markdown() -> None:
    rep = summarize(parse_records(CSV), threshold=-30)
    assert rep.n == 6 and rep.groups == 3 and rep.n_collapsed == 3
    by = {m.metric: m for m in rep.metrics}
    assert by["mds"].auroc.auroc == pytest.approx(1.0) and by["mds"].correlation.n == 5
    assert (by["retention"].auroc.auroc == pytest.approx(0.0)
            and by["retention"].auroc.direction == "lower")
    md = rep.to_markdown()
    cells = {row[0]: row for row in _table_rows(md)}
    assert cells["mds"][:2] == ["mds", "5"] and cells["retention"][7] == "lower"
    assert "Two-way additive ANOVA" in md and "within-task ρ" in md
    assert by["retention"].beyond_task.n == 6


def test_stats_cli(tmp_path: Path) -> None:
    from mergekit_collapse.cli import main

    path = tmp_path / "records.csv"
    path.write_text(CSV)
    res = CliRunner().invoke(main, ["stats", str(path), "--format", "json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["n_collapsed"] == 3 and data["metrics"][0]["metric"] == "mds"
    res = CliRunner().invoke(main, ["stats", str(path), "--threshold", "-50"])
    assert res.exit_code == 0 and "collapsed (loss < -50): 2" in res.output
    res = CliRunner().invoke(main, ["stats", str(tmp_path / "nope.csv")])
    assert res.exit_code == 2 and "not found" in res.output
