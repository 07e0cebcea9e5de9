"""`mergekit-collapse run`: guard -> merge -> evaluate -> card -> push, end to end and resumable."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner
from common import QUIET, make_tiny_tasks
from hub_server import TOKEN

from mergekit_collapse import merge
from mergekit_collapse.cli import main
from mergekit_collapse.errors import GuardStoppedError
from mergekit_collapse.evaluate import harness
from mergekit_collapse.pipeline import run_pipeline

REPO = "alice/tiny-merge"


@pytest.fixture
def config(tiny_zoo, tmp_path):
    tasks = make_tiny_tasks(tmp_path)
    lora = f"{tiny_zoo['base']}+{tiny_zoo['lora1']}"
    refs = [str(tiny_zoo["ft1"]), lora, str(tiny_zoo["ft2"])]
    raw = {
        "merge_method": "task_arithmetic",
        "base_model": str(tiny_zoo["base"]),
        "models": [{"model": r, "parameters": {"weight": 0.5}} for r in refs],
        "dtype": "float32",
        "guard": {"budget": {"absolute": 1e9}, "tasks": {
            r: {"name": n, "probes": [f"{n} probe one", f"{n} probe two"],
                "eval": str(tasks / "tiny_mc.yaml")} for r, n in zip(refs, "abc", strict=True)}},
    }
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_run_end_to_end_with_push_then_resume(config, tmp_path, hub, monkeypatch):
    from huggingface_hub import ModelCard, hf_hub_download

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = tmp_path / "merged"
    res = CliRunner().invoke(main, ["run", str(config), str(out), "--push", REPO, "--limit", "6"])
    assert res.exit_code == 0, res.output
    assert TOKEN not in res.output
    for name in ("config.json", "README.md", "mergeability/report.json",
                 "mergeability/evaluation.json", "mergeability/hidden_sim.png"):
        assert (out / name).is_file(), name
    ev = json.loads((out / "mergeability" / "evaluation.json").read_text())
    assert [t["task"] for t in ev["tasks"]] == ["a", "b", "c"]
    # the pushed card round-trips with its mergeability metadata
    card = ModelCard.load(hf_hub_download(REPO, "README.md", token=TOKEN,
                                          cache_dir=tmp_path / "dl"))
    assert "mergekit-collapse" in card.data.tags  # (local paths: no Hub base_model to relate to)
    assert card.data.mergeability["verdict"] == "mergeable"
    assert len(card.data.mergeability["observed"]["tasks"]) == 3

    # a re-run skips the finished merge and evaluation (both would fail if called)
    def fail(*a, **k):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(merge, "guarded_merge", fail)
    monkeypatch.setattr(harness, "run_tasks", fail)
    rerun = ["run", str(config), str(out), "--limit", "6"]
    res = CliRunner().invoke(main, rerun)
    assert res.exit_code == 0, res.output
    assert "finished earlier, outputs intact: skipped" in res.output
    # a damaged output is redone, not trusted
    (out / "config.json").write_text("{}")
    res = CliRunner().invoke(main, rerun)
    assert res.exit_code == 1 and "ran again" in res.output


def test_abort_leaves_no_output(config, tmp_path):
    out = tmp_path / "merged"
    with pytest.raises(GuardStoppedError):
        run_pipeline(config, out, absolute_budget=1e-9, runtime=QUIET, echo=lambda s: None)
    assert not out.exists()
