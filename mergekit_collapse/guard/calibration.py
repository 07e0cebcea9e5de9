"""The calibration the guard reads: risk bands and the default relative budget (fitted by
`mergekit_collapse.analysis.fitting`).

From merge records (format: `mergekit_collapse.statistics`), with "collapsed" meaning
``loss < threshold`` (default −30):

* **score and direction** — the per-model score column (``--score``; by default the column with
  the best AUROC) and which of its values go with collapse (``higher`` when its AUROC ≥ 0.5,
  see `statistics.auroc`), unless given.
* **bands** — ``low`` / ``elevated`` / ``collapse`` edges on that score. The *collapse* edge
  maximises Youden's J = sensitivity + specificity − 1 over the ROC cuts (ties: the more specific
  cut, leaving the sensitive side to *elevated*); the *elevated* edge is the least extreme cut that
  still flags at least ``sensitivity`` (default 0.9) of the collapsed rows, never beyond the
  collapse edge. Edges sit halfway between the two observed values they separate.
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

import json
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from mergekit_collapse._console import one_line
from mergekit_collapse._constants import cache_root
from mergekit_collapse._io import atomic_write_text, why_unwritable
from mergekit_collapse.errors import BadInputError, CacheError
from mergekit_collapse.guard.decision import (
    COLLAPSE_THRESHOLD,
    Band,
    Direction,
    band_of,
    edges_in_order,
)

CALIBRATION_FILE = "calibration.json"
DEFAULT_RESOURCE = "calibration_default.json"
#: the records column a relative budget bounds: the merge's r*² over the base model's probe spread
#: (benchmarks/validity.py writes it; the guard's verdict compares r*² with budget × spread)
DEFAULT_BUDGET_COLUMN = "exact_rel"


class Bands(BaseModel):
    """Band edges in the score's own units: `collapse` from this edge on, `elevated` from that one."""  # noqa: E501 - pydantic puts this docstring in the JSON Schema

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
    threshold: float = Field(default=COLLAPSE_THRESHOLD, description="loss below this = collapsed")
    source: dict[str, Any] = Field(description="records file sha256, n, date — or a note")
    validity: Validity | None = None
    rehearsal: SignalBands | None = None
    decides: Literal["risk", "rehearsal"] = "risk"
    out_of_sample: dict[str, Any] | None = Field(default=None, description=(
        "how the bands did on records they were not fitted on (benchmarks/validity.py)"))

    @model_validator(mode="after")
    def _ordered(self) -> Calibration:
        e, c = self.bands.elevated, self.bands.collapse
        if not edges_in_order(self.direction, e, c):
            raise ValueError(f"band edges out of order for direction '{self.direction}': "
                             f"elevated {e}, collapse {c}")
        return self

    def band(self, value: float | None) -> Band | None:
        """The risk band of one score value (see `band_of`)."""
        return band_of(value, self.direction, self.bands)


# ---------------------------------------------------------------------------------------------
# Fitting
# ---------------------------------------------------------------------------------------------



# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def default_path() -> Path:
    """Where `calibrate` writes and `load_calibration` looks first:
    cache_root()/calibration.json."""
    return cache_root() / CALIBRATION_FILE


def write_calibration(cal: Calibration, path: str | Path | None = None) -> Path:
    """Write a calibration as JSON (default `cache_root()/calibration.json`); return the path.

    Raises:
        CacheError: the file cannot be written (a file in the way, read-only, full).
    """
    p = Path(path) if path is not None else default_path()
    try:
        atomic_write_text(p, cal.model_dump_json(indent=2) + "\n")
    except OSError as e:
        raise CacheError(f"cannot write the calibration {one_line(str(p))}: "
                         f"{why_unwritable(p.parent, e)}") from None
    return p


def _parse(text: str, where: str) -> Calibration:
    try:
        return Calibration.model_validate(json.loads(text))
    except (ValueError, ValidationError) as e:
        first = e.errors()[0]["msg"] if isinstance(e, ValidationError) else str(e)
        raise BadInputError(f"{where}: invalid calibration ({first})") from None


def load_calibration(path: str | Path | None = None) -> Calibration:
    """The calibration in use: `path`, else the user's `cache_root()/calibration.json`, else the
    default.

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
    resource = resources.files("mergekit_collapse.guard").joinpath(DEFAULT_RESOURCE)
    text = resource.read_text(encoding="utf-8")
    return _parse(text, f"packaged {DEFAULT_RESOURCE}")
