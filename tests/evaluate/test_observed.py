"""Evaluate a real mergekit merge of tiny models with the real lm-eval harness; Eq. 1; caching."""

from __future__ import annotations

import json

import pytest
import yaml
from common import QUIET, make_tiny_tasks, merge_with_mergekit

from mergekit_collapse.evaluate import harness
from mergekit_collapse.evaluate.observed import evaluate_merge, write_evaluation
from mergekit_collapse.guard.assess import check
from mergekit_collapse.guard.config import load_config


@pytest.fixture
def merged(tiny_zoo, tmp_path):
    tasks = make_tiny_tasks(tmp_path)
    lora = f"{tiny_zoo['base']}+{tiny_zoo['lora1']}"
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(tiny_zoo["base"]),
        "models": [{"model": str(tiny_zoo["ft1"]), "parameters": {"weight": 0.5}},
                   {"model": lora, "parameters": {"weight": 0.5}}],
        "dtype": "float32",
        "guard": {"tasks": {
            str(tiny_zoo["ft1"]): {"name": "a", "probes": ["alpha beta", "gamma"],
                                   "eval": str(tasks / "tiny_mc.yaml")},
            lora: {"name": "b", "probes": ["one two", "three"],
                   "eval": str(tasks / "tiny_mc.yaml")}}},
    }
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(cfg))
    out = merge_with_mergekit(path, tmp_path / "merged", tmp_path / "lora-cache")
    report = check(path, runtime=QUIET, absolute_budget=1e9)
    report.write(out / "mergeability")
    return path, out, report


def test_evaluate_merge_end_to_end(merged, monkeypatch):
    path, out, report = merged
    cfg = load_config(path)
    ev = evaluate_merge(out, cfg, limit=6, batch_size=4, report=report, progress=False)
    assert [t.task for t in ev.tasks] == ["a", "b"]
    for t in ev.tasks:
        assert t.metric == "acc" and t.eval == "tiny_mc"
        assert 0 <= t.merged <= 1 and 0 <= t.constituent <= 1
        if t.constituent:
            assert t.loss == pytest.approx((t.merged / t.constituent - 1) * 100)  # Eq. 1
        # the merge keeps part of each model's shift from the base
        assert t.observed_retention is not None and -1 < t.observed_retention < 2
    paths = write_evaluation(ev, out / "mergeability", report)
    data = json.loads(paths["json"].read_text())
    assert (data["schema_version"] == "1.0" and len(data["tasks"]) == 2
            and data["dtype"] == "float32")
    assert paths["plot"].stat().st_size > 1000

    # a re-run pays nothing: every score comes from the cache
    def no_eval(*a, **k):
        raise AssertionError("lm-eval ran again")

    monkeypatch.setattr(harness, "run_tasks", no_eval)
    again = evaluate_merge(out, cfg, limit=6, batch_size=4, progress=False)
    assert [t.merged for t in again.tasks] == [t.merged for t in ev.tasks]
    # scores are cached per dtype: bfloat16 is scored afresh, for the merge and constituents alike
    with pytest.raises(AssertionError, match="ran again"):
        evaluate_merge(out, cfg, limit=6, batch_size=4, progress=False, dtype="bfloat16")
