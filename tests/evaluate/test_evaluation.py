"""lm-eval runner on a tiny real model through the real harness, offline; merging loss (Eq. 1)."""

from __future__ import annotations

from pathlib import Path

import pytest
from common import make_tiny_tasks

from mergekit_collapse.errors import BadInputError
from mergekit_collapse.evaluate.harness import merging_loss, run_tasks


def test_merging_loss_eq1() -> None:
    assert merging_loss(0.45, 0.9) == pytest.approx(-50.0)
    assert merging_loss(0.9, 0.9) == pytest.approx(0.0)
    assert merging_loss(0.0, 0.8) == pytest.approx(-100.0)
    assert merging_loss(0.6, 0.5) == pytest.approx(20.0)


def test_merging_loss_rejects_zero_constituent() -> None:
    with pytest.raises(BadInputError, match="scores 0"):
        merging_loss(0.5, 0.0)
    with pytest.raises(BadInputError):
        merging_loss(float("nan"), 0.5)


def test_run_tasks_on_tiny_model(tiny_zoo: dict[str, Path], tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_zoo["base"], dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_zoo["base"])
    yamls = make_tiny_tasks(tmp_path)
    scores = run_tasks(model, tok, ["tiny_mc", "tiny_gen"], include_path=yamls, limit=4,
                       batch_size=4)
    assert set(scores) == {"tiny_mc", "tiny_gen"}
    assert 0.0 <= scores["tiny_mc"]["acc"] <= 1.0
    assert scores["tiny_gen"]["exact_match"] == 0.0  # a random model never spells "even"
    one = run_tasks(model, tok, ["tiny_mc"], include_path=yamls / "tiny_mc.yaml", limit=2,
                    batch_size=2)
    assert set(one) == {"tiny_mc"}
    with pytest.raises(BadInputError, match="unknown lm-eval task"):
        run_tasks(model, tok, ["no_such_task"], include_path=yamls, limit=1)
