"""ci/results.py, imported directly: a report becomes findings, a failing status and one verdict."""

from __future__ import annotations

from pathlib import Path

from reports import MODELS, make_report

from mergekit_collapse.ci.results import (
    ConfigResult,
    fails,
    findings,
    overall_verdict,
    report_band,
    worst_band,
)
from mergekit_collapse.errors import EXIT_OK
from mergekit_collapse.guard.report import RiskInfo


def result(report=None, error: str | None = None) -> ConfigResult:
    return ConfigResult(path=Path("merge.yml"), display="merge.yml", exit_code=EXIT_OK,
                        report=report, error=error)


def risky(direction: str = "higher"):
    """A report decided by the risk score: math in the collapse band, code elevated."""
    r = make_report(verdict="collapse")
    r.decided_by = "risk"
    edges = (0.5, 0.8) if direction == "higher" else (0.5, 0.2)
    r.risk = RiskInfo(score="relative_distortion", direction=direction, elevated=edges[0],
                      collapse=edges[1], calibration={})
    values = (0.1, 0.9, 0.6) if direction == "higher" else (0.9, 0.1, 0.4)
    for m, v, band in zip(r.models, values, ("low", "collapse", "elevated"), strict=True):
        m.risk_score, m.risk_band = v, band
    return r


def test_fails_by_verdict_and_band():
    calm, r = make_report(), risky()
    assert not fails(calm, "collapse") and fails(r, "collapse") and not fails(r, "never")
    calm.models[0].risk_band = "elevated"
    assert fails(calm, "elevated") and not fails(calm, "collapse")


def test_bands_and_the_overall_verdict():
    r = risky()
    assert report_band(r) == "collapse" and report_band(make_report()) is None
    assert worst_band([result(make_report()), result(r)]) == "collapse"
    assert worst_band([result(make_report())]) == "none"
    unassessed = make_report(verdict="unassessed")
    assert overall_verdict([result(make_report()), result(unassessed)]) == "unassessed"
    assert overall_verdict([result(unassessed), result(r)]) == "collapse"
    assert overall_verdict([result(r), result(error="boom")]) == "error"
    assert overall_verdict([]) == "none"


def test_findings_state_the_edge_in_the_signals_direction():
    for direction, cmp in (("higher", "≥ 0.8"), ("lower", "≤ 0.2")):
        found = findings(result(risky(direction)))
        assert [(f.level, f.rule, f.model) for f in found] == [
            ("error", "collapse-band", MODELS[1]), ("warning", "elevated-band", MODELS[2])]
        assert f"in the collapse band ({cmp})." in found[0].message


def test_a_set_over_budget_by_the_bounds_points_at_its_outlier():
    found = findings(result(make_report(verdict="collapse")))
    assert [(f.rule, f.model) for f in found] == [("over-budget", MODELS[2])]
