"""What a merge actually did: lm-eval scores of the merged model and its constituents, the merging
loss of each task (paper Eq. 1), observed retention, and the predicted-vs-observed plot."""

from __future__ import annotations

import gc
import hashlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field

from mergekit_collapse._constants import cache_root
from mergekit_collapse._io import atomic_write_bytes, atomic_write_text
from mergekit_collapse._version import __version__
from mergekit_collapse.errors import BadInputError
from mergekit_collapse.guard.config import LoadedConfig, TaskSpec
from mergekit_collapse.guard.decision import COLLAPSE_THRESHOLD
from mergekit_collapse.guard.report import GuardReport, display_names
from mergekit_collapse.runtime import Runtime

if TYPE_CHECKING:
    from mergekit_collapse._console import Progress
    from mergekit_collapse.guard.forward import ExtractionSettings

log = logging.getLogger(__name__)

#: metrics tried in order as a task's headline score
PRIMARY_METRICS = ("acc", "exact_match", "acc_norm", "f1", "bleu")


class TaskOutcome(BaseModel):
    """One constituent's task: its own score, the merged model's, and the merging loss (Eq. 1)."""

    model_config = ConfigDict(extra="allow")

    model: str
    task: str
    eval: str
    metric: str
    constituent: float | None = None
    merged: float | None = None
    base: float | None = None
    loss: float | None = Field(description=(
        "(merged / constituent - 1) * 100; None if constituent is 0"))
    observed_retention: float | None = None


class Evaluation(BaseModel):
    """evaluation.json: what the card and the validity benchmark read."""

    model_config = ConfigDict(extra="allow")

    schema_version: str = "1.0"
    tool_version: str = __version__
    limit: int | None = None
    dtype: str = "float32"
    tasks: list[TaskOutcome] = Field(default_factory=list)
    mean_loss: float | None = None


@dataclass(frozen=True)
class EvalTask:
    """An lm-eval task: its name and the include path holding its YAML (None: a registered task)."""

    name: str
    include_path: Path | None
    digest: str  # content hash of the YAML, for the score cache


def resolve_eval(spec: TaskSpec, cfg: LoadedConfig) -> EvalTask | None:
    """`guard.tasks.<ref>.eval`: a registered lm-eval task name, or the path of a task YAML."""
    if not spec.eval:
        return None
    if not spec.eval.endswith((".yaml", ".yml")):
        return EvalTask(spec.eval, None, spec.eval)
    path = cfg.resolve(spec.eval)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        raise BadInputError(f"lm-eval task YAML not found: {path}") from None
    from lm_eval.tasks._yaml_loader import load_yaml

    # lm-eval's own loader (`!function` tags, `include:`); resolve_func=False: imports no task code
    try:
        name = load_yaml(path, resolve_func=False).get("task")
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise BadInputError(f"{path}: not a readable lm-eval task YAML "
                            f"({str(e).splitlines()[0]})") from None
    if not isinstance(name, str) or not name:
        raise BadInputError(f"{path}: no `task:` name in this lm-eval YAML")
    return EvalTask(name, path.parent, hashlib.sha256(text.encode()).hexdigest())


def headline(metrics: dict[str, float], task: str) -> tuple[str, float]:
    """The task's headline metric and value."""
    for name in PRIMARY_METRICS:
        if name in metrics:
            return name, metrics[name]
    rest = [k for k in metrics if "stderr" not in k]
    if not rest:
        raise BadInputError(f"lm-eval returned no metric for task '{task}'")
    return rest[0], metrics[rest[0]]


class ScoreCache:
    """lm-eval scores keyed by (model identity, task, task YAML, limit, dtype, versions), a JSON
    file each."""

    def __init__(self, root: Path | None = None, *, chat: bool = True):
        self.root = (root or cache_root()) / "scores"
        self.chat = chat  # prompts in the chat template (guard.chat_template)

    def _path(self, identity: str, task: EvalTask, limit: int | None, dtype: str) -> Path:
        import lm_eval

        parts = [identity, task.name, task.digest, limit, dtype, lm_eval.__version__, "1"]
        key = json.dumps(parts if self.chat else [*parts, "plain"])  # chat: the keys of before
        return self.root / f"{hashlib.sha256(key.encode()).hexdigest()}.json"

    def get(self, identity: str, task: EvalTask, limit: int | None,
            dtype: str) -> dict[str, float] | None:
        path = self._path(identity, task, limit, dtype)
        try:
            metrics = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            metrics = None
        if isinstance(metrics, dict):
            return metrics
        log.warning("recomputing corrupt score cache entry %s", path)
        return None

    def put(self, identity: str, task: EvalTask, limit: int | None, dtype: str,
            metrics: dict[str, float]) -> None:
        atomic_write_bytes(self._path(identity, task, limit, dtype), json.dumps(metrics).encode())


def _score(model: Any, tok: Any, identity: str, tasks: list[EvalTask], *, limit: int | None,
           batch_size: int, cache: ScoreCache, dtype: str) -> dict[str, dict[str, float]]:
    """Scores of one loaded model on tasks, from the cache where possible; grouped by include
    path."""
    from mergekit_collapse.evaluate.harness import run_tasks

    out: dict[str, dict[str, float]] = {}
    todo: dict[Path | None, list[EvalTask]] = {}
    for t in tasks:
        hit = cache.get(identity, t, limit, dtype)
        if hit is not None:
            out[t.name] = hit
        else:
            todo.setdefault(t.include_path, []).append(t)
    chat = cache.chat and bool(getattr(tok, "chat_template", None))
    if cache.chat and not chat and todo:
        log.warning("the tokenizer of %s has no chat template: lm-eval scores plain prompts (set "
                    "guard.chat_template: false to say so)",
                    getattr(tok, "name_or_path", "a model"))
    for include, group in todo.items():
        results = run_tasks(model, tok, [t.name for t in group], include_path=include, limit=limit,
                            batch_size=batch_size, apply_chat_template=chat)
        for t in group:
            if t.name not in results:
                raise BadInputError(f"lm-eval returned no result for task '{t.name}'")
            cache.put(identity, t, limit, dtype, results[t.name])
            out[t.name] = results[t.name]
    return out


def evaluate_merge(merged_dir: str | Path, cfg: LoadedConfig, *, limit: int | None = None,
                   batch_size: int = 16, with_base: bool = False,
                   report: GuardReport | None = None, progress: bool = True,
                   dtype: str = "float32") -> Evaluation:
    """Evaluate a merged model and each constituent on the constituents' tasks.

    Constituent (and base) scores are cached by model identity and dtype, so re-runs don't pay
    twice. LoRA constituents are evaluated on one loaded base with adapter swap. The merge and
    its constituents are always scored in the same dtype (float32 by default).

    Args:
        merged_dir: the folder mergekit wrote.
        cfg: the config that was merged (its guard.tasks.<ref>.eval name each model's task).
        limit: documents per task (None: all).
        batch_size: lm-eval batch size.
        with_base: also score the base model (for reference).
        report: the guard's report (its dtype is reused for the observed-retention pass).
        progress: show progress.
        dtype: float32, bfloat16 or float16 (bfloat16 is several times faster on CPU).

    Returns:
        The Evaluation (write it with `write_evaluation`).

    Raises:
        BadInputError: no model has an `eval` task, a task is unknown, a model is missing.
    """
    from mergekit_collapse._console import Progress
    from mergekit_collapse.guard.forward import ExtractionSettings
    from mergekit_collapse.models.loading import resolve_dtype

    merged = Path(merged_dir)
    if not merged.is_dir():
        raise BadInputError(f"merged model folder not found: {merged}")
    settings = ExtractionSettings(dtype=dtype, device="cpu")
    torch_dtype = resolve_dtype(dtype, "cpu")
    tasks, evaluated = _eval_tasks(cfg)
    all_tasks = list({t.name: t for t in (tasks[str(m)] for m in evaluated)}.values())
    sc = _Scoring(settings, torch_dtype, ScoreCache(chat=cfg.guard.chat_template), limit,
                  batch_size, dtype)
    base_ref = [str(cfg.base)] if with_base and cfg.base is not None else []
    refs = [str(m) for m in evaluated] + base_ref
    steps = Progress("evaluate", 2 + len(evaluated) + int(with_base), enabled=progress,
                     labels=display_names(refs, cfg.path.parent if cfg.path else None))

    merged_scores = _score_merged(merged, all_tasks, sc, steps)
    own = _score_constituents(evaluated, tasks, sc, steps)
    base_scores: dict[str, dict[str, float]] = {}
    if with_base and cfg.base is not None:
        base_scores = _score_base(cfg.base, all_tasks, sc, steps)

    with steps.step("observed retention"):
        retention = observed_retention(merged, cfg, report.dtype if report is not None else "auto")
    steps.close()
    outcomes = _outcomes(cfg, evaluated, tasks, own, merged_scores, base_scores, retention)
    losses = [o.loss for o in outcomes if o.loss is not None]
    return Evaluation(limit=limit, dtype=dtype, tasks=outcomes,
                      mean_loss=float(np.mean(losses)) if losses else None)


def _eval_tasks(cfg: LoadedConfig) -> tuple[dict[str, EvalTask | None], list[Any]]:
    """Each model's eval task, and the models that have one (none: BadInputError)."""
    tasks = {str(m): resolve_eval(cfg.task_of(m), cfg) for m in cfg.models}
    evaluated = [m for m in cfg.models if tasks[str(m)] is not None]
    if not evaluated:
        raise BadInputError("no model has a guard.tasks.<ref>.eval task to evaluate on")
    return tasks, evaluated


@dataclass
class _Scoring:
    """What every scoring pass of `evaluate_merge` shares: settings, dtype, cache, lm-eval's."""

    settings: ExtractionSettings
    torch_dtype: Any
    cache: ScoreCache
    limit: int | None
    batch_size: int
    dtype: str

    def load(self, folder: Path) -> Any:
        """The causal LM in `folder`, on CPU in the evaluation dtype."""
        from mergekit_collapse.models.loading import load_causal_lm

        return load_causal_lm(folder, self.settings, "cpu", self.torch_dtype)

    def score(self, model: Any, tok: Any, identity: str,
              tasks: list[EvalTask]) -> dict[str, dict[str, float]]:
        """`_score` with the shared limit, batch size, cache and dtype."""
        return _score(model, tok, identity, tasks, limit=self.limit, batch_size=self.batch_size,
                      cache=self.cache, dtype=self.dtype)


def _score_merged(merged: Path, all_tasks: list[EvalTask], sc: _Scoring,
                  steps: Progress) -> dict[str, dict[str, float]]:
    """Score the merged model on every constituent's task."""
    from mergekit_collapse.models.identity import folder_identity
    from mergekit_collapse.models.loading import check_weights, load_tokenizer

    check_weights(merged, str(merged), allow_pickle=False)
    with steps.step("merged"):
        model = sc.load(merged)
        tok = load_tokenizer(merged, sc.settings)
        merged_scores = sc.score(model, tok, folder_identity(merged), all_tasks)
        del model
        gc.collect()
    return merged_scores


def _score_constituents(evaluated: list[Any], tasks: dict[str, EvalTask | None], sc: _Scoring,
                        steps: Progress) -> dict[str, dict[str, float]]:
    """Score each constituent on its own task: one load per base, LoRAs by adapter swap."""
    from mergekit_collapse.models.identity import model_identity
    from mergekit_collapse.models.loading import load_tokenizer, local_dir, swap_adapter

    own: dict[str, dict[str, float]] = {}
    by_base: dict[Path, list[Any]] = {}
    for m in evaluated:
        by_base.setdefault(local_dir(m.model).resolve(), []).append(m)
    for base_dir, group in by_base.items():
        loaded = peft_model = None
        tok = load_tokenizer(base_dir, sc.settings)
        for m in group:
            t = tasks[str(m)]
            ident = model_identity(m)
            hit = sc.cache.get(ident, t, sc.limit, sc.dtype)
            with steps.step(steps.label(str(m)), note="cached" if hit is not None else ""):
                if hit is not None:
                    own[str(m)] = hit
                else:
                    if loaded is None:
                        loaded = sc.load(base_dir)
                    if m.lora is None:
                        target = loaded
                    else:
                        peft_model = swap_adapter(loaded, peft_model, local_dir(m.lora))
                        target = peft_model.get_base_model()
                    own[str(m)] = sc.score(target, tok, ident, [t])[t.name]
        del loaded, peft_model
        gc.collect()
    return own


def _score_base(base: Any, all_tasks: list[EvalTask], sc: _Scoring,
                steps: Progress) -> dict[str, dict[str, float]]:
    """Score the base model on every task (for reference)."""
    from mergekit_collapse.models.identity import model_identity
    from mergekit_collapse.models.loading import load_tokenizer, local_dir

    with steps.step(f"{steps.label(str(base))} (base)"):
        base_dir = local_dir(base.model)
        base_model = sc.load(base_dir)
        base_scores = sc.score(base_model, load_tokenizer(base_dir, sc.settings),
                               model_identity(base), all_tasks)
        del base_model
        gc.collect()
    return base_scores


def _outcomes(cfg: LoadedConfig, evaluated: list[Any], tasks: dict[str, EvalTask | None],
              own: dict[str, dict[str, float]], merged_scores: dict[str, dict[str, float]],
              base_scores: dict[str, dict[str, float]],
              retention: dict[str, float]) -> list[TaskOutcome]:
    """Each constituent's task outcome: its own score, the merge's, the merging loss (Eq. 1)."""
    outcomes = []
    for m in evaluated:
        t = tasks[str(m)]
        metric, theirs = headline(own[str(m)], t.name)
        ours = merged_scores[t.name].get(metric, float("nan"))
        base = base_scores.get(t.name, {}).get(metric)
        loss = (ours / theirs - 1.0) * 100.0 if theirs else None  # Eq. 1
        outcomes.append(TaskOutcome(model=str(m), task=cfg.task_of(m).name, eval=t.name,
                                    metric=metric, constituent=theirs, merged=ours, base=base,
                                    loss=loss, observed_retention=retention.get(str(m))))
    return outcomes

def observed_retention(merged_dir: Path, cfg: LoadedConfig,
                       dtype: str = "auto") -> dict[str, float]:
    """Retention measured with the merged model's real hidden states on the config's probes.

    One forward pass of the merged model (the constituents' and base's vectors come from the
    guard's cache). Empty when the config has no base model.
    """
    from mergekit.common import ModelReference

    from mergekit_collapse.guard import geometry
    from mergekit_collapse.guard.assess import extraction_settings
    from mergekit_collapse.guard.extract import extract
    from mergekit_collapse.guard.probes import build_probes

    if cfg.base is None:
        return {}
    probes = build_probes(cfg)
    settings = extraction_settings(cfg, Runtime(device="cpu", dtype=dtype))
    merged_ref = ModelReference.model_validate(str(Path(merged_dir).resolve()))
    ext = extract([cfg.base, *cfg.models, merged_ref], probes.texts, settings, progress=False)
    values = geometry.observed_retention(
        ext.vectors[str(cfg.base)], ext.vectors[str(merged_ref)],
        np.stack([ext.vectors[str(m)] for m in cfg.models]))
    return {str(m): float(v) for m, v in zip(cfg.models, values, strict=True)}


def write_evaluation(evaluation: Evaluation, out_dir: str | Path,
                     report: GuardReport | None = None) -> dict[str, Path]:
    """Write evaluation.json (and predicted_vs_observed.png when a report is given) into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "evaluation.json"}
    atomic_write_text(paths["json"], evaluation.model_dump_json(indent=2))
    if report is not None:
        paths["plot"] = plot_predicted_vs_observed(report, evaluation,
                                                   out / "predicted_vs_observed.png")
    return paths


def plot_predicted_vs_observed(report: GuardReport, evaluation: Evaluation, path: Path) -> Path:
    """Per-model predictors (MDS, distortion, retention) against the observed merging loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_name = {m.name: m for m in report.models}
    rows = [(o, by_name[o.model]) for o in evaluation.tasks
            if o.model in by_name and o.loss is not None]
    panels = [("MDS (Eq. 3)", lambda o, m: m.mds),
              ("relative distortion (the risk score)", lambda o, m: m.relative_distortion),
              ("retention (planned)", lambda o, m: m.retention),
              ("observed retention", lambda o, m: o.observed_retention)]
    panels = [p for p in panels if any(p[1](o, m) is not None for o, m in rows)]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(3.4 * max(1, len(panels)), 3.2),
                             dpi=110, squeeze=False)
    for ax, (title, get) in zip(axes[0], panels, strict=False):
        pts = [(get(o, m), o.loss, o.task) for o, m in rows if get(o, m) is not None]
        pts = [p for p in pts if np.isfinite(p[0])]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="tab:red")
        for x, y, label in pts:
            ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.axhline(COLLAPSE_THRESHOLD, color="grey", lw=0.8, ls="--")
        ax.ticklabel_format(axis="x", useOffset=False)
        ax.set_xlabel(title, fontsize=8)
        ax.set_ylabel("merging loss % (Eq. 1)", fontsize=8)
    fig.suptitle(f"predicted vs observed — verdict: {report.verdict}", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path
