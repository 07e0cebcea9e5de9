"""Predictive validity of collapse metrics: correlations, AUROC and ANOVA over merge records.

Pure: numpy / scipy / statsmodels / pandas on in-memory data, no torch and no file I/O (callers
read the file and pass its text to `parse_records`, which parses it with pandas).

Merge records
-------------
One row per (merge, constituent model), as CSV (header row) or JSONL (one JSON object a line):

=============  ========  ==============================================================
column         required  meaning
=============  ========  ==============================================================
``group``      yes       merge id: rows of one merge share it
``task``       yes       the constituent's task (ANOVA factor)
``method``     yes       the merge method, e.g. ``linear``, ``ties`` (ANOVA factor)
``model``      yes       the constituent model reference
``loss``       yes       merging loss of this constituent, Eq. 1, in percent (−100 … ≥ 0)
any other      no        a numeric metric column: ``mds``, ``mean_hidden_sim``,
                         ``distortion_optimal``, ``retention``, ``relative_distortion``,
                         ``conflict_sign``, … (pair metrics repeat on both rows of a pair)
=============  ========  ==============================================================

A column is a metric when every non-empty value in it is a number (``inf`` allowed); empty
cells, JSON ``null`` and ``nan`` are missing values and drop only that row from that metric's
statistics. Non-numeric extra columns (notes, paths) are kept but not analysed.

Conventions
-----------
* **Collapsed** means ``loss < threshold`` (default −30, i.e. a loss worse than −30 %).
* **AUROC orientation: higher metric = more risk.** ``auroc = P(metric of a collapsed row >
  metric of a non-collapsed row)`` (ties count ½), computed as Mann–Whitney ``U / (n₁·n₀)``.
  0.5 is chance; a value below 0.5 means *lower* values go with collapse (e.g. HiddenSim,
  retention) and ``1 − auroc`` is its skill in that direction — reported as ``direction``.
* **ANOVA** of loss by task and by method: one-way F-tests per factor and the additive two-way
  model ``loss ~ C(method) + C(task)`` (statsmodels OLS and ``anova_lm``, type-II sums of squares
  for the two-way). The paper's Table 3 "one-way" p-values are reproduced by the two-way model.
* **Beyond the task**: task identity alone explains much of the loss (the paper's ANOVA), so a
  metric that only recognises "hard" tasks scores well on AUROC. `beyond_task` asks what it adds:
  Spearman ρ of the task-demeaned metric against the task-demeaned loss (the *within-task* ρ),
  and the partial F-test of the metric in ``loss ~ C(task) + metric`` against ``loss ~ C(task)``
  (statsmodels ``compare_f_test``, 1 numerator df) with the share of the remaining variance it
  explains.
* Degenerate inputs (n < 3, a constant column, one class only, one factor level) give ``None``
  and a ``reason``; never NaN, never an exception.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from mergekit_collapse.errors import BadInputError
from mergekit_collapse.guard.decision import COLLAPSE_THRESHOLD

if TYPE_CHECKING:
    import pandas as pd

REQUIRED_COLUMNS = ("group", "task", "method", "model", "loss")
log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------


def _number(value: Any) -> float | None:
    """A cell as a float; None when missing; raises ValueError when not a number."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("a boolean is not a metric value")
    if isinstance(value, (int, float)):
        v = float(value)
    else:
        text = str(value).strip()
        if text == "" or text.lower() in {"nan", "na", "null", "none"}:
            return None
        v = float(text)
    return None if math.isnan(v) else v


class Records(BaseModel):
    """A parsed merge-records table (see the module docstring)."""

    rows: list[dict[str, Any]]
    metrics: list[str] = Field(description="the numeric metric columns, in first-seen order")

    @property
    def n(self) -> int:
        return len(self.rows)

    def column(self, name: str) -> np.ndarray:
        """A numeric column as float64, NaN where missing.

        Raises:
            KeyError: no such numeric column.
        """
        if name != "loss" and name not in self.metrics:
            raise KeyError(f"no metric column '{name}'; have {self.metrics}")
        return np.array([np.nan if (v := _number(r.get(name))) is None else v for r in self.rows],
                        dtype=float)

    def labels(self, name: str) -> list[str]:
        """A text column (`group`, `task`, `method`, `model`)."""
        return [str(r.get(name, "")) for r in self.rows]


def _read_jsonl(text: str, source: str) -> pd.DataFrame:
    """JSON lines, one object each (pandas `read_json`: exact floats, no type conversion)."""
    import pandas as pd

    if not text.strip():
        return pd.DataFrame()
    try:
        return pd.read_json(io.StringIO(text), lines=True, dtype=False, precise_float=True)
    except (ValueError, TypeError) as e:  # TypeError: a line that is not a JSON object
        raise BadInputError(f"{source}: not JSON lines of one object each "
                            f"({_first_line(e)})") from None


def _read_csv(text: str, source: str) -> pd.DataFrame:
    """CSV with a header row, every cell as text (pandas `read_csv`); an empty cell reads ""."""
    import warnings

    import pandas as pd

    try:
        with warnings.catch_warnings():  # a first row longer than the header only warns
            warnings.simplefilter("error", pd.errors.ParserWarning)
            return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, index_col=False)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()
    except (pd.errors.ParserError, pd.errors.ParserWarning) as e:
        raise BadInputError(f"{source}: a row has more cells than the header "
                            f"({_first_line(e)})") from None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def parse_records(text: str, fmt: Literal["csv", "jsonl"] | None = None, *, source: str = "records"
                  ) -> Records:
    """Parse a merge-records table from CSV or JSONL text.

    Args:
        text: the file's content.
        fmt: "csv" or "jsonl"; None guesses (JSONL when the first non-blank character is `{`).
        source: a name for error messages (e.g. the file path).

    Returns:
        The records, with the metric columns detected.

    Raises:
        BadInputError: malformed rows, missing required columns, or a non-numeric `loss`.
    """
    if fmt is None:
        fmt = "jsonl" if text.lstrip().startswith("{") else "csv"
    if fmt == "jsonl":
        frame = _read_jsonl(text, source)
    elif fmt == "csv":
        frame = _read_csv(text, source)
    else:
        raise BadInputError(f"unknown records format '{fmt}' (csv or jsonl)")
    if len(frame) == 0:
        raise BadInputError(f"{source}: no records")
    rows, columns = frame.to_dict("records"), [str(c) for c in frame.columns]
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise BadInputError(f"{source}: missing required column(s) {missing}; "
                            f"need {list(REQUIRED_COLUMNS)} plus metric columns")
    for i, r in enumerate(rows, 1):
        try:
            _number(r.get("loss"))
        except (TypeError, ValueError):
            raise BadInputError(f"{source}: row {i}: "
                                f"loss '{r.get('loss')}' is not a number") from None
    metrics = []
    for c in columns:
        if c in REQUIRED_COLUMNS:
            continue
        values, bad = [], []
        for i, r in enumerate(rows, 1):
            try:
                values.append(_number(r.get(c)))
            except (TypeError, ValueError):
                bad.append(i)
        if sum(v is not None for v in values) <= len(bad):
            continue  # a text column (mostly words, a number or two among them)
        # a metric column with a stray cell: the cell is missing, said, not the column dropped
        if bad:
            first = rows[bad[0] - 1][c]
            log.warning("%s: column '%s': %d of %d cells are not a number (row %d: %r): "
                        "left out of every statistic as missing",
                        source, c, len(bad), len(rows), bad[0], first)
            for i in bad:
                rows[i - 1][c] = None
        metrics.append(c)
    return Records(rows=rows, metrics=metrics)


# ---------------------------------------------------------------------------------------------
# Correlation and AUROC
# ---------------------------------------------------------------------------------------------


class Correlation(BaseModel):
    """Pearson and Spearman correlation of a metric with merging loss, with two-sided p-values."""

    n: int
    pearson_r: float | None = None
    pearson_p: float | None = None
    spearman_rho: float | None = None
    spearman_p: float | None = None
    reason: str | None = Field(default=None, description="why the values are None")


class Auroc(BaseModel):
    """AUROC of a metric for 'collapsed' (loss < threshold). Orientation: higher metric = more risk."""  # noqa: E501 - pydantic puts this docstring in the JSON Schema

    n: int
    n_collapsed: int
    auroc: float | None = Field(default=None,
                                description="P(collapsed row's metric > other's), ties ½")
    direction: Literal["higher", "lower"] | None = Field(
        default=None, description="which values go with collapse: higher when auroc ≥ 0.5")
    auroc_best: float | None = Field(default=None, description="max(auroc, 1 − auroc)")
    mannwhitney_p: float | None = Field(default=None,
                                        description="two-sided Mann–Whitney U p-value")
    reason: str | None = None


def _complete_rows(*arrays: np.ndarray) -> list[np.ndarray]:
    """The rows where no array is missing (NaN); ±inf is kept, for the rank methods."""
    mask = np.ones(len(arrays[0]), dtype=bool)
    for a in arrays:
        mask &= ~np.isnan(a)
    return [a[mask] for a in arrays]


def _clean(v: Any) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def correlation(metric: Sequence[float], loss: Sequence[float]) -> Correlation:
    """Pearson r and Spearman ρ of `metric` against `loss` (scipy.stats), rows with NaN dropped.

    Pearson needs finite values (rows with ±inf are dropped for it); Spearman ranks, so ±inf
    (e.g. an infinite MDS) is kept.

    Args:
        metric: one value per record.
        loss: merging loss per record (Eq. 1).

    Returns:
        A `Correlation`; None values with a `reason` when undefined (n < 3 or a constant column).
    """
    from scipy import stats

    x, y = _complete_rows(np.asarray(metric, dtype=float), np.asarray(loss, dtype=float))
    out = Correlation(n=len(x))
    if len(x) < 3:
        out.reason = f"n = {len(x)} < 3"
        return out
    if np.unique(x).size < 2 or np.unique(y).size < 2:
        out.reason = "constant column"
        return out
    rho, p = stats.spearmanr(x, y)
    out.spearman_rho, out.spearman_p = _clean(rho), _clean(p)
    fin = np.isfinite(x) & np.isfinite(y)
    xf, yf = x[fin], y[fin]
    if len(xf) >= 3 and np.unique(xf).size > 1 and np.unique(yf).size > 1:
        r, p = stats.pearsonr(xf, yf)
        out.pearson_r, out.pearson_p = _clean(r), _clean(p)
    else:
        out.reason = "Pearson undefined on the finite values (n < 3 or constant)"
    return out


def collapsed(loss: Sequence[float], threshold: float = COLLAPSE_THRESHOLD) -> np.ndarray:
    """Boolean mask: `loss < threshold` (NaN losses are not collapsed; drop them first)."""
    arr = np.asarray(loss, dtype=float)
    with np.errstate(invalid="ignore"):
        return arr < threshold


def auroc(metric: Sequence[float], is_collapsed: Sequence[bool]) -> Auroc:
    """AUROC of `metric` for the positive class `is_collapsed`, higher metric = more risk.

    Computed as Mann–Whitney `U₁ / (n₁·n₀)` with U₁ the statistic of the collapsed sample
    (scipy.stats.mannwhitneyu): the probability that a collapsed record's metric exceeds a
    non-collapsed one's, ties counted ½. Rows with a NaN metric are dropped; ±inf is ranked.

    Args:
        metric: one value per record.
        is_collapsed: the labels.

    Returns:
        An `Auroc`; None values with a `reason` when one class is empty or the metric constant.
    """
    from scipy import stats

    x = np.asarray(metric, dtype=float)
    y = np.asarray(is_collapsed, dtype=bool)
    keep = ~np.isnan(x)
    x, y = x[keep], y[keep]
    pos, neg = x[y], x[~y]
    out = Auroc(n=len(x), n_collapsed=int(y.sum()))
    if len(pos) == 0 or len(neg) == 0:
        out.reason = "one class only: " + ("no collapsed rows" if len(pos) == 0
                                           else "every row collapsed")
        return out
    if np.unique(x).size < 2:
        out.reason = "constant metric"
        return out
    res = stats.mannwhitneyu(pos, neg, alternative="two-sided")
    a = float(res.statistic) / (len(pos) * len(neg))
    out.auroc = a
    out.direction = "higher" if a >= 0.5 else "lower"
    out.auroc_best = max(a, 1.0 - a)
    out.mannwhitney_p = _clean(res.pvalue)
    return out


# ---------------------------------------------------------------------------------------------
# ANOVA
# ---------------------------------------------------------------------------------------------


class AnovaRow(BaseModel):
    """One factor's F-test."""

    factor: str
    df: float | None = None
    df_resid: float | None = None
    sum_sq: float | None = None
    f_value: float | None = None
    p: float | None = None
    levels: int = 0
    reason: str | None = None


class Anova(BaseModel):
    """ANOVA of merging loss by task and by method: one-way each, and the additive two-way model."""

    n: int
    one_way: list[AnovaRow]
    two_way: list[AnovaRow] = Field(description="loss ~ C(method) + C(task), type-II SS")
    two_way_reason: str | None = None

    def to_markdown(self) -> str:
        """The one-way and the two-way tables."""
        lines: list[str] = []
        for title, rows, reason in (("One-way ANOVA of loss", self.one_way, None),
                                    ("Two-way additive ANOVA: loss ~ C(method) + C(task)",
                                     self.two_way, self.two_way_reason)):
            lines += ["", f"**{title}** (n = {self.n})", ""]
            if reason:
                lines.append(f"undefined: {reason}")
                continue
            lines.append(markdown_table(
                ["factor", "levels", "df", "df resid", "F", "p", "note"],
                [[r.factor, r.levels, _f(r.df), _f(r.df_resid), _f(r.f_value), _f(r.p),
                  r.reason or ""]
                 for r in rows]))
        return "\n".join(lines) + "\n"


def _one_way(factor: str, loss: np.ndarray, levels: list[str]) -> AnovaRow:
    import pandas as pd
    import statsmodels.api as sm
    from statsmodels.formula.api import ols

    frame = pd.DataFrame({"loss": loss, factor: levels})
    n, k = len(loss), frame[factor].nunique()
    row = AnovaRow(factor=factor, levels=k)
    if k < 2:
        row.reason = f"{k} level(s) of {factor}: nothing to compare"
        return row
    if n - k < 1:
        row.reason = f"no residual degrees of freedom (n = {n}, {k} levels)"
        return row
    if np.unique(loss).size < 2:
        row.reason = "constant loss"
        return row
    fit = ols(f"loss ~ C({factor})", data=frame).fit()
    rec = sm.stats.anova_lm(fit).loc[f"C({factor})"]
    row.sum_sq, row.df, row.df_resid = float(rec["sum_sq"]), float(rec["df"]), float(fit.df_resid)
    # F = SS / 0; the fit's residuals are rounding
    if frame.groupby(factor)["loss"].nunique().max() < 2:
        row.reason = "F undefined (no variance within groups)"
    else:
        row.f_value, row.p = _clean(rec["F"]), _clean(rec["PR(>F)"])
    return row


def anova(loss: Sequence[float], task: Sequence[str], method: Sequence[str]) -> Anova:
    """One-way ANOVA of loss by task and by method, and the additive two-way `loss ~ method + task`.

    Args:
        loss: merging loss per record (NaN rows dropped).
        task: the task label per record.
        method: the merge-method label per record.

    Returns:
        An `Anova`; a factor's row has None values and a `reason` when it is degenerate.
    """
    y = np.asarray(loss, dtype=float)
    keep = np.isfinite(y)
    y = y[keep]
    tasks = [str(t) for t, k in zip(task, keep, strict=True) if k]
    methods = [str(m) for m, k in zip(method, keep, strict=True) if k]
    out = Anova(n=len(y), one_way=[_one_way("task", y, tasks), _one_way("method", y, methods)],
                two_way=[])
    k_t, k_m = len(set(tasks)), len(set(methods))
    resid = len(y) - (k_t - 1) - (k_m - 1) - 1
    if k_t < 2 or k_m < 2:
        out.two_way_reason = f"needs ≥ 2 tasks and ≥ 2 methods (have {k_t}, {k_m})"
    elif resid < 1:
        out.two_way_reason = f"no residual degrees of freedom (n = {len(y)})"
    elif np.unique(y).size < 2:
        out.two_way_reason = "constant loss"
    else:
        import pandas as pd
        import statsmodels.api as sm
        from statsmodels.formula.api import ols

        frame = pd.DataFrame({"loss": y, "task": tasks, "method": methods})
        fit = ols("loss ~ C(method) + C(task)", data=frame).fit()
        table = sm.stats.anova_lm(fit, typ=2)
        for term, factor, levels in (("C(method)", "method", k_m), ("C(task)", "task", k_t)):
            rec = table.loc[term]
            row = AnovaRow(factor=factor, df=float(rec["df"]), df_resid=float(fit.df_resid),
                           sum_sq=_clean(rec["sum_sq"]), f_value=_clean(rec["F"]),
                           p=_clean(rec["PR(>F)"]), levels=levels)
            if row.f_value is None:
                row.reason = "F undefined (the model fits exactly)"
            out.two_way.append(row)
    return out


class BeyondTask(BaseModel):
    """What a metric says about loss beyond the task's identity (see the module docstring)."""

    n: int
    within_rho: float | None = None
    within_p: float | None = None
    f_value: float | None = None
    p: float | None = None
    partial_r2: float | None = Field(None, description="share of the task-only residual variance")
    reason: str | None = None


def _flat(d: np.ndarray, x: np.ndarray) -> bool:
    """True when the demeaned `d` is zero up to the rounding of demeaning `x`."""
    return bool(np.ptp(d) <= 1e-9 * max(1.0, float(np.abs(x).max())))


def _demean(x: np.ndarray, task: np.ndarray) -> np.ndarray:
    out = x.copy()
    for t in np.unique(task):
        out[task == t] -= x[task == t].mean()
    return out


def beyond_task(metric: Sequence[float], loss: Sequence[float], task: Sequence[str]) -> BeyondTask:
    """Within-task Spearman ρ and the partial F-test of `metric` in ``loss ~ C(task) + metric``.

    Args:
        metric: the metric per record (non-finite rows dropped).
        loss: merging loss per record (NaN rows dropped).
        task: the task label per record.

    Returns:
        A `BeyondTask`; None values and a `reason` when it is undefined.
    """
    import pandas as pd
    from scipy import stats
    from statsmodels.formula.api import ols

    x, y = np.asarray(metric, dtype=float), np.asarray(loss, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y, t = x[keep], y[keep], np.asarray([str(v) for v in task], dtype=object)[keep]
    levels = np.unique(t)
    out = BeyondTask(n=len(y))
    dx, dy = _demean(x, t), _demean(y, t)
    df_resid = len(y) - len(levels) - 1
    if df_resid < 1:
        out.reason = f"no residual degrees of freedom (n = {len(y)}, {len(levels)} tasks)"
    elif _flat(dx, x) or _flat(dy, y):
        out.reason = "no variation within tasks"
    else:
        rho = stats.spearmanr(dx, dy)
        out.within_rho, out.within_p = _clean(rho.statistic), _clean(rho.pvalue)
        frame = pd.DataFrame({"loss": y, "task": t, "metric": x})
        task_only = ols("loss ~ C(task)", data=frame).fit()
        full = ols("loss ~ C(task) + metric", data=frame).fit()
        if full.ssr <= 0:
            out.reason = "the model fits exactly"
        else:
            f_value, p, _ = full.compare_f_test(task_only)
            out.f_value, out.p = _clean(f_value), _clean(p)
            out.partial_r2 = _clean((task_only.ssr - full.ssr) / task_only.ssr)
    return out


# ---------------------------------------------------------------------------------------------
# The whole summary
# ---------------------------------------------------------------------------------------------


class MetricStats(BaseModel):
    """One metric column's validity: correlation with loss and AUROC for collapse."""

    metric: str
    correlation: Correlation
    auroc: Auroc
    beyond_task: BeyondTask


class StatsReport(BaseModel):
    """Every metric column's validity and the ANOVA tables."""

    n: int
    groups: int
    threshold: float
    n_collapsed: int
    metrics: list[MetricStats]
    n_without_loss: int = 0  # rows whose loss is missing or NaN: left out of every statistic
    anova: Anova

    def to_markdown(self) -> str:
        """Markdown tables: one row per metric, then the ANOVA tables."""
        left_out = (f" ({self.n_without_loss} without a loss, left out)" if self.n_without_loss
                    else "")
        lines = [f"{self.n} records in {self.groups} merges{left_out}; collapsed (loss < "
                 f"{self.threshold:g}): {self.n_collapsed}.", "",
                 "AUROC: P(collapsed row's metric > non-collapsed row's); < 0.5 means lower values "
                 "go with collapse.", "",
                 "Within-task ρ: Spearman of task-demeaned metric and loss; p beyond task: partial "
                 "F-test of the metric in loss ~ C(task) + metric.", ""]
        rows = []
        for m in self.metrics:
            c, a, b = m.correlation, m.auroc, m.beyond_task
            note = "; ".join(x for x in (c.reason, a.reason, b.reason) if x)
            rows.append([m.metric, c.n, _f(c.pearson_r), _f(c.pearson_p), _f(c.spearman_rho),
                         _f(c.spearman_p), _f(a.auroc), a.direction or "—", _f(b.within_rho),
                         _f(b.p), note])
        lines.append(markdown_table(["metric", "n", "Pearson r", "p", "Spearman ρ", "p", "AUROC",
                                     "direction", "within-task ρ", "p beyond task", "note"], rows))
        return "\n".join(lines) + "\n" + self.anova.to_markdown()


def _f(x: float | None) -> str:
    return "—" if x is None else f"{x:.3g}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table (tabulate); cells are printed as given, never re-parsed as
    numbers."""
    from tabulate import tabulate

    return tabulate(rows, headers=list(headers), tablefmt="github", disable_numparse=True)


def summarize(records: Records, *, threshold: float = COLLAPSE_THRESHOLD) -> StatsReport:
    """Validity of every metric column of `records`, and the ANOVA of loss by task and method.

    Args:
        records: parsed merge records.
        threshold: a row is collapsed when its loss is below this (percent, default −30).

    Returns:
        A `StatsReport`.
    """
    loss = records.column("loss")
    if missing := int(np.isnan(loss).sum()):
        log.warning("%d of %d records have no loss (empty or NaN): left out of every statistic",
                    missing, records.n)
    labels = collapsed(loss, threshold)
    tasks = records.labels("task")
    stats_rows = []
    for name in records.metrics:
        x = records.column(name)
        keep = ~np.isnan(loss)
        stats_rows.append(MetricStats(metric=name, correlation=correlation(x, loss),
                                      auroc=auroc(x[keep], labels[keep]),
                                      beyond_task=beyond_task(x, loss, tasks)))
    return StatsReport(
        n=records.n, groups=len(set(records.labels("group"))), threshold=threshold,
        n_collapsed=int(labels.sum()), metrics=stats_rows, n_without_loss=missing,
        anova=anova(loss, tasks, records.labels("method")))
