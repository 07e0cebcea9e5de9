"""The verdict, in one place: budget, bounds (Corollary 1, corrected) and the per-model signals.

| budget | bounds at the budget | per-model signal (`Calibration.decides`, else the other) | verdict | decided_by |
|---|---|---|---|---|
| explicit (config or CLI) | Jung ≤ budget / Δ²/4 > budget / r*² | reported, not used | mergeable / collapse | jung / converse / exact |
| calibrated default | reported, not used | a model in the signal's collapse band | collapse | risk / rehearsal |
| calibrated default | reported, not used | none in the collapse band | mergeable | risk / rehearsal |
| calibrated default | over (Δ²/4 or r*²) | no signal (no base model, no rehearsal) | collapse | converse / exact |
| calibrated default | within | no signal | unassessed | none |

Jung is only sufficient and Δ²/4 only necessary; the exact r*² decides between them. An explicit
budget asks for the geometric test alone. A signal counts only when every model has a value.
Beside a validated signal the bounds at the calibrated budget are not a veto: out of sample they
only cost specificity (benchmarks/RESULTS.md, "Out of sample").

A model's band on a signal (`band_of`): "collapse" at or beyond the calibrated collapse edge,
"elevated" at or beyond the elevated edge, else "low"; the edges come from `guard.calibration`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from mergekit_collapse.guard.config import Budget
from mergekit_collapse.guard.report import Band

#: which values of a per-model signal go with collapse: higher (a risk score) or lower (a retention)
Direction = Literal["higher", "lower"]


@dataclass(frozen=True)
class ResolvedBudget:
    mode: str  # "relative" | "absolute"
    value: float
    absolute: float  # squared hidden-state units
    scale: float | None
    scale_source: str | None
    source: str  # "config" (file or CLI) | "calibration"


def resolve_budget(budget: Budget, scale: float | None, scale_source: str | None,
                   default_relative: float) -> ResolvedBudget:
    """A relative budget multiplies the scale (the base model's probe spread); absolute is as given.

    Args:
        budget: the configured budget; neither field set means `default_relative`.
        scale: the scale of a relative budget. scale_source: what it is.
        default_relative: the calibrated default relative budget.

    Raises:
        ValueError: a relative budget without a positive scale.
    """
    if budget.absolute is not None:
        return ResolvedBudget("absolute", budget.absolute, budget.absolute, scale, scale_source,
                              "config")
    value, source = ((budget.relative, "config") if budget.relative is not None
                     else (default_relative, "calibration"))
    if scale is None or scale <= 0:
        raise ValueError("a relative budget needs a positive scale")
    return ResolvedBudget("relative", value, value * scale, scale, scale_source, source)


def band_of(value: float | None, direction: Direction, bands: Any) -> Band | None:
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


def verdict(*, jung: float, converse: float, exact: float, budget: float) -> tuple[str, str]:
    """(verdict, decided_by): pass if Jung <= budget; collapse if Δ²/4 > budget; else by r*²."""
    if jung <= budget:
        return "mergeable", "jung"
    if converse > budget:
        return "collapse", "converse"
    return ("mergeable" if exact <= budget else "collapse"), "exact"


def decide(*, bounds: tuple[str, str], budget_source: str, signals: dict[str, list[str | None]],
           prefer: str) -> tuple[str, str, str | None]:
    """(verdict, decided_by, note) by the module's table.

    Args:
        bounds: `verdict()` at the budget in force.
        budget_source: "config" (explicit) or "calibration".
        signals: each per-model signal's bands, in model order ("risk", "rehearsal").
        prefer: the signal that decides when several are complete.
    """
    if budget_source != "calibration":
        return *bounds, None
    complete = [k for k, bands in signals.items() if bands and all(b is not None for b in bands)]
    if not complete:
        if bounds[0] == "collapse":
            return *bounds, None
        return "unassessed", "none", ("no validated per-model signal could be computed, so the "
                                      "calibrated budget's bounds alone do not vouch for this merge")
    signal = prefer if prefer in complete else complete[0]
    return ("collapse" if "collapse" in signals[signal] else "mergeable"), signal, None
