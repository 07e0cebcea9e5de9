"""The guard's report: a versioned pydantic model, its Markdown summary and its HiddenSim
heatmap."""

from __future__ import annotations

import io
import math
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from tabulate import tabulate

from mergekit_collapse._constants import REPORT_SCHEMA_VERSION
from mergekit_collapse._io import atomic_write_bytes, atomic_write_text
from mergekit_collapse.guard.decision import (
    BandName,
    DecidedByName,
    Direction,
    VerdictName,
    edges_text,
    icon,
)

#: what a Hub model id looks like ("org/name")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(path: str) -> bool:
    """Whether a model path (revision left off) names a Hub repo rather than a local folder."""
    return bool(HUB_ID.match(path)) and not Path(path).expanduser().exists()


def relative_inside(path: str, root: Path) -> str | None:
    """`path` relative to `root` when it lies inside it (symlinks resolved or not)."""
    for p, r in ((Path(os.path.abspath(path)), Path(os.path.abspath(root))),
                 (Path(path).resolve(), root.resolve())):
        try:
            rel = p.relative_to(r).as_posix()
        except ValueError:
            continue
        return rel if rel != "." else None
    return None


def _part_display(part: str, root: Path | None, depth: int, adapter: bool) -> str:
    path, _, _ = part.partition("@")  # mergekit's revision separator
    if is_hub_id(path) or (depth == 0 and not os.path.isabs(os.path.expanduser(path))):
        return part  # a Hub id, or a relative path as the config writes it
    rel = relative_inside(path, root) if root is not None and not adapter else None
    if rel is not None and len(Path(rel).parts) >= depth + 1:
        return rel
    parts = Path(os.path.abspath(os.path.expanduser(path))).parts[1:]  # never the leading "/"
    return "/".join(parts[-(depth + 1):])


def display_names(refs: list[str], root: Path | None = None) -> dict[str, str]:
    """Short names for model references, for tables, cards and the console.

    A Hub id, or a relative path, stays as the config writes it; an absolute path is shown
    relative to `root` (the config's folder) when it lies inside it, else by its folder name (an
    adapter's always by its folder name): `base+lora` becomes `base-display+adapter-display`.
    Names that would collide get more of their path.

    Args:
        refs: model references as mergekit writes them (`str(ModelReference)`).
        root: the folder local paths are shown relative to.

    Returns:
        `{ref: display}` for every reference.
    """
    def show(ref: str, depth: int) -> str:
        base, plus, lora = ref.partition("+")
        text = _part_display(base, root, depth, adapter=False)
        return text + (plus + _part_display(lora, root, depth, adapter=True) if plus else "")

    depth = dict.fromkeys(refs, 0)
    out = {r: show(r, 0) for r in refs}
    for _ in range(16):  # deepen colliding names until unique (or whole paths)
        seen: dict[str, list[str]] = {}
        for r, d in out.items():
            seen.setdefault(d, []).append(r)
        clashes = [r for group in seen.values() if len(group) > 1 for r in group]
        if not clashes:
            break
        for r in clashes:
            depth[r] += 1
            out[r] = show(r, depth[r])
    return out


class ModelEntry(BaseModel):
    """One constituent model's scores. Distortions are in squared hidden-state units."""

    name: str = Field(description="the model reference as written in the config")
    display: str | None = Field(default=None, description=(
        "its short name in tables and the card: the Hub id, the path relative to the config's "
        "folder, or the folder's name (`base+adapter` for LoRA references); see display_names"))
    task: str
    mds: float | None = Field(description="Eq. 3; None when HiddenSim is undefined; inf allowed")
    mean_hidden_sim: float | None
    distortion_optimal: float = Field(description="(Dα*)_i − ½α*ᵀDα*")
    distortion_uniform: float
    distortion_planned: float | None = Field(default=None,
                                             description="under the merge's own weights")
    shift: float | None = Field(default=None, description="||p_i − p_base||² (needs a base model)")
    retention: float | None = Field(default=None, description="<p_m−p_0, p_i−p_0>/||p_i−p_0||²")
    relative_distortion: float | None = Field(default=None,
                                              description="||p_m − p_i||²/||p_i−p_0||²")
    risk_score: float | None = Field(default=None,
                                     description="this model's value of the risk score")
    risk_band: BandName | None = None
    rehearsal_agreement: float | None = Field(default=None, description=(
        "share of its probes on which the in-memory merge's greedy answer equals this model's"))
    rehearsal_token_agreement: float | None = Field(default=None, description=(
        "share of its answer tokens the in-memory merge predicts as this model does"))
    rehearsal_partial: float | None = Field(default=None, description=(
        "the agreement, ties broken by the token agreement (less than one probe's step)"))
    rehearsal_kl: float | None = Field(default=None, description=(
        "KL(model ‖ merge) of the first answer token, mean over its probes"))
    predicted_retention: float | None = Field(default=None, description=(
        "the rehearsal score the bands apply to (see RehearsalInfo.score)"))
    rehearsal_band: BandName | None = None

    def signal(self, name: str) -> tuple[str | None, float | None]:
        """(band, value) of a per-model signal: "risk" (risk_score) or "rehearsal"
        (predicted_retention)."""
        if name == "rehearsal":
            return self.rehearsal_band, self.predicted_retention
        return self.risk_band, self.risk_score


class Distances(BaseModel):
    mean: list[list[float]] = Field(description="dmean(i,j) = mean_x ||h_i − h_j||")
    rms: list[list[float]] = Field(description="drms(i,j) = sqrt(mean_x ||h_i − h_j||²)")


class Bounds(BaseModel):
    """Theorem 1 bounds on the best convex merge's worst-case distortion."""

    diameter: float
    converse: float = Field(description="Δ²/4: no merge does better")
    jung: float = Field(description="n/(2(n+1))·Δ²: some convex merge does at least this well")
    jung_n: int
    jung_dim: Literal["affine", "hidden"]
    exact: float = Field(description="r*², squared radius of the minimum enclosing ball")
    uniform: float = Field(description="worst distortion of the uniform average")
    planned: float | None = Field(default=None,
                                  description="worst distortion under the merge's weights")


class BudgetInfo(BaseModel):
    mode: Literal["relative", "absolute"]
    value: float
    absolute: float = Field(description="the budget in squared hidden-state units")
    scale: float | None = Field(default=None, description="the scale a relative budget multiplies")
    scale_source: str | None = None
    source: str = Field(default="config", description="config (file or CLI) | calibration")


class RiskInfo(BaseModel):
    """The per-model risk score the guard bands models with, and where its bands came from."""

    score: str = Field(description="the ModelEntry field used, e.g. relative_distortion")
    direction: Direction
    elevated: float
    collapse: float
    calibration: dict = Field(description=(
        "the calibration's source (records sha256, n, date) or note"))
    auroc: float | None = Field(default=None, description="its validity when calibrated")


class RehearsalInfo(BaseModel):
    """Whether the merge was rehearsed in memory, and the bands of its score (its cost: RunInfo)."""

    status: Literal["ran", "skipped", "off"]
    reason: str | None = Field(default=None, description="why it was skipped or off")
    score: str | None = Field(default=None,
                              description="the ModelEntry field banded as predicted_retention")
    direction: Direction | None = None
    elevated: float | None = None
    collapse: float | None = None
    answer_tokens: int | None = None
    dtype: str | None = None


class RunInfo(BaseModel):
    """When and how fast the report was made: the only part of a report that differs between two
    runs on the same inputs and seed (everything else is byte-identical)."""

    date: str = Field(description="when the report was made, UTC ISO 8601")
    seconds: dict[str, float] = Field(default_factory=dict, description=(
        "wall time per step: extract, rehearsal.answers, rehearsal.merge, rehearsal.compare, "
        "assess, total"))

    def rehearsal_cost(self) -> str:
        """The rehearsal's steps and their seconds, e.g. "answers 1.2 s, merge 0.3 s"."""
        return ", ".join(f"{k.removeprefix('rehearsal.')} {v:.1f} s"
                         for k, v in self.seconds.items() if k.startswith("rehearsal."))


class ProbeInfo(BaseModel):
    k: int
    count: int
    sha256: str
    seed: int
    chat_template: bool


class Action(BaseModel):
    """What a re-organisation action changed and why."""

    action: str
    changed: str
    reason: str
    models: list[str] = Field(default_factory=list)
    configs: list[str] = Field(default_factory=list)


class GuardReport(BaseModel):
    """Everything the guard computed, JSON-serialisable and versioned."""

    # an MDS of +inf (mean HiddenSim 0) must survive the JSON round trip
    model_config = ConfigDict(ser_json_inf_nan="constants")

    schema_version: str = REPORT_SCHEMA_VERSION
    tool_version: str
    config: str | None = None
    merge_method: str
    base_model: str | None
    models: list[ModelEntry]
    hidden_sim: list[list[float]] | None = Field(description="Eq. 2; None when undefined")
    hidden_sim_note: str | None = None
    distances: Distances
    bounds: Bounds
    weights: dict[str, float] = Field(description="α*: distortion-optimal convex weights")
    planned_weights: dict[str, float] | None = None
    budget: BudgetInfo
    verdict: VerdictName
    decided_by: DecidedByName
    probes: ProbeInfo
    layer: int
    pooling: str
    dtype: str
    hidden_size: int
    risk: RiskInfo | None = None
    rehearsal: RehearsalInfo | None = None
    notes: list[str] = Field(default_factory=list)
    actions: list[Action] = Field(default_factory=list)
    run_info: RunInfo | None = Field(default=None, description=(
        "timings and the date: the one field that differs between runs (RunInfo)"))

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.models]

    def displays(self) -> dict[str, str]:
        """Display names of the models and the base model by reference (see `display_names`);
        a model's own `display` wins."""
        refs = [*self.names, *([self.base_model] if self.base_model else [])]
        out = display_names(refs, Path(self.config).parent if self.config else None)
        out.update({m.name: m.display for m in self.models if m.display})
        return out

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """Write report.json, report.md and hidden_sim.png into out_dir (each whole or not at all);
        return their paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / "report.json", "markdown": out / "report.md",
                 "heatmap": out / "hidden_sim.png"}
        atomic_write_text(paths["json"], self.model_dump_json(indent=2))
        atomic_write_text(paths["markdown"], to_markdown(self))
        plot_heatmap(self, paths["heatmap"])
        return paths

    @classmethod
    def read(cls, path: str | Path) -> GuardReport:
        """Read a report.json (or the report.json inside a folder)."""
        p = Path(path)
        if p.is_dir():
            p = p / "report.json"
        return cls.model_validate_json(p.read_text(encoding="utf-8"))


def fmt(x: Any, digits: int = 3) -> str:
    """A number for a Markdown table: 3 significant digits, ∞ for inf, — for None."""
    if x is None:
        return "—"
    if isinstance(x, (int, float)):
        if math.isinf(x):
            return "∞" if x > 0 else "-∞"
        if math.isnan(x):
            return "—"
        return f"{x:.{digits}g}"
    return str(x)


def to_markdown(r: GuardReport) -> str:
    """A summary fit for a PR comment."""
    b = r.bounds
    shown = r.displays()
    lines = [
        f"### {icon(r.verdict)} mergekit-collapse: **{r.verdict}** (decided by {r.decided_by})",
        "",
        f"`{r.merge_method}` merge of {len(r.models)} models"
        + (f" on `{shown[r.base_model]}`" if r.base_model else "")
        + f"; {r.probes.count} probes (k={r.probes.k}), layer {r.layer}, {r.pooling} pooling.",
        "",
        "| bound | value |",
        "|---|---|",
        f"| budget ({r.budget.mode} {fmt(r.budget.value)}) | {fmt(r.budget.absolute)} |",
        f"| converse Δ²/4 (no merge does better) | {fmt(b.converse)} |",
        f"| exact r*² (best convex merge) | {fmt(b.exact)} |",
        f"| Jung n/(2(n+1))·Δ² (n={b.jung_n}, {b.jung_dim}) | {fmt(b.jung)} |",
        f"| uniform average | {fmt(b.uniform)} |",
    ]
    if b.planned is not None:
        lines.append(f"| the config's own weights | {fmt(b.planned)} |")
    risk = f"risk ({r.risk.score})" if r.risk else "risk"
    lines += ["", "| model | task | MDS | mean HiddenSim | distortion (α*) | weight α* | "
              f"retention | {risk} | rehearsal |", "|---|---|---|---|---|---|---|---|---|"]
    for m in r.models:
        band = f"{m.risk_band} ({fmt(m.risk_score)})" if m.risk_band else "—"
        reh = (f"{m.rehearsal_band} ({fmt(m.predicted_retention)})" if m.rehearsal_band
               else fmt(m.predicted_retention))
        lines.append(f"| `{shown[m.name]}` | {m.task} | {fmt(m.mds)} | {fmt(m.mean_hidden_sim)} | "
                     f"{fmt(m.distortion_optimal)} | {fmt(r.weights.get(m.name))} | "
                     f"{fmt(m.retention)} | {band} | {reh} |")
    if r.rehearsal is not None:
        h = r.rehearsal
        cost = r.run_info.rehearsal_cost() if r.run_info else ""
        lines += ["", f"Rehearsal: {h.status}" + (f" ({h.reason})" if h.reason else "")
                  + (f"; {cost}" if cost else "")]
    if r.hidden_sim_note:
        lines += ["", f"> HiddenSim: {r.hidden_sim_note}"]
    for n in r.notes:
        lines += ["", f"> {n}"]
    for a in r.actions:
        lines += ["", f"- **{a.action}**: {a.changed} — {a.reason}"]
    return "\n".join(lines) + "\n"


def plot_heatmap(r: GuardReport, path: str | Path) -> Path:
    """An annotated HiddenSim heatmap (in the spirit of the paper's Figure 1), MDS in the labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [f"{m.task}\nMDS {fmt(m.mds)}" for m in r.models]
    if r.hidden_sim is not None:
        mat, title, cmap = np.array(r.hidden_sim), "HiddenSim (Eq. 2)", "viridis"
    else:  # undefined: show the rms distances instead
        mat, title, cmap = np.array(r.distances.rms), "drms (HiddenSim undefined)", "magma_r"
    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * n, 0.9 + 0.8 * n), dpi=110)
    im = ax.imshow(mat, cmap=cmap, vmin=0 if r.hidden_sim is not None else None,
                   vmax=1 if r.hidden_sim is not None else None)
    ax.set_xticks(range(n), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    for i in range(n):
        for j in range(n):
            v = mat[i, j]
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if (r.hidden_sim is not None and v < 0.5) else "black")
    ax.set_title(f"{title} — {r.verdict}", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


#: the columns of `format_text`'s model table
MODEL_COLUMNS = ["model", "task", "MDS", "dist α*", "α*", "retention", "risk", "rehearsal"]


def format_text(report: GuardReport) -> str:
    """A terminal summary: verdict, bounds, per-model table."""
    b = report.bounds
    lines = [
        f"verdict: {report.verdict.upper()} (decided by {report.decided_by})",
        f"budget:  {report.budget.absolute:.4g} ({report.budget.mode} {report.budget.value:g})",
        f"risk:    {report.risk.score} (calibrated AUROC {report.risk.auroc or float('nan'):.2f}); "
        f"bands {edges_text(report.risk.direction, report.risk.elevated, report.risk.collapse)}"
        if report.risk else "risk:    —",
        f"bounds:  converse Δ²/4 {b.converse:.4g} ≤ exact r*² {b.exact:.4g} ≤ "
        f"Jung {b.jung:.4g} (n={b.jung_n});  uniform average {b.uniform:.4g}",
        f"probes:  {report.probes.count} (k={report.probes.k}), layer {report.layer}, "
        f"{report.pooling} pooling, {report.dtype}",
    ]
    h = report.rehearsal
    if h is not None:
        cost = report.run_info.rehearsal_cost() if report.run_info else ""
        bands = (f"; bands {edges_text(h.direction, h.elevated, h.collapse)}"
                 if h.collapse is not None else "")
        lines.append(f"rehearsal: {h.status}" + (f" ({h.reason})" if h.reason else "")
                     + (f": {h.score}{bands}; {cost}" if h.status == "ran" else ""))
    shown, rows = report.displays(), []
    for m in report.models:
        mds = "—" if m.mds is None else ("inf" if m.mds == float("inf") else f"{m.mds:.3f}")
        ret = "—" if m.retention is None else f"{m.retention:.3f}"
        risk = "—" if m.risk_band is None else f"{m.risk_band} {m.risk_score:.3g}"
        reh = ("—" if m.predicted_retention is None else
               f"{m.rehearsal_band or ''} {m.predicted_retention:.3g}".strip())
        rows.append([shown[m.name], m.task, mds, f"{m.distortion_optimal:.4g}",
                     f"{report.weights[m.name]:.3f}", ret, risk, reh])
    lines += ["", tabulate(rows, headers=MODEL_COLUMNS, tablefmt="simple", disable_numparse=True,
                           colalign=("left", "left") + ("right",) * 6)]
    for note in ([report.hidden_sim_note] if report.hidden_sim_note else []) + report.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)
