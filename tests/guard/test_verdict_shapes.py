"""Every config shape gets a risk verdict (anchored score and rehearsal), or says why not."""

from __future__ import annotations

import pytest
import yaml
from common import QUIET32

from mergekit_collapse.guard.assess import check
from mergekit_collapse.guard.config import parse_config

PROBES = ["the cat sat on", "one two three", "hello there", "a b c d", "zero one", "red green"]


def shape(zoo, name):
    """A config of one shape, as a user would write it for mergekit."""
    lora = [f"{zoo['base']}+{zoo[m]}" for m in ("lora1", "lora2", "lora3")]
    full = [str(zoo[m]) for m in ("ft1", "ft2", "ft3")]
    base = str(zoo["base"])
    weighted = [{"model": r, "parameters": {"weight": 1.0, "density": 0.5}} for r in full]
    raw = {
        "linear-loras": {"merge_method": "linear",
                         "models": [{"model": r, "parameters": {"weight": 1.0}}
                                                               for r in lora]},
        "linear-full": {"merge_method": "linear",
                        "models": [{"model": r, "parameters": {"weight": 1.0}}
                                                              for r in full]},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": base,
                            "models": [{"model": r, "parameters": {"weight": 1.0}} for r in full]},
        "ties": {"merge_method": "ties", "base_model": base, "models": weighted},
        "dare_ties": {"merge_method": "dare_ties", "base_model": base, "models": weighted},
        "slerp": {"merge_method": "slerp", "base_model": full[0], "parameters": {"t": 0.5},
                  "slices": [{"sources": [{"model": full[0], "layer_range": [0, 2]},
                                          {"model": full[1], "layer_range": [0, 2]}]}]},
    }[name]
    refs = lora if name == "linear-loras" else full[:2] if name == "slerp" else full
    guard = {"k": 2, "tasks": {r: {"name": f"t{i}", "probes": PROBES[2 * i: 2 * i + 2]}
                               for i, r in enumerate(refs)}}
    if name in ("linear-full", "slerp"):
        guard["base"] = base  # full fine-tunes: the config cannot name their base for mergekit
    return parse_config(yaml.safe_dump({**raw, "dtype": "float32", "guard": guard}))


@pytest.mark.parametrize("name", ["linear-loras", "linear-full", "task_arithmetic", "ties",
                                  "dare_ties", "slerp"])
def test_every_shape_gets_both_signals(tiny_zoo, name):
    report = check(shape(tiny_zoo, name), runtime=QUIET32)
    assert report.base_model is not None
    assert report.rehearsal.status == "ran", report.rehearsal.reason
    for m in report.models:
        assert m.risk_score is not None and m.risk_band is not None
        assert m.predicted_retention is not None and 0 <= m.predicted_retention <= 1
    assert report.decided_by in ("risk", "rehearsal", "converse", "exact")


def test_without_base_or_rehearsal_the_verdict_says_why(tiny_zoo):
    cfg = shape(tiny_zoo, "linear-full")
    cfg = parse_config(cfg.source.replace(f"base: {tiny_zoo['base']}", "rehearse: 'off'"))
    report = check(cfg, runtime=QUIET32)
    assert report.base_model is None and report.rehearsal.status == "off"
    assert report.verdict != "mergeable"
    assert any("guard.base" in n for n in report.notes)
