"""Fit the calibration (risk bands, default relative budget) from merge records."""

from __future__ import annotations

import datetime as _dt
import hashlib
import math
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from mergekit_collapse.analysis.statistics import (
    Records,
    auroc,
    collapsed,
    correlation,
    parse_records,
)
from mergekit_collapse.errors import BadInputError
from mergekit_collapse.guard.calibration import (
    DEFAULT_BUDGET_COLUMN,
    Bands,
    Calibration,
    Validity,
    write_calibration,
)
from mergekit_collapse.guard.decision import COLLAPSE_THRESHOLD, Direction, orientation


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

    The ROC points are sklearn's `roc_curve` at every distinct score; each cut's edge lies halfway
    between its score and the next lower one.

    Args:
        oriented: scores, oriented so that higher = more risk (NaN already dropped; ±inf allowed).
        labels: collapsed or not (both classes present).
        sensitivity: the elevated cut's minimum sensitivity.

    Returns:
        The collapse cut (max J, ties to the more specific) and the elevated cut (the highest
        edge with sensitivity ≥ `sensitivity`, never above the collapse cut).
    """
    from sklearn.metrics import roc_curve

    # roc_curve wants finite scores: pass each value's rank among the distinct values (±inf allowed)
    distinct, rank = np.unique(oriented, return_inverse=True)
    fpr, tpr, thresholds = roc_curve(labels, rank, drop_intermediate=False)
    # drop sklearn's leading (inf, 0, 0) point: one point per distinct value, descending
    values, fpr, tpr = distinct[thresholds[1:].astype(int)], fpr[1:], tpr[1:]
    j = tpr - fpr
    k_c = int(np.flatnonzero(j >= j.max() - 1e-12)[0])
    collapse = _Cut(edge=_edge(values, k_c), sensitivity=float(tpr[k_c]),
                    specificity=float(1 - fpr[k_c]))
    k_e = int(np.flatnonzero(tpr >= sensitivity - 1e-12)[0])
    k_e = max(k_e, k_c)
    elevated = _Cut(edge=_edge(values, k_e), sensitivity=float(tpr[k_e]),
                    specificity=float(1 - fpr[k_e]))
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


def fit_calibration(records: Records, *, score: str | None = None,
                    direction: Direction | None = None, threshold: float = COLLAPSE_THRESHOLD,
                    sensitivity: float = 0.9, budget_column: str = DEFAULT_BUDGET_COLUMN,
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
        raise BadInputError(f"no score column '{score}' in the records; metric columns: "
                            f"{records.metrics}")
    x = records.column(score)
    use = keep & ~np.isnan(x)
    x, y, lo = x[use], labels[use], loss[use]
    if len(x) < 3:
        raise BadInputError(f"only {len(x)} records have both '{score}' and a loss; need ≥ 3")
    if y.all() or not y.any():
        raise BadInputError("records need collapsed and non-collapsed rows (loss < "
                            f"{threshold:g}); {int(y.sum())} of {len(y)} are collapsed")
    auc = auroc(x, y)
    if direction is None:
        direction = auc.direction or "higher"
    sign = orientation(direction)
    cut_c, cut_e = roc_cuts(sign * x, y, sensitivity=sensitivity)
    corr = correlation(x, lo)
    oriented_auc = None if auc.auroc is None else (auc.auroc if sign > 0 else 1 - auc.auroc)
    validity = Validity(n=len(x), n_collapsed=int(y.sum()), auroc=oriented_auc,
                        spearman_rho=corr.spearman_rho, spearman_p=corr.spearman_p,
                        youden_j=cut_c.sensitivity + cut_c.specificity - 1,
                        sensitivity_collapse=cut_c.sensitivity,
                        specificity_collapse=cut_c.specificity,
                        sensitivity_elevated=cut_e.sensitivity)
    budget = _budget_edge(records, labels, keep, budget_column, sensitivity)
    src = dict(source or {})
    src.setdefault("n", int(records.n))
    src.setdefault("date", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    return Calibration(score=score, direction=direction,
                       bands=Bands(elevated=sign * cut_e.edge, collapse=sign * cut_c.edge),
                       relative_budget=budget, threshold=threshold, source=src, validity=validity)


def _budget_edge(records: Records, labels: np.ndarray, keep: np.ndarray, budget_column: str,
                 sensitivity: float) -> float | None:
    """The default relative budget: the collapse edge of the budget column (None: not fittable)."""
    if budget_column not in records.metrics:
        return None
    b = records.column(budget_column)
    ok = keep & np.isfinite(b)
    if (ok.sum() >= 3 and labels[ok].any() and not labels[ok].all()
            and np.unique(b[ok]).size > 1):
        cut_b, _ = roc_cuts(b[ok], labels[ok], sensitivity=sensitivity)
        return cut_b.edge if cut_b.edge > 0 else None
    return None



def fit_calibration_file(records_path: str | Path, *, out: str | Path | None = None,
                         score: str | None = None,
                   direction: Direction | None = None, threshold: float = COLLAPSE_THRESHOLD,
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
    fmt = ("jsonl" if suffix in {".jsonl", ".json", ".ndjson"}
           else "csv" if suffix == ".csv" else None)
    records = parse_records(text, fmt, source=str(path))
    source = {"file": str(path), "sha256": hashlib.sha256(data).hexdigest(), "n": records.n}
    cal = fit_calibration(records, score=score, direction=direction, threshold=threshold,
                          sensitivity=sensitivity, budget_column=budget_column, source=source)
    return cal, write_calibration(cal, out)


