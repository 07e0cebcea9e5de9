"""Calibration: hand-computed band edges and budget, file round trip, packaged default, CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from common import calibration_csv

from mergekit_collapse.analysis.fitting import fit_calibration, fit_calibration_file, roc_cuts
from mergekit_collapse.analysis.statistics import parse_records
from mergekit_collapse.errors import BadInputError
from mergekit_collapse.guard.calibration import Bands, Calibration, default_path, load_calibration


def test_fit_hand_computed() -> None:
    # cuts (descending): TPR .25 .25 .5 .75 .75 1 1 1, FPR 0 .25 .25 .25 .5 .5 .75 1
    # J max .5 at x ≥ .5 and x ≥ .3: the more specific, .5 -> edge (.5+.4)/2 = .45;
    # TPR ≥ .9 first at x ≥ .3 -> elevated edge (.3+.2)/2 = .25
    cal = fit_calibration(parse_records(calibration_csv()), score="x")
    assert cal.direction == "higher"
    assert cal.bands.collapse == pytest.approx(0.45) and cal.bands.elevated == pytest.approx(0.25)
    v = cal.validity
    assert v.auroc == pytest.approx(12 / 16) and v.youden_j == pytest.approx(0.5)
    assert (v.sensitivity_collapse == pytest.approx(0.75)
            and v.specificity_collapse == pytest.approx(0.75))
    assert v.sensitivity_elevated == pytest.approx(1.0) and v.n == 8 and v.n_collapsed == 4
    assert cal.relative_budget == pytest.approx(0.9)  # the same cut on 2·x
    assert [cal.band(x) for x in (0.45, 0.3, 0.2, None)] == ["collapse", "elevated", "low", None]


def test_roc_cuts_infinite_and_tied_scores() -> None:
    # an infinite MDS is a valid score: distinct values (descending) inf, 3, 2, -inf;
    # TPR .5 1 1 1, FPR 0 0 .5 1 (the tie at 2 is one cut) -> J = 1 at "≥ 3": edge (3 + 2) / 2
    x = np.array([np.inf, 3.0, 2.0, 2.0, -np.inf, 2.0])
    y = np.array([True, True, False, False, False, False])
    collapse, elevated = roc_cuts(x, y, sensitivity=0.5)
    assert collapse.edge == 2.5 and collapse.sensitivity == 1.0 and collapse.specificity == 1.0
    assert elevated == collapse  # never above the collapse cut
    # halfway between inf and 3 is not finite: the edge is the finite side
    top, _ = roc_cuts(np.array([np.inf, 3.0, 1.0]), np.array([True, False, False]), sensitivity=1.0)
    assert top.edge == 3.0 and top.specificity == 1.0


def test_fit_lower_direction_and_auto_score() -> None:
    text = calibration_csv().replace(",x,", ",sim,")
    rows = text.splitlines()
    flipped = [rows[0]] + [",".join(c if j != 5 else str(-float(c))
                                    for j, c in enumerate(r.split(",")))
                           for r in rows[1:]]
    cal = fit_calibration(parse_records("\n".join(flipped)), score="sim")
    assert cal.direction == "lower"
    assert cal.bands.collapse == pytest.approx(-0.45) and cal.bands.elevated == pytest.approx(-0.25)
    assert cal.band(-0.5) == "collapse" and cal.band(-0.3) == "elevated" and cal.band(0.0) == "low"
    # x and exact_rel tie (AUROC .75) > noise
    auto = fit_calibration(parse_records(calibration_csv()))
    assert auto.score == "x"
    forced = fit_calibration(parse_records(calibration_csv()), score="x", direction="lower")
    assert forced.direction == "lower" and forced.validity.auroc == pytest.approx(0.25)


def test_fit_bad_inputs() -> None:
    rec = parse_records(calibration_csv())
    with pytest.raises(BadInputError, match="no score column"):
        fit_calibration(rec, score="nope")
    with pytest.raises(BadInputError, match="collapsed and non-collapsed"):
        fit_calibration(rec, score="x", threshold=-100)
    with pytest.raises(BadInputError, match="sensitivity"):
        fit_calibration(rec, score="x", sensitivity=0)
    with pytest.raises(ValueError, match="out of order"):
        Calibration(score="x", direction="higher", bands=Bands(elevated=2, collapse=1), source={})


def test_file_round_trip_and_default(tmp_path: Path) -> None:
    # no user file yet: the packaged calibration from the validity run
    packaged = load_calibration()
    assert packaged.score == "relative_distortion" and packaged.source["setting"] == "last-1"
    assert packaged.source["bases"] == ["HuggingFaceTB/SmolLM2-135M-Instruct",
                                        "google/gemma-3-270m"]
    for name, digest in packaged.source["files"].items():  # records of both bases, committed
        assert hashlib.sha256((Path(__file__).parents[2] / name).read_bytes()).hexdigest() == digest
    assert packaged.band(2.0) == "collapse" and packaged.relative_budget > 0
    records = tmp_path / "records.csv"
    calibration_csv(records)
    cal, path = fit_calibration_file(records, score="x")
    assert path == default_path() and path.is_file()
    assert cal.source["sha256"] == hashlib.sha256(records.read_bytes()).hexdigest()
    assert cal.source["n"] == 8 and "date" in cal.source
    assert load_calibration() == cal
    path.write_text("{not json")
    with pytest.raises(BadInputError, match="invalid calibration"):
        load_calibration()
    with pytest.raises(BadInputError, match="not found"):
        load_calibration(tmp_path / "missing.json")


def test_calibrate_cli(tmp_path: Path) -> None:
    from mergekit_collapse.cli import main

    records = tmp_path / "records.csv"
    calibration_csv(records)
    out = tmp_path / "cal.json"
    res = CliRunner().invoke(main, ["calibrate", str(records), "--score", "x", "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["bands"] == {"elevated": pytest.approx(0.25), "collapse": pytest.approx(0.45)}
    assert "elevated ≥ 0.25" in res.output
    res = CliRunner().invoke(main, ["calibrate", str(records), "--score", "zzz"])
    assert res.exit_code == 2 and "no score column" in res.output
