"""guard/decision.py, imported directly: what a verdict and a band mean, their order, the edges."""

from __future__ import annotations

import json

import pytest
import yaml
from reports import make_report

from mergekit_collapse.guard.decision import (
    BOUNDS,
    COLLAPSE_THRESHOLD,
    SIGNALS,
    Band,
    DecidedBy,
    Verdict,
    at_or_above,
    band_of,
    comparison,
    decide,
    edges_in_order,
    edges_text,
    flagged,
    icon,
    orientation,
    outlier,
    verdict,
    worst,
    worst_band,
    worst_verdict,
)
from mergekit_collapse.guard.report import RehearsalInfo, RiskInfo, format_text, to_markdown


class Edges:
    def __init__(self, elevated: float, collapse: float):
        self.elevated, self.collapse = elevated, collapse


def test_enums_are_their_strings():
    assert Verdict.COLLAPSE == "collapse" and f"{Band.ELEVATED}" == "elevated"
    assert json.dumps([Verdict.MERGEABLE, DecidedBy.REHEARSAL]) == '["mergeable", "rehearsal"]'
    assert [b.value for b in Band] == ["low", "elevated", "collapse"]
    assert set(BOUNDS) == {"jung", "converse", "exact"} and set(SIGNALS) == {"risk", "rehearsal"}


def test_a_report_stores_plain_strings():
    """Enum members given to the report come back as plain strings: JSON and YAML are unchanged."""
    r = make_report(verdict=Verdict.COLLAPSE)
    r.models[0].risk_band = None
    r = r.model_validate({**r.model_dump(), "decided_by": DecidedBy.RISK})
    assert type(r.verdict) is str and type(r.decided_by) is str
    assert "verdict: collapse" in yaml.safe_dump(r.model_dump())


@pytest.mark.parametrize(("value", "direction", "expected"), [
    (0.1, "higher", Band.LOW), (0.5, "higher", Band.ELEVATED), (0.9, "higher", Band.COLLAPSE),
    (0.9, "lower", Band.LOW), (0.5, "lower", Band.ELEVATED), (0.1, "lower", Band.COLLAPSE),
    (None, "higher", None), (float("nan"), "lower", None)])
def test_band_of_honours_the_direction(value, direction, expected):
    edges = Edges(0.5, 0.8) if direction == "higher" else Edges(0.5, 0.2)
    assert band_of(value, direction, edges) is expected


def test_edges_text_honours_the_direction():
    assert (orientation("higher"), orientation("lower")) == (1.0, -1.0)
    assert edges_in_order("higher", 0.5, 0.8) and not edges_in_order("higher", 0.8, 0.5)
    assert edges_in_order("lower", 0.5, 0.2) and not edges_in_order("lower", 0.2, 0.5)
    assert comparison("higher") == "≥" and comparison("lower") == "≤"
    assert edges_text("higher", 0.5, 0.8) == "elevated ≥ 0.5, collapse ≥ 0.8"
    assert edges_text("lower", 0.5, 0.2) == "elevated ≤ 0.5, collapse ≤ 0.2"


def test_orders():
    assert worst_band(["low", None, "collapse", "elevated"]) is Band.COLLAPSE
    assert worst_band([None]) is None
    assert worst_verdict(["mergeable", "unassessed"]) is Verdict.UNASSESSED
    assert worst_verdict(["unassessed", "collapse", "mergeable"]) is Verdict.COLLAPSE
    assert worst_verdict([]) is Verdict.MERGEABLE
    assert at_or_above("collapse", "elevated") and not at_or_above("low", "elevated")
    assert not at_or_above(None, "low")
    assert (icon("mergeable"), icon("collapse"), icon("unassessed")) == ("✅", "⛔", "⚠️")


def test_bounds_and_signals_decide():
    assert verdict(jung=1, converse=0.1, exact=0.5, budget=2) == ("mergeable", "jung")
    assert verdict(jung=3, converse=2.5, exact=2.8, budget=2) == ("collapse", "converse")
    assert verdict(jung=3, converse=1, exact=1.5, budget=2) == ("mergeable", "exact")
    bounds = (Verdict.MERGEABLE, DecidedBy.EXACT)
    assert decide(bounds=bounds, budget_source="config", signals={}, prefer="risk")[:2] == bounds
    v, by, note = decide(bounds=bounds, budget_source="calibration", prefer="rehearsal",
                         signals={"risk": ["collapse", "low"], "rehearsal": ["low", "elevated"]})
    assert (v, by, note) == (Verdict.MERGEABLE, DecidedBy.REHEARSAL, None)
    v, by, note = decide(bounds=bounds, budget_source="calibration", prefer="rehearsal",
                         signals={"risk": ["collapse", "low"], "rehearsal": [None, "low"]})
    assert (v, by) == (Verdict.COLLAPSE, DecidedBy.RISK)
    v, by, note = decide(bounds=bounds, budget_source="calibration", prefer="risk", signals={})
    assert (v, by) == (Verdict.UNASSESSED, DecidedBy.NONE) and note


def test_flagged_worst_and_outlier():
    r = make_report(verdict="collapse")
    assert flagged(r) == [] and outlier(r) == 2 == worst(r)  # decided by a bound: the MDS outlier
    r.decided_by = "risk"
    r.models[1].risk_band, r.models[2].risk_band = "collapse", "elevated"
    assert flagged(r) == [1] and worst(r) == 1 and outlier(r) == 2
    r.models[0].mds = None  # MDS undefined: the highest distortion under the uniform average
    assert outlier(r) == 2


def test_the_collapse_threshold_is_the_one_default():
    from mergekit_collapse.cli.calibrate import calibrate
    from mergekit_collapse.cli.stats import stats
    from mergekit_collapse.guard.calibration import Calibration

    assert COLLAPSE_THRESHOLD == -30.0
    assert Calibration.model_fields["threshold"].default == COLLAPSE_THRESHOLD
    for command in (calibrate, stats):
        default = next(p.default for p in command.params if p.name == "threshold")
        assert default == COLLAPSE_THRESHOLD


def test_the_report_prints_edges_in_the_signals_direction():
    """A lower-is-riskier risk score prints "≤" (it printed "≥" whatever the direction)."""
    r = make_report()
    r.risk = RiskInfo(score="retention", direction="lower", elevated=0.5, collapse=0.2,
                      calibration={})
    r.rehearsal = RehearsalInfo(status="ran", score="rehearsal_agreement", direction="lower",
                                elevated=0.8, collapse=0.6)
    text = format_text(r)
    assert "bands elevated ≤ 0.5, collapse ≤ 0.2" in text
    assert "bands elevated ≤ 0.8, collapse ≤ 0.6" in text
    r.risk.direction, r.risk.elevated, r.risk.collapse = "higher", 0.5, 0.8
    assert "bands elevated ≥ 0.5, collapse ≥ 0.8" in format_text(r)
    assert to_markdown(r).startswith("### ✅ mergekit-collapse: **mergeable**")
