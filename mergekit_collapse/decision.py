"""Budget and verdict (Corollary 1, corrected): Jung is only sufficient, Δ²/4 only necessary."""

from __future__ import annotations

from dataclasses import dataclass

from mergekit_collapse.config import Budget


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


def verdict(*, jung: float, converse: float, exact: float, budget: float) -> tuple[str, str]:
    """(verdict, decided_by): pass if Jung <= budget; collapse if Δ²/4 > budget; else by r*²."""
    if jung <= budget:
        return "mergeable", "jung"
    if converse > budget:
        return "collapse", "converse"
    return ("mergeable" if exact <= budget else "collapse"), "exact"
