"""The merge planner on tiny real models: two close fine-tunes and a far outlier (a merge with the
outlier keeps it and swamps the others), searched, rehearsed, written and merged for real."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from common import QUIET, QUIET32, make_finetune

from mergekit_collapse import plan
from mergekit_collapse.cli import main
from mergekit_collapse.errors import BadInputError, ConfigError
from mergekit_collapse.planner.search import Judged, expected_retention, objective
from mergekit_collapse.planner.space import Candidate, Screen

PROBES = ["the cat sat on", "one two three", "hello there", "a b c d", "zero one", "red green",
          "blue sky", "five six seven", "up and down", "left right", "big small", "yes no maybe"]
NAMES = ("near1", "near2", "far")


@pytest.fixture(scope="module")
def pool_zoo(tiny_zoo, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pool")
    zoo = {"base": tiny_zoo["base"]}
    for name, seed, scale in (("near1", 1, 0.0005), ("near2", 2, 0.0005), ("far", 3, 0.2)):
        zoo[name] = make_finetune(tiny_zoo["base"], root / name, seed=seed, scale=scale)
    return zoo


def write_pool(zoo, tmp_path: Path, *, method: str | None = None, names=NAMES, per_task: int = 2,
               **space) -> Path:
    raw: dict = {"base_model": str(zoo["base"]), "dtype": "float32",
                 "models": [{"model": str(zoo[n])} for n in names]}
    if method is not None:
        raw = {"merge_method": method, **raw}
        for m in raw["models"]:
            m["parameters"] = {"weight": 1.0}
    raw["guard"] = {"k": 2, "answer_tokens": 4, "tasks": {
        str(zoo[n]): {"name": n, "probes": PROBES[per_task * i: per_task * (i + 1)]}
        for i, n in enumerate(names)},
        "plan": {"methods": ["linear", "task_arithmetic"], "weights": [1.0], "rehearsals": 4,
                 "refine": 0, **space}}
    path = tmp_path / "pool.yml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_drops_the_outlier_and_writes_a_config_mergekit_merges(pool_zoo, tmp_path):
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from mergekit_collapse.guard.config import load_config
    from mergekit_collapse.merge import merge_config

    # a budget that rehearses the whole grid (8): the geometry alone ranks the outlier's pairs first
    result = plan(write_pool(pool_zoo, tmp_path, rehearsals=8), out=tmp_path / "out",
                  runtime=QUIET32)
    best = result.finalists[0]
    assert sorted(best.tasks) == ["near1", "near2"] and result.kept_apart == ["far"]
    assert best.rehearsal is not None and result.rehearsed == result.screened == 8
    assert best.objective >= max(f.objective for f in result.finalists)
    # the expected retention is read at the agreement it was fitted on, not the calibrated score
    for f in (f for f in result.finalists if f.rehearsal is not None):
        assert f.agreement is not None and f.expected_retention == pytest.approx(
            expected_retention(f.agreement), abs=1e-3)
    raw = yaml.safe_load((tmp_path / "out" / "plan.yml").read_text())
    MergeConfiguration.model_validate({k: v for k, v in raw.items() if k != "guard"})
    cfg = load_config(tmp_path / "out" / "plan.yml")
    assert cfg.guard.planned.kept_apart == ["far"] and cfg.guard.planned.rehearsed == 8
    merge_config(raw, tmp_path / "merged", MergeOptions(copy_tokenizer=True, quiet=True))
    assert (tmp_path / "merged" / "config.json").is_file()
    saved = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert saved["finalists"][0]["tasks"] == best.tasks and "keep apart: far" in \
        (tmp_path / "out" / "plan.md").read_text()


def test_two_merges_when_one_keeps_tasks_apart(pool_zoo, tmp_path):
    """Two pairs far from each other (each model with a close twin): one merge keeps one pair;
    with `max_merges: 2` the plan adds a merge of the other pair, plan-2.yml, which mergekit
    accepts; with the default (one merge) the other pair is kept apart."""
    from mergekit.config import MergeConfiguration

    zoo = {**pool_zoo, **{f"{n}_twin": make_finetune(pool_zoo[n], tmp_path / f"{n}_twin", seed=4,
                                                     scale=0.0001) for n in ("near1", "far")}}
    names = ("near1", "near1_twin", "far", "far_twin")
    # three probes per task, k = 2: the second merge's search confirms on the probe left over
    result = plan(write_pool(zoo, tmp_path, names=names, per_task=3, rehearsals=12, max_merges=2),
                  out=tmp_path / "out", runtime=QUIET32)
    first, (second,) = result.finalists[0], result.further
    assert first.confirmed and second.finalist.confirmed
    assert sorted([sorted(first.tasks), sorted(second.finalist.tasks)]) == [
        ["far", "far_twin"], ["near1", "near1_twin"]]
    assert result.kept_apart == [] and second.file == "plan-2.yml"
    raw = yaml.safe_load((tmp_path / "out" / "plan-2.yml").read_text())
    MergeConfiguration.model_validate({k: v for k, v in raw.items() if k != "guard"})
    planned = yaml.safe_load((tmp_path / "out" / "plan.yml").read_text())["guard"]["planned"]
    assert planned["other_merges"] == [f"plan-2.yml: {second.finalist.method} of "
                                       f"{', '.join(second.finalist.tasks)}"]
    assert "then " in (tmp_path / "out" / "plan.md").read_text()
    one = plan(write_pool(zoo, tmp_path, names=names, rehearsals=12), runtime=QUIET32)
    assert one.further == [] and len(one.kept_apart) == 2


def test_ramped_weights_are_mergekit_gradients_and_rehearsed(pool_zoo, tmp_path):
    """`ramps: [[0, 1]]`: task arithmetic gets a ramped twin of each flat candidate (linear, whose
    weights are normalised, does not), written as mergekit's gradient; mergekit merges it as a
    ramp (the first layer stays the base's, the last moves by the full task vector) and the
    rehearsal judges it like any candidate."""
    import torch
    from mergekit.options import MergeOptions
    from safetensors.torch import load_file

    from mergekit_collapse.merge import merge_config
    from mergekit_collapse.planner.space import candidate_raw, candidates, load_pool

    path = write_pool(pool_zoo, tmp_path, ramps=[[0.0, 1.0]], rehearsals=12)
    pool = load_pool(path)
    grid, _ = candidates(pool, ["linear", "task_arithmetic"])
    ramped = [c for c in grid if c.ramp]
    assert ramped and {c.method for c in ramped} == {"task_arithmetic"}
    assert len(ramped) == len([c for c in grid if c.method == "task_arithmetic"]) // 2
    one = next(c for c in ramped if len(c.members) == 2)
    raw = candidate_raw(pool, one)
    assert [m["parameters"]["weight"] for m in raw["models"]] == [[0.0, 1.0]] * 2
    merge_config(raw, tmp_path / "merged", MergeOptions(quiet=True))
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    base = load_file(pool_zoo["base"] / "model.safetensors")
    a, b = (load_file(pool_zoo[pool.tasks[i]] / "model.safetensors") for i in one.members)
    first, last = "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"
    torch.testing.assert_close(merged[first], base[first])
    torch.testing.assert_close(merged[last], a[last] + b[last] - base[last])
    result = plan(path, runtime=QUIET32)
    assert any(f.ramp == [0.0, 1.0] and f.rehearsal is not None for f in result.finalists)


def test_a_config_with_one_gradient_is_its_own_ramped_candidate(pool_zoo, tmp_path):
    from mergekit_collapse.planner.search import own_candidate
    from mergekit_collapse.planner.space import load_pool

    path = write_pool(pool_zoo, tmp_path, method="task_arithmetic")
    raw = yaml.safe_load(path.read_text())
    for m in raw["models"]:
        m["parameters"]["weight"] = [0.2, 0.8]
    path.write_text(yaml.safe_dump(raw))
    own = own_candidate(load_pool(path))
    assert own is not None and own.ramp == (0.2, 0.8) and own.weights == (1.0, 1.0, 1.0)
    raw["models"][0]["parameters"]["weight"] = [0.5, 0.5]  # not one shared ramp: not representable
    path.write_text(yaml.safe_dump(raw))
    assert own_candidate(load_pool(path)) is None


def test_must_include_keeps_the_outlier(pool_zoo, tmp_path):
    result = plan(write_pool(pool_zoo, tmp_path, must_include=[str(pool_zoo["far"])]),
                  runtime=QUIET32, max_rehearsals=2)
    assert all("far" in f.tasks for f in result.finalists)


def test_worst_rule_counts_a_left_out_task_as_lost(pool_zoo, tmp_path):
    """Only the all-in merge can have a worst task above 0; screen-only (no rehearsal) here."""
    result = plan(write_pool(pool_zoo, tmp_path), objective="worst", max_rehearsals=0,
                  runtime=QUIET32)
    assert result.rehearsed == 0 and result.finalists[0].rehearsal is None
    assert len(result.finalists[0].tasks) == 3 or result.finalists[0].objective < 0.01


def test_the_config_as_written_is_a_candidate_and_refinement_runs(pool_zoo, tmp_path):
    result = plan(write_pool(pool_zoo, tmp_path, method="task_arithmetic", rehearsals=3, refine=1),
                  runtime=QUIET32)
    origins = {f.origin for f in result.finalists}
    assert {"as written", "refine"} <= origins and result.rehearsed == 3


def test_a_spent_time_budget_rehearses_nothing_and_still_plans(pool_zoo, tmp_path):
    """`--max-seconds 0`: the geometry screen completes, no rehearsal starts, plan.yml is
    written; the same pool with no budget rehearses."""
    res = CliRunner().invoke(main, ["plan", str(write_pool(pool_zoo, tmp_path)), "--out",
                                    str(tmp_path / "out"), "--max-seconds", "0", "--dtype",
                                    "float32", "--no-progress"])
    assert res.exit_code == 0, res.output
    written = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert written["rehearsed"] == 0 and written["screened"] > 0
    assert (tmp_path / "out" / "plan.yml").is_file()
    assert plan(write_pool(pool_zoo, tmp_path, rehearsals=1), runtime=QUIET32).rehearsed == 1


def test_cli_plan_and_the_card_says_how_the_config_was_chosen(pool_zoo, tmp_path):
    from mergekit.options import MergeOptions

    from mergekit_collapse.merge import guarded_merge
    from mergekit_collapse.publish.card import write_card

    res = CliRunner().invoke(main, ["plan", str(write_pool(pool_zoo, tmp_path)), "--out",
                                    str(tmp_path / "out"), "--max-rehearsals", "0", "--dtype",
                                    "float32", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "chosen:" in res.stdout and "why:" in res.stdout
    merged = guarded_merge(tmp_path / "out" / "plan.yml", tmp_path / "merged",
                           MergeOptions(copy_tokenizer=True, quiet=True), runtime=QUIET,
                           rehearse="off", action="warn")
    write_card(merged.outputs[0])
    card = (merged.outputs[0] / "README.md").read_text()
    assert "How this config was chosen" in card and "candidates screened" in card


@pytest.mark.parametrize(("space", "words"), [
    ({"methods": ["lineer"]},
     "guard.plan.methods: unknown merge method 'lineer'; did you mean 'linear'"),
    ({"must_include": ["/no/such"]}, "must_include names '/no/such'"),
    ({"refine": 5, "rehearsals": 2}, "exceeds the rehearsal budget"),
])
def test_bad_search_space_is_one_clear_line(pool_zoo, tmp_path, space, words):
    with pytest.raises(BadInputError) as e:
        plan(write_pool(pool_zoo, tmp_path, **space), runtime=QUIET)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_a_pool_of_one_model_is_refused(pool_zoo, tmp_path):
    with pytest.raises(ConfigError, match="a plan merges two or more"):
        plan(write_pool(pool_zoo, tmp_path, names=("near1",)), runtime=QUIET)


def test_verify_merges_and_evaluates_the_top_finalist(pool_zoo, tmp_path):
    from common import make_tiny_tasks

    path = write_pool(pool_zoo, tmp_path, rehearsals=1)
    raw = yaml.safe_load(path.read_text())
    tasks = make_tiny_tasks(tmp_path)
    for spec in raw["guard"]["tasks"].values():
        spec["eval"] = str(tasks / "tiny_mc.yaml")
    path.write_text(yaml.safe_dump(raw))
    result = plan(path, out=tmp_path / "out", verify=1, verify_limit=2, runtime=QUIET32)
    top = result.finalists[0]
    assert top.observed is not None and set(top.observed) == set(top.tasks)
    assert {"merge", "evaluate"} <= set(top.verify_seconds)
    assert "merge + lm-eval, measured by --verify" in result.labelled_search_basis
    assert (tmp_path / "out" / "verify" / "rank1" / "config.json").is_file()


def test_objective_rules_and_expected_retention():

    tasks = ["a", "b", "c"]
    small, big = {"a": 1.0, "b": 1.0}, {"a": 1.0, "b": 0.6, "c": 0.4}
    # kept: two tasks above the floor either way, same mean; mean: same, the worst breaks the tie;
    # worst: a left-out task is lost
    assert objective(small, tasks, "kept", 0.5) == pytest.approx(objective(big, tasks, "kept", 0.5))
    assert objective(small, tasks, "mean", 0.5) < objective(big, tasks, "mean", 0.5)
    assert objective(small, tasks, "worst", 0.5) < objective(big, tasks, "worst", 0.5)
    exp = expected_retention({"a": 0.0, "b": 0.2, "c": 1.0})
    assert exp["a"] < exp["b"] < exp["c"] <= 1 and exp["a"] > 0
    # expected retention counts a partly kept task: the big merge wins on the mean now
    assert objective(big, tasks, "mean", 0.5, retention=expected_retention(big)) > \
        objective(small, tasks, "mean", 0.5, retention=expected_retention(small))
    # a judged candidate's expected retention is read at its agreement: a partial score of 0.69
    # (3 of 5 probes, 90 % of the tokens) is the 0.6 level, not two thirds of the way to 0.8
    j = Judged(Candidate((0,), "linear", None), Screen({}, {}), {"a": 0.69}, {"a": 0.9}, {"a": 0.6})
    assert j.predicted == expected_retention({"a": 0.6}) != expected_retention({"a": 0.69})


def test_the_best_are_confirmed_on_a_second_probe_sample(pool_zoo, tmp_path):
    """`confirm`: the best of the best rehearsed merges (a subset and a method: refined weights
    count once) are rehearsed again on k other probes per task (seeded, disjoint from the first k)
    and ranked on both samples; the winner is one of them."""
    from dataclasses import replace

    from mergekit_collapse.guard.assess import extraction_settings, probes_by_model, run_guard
    from mergekit_collapse.guard.probes import build_probes, more_probes
    from mergekit_collapse.guard.rehearsal import partial_credit, rehearse
    from mergekit_collapse.planner.search import Rehearser, geometry
    from mergekit_collapse.planner.space import candidate_raw, load_pool, merge_of
    from mergekit_collapse.runtime import Runtime

    path = write_pool(pool_zoo, tmp_path, per_task=4, rehearsals=5, refine=2, confirm=2)
    pool = load_pool(path)
    cfg = pool.cfg
    sample = build_probes(cfg)
    more = more_probes(cfg, sample)
    assert more.tasks == sample.tasks and not set(more.texts) & set(sample.texts)
    assert more == more_probes(cfg, sample)  # seeded
    once = plan(path, out=tmp_path / "once", runtime=QUIET32, confirm=0)
    result = plan(path, out=tmp_path / "out", runtime=QUIET32)
    assert [f.confirmed for f in result.finalists[:3]] == [True, True, False]
    top, runner_up = result.finalists[:2]
    assert (top.method, top.tasks) != (runner_up.method, runner_up.tasks)  # two merges, not clones
    assert any(f.origin == "refine" for f in result.finalists)
    assert not any(f.confirmed for f in once.finalists)
    assert "(confirmed)" in (tmp_path / "out" / "plan.md").read_text()
    # a confirmed candidate's evidence is pooled over both samples (2 probes each), the partial
    # score recomputed over 4 probes; first-sample values set by hand so that the pooling shows
    run = run_guard(cfg, runtime=Runtime(dtype="float32", progress=False), rehearse="off")
    rehearser = Rehearser(pool, geometry(pool, run), run.probes,
                          extraction_settings(cfg, QUIET32), None)
    c = Candidate((0, 2), "linear", None, None)
    j = rehearser(c)
    j = replace(j, agreement=dict.fromkeys(j.agreement, 0.5),
                token_agreement=dict.fromkeys(j.agreement, 0.25),
                rehearsal=dict.fromkeys(j.agreement, 0.5625))
    k = rehearser.confirmed(j)
    models = [cfg.models[i] for i in c.members]
    on_more = rehearse(merge_of(candidate_raw(pool, c)), models,
                      {str(m): probes_by_model(cfg, more)[str(m)] for m in models},
                      extraction_settings(cfg, QUIET32), answer_tokens=4, progress=False)
    for t, m in zip(k.agreement, models, strict=True):
        x = on_more.models[str(m)]
        assert k.agreement[t] == pytest.approx((0.5 + x["rehearsal_agreement"]) / 2)
        assert k.token_agreement[t] == pytest.approx((0.25 + x["rehearsal_token_agreement"]) / 2)
        assert k.rehearsal[t] == pytest.approx(
            partial_credit(k.agreement[t], k.token_agreement[t], 4))
    assert k.confirmed and k.seconds > j.seconds
    # two probes per task and k = 2: no probe is left, nothing is confirmed
    plain = plan(write_pool(pool_zoo, tmp_path, rehearsals=4, confirm=2), runtime=QUIET32)
    assert not any(f.confirmed for f in plain.finalists)


def test_confirm_takes_the_best_of_each_merge_not_its_refined_clones():
    """Of the rehearsed candidates, `confirm` re-judges the best of the `n` best merges (a refined
    twin of a merge already taken is passed over) and ranks them, re-judged, ahead of the rest."""
    from dataclasses import replace

    from mergekit_collapse._console import Progress
    from mergekit_collapse.planner.search import confirm

    def judged(members: tuple, method: str, weights: tuple | None, value: float) -> Judged:
        one = {"a": 1.0}
        return Judged(Candidate(members, method, weights), Screen({}, {}), one, one, one,
                      value=value)

    done = [judged((0, 1), "ties", (1.0, 1.0), 0.9), judged((0, 1), "ties", (0.9, 1.1), 0.89),
            judged((0, 1, 2), "linear", None, 0.8), judged((1, 2), "ties", (1.0, 1.0), 0.6)]
    # the second sample lowers the TIES merge below the linear one
    again = confirm(done, lambda j: replace(j, confirmed=True, value=j.value - 0.2 * (
        j.candidate.method == "ties")), 2, progress=Progress("confirm", 0, enabled=False))
    assert [(j.candidate.method, j.candidate.weights, j.confirmed) for j in again] == [
        ("linear", None, True), ("ties", (1.0, 1.0), True), ("ties", (0.9, 1.1), False),
        ("ties", (1.0, 1.0), False)]
    assert again[1].value == pytest.approx(0.7) and again[3].candidate.members == (1, 2)


def test_the_benchmarks_random_search_judges_as_the_planner_does(pool_zoo, tmp_path):
    """`benchmarks/planner.py`'s random search (the planner's baseline at equal budget) rehearses
    with the planner's own `Rehearser` and objective."""
    import importlib.util

    from mergekit_collapse.guard.assess import run_guard
    from mergekit_collapse.planner.space import load_pool
    from mergekit_collapse.runtime import Runtime

    path = Path(__file__).parents[2] / "benchmarks" / "planner.py"
    spec = importlib.util.spec_from_file_location("planner_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    pool = load_pool(write_pool(pool_zoo, tmp_path))
    run = run_guard(pool.cfg, runtime=Runtime(dtype="float32", progress=False), rehearse="off")
    best, seconds = bench.random_search(pool, run, 2, 0, "mean", 0.5)
    assert best.method in ("linear", "task_arithmetic") and len(best.members) >= 2 and seconds > 0
