"""What a verdict and a band mean, in one place: their names and order, the collapse threshold,
the budget, the bounds (Corollary 1, corrected), the per-model signals and the edges' text.

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
"elevated" at or beyond the elevated edge, else "low"; "beyond" follows the signal's direction
(higher is riskier for a risk score, lower for a retention such as the rehearsal's agreement).
The enums are `str`-valued: reports store their plain values, so JSON and YAML are unchanged.
"""  # noqa: E501 - Markdown table rows

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Literal, Protocol

from mergekit_collapse.guard.config import Budget

if TYPE_CHECKING:
    from mergekit_collapse.guard.report import GuardReport

#: a merge whose observed mean loss (percent) is below this collapsed (the paper's −30 %)
COLLAPSE_THRESHOLD = -30.0
#: which values of a per-model signal go with collapse: higher (a risk score) or lower (a retention)
Direction = Literal["higher", "lower"]


class _Named(str, Enum):
    """A str-valued enum that prints as its value."""

    def __str__(self) -> str:
        return str(self.value)


class Verdict(_Named):
    """The guard's verdict; "unassessed": the calibrated default budget was in use, the bounds were
    within it, and no validated per-model signal could be computed (nothing vouches)."""

    MERGEABLE = "mergeable"
    COLLAPSE = "collapse"
    UNASSESSED = "unassessed"


class Band(_Named):
    """A model's band on a per-model signal, lowest risk first."""

    LOW = "low"
    ELEVATED = "elevated"
    COLLAPSE = "collapse"


class DecidedBy(_Named):
    """What decided the verdict: a bound, a per-model signal, or nothing."""

    JUNG = "jung"
    CONVERSE = "converse"
    EXACT = "exact"
    RISK = "risk"
    REHEARSAL = "rehearsal"
    NONE = "none"


#: the deciders that are bounds (the geometric test), and those that are per-model signals
BOUNDS = (DecidedBy.JUNG, DecidedBy.CONVERSE, DecidedBy.EXACT)
SIGNALS = (DecidedBy.RISK, DecidedBy.REHEARSAL)
#: verdicts from the least to the most severe (nothing vouching for a merge is not a pass)
SEVERITY = (Verdict.MERGEABLE, Verdict.UNASSESSED, Verdict.COLLAPSE)
#: the values pydantic fields accept (the same JSON Schema as the Literals they replace)
VerdictName = Literal[tuple(v.value for v in Verdict)]  # type: ignore[valid-type]
BandName = Literal[tuple(b.value for b in Band)]  # type: ignore[valid-type]
DecidedByName = Literal[tuple(d.value for d in DecidedBy)]  # type: ignore[valid-type]
#: the icon of a verdict in Markdown summaries (anything else: ⚠️)
ICONS = {Verdict.MERGEABLE: "✅", Verdict.COLLAPSE: "⛔"}


def icon(verdict: str) -> str:
    """The Markdown icon of a verdict: ✅ mergeable, ⛔ collapse, ⚠️ anything else."""
    return ICONS.get(verdict, "⚠️")  # type: ignore[call-overload]


def worst_band(bands: Iterable[str | None]) -> Band | None:
    """The highest of some bands (None ignored), or None when there is none."""
    order = list(Band)
    found = [Band(b) for b in bands if b is not None]
    return max(found, key=order.index) if found else None


def worst_verdict(verdicts: Iterable[str]) -> Verdict:
    """The most severe verdict (collapse > unassessed > mergeable); mergeable for none."""
    return max((Verdict(v) for v in verdicts), key=SEVERITY.index, default=Verdict.MERGEABLE)


def at_or_above(band: str | None, floor: str) -> bool:
    """Whether `band` is `floor` or a higher one (False for None)."""
    order = list(Band)
    return band is not None and order.index(Band(band)) >= order.index(Band(floor))


def orientation(direction: str | None) -> float:
    """+1 when higher values are riskier, −1 when lower are: `orientation * value` grows with
    risk."""
    return -1.0 if direction == "lower" else 1.0


def edges_in_order(direction: str, elevated: float, collapse: float) -> bool:
    """Whether the elevated edge comes before the collapse edge in the signal's direction."""
    return orientation(direction) * elevated <= orientation(direction) * collapse


def comparison(direction: str | None) -> str:
    """How a value reaches a band's edge: "≥" when higher is riskier, "≤" when lower is."""
    return "≤" if direction == "lower" else "≥"


def edges_text(direction: str | None, elevated: float | None, collapse: float | None) -> str:
    """"elevated ≥ x, collapse ≥ y" (or "≤" for a lower-is-riskier signal)."""
    cmp = comparison(direction)
    return f"elevated {cmp} {elevated:.3g}, collapse {cmp} {collapse:.3g}"


def shown_signal(report: GuardReport) -> DecidedBy:
    """The per-model signal whose bands summaries show: the rehearsal when it decided, else risk."""
    return DecidedBy.REHEARSAL if report.decided_by == DecidedBy.REHEARSAL else DecidedBy.RISK


def flagged(report: GuardReport) -> list[int]:
    """The models the deciding per-model signal (risk or rehearsal) puts in its collapse band."""
    by = report.decided_by
    if by not in SIGNALS:
        return []
    return [i for i, m in enumerate(report.models) if m.signal(by)[0] == Band.COLLAPSE]


def outlier(report: GuardReport) -> int:
    """The model farthest from the rest: highest MDS, else highest distortion under the uniform
    average."""
    models = report.models
    if all(m.mds is not None for m in models):
        return max(range(len(models)), key=lambda i: models[i].mds)
    return max(range(len(models)), key=lambda i: models[i].distortion_uniform)


def worst(report: GuardReport) -> int:
    """The model to blame: the first flagged one, else the outlier."""
    risky = flagged(report)
    return risky[0] if risky else outlier(report)


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


class Edges(Protocol):
    """A signal's band edges, in its own units (`guard.calibration.Bands`)."""

    elevated: float
    collapse: float


def band_of(value: float | None, direction: Direction, bands: Edges) -> Band | None:
    """The band of one score value: "collapse" at or beyond the collapse edge, "elevated" at or
    beyond the elevated edge, else "low"; None for a missing value."""
    if value is None or math.isnan(value):
        return None
    sign = orientation(direction)
    if sign * value >= sign * bands.collapse:
        return Band.COLLAPSE
    if sign * value >= sign * bands.elevated:
        return Band.ELEVATED
    return Band.LOW


def verdict(*, jung: float, converse: float, exact: float, budget: float
            ) -> tuple[Verdict, DecidedBy]:
    """(verdict, decided_by): pass if Jung <= budget; collapse if Δ²/4 > budget; else by r*²."""
    if jung <= budget:
        return Verdict.MERGEABLE, DecidedBy.JUNG
    if converse > budget:
        return Verdict.COLLAPSE, DecidedBy.CONVERSE
    return (Verdict.MERGEABLE if exact <= budget else Verdict.COLLAPSE), DecidedBy.EXACT


def decide(*, bounds: tuple[str, str], budget_source: str, signals: dict[str, list[str | None]],
           prefer: str) -> tuple[Verdict, DecidedBy, str | None]:
    """(verdict, decided_by, note) by the module's table.

    Args:
        bounds: `verdict()` at the budget in force.
        budget_source: "config" (explicit) or "calibration".
        signals: each per-model signal's bands, in model order ("risk", "rehearsal").
        prefer: the signal that decides when several are complete.
    """
    by_bounds = Verdict(bounds[0]), DecidedBy(bounds[1])
    if budget_source != "calibration":
        return *by_bounds, None
    complete = [k for k, bands in signals.items() if bands and all(b is not None for b in bands)]
    if not complete:
        if by_bounds[0] is Verdict.COLLAPSE:
            return *by_bounds, None
        return Verdict.UNASSESSED, DecidedBy.NONE, (
            "no validated per-model signal could be computed, so the calibrated budget's bounds "
            "alone do not vouch for this merge")
    signal = prefer if prefer in complete else complete[0]
    risky = worst_band(signals[signal]) is Band.COLLAPSE
    return (Verdict.COLLAPSE if risky else Verdict.MERGEABLE), DecidedBy(signal), None
