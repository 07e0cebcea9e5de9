"""Calibrate the default risk score from merge records: risk bands and the default relative budget.

From merge records (format: `mergekit_collapse.statistics`), with "collapsed" meaning
``loss < threshold`` (default −30):

* **score and direction** — the per-model score column (``--score``; by default the column with
  the best AUROC) and which of its values go with collapse (``higher`` when its AUROC ≥ 0.5,
  see `statistics.auroc`), unless given.
* **bands** — ``low`` / ``elevated`` / ``collapse`` edges on that score. The *collapse* edge
  maximises Youden's J = sensitivity + specificity − 1 over the ROC cuts (ties: the more specific
  cut, leaving the sensitive side to *elevated*); the *elevated* edge is the least extreme cut that still flags at least ``sensitivity``
  (default 0.9) of the collapsed rows, never beyond the collapse edge. Edges sit halfway between
  the two observed values they separate.
* **relative_budget** — when the records carry the guard's budget quantity (the ``exact_rel``
  column by default: the group's r*² over the base's probe spread, what a relative budget
  bounds), its Youden-J cut with higher = more risk; otherwise None (the guard keeps its own
  default).

The result is a `Calibration` JSON written to ``cache_root()/calibration.json`` by default;
`load_calibration` reads that file when present, else the packaged
``calibration_default.json``, fitted on the records of ``benchmarks/validity.py``
(``benchmarks/results/records-last-1.jsonl``; its ``source`` says how).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field, ValidationError, model_validator

from mergekit_collapse.constants import cache_root
from mergekit_collapse.errors import BadInputError
from mergekit_collapse.report import Band
from mergekit_collapse.statistics import DEFAULT_THRESHOLD, Records, auroc, collapsed, correlation

Direction = Literal["higher", "lower"]
CALIBRATION_FILE = "calibration.json"
DEFAULT_RESOURCE = "calibration_default.json"
#: the records column a relative budget bounds: the merge's r*² over the base model's probe spread
#: (benchmarks/validity.py writes it; the guard's verdict compares r*² with budget × spread)
DEFAULT_BUDGET_COLUMN = "exact_rel"


class Bands(BaseModel):
    """Band edges in the score's own units: `collapse` from this edge on, `elevated` from that one."""

    elevated: float
    collapse: float


class Validity(BaseModel):
    """How well the score separated collapsed records when it was calibrated."""

    n: int
    n_collapsed: int
    auroc: float | None = Field(description="AUROC in the calibrated direction (0.5 = chance)")
    spearman_rho: float | None = Field(default=None, description="score vs loss")
    spearman_p: float | None = None
    youden_j: float | None = Field(default=None, description="J at the collapse edge")
    sensitivity_collapse: float | None = None
    specificity_collapse: float | None = None
    sensitivity_elevated: float | None = None


def band_of(value: float | None, direction: Direction, bands: Bands) -> Band | None:
    """The band of one score value: "collapse" at or beyond the collapse edge, "elevated" at or
    beyond the elevated edge, else "low"; None for a missing value."""
    if value is None or math.isnan(value):
        return None
    sign = 1.0 if direction == "higher" else -1.0
    if sign * value >= sign * bands.collapse:
        return "collapse"
    if sign * value >= sign * bands.elevated:
        return "elevated"
    return "low"


class SignalBands(BaseModel):
    """Bands on a second per-model signal (the rehearsal's predicted retention)."""

    score: str = Field(description="the ModelEntry field the bands apply to")
    direction: Direction
    bands: Bands
    validity: Validity | None = None

    def band(self, value: float | None) -> Band | None:
        return band_of(value, self.direction, self.bands)


class Calibration(BaseModel):
    """The default risk score's bands and the guard's default relative budget.

    `rehearsal` carries the bands of the rehearsal's score, and `decides` which of the two signals
    decides the verdict when both were computed (the better one out of sample, RESULTS.md).
    """

    score: str = Field(description="the per-model score column the bands apply to")
    direction: Direction = Field(description="higher: larger scores are riskier; lower: smaller")
    bands: Bands
    relative_budget: float | None = Field(default=None, gt=0)
    threshold: float = Field(default=DEFAULT_THRESHOLD, description="loss below this = collapsed")
    source: dict[str, Any] = Field(description="records file sha256, n, date — or a note")
    validity: Validity | None = None
    rehearsal: SignalBands | None = None
    decides: Literal["risk", "rehearsal"] = "risk"
    out_of_sample: dict[str, Any] | None = Field(default=None, description=(
        "how the bands did on records they were not fitted on (benchmarks/validity.py)"))

    @model_validator(mode="after")
    def _ordered(self) -> Calibration:
        e, c = self.bands.elevated, self.bands.collapse
        if (self.direction == "higher" and e > c) or (self.direction == "lower" and e < c):
            raise ValueError(f"band edges out of order for direction '{self.direction}': "
                             f"elevated {e}, collapse {c}")
        return self

    def band(self, value: float | None) -> Band | None:
        """The risk band of one score value (see `band_of`)."""
        return band_of(value, self.direction, self.bands)


# ---------------------------------------------------------------------------------------------
# Fitting
# ---------------------------------------------------------------------------------------------


class _Cut(BaseModel):
    edge: float  # oriented units: collapse when oriented score ≥ edge
    sensitivity: float
    specificity: float


def _edge(values: np.ndarray, k: int) -> float:
    """Halfway between the k-th distinct value (descending) and the next lower one."""
    hi = float(values[k])
    if k + 1 >= len(values):
        return hi
    mid = (hi + float(values[k + 1])) / 2
    return mid if math.isfinite(mid) else (hi if math.isfinite(hi) else float(values[k + 1]))


def roc_cuts(oriented: np.ndarray, labels: np.ndarray, *, sensitivity: float) -> tuple[_Cut, _Cut]:
    """(Youden-J cut, high-sensitivity cut) for the rule "collapse when oriented score ≥ edge".

    Args:
        oriented: scores, oriented so that higher = more risk (NaN already dropped).
        labels: collapsed or not.
        sensitivity: the elevated cut's minimum sensitivity.

    Returns:
        The collapse cut (max J, ties to the more specific) and the elevated cut (the highest
        edge with sensitivity ≥ `sensitivity`, never above the collapse cut).
    """
    values = np.unique(oriented)[::-1]  # distinct, descending
    pos, neg = oriented[labels], oriented[~labels]
    tpr = np.array([(pos >= v).mean() for v in values])
    fpr = np.array([(neg >= v).mean() for v in values])
    j = tpr - fpr
    k_c = int(np.flatnonzero(j >= j.max() - 1e-12)[0])
    collapse = _Cut(edge=_edge(values, k_c), sensitivity=float(tpr[k_c]), specificity=float(1 - fpr[k_c]))
    k_e = int(np.flatnonzero(tpr >= sensitivity - 1e-12)[0])
    k_e = max(k_e, k_c)
    elevated = _Cut(edge=_edge(values, k_e), sensitivity=float(tpr[k_e]), specificity=float(1 - fpr[k_e]))
    return collapse, elevated


def _best_score(records: Records, labels: np.ndarray, keep: np.ndarray) -> str:
    best, best_auc = None, -1.0
    for name in records.metrics:
        a = auroc(records.column(name)[keep], labels[keep])
        if a.auroc_best is not None and a.auroc_best > best_auc:
            best, best_auc = name, a.auroc_best
    if best is None:
        raise BadInputError("no metric column separates collapsed from non-collapsed records "
                            "(each is constant, missing, or one class only)")
    return best


def fit_calibration(records: Records, *, score: str | None = None, direction: Direction | None = None,
                    threshold: float = DEFAULT_THRESHOLD, sensitivity: float = 0.9,
                    budget_column: str = DEFAULT_BUDGET_COLUMN,
                    source: dict[str, Any] | None = None) -> Calibration:
    """Fit risk bands on `score` (and the default relative budget) from merge records.

    Args:
        records: parsed merge records.
        score: the score column; None picks the metric column with the best AUROC.
        direction: "higher" or "lower" = riskier; None takes it from the AUROC (≥ 0.5: higher).
        threshold: a record is collapsed when its loss is below this (percent).
        sensitivity: the elevated edge's minimum sensitivity (0 < s ≤ 1).
        budget_column: the column holding the guard's relative budget quantity.
        source: provenance to store (file, sha256, n, date).

    Returns:
        The `Calibration`.

    Raises:
        BadInputError: unknown score column, fewer than 3 usable records, or only one class.
    """
    if not 0 < sensitivity <= 1:
        raise BadInputError(f"sensitivity must be in (0, 1], got {sensitivity}")
    loss = records.column("loss")
    keep = ~np.isnan(loss)
    labels = collapsed(loss, threshold)
    if score is None:
        score = _best_score(records, labels, keep)
    if score not in records.metrics:
        raise BadInputError(f"no score column '{score}' in the records; metric columns: {records.metrics}")
    x = records.column(score)
    use = keep & ~np.isnan(x)
    x, y, lo = x[use], labels[use], loss[use]
    if len(x) < 3:
        raise BadInputError(f"only {len(x)} records have both '{score}' and a loss; need ≥ 3")
    if y.all() or not y.any():
        raise BadInputError(f"records need collapsed and non-collapsed rows (loss < {threshold:g}); "
                            f"{int(y.sum())} of {len(y)} are collapsed")
    auc = auroc(x, y)
    if direction is None:
        direction = auc.direction or "higher"
    sign = 1.0 if direction == "higher" else -1.0
    cut_c, cut_e = roc_cuts(sign * x, y, sensitivity=sensitivity)
    corr = correlation(x, lo)
    oriented_auc = None if auc.auroc is None else (auc.auroc if direction == "higher" else 1 - auc.auroc)
    validity = Validity(n=len(x), n_collapsed=int(y.sum()), auroc=oriented_auc,
                        spearman_rho=corr.spearman_rho, spearman_p=corr.spearman_p,
                        youden_j=cut_c.sensitivity + cut_c.specificity - 1,
                        sensitivity_collapse=cut_c.sensitivity, specificity_collapse=cut_c.specificity,
                        sensitivity_elevated=cut_e.sensitivity)
    budget = None
    if budget_column in records.metrics:
        b = records.column(budget_column)
        ok = keep & np.isfinite(b)
        if ok.sum() >= 3 and labels[ok].any() and not labels[ok].all() and np.unique(b[ok]).size > 1:
            cut_b, _ = roc_cuts(b[ok], labels[ok], sensitivity=sensitivity)
            budget = cut_b.edge if cut_b.edge > 0 else None
    src = dict(source or {})
    src.setdefault("n", int(records.n))
    src.setdefault("date", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    return Calibration(score=score, direction=direction,
                       bands=Bands(elevated=sign * cut_e.edge, collapse=sign * cut_c.edge),
                       relative_budget=budget, threshold=threshold, source=src, validity=validity)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def default_path() -> Path:
    """Where `calibrate` writes and `load_calibration` looks first: cache_root()/calibration.json."""
    return cache_root() / CALIBRATION_FILE


def calibrate_file(records_path: str | Path, *, out: str | Path | None = None, score: str | None = None,
                   direction: Direction | None = None, threshold: float = DEFAULT_THRESHOLD,
                   sensitivity: float = 0.9, budget_column: str = DEFAULT_BUDGET_COLUMN
                   ) -> tuple[Calibration, Path]:
    """Read a records file, fit the calibration, write it as JSON.

    Args:
        records_path: CSV or JSONL merge records.
        out: the JSON to write; default `cache_root()/calibration.json`.
        score: see `fit_calibration`.
        direction: see `fit_calibration`.
        threshold: see `fit_calibration`.
        sensitivity: see `fit_calibration`.
        budget_column: see `fit_calibration`.

    Returns:
        (the calibration, the path written).

    Raises:
        BadInputError: unreadable or invalid records, or records that cannot be calibrated.
    """
    from mergekit_collapse.statistics import parse_records

    path = Path(records_path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BadInputError(f"records file not found: {path}") from None
    except OSError as e:
        raise BadInputError(f"cannot read records {path}: {e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadInputError(f"{path}: records must be UTF-8 text") from None
    suffix = path.suffix.lower()
    fmt = "jsonl" if suffix in {".jsonl", ".json", ".ndjson"} else "csv" if suffix == ".csv" else None
    records = parse_records(text, fmt, source=str(path))
    source = {"file": str(path), "sha256": hashlib.sha256(data).hexdigest(), "n": records.n}
    cal = fit_calibration(records, score=score, direction=direction, threshold=threshold,
                          sensitivity=sensitivity, budget_column=budget_column, source=source)
    return cal, write_calibration(cal, out)


def write_calibration(cal: Calibration, path: str | Path | None = None) -> Path:
    """Write a calibration as JSON (default `cache_root()/calibration.json`); return the path."""
    p = Path(path) if path is not None else default_path()
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(cal.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return p


def _parse(text: str, where: str) -> Calibration:
    try:
        return Calibration.model_validate(json.loads(text))
    except (ValueError, ValidationError) as e:
        first = e.errors()[0]["msg"] if isinstance(e, ValidationError) else str(e)
        raise BadInputError(f"{where}: invalid calibration ({first})") from None


def load_calibration(path: str | Path | None = None) -> Calibration:
    """The calibration in use: `path`, else the user's `cache_root()/calibration.json`, else the default.

    Args:
        path: an explicit calibration JSON.

    Returns:
        The `Calibration`. The packaged default carries placeholder values (its `source.note`).

    Raises:
        BadInputError: `path` is missing, or a calibration file is not valid.
    """
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise BadInputError(f"calibration file not found: {p}")
        return _parse(p.read_text(encoding="utf-8"), str(p))
    user = default_path()
    if user.is_file():
        return _parse(user.read_text(encoding="utf-8"), str(user))
    text = resources.files("mergekit_collapse").joinpath(DEFAULT_RESOURCE).read_text(encoding="utf-8")
    return _parse(text, f"packaged {DEFAULT_RESOURCE}")
