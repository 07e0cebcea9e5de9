"""The guarded merge: guard, re-organise, then merge with mergekit's own `run_merge`.

Two doors lead here: `mergekit-yaml config.yml OUT --guard ...` (`cli/mergekit_yaml.py`, mergekit's
own console script extended by the `.pth` hook) and `mergekit-collapse merge config.yml OUT ...`.
The report goes to `OUT/mergeability/` (and `--guard-report DIR`), where the card reads it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergekit_collapse._constants import REPORT_DIR, SHIPPED_DIR
from mergekit_collapse._io import atomic_write_text, staged_folder
from mergekit_collapse.errors import BadInputError, CollapseError, GuardStoppedError
from mergekit_collapse.models.lora import fresh_lora_cache
from mergekit_collapse.runtime import Runtime

if TYPE_CHECKING:
    from mergekit_collapse.actions.base import ActionContext, MergeJob, Reorganisation
    from mergekit_collapse.guard.config import LoadedConfig
    from mergekit_collapse.guard.report import Action, GuardReport

LOG = logging.getLogger(__name__)

#: the folder inside the merged model where the report (and later the evaluation) lives
#: the help section of our options in mergekit's PrettyPrintHelp
HELP_CATEGORY = "Merge Guard (mergekit-collapse)"
#: marks a click command that already has the guard options
_INSTALLED = "_mergekit_collapse_guard"


@dataclass
class GuardedMerge:
    """What `guarded_merge` did.

    Attributes:
        report: the guard's report, with the actions taken.
        outputs: folders mergekit wrote models to.
        configs: the re-organised / re-weighted configs written next to the output.
        report_paths: report.json / report.md / hidden_sim.png, per folder written.
        sources: for each folder in `outputs`, the config it was merged from (None: as written).
        shipped: for each folder merged from a set an action changed (drop, replace, split
            groups), the guard's re-check of the config merged there (written to
            `<folder>/mergeability/shipped/`; that folder's card heads with it).
    """

    report: GuardReport
    shipped: dict[Path, GuardReport] = field(default_factory=dict)
    outputs: list[Path] = field(default_factory=list)
    sources: list[Path | None] = field(default_factory=list)
    configs: list[Path] = field(default_factory=list)
    report_paths: list[Path] = field(default_factory=list)
    merge_seconds: float = 0.0

    def summary(self) -> str:
        """A few lines for the terminal."""
        r = self.report
        b = r.bounds
        lines = [f"mergekit-collapse: {r.verdict} (decided by {r.decided_by}; r*² {b.exact:.4g}, "
                 f"budget {r.budget.absolute:.4g})"]
        h = r.rehearsal
        if h is not None and h.status == "ran":
            sec = r.run_info.seconds if r.run_info else {}
            spent = sum(v for k, v in sec.items() if k.startswith("rehearsal."))
            lines.append(f"  rehearsal: {spent:.1f} s (its merge, a layer at a time, "
                         f"{sec.get('rehearsal.merge', 0):.1f} s); "
                         f"mergekit merge {self.merge_seconds:.1f} s")
        elif h is not None:
            lines.append(f"  rehearsal {h.status}: {h.reason}")
        lines += [f"  {a.action}: {a.changed}" for a in r.actions]
        for folder, s in self.shipped.items():
            lines.append(f"  shipped merge {folder} ({len(s.models)} models), re-checked: "
                         f"{s.verdict} (decided by {s.decided_by})")
        lines += [f"  config: {p}" for p in self.configs]
        lines += [f"  merged: {p}" for p in self.outputs]
        if self.configs and not self.outputs:
            lines.append("  not merged: run mergekit-yaml on each config, or add --guard-merge-all")
        lines += [f"  report: {p}" for p in self.report_paths if p.name == "report.md"]
        return "\n".join(lines)


def guarded_merge(config_path: str | Path, out_path: str | Path, merge_options: Any, *,
                  action: str | None = None, budget: float | None = None,
                  absolute_budget: float | None = None, weights: str | None = None,
                  rehearse: str | None = None, report_dir: str | Path | None = None,
                  merge_all: bool = False, runtime: Runtime | None = None,
                  **settings: Any) -> GuardedMerge:
    """Run the guard on a mergekit config, apply its action, and merge with mergekit's run_merge.

    Nothing is written to `out_path` before the guard has decided: when it stops the merge
    (action `abort`, or no re-organisation fits the budget) `out_path` is left as it was. The merge
    is built in a temporary folder beside `out_path` and renamed into place when it is complete
    (replacing a previous merge there whole); an error or Ctrl-C leaves `out_path` as it was.

    Args:
        config_path: the mergekit YAML (with its `guard:` section).
        out_path: mergekit's output folder. Re-organised configs are written beside it as
            `<OUT>.<action>.yml`; the report goes to `<OUT>/mergeability/`, and the re-check of
            a set an action changed to `<folder>/mergeability/shipped/` (see `GuardedMerge`).
        merge_options: mergekit's MergeOptions (device, dtype handling, trust_remote_code, ...).
        action: overrides guard.action (abort, warn, drop, split, replace, order).
        budget: relative budget, overrides guard.budget.
        absolute_budget: absolute budget, overrides guard.budget.
        weights: overrides guard.weights (none, suggest, apply).
        rehearse: overrides guard.rehearse (auto, on, off).
        report_dir: also write the report here (written even when the merge is stopped).
        merge_all: split: merge every group into `<OUT>/group-<k>`.
        runtime: the guard's device, dtype, cache, ... (default: `merge_runtime(merge_options)`,
            mergekit's device and flags).
        **settings: other guard settings to override (layer, pooling, k, seed, jung_dim, base).

    Returns:
        What was merged and written.

    Raises:
        BadInputError: invalid config, guard section or options; `out_path` is a file, or a
            non-empty folder that is not a merged model (never replaced).
        GuardStoppedError: over budget and the action stopped the merge (exit 3).
    """
    from mergekit_collapse.guard.assess import run_guard

    out = Path(out_path)
    cfg = _load_checked(config_path, out, report_dir)
    overrides = {k: v for k, v in {"action": action, "weights": weights, "rehearse": rehearse,
                                   **settings}.items() if v is not None}
    cfg, candidate_refs = _with_candidates(cfg, (action or cfg.guard.action) == "replace")
    options = {"runtime": runtime or merge_runtime(merge_options), "budget": budget,
               "absolute_budget": absolute_budget, **overrides}
    run = run_guard(cfg, extra_models=tuple(dict.fromkeys(candidate_refs.values())), **options)
    ctx, outcome = _decide(cfg, run, candidate_refs, merge_all)
    report, settings = ctx.report, run.cfg.guard
    if outcome.stop:
        _stop(outcome.stop, report, report_dir)
    result = GuardedMerge(report=report)
    report.actions.extend(_weights(outcome, ctx, settings.weights, out))
    jobs = _write_configs(outcome, cfg.source, out, settings.action, result)
    result.shipped = _recheck(cfg, jobs, ctx, options)
    _merge_and_report(out, jobs, outcome, merge_options, result)
    _copy_reports(report_dir, out, result)
    return result


def _load_checked(config_path: str | Path, out: Path,
                  report_dir: str | Path | None) -> LoadedConfig:
    """Load the config and check the output (and report) folders before the guard runs."""
    from mergekit_collapse.guard.config import check_writable, load_config

    cfg = load_config(config_path)
    check_writable(out, "OUT")
    if report_dir:
        check_writable(report_dir, "--guard-report")
    _check_out(out)
    return cfg


def merge_runtime(merge_options: Any, **fields: Any) -> Runtime:
    """The guard's runtime beside a mergekit merge: mergekit's device, its trust_remote_code,
    progress unless its --quiet; `fields` set the rest (cache_dir, ...) or override these."""
    return Runtime(**{"device": getattr(merge_options, "device", None) or "auto",
                      "trust_remote_code": bool(getattr(merge_options, "trust_remote_code", False)),
                      "progress": not getattr(merge_options, "quiet", False), **fields})


def _decide(cfg: LoadedConfig, run: Any, candidate_refs: dict[str, Any],
            merge_all: bool) -> tuple[ActionContext, Reorganisation]:
    """Apply the guard's action to its report; the records join the report's actions."""
    from mergekit_collapse.actions import ActionContext, get_action

    report, settings = run.report, run.cfg.guard
    ctx = ActionContext(
        report=report, raw=_raw(cfg.source), refs=list(run.cfg.models),
        budget=report.budget.absolute, merge_method=cfg.merge.merge_method, base=cfg.base,
        vectors=run.vectors, candidates=dict(settings.candidates), candidate_refs=candidate_refs)
    try:
        outcome = get_action(settings.action).apply(ctx, merge_all=merge_all)
    except BadInputError:  # an action's own one-line error (a ValueError too): as it is
        raise
    except ValueError as e:  # e.g. too many replacement combinations to try
        raise BadInputError(f"guard action '{settings.action}': {e}") from None
    report.actions.extend(outcome.records)
    return ctx, outcome


def _stop(why: str, report: GuardReport, report_dir: str | Path | None) -> None:
    """The action stopped the merge: write the report to `report_dir` (if given) and raise."""
    if report_dir:
        report.write(report_dir)
        raise GuardStoppedError(f"{why}; report: {Path(report_dir) / 'report.md'}", report)
    raise GuardStoppedError(f"{why} (--guard-report DIR keeps the report)", report)


def _write_configs(outcome: Reorganisation, source: str, out: Path, action: str,
                   result: GuardedMerge) -> list[tuple[Any, ...]]:
    """Write the configs the actions changed beside `out`; return the merge jobs to run."""
    report = result.report
    jobs = []
    for pm in outcome.merges:
        target = out / pm.name if pm.name else out
        text, path = source, None
        if pm.changed:
            path = _sibling(out, pm.suffix)
            text = _write_config(path, pm.raw)
            result.configs.append(path)
            for rec in report.actions:
                if _belongs(rec, pm, action):
                    rec.configs.append(str(path))
        if pm.merge:
            jobs.append((pm, target, text, path))
    if outcome.multi_stage is not None:
        path = _sibling(out, "order")
        atomic_write_text(path, outcome.multi_stage)
        result.configs.append(path)
        for rec in report.actions:
            rec.configs.append(str(path))
    return jobs


def _merge_and_report(out: Path, jobs: list[tuple[Any, ...]], outcome: Reorganisation,
                      merge_options: Any, result: GuardedMerge) -> None:
    """Merge the jobs into a staged `out` with the reports; with nothing to merge, the report."""
    report = result.report
    if not jobs and outcome.multi_stage is None:  # nothing merged: only the report goes to OUT
        result.report_paths += list(report.write(out / REPORT_DIR).values())
        return
    with staged_folder(out) as staged:
        for pm, target, source, path in jobs:
            t0 = time.perf_counter()
            merge_config(pm.raw, staged / target.relative_to(out), merge_options,
                         config_source=source)
            result.merge_seconds += time.perf_counter() - t0
            result.outputs.append(target)
            result.sources.append(path)
        if outcome.multi_stage is not None:
            # absolute: mergekit takes a/b for a Hub id
            stages = _sibling(out.resolve(), "stages", ext="")
            merge_multi_stage(outcome.multi_stage, staged, stages, merge_options)
            result.outputs.append(out)
            result.sources.append(None)  # the final stage merges the config's own constituents
        for target, rep in result.shipped.items():
            if target != out:  # a split group's card reads the config as written there too
                report.write(staged / target.relative_to(out) / REPORT_DIR)
            rep.write(staged / target.relative_to(out) / REPORT_DIR / SHIPPED_DIR)
        written = report.write(staged / REPORT_DIR).values()
    result.report_paths += [out / REPORT_DIR / p.name for p in written]


def _copy_reports(report_dir: str | Path | None, out: Path, result: GuardedMerge) -> None:
    """`--guard-report DIR`: the report there too, and each re-check under its folder's name."""
    if report_dir:
        result.report_paths += list(result.report.write(report_dir).values())
        for target, rep in result.shipped.items():
            rep.write(Path(report_dir) / target.relative_to(out) / SHIPPED_DIR)

def _recheck(cfg: LoadedConfig, jobs: list[tuple[Any, ...]], ctx: ActionContext,
             options: dict[str, Any]) -> dict[Path, GuardReport]:
    """The guard's report on each config merged from a set an action changed (drop, replace, the
    groups of split): the normal check path again, on cached hidden states, one rehearsal each.

    The report on the config as written keeps the actions; each re-check carries them too, and
    a note with the written config's verdict, so that either file tells the whole story.

    Returns:
        Output folder -> the re-check's report; a folder merged from the set as written has none,
        nor one whose re-check failed (a warning says why: the merge does not depend on it).
    """
    from mergekit_collapse.guard.assess import run_guard
    from mergekit_collapse.guard.config import parse_config

    written, shipped = ctx.report, {}
    for pm, target, source, _ in jobs:
        if pm.members == ctx.refs:
            continue
        try:
            run = run_guard(parse_config(source, cfg.path), **options)
        except CollapseError as e:
            LOG.warning("%s is not re-checked after the guard's actions: %s", target, e)
            continue
        if run is None:  # another process of a multi-process run
            continue
        run.report.actions = [a.model_copy() for a in written.actions]
        run.report.notes.append(
            f"re-checked after the guard's actions; the config as written ({len(written.models)} "
            f"models) had verdict {written.verdict} (decided by {written.decided_by})")
        shipped[target] = run.report
    return shipped


def _check_out(out: Path) -> None:
    """Refuse a folder holding something else than a merge: a merge would replace it (a file is
    refused before, by `check_writable`)."""
    from mergekit_collapse.models.loading import WEIGHT_SUFFIXES

    names = [p.name for p in out.iterdir()] if out.is_dir() else []
    merged = {"config.json", "mergekit_config.yml", REPORT_DIR} & set(names) or any(
        n.endswith(WEIGHT_SUFFIXES) for n in names)
    if names and not merged:
        raise BadInputError(f"output {out} is not a merged model folder "
                            f"(no config.json, weights or {REPORT_DIR}/) and would be replaced: "
                            "choose a new or empty folder")


def _belongs(rec: Action, pm: MergeJob, action: str) -> bool:
    """Is this record about this merge job's config (split records name their group)?"""
    if rec.action == action or (rec.action == "weights" and "applied" in rec.changed):
        return not pm.name or rec.changed.startswith(f"{pm.name}:")
    return False


def _raw(source: str) -> dict:
    import yaml

    return yaml.safe_load(source)


def _sibling(out: Path, suffix: str, ext: str = ".yml") -> Path:
    """`<OUT>.<suffix>.yml` next to the output folder."""
    return out.parent / f"{out.name}.{suffix}{ext}"


def _write_config(path: Path, raw: dict) -> str:
    from mergekit_collapse.actions.rewrite import dump_config

    text = dump_config(raw)
    atomic_write_text(path, text)
    return text


def _with_candidates(cfg: Any, wanted: bool) -> tuple[Any, dict[str, Any]]:
    """For `replace`: give every candidate its task's probe spec, so the guard can extract it.

    Returns:
        (the config with candidate task entries, candidate text -> ModelReference).

    Raises:
        BadInputError: a candidate task that no model has, or a candidate that is not a model
            reference.
    """
    from mergekit_collapse.guard.config import parse_ref, with_guard

    if not wanted or not cfg.guard.candidates:
        return cfg, {}
    by_name = {spec.name: spec for spec in cfg.guard.tasks.values()}
    tasks = dict(cfg.guard.tasks)
    refs: dict[str, Any] = {}
    for task, texts in cfg.guard.candidates.items():
        if task not in by_name:
            raise BadInputError(f"guard.candidates names task '{task}', which no model of "
                                "this merge has")
        for text in texts:
            ref = parse_ref(text)
            if ref is None:
                raise BadInputError(f"guard.candidates['{task}']: '{text}' is not a "
                                    "model reference")
            refs[text] = ref
            tasks.setdefault(text, by_name[task])
    guard = cfg.guard.model_copy(update={"tasks": tasks})
    return with_guard(cfg, guard), refs


def _weights(outcome: Reorganisation, ctx: ActionContext, mode: str, out: Path) -> list[Action]:
    """`--guard-weights`: α* of each merge job's own models, suggested or applied.

    `suggest` writes `<OUT>[.<action>]-weights.yml` beside the output and merges as planned;
    `apply` rewrites the jobs' configs (linear and task-arithmetic family methods only).
    """
    from mergekit_collapse.actions.rewrite import weights_config
    from mergekit_collapse.guard import geometry
    from mergekit_collapse.guard.report import Action
    from mergekit_collapse.guard.weights import task_family

    if mode == "none":
        return []
    if outcome.multi_stage is not None:
        return [Action(action="weights", changed="not applied",
                       reason="a multi-stage (order) plan weights each stage by its group sizes")]
    records = []
    linear = ctx.merge_method == "linear" or ctx.merge_method in task_family()
    for pm in outcome.merges:
        if len(pm.members) < 2:
            continue
        sq = geometry.pairwise_distances(ctx.vectors(pm.members)).sq
        alpha = geometry.enclosing_ball(sq).weights
        weights = {m: float(a) for m, a in zip(pm.members, alpha, strict=True)}
        text = ", ".join(f"{m}: {a:.3f}" for m, a in weights.items())
        where = f"{pm.name}: " if pm.name else ""
        if mode == "apply" and linear:
            pm.raw = weights_config(pm.raw, weights)
            pm.changed = True
            pm.suffix = f"{pm.suffix}-weights" if pm.suffix else "weights"
            records.append(Action(
                action="weights", changed=f"{where}applied α* as weight: {text}",
                reason="distortion-optimal convex weights (minimum enclosing ball): the worst "
                       "model's distortion is the smallest any convex merge allows",
                models=[str(m) for m in pm.members]))
        else:
            why = ("suggested only (--guard-weights suggest)" if mode == "suggest" else
                   f"not applied: {ctx.merge_method} has no linear weights")
            records.append(Action(action="weights", changed=f"{where}α* {text}", reason=why,
                                  models=[str(m) for m in pm.members]))
            if mode == "suggest" and linear:
                path = _sibling(out, f"{pm.suffix}-weights" if pm.suffix else "weights")
                _write_config(path, weights_config(pm.raw, weights))
                records[-1].configs.append(str(path))
    return records


def merge_config(raw: dict, out: str | Path, merge_options: Any, *,
                 config_source: str | None = None) -> None:
    """Merge one config with mergekit's own run_merge.

    Args:
        raw: the mergekit YAML mapping (a `guard:` key is ignored, as mergekit itself ignores it).
        out: the output folder.
        merge_options: mergekit's MergeOptions.
        config_source: the YAML text mergekit records in the output (default: its own dump).

    Raises:
        BadInputError: mergekit rejects the config.
    """
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from pydantic import ValidationError

    body = {k: v for k, v in raw.items() if k != "guard"}
    try:
        merge = MergeConfiguration.model_validate(body)
    except (ValidationError, RuntimeError, ValueError) as e:
        raise BadInputError(f"invalid mergekit config: {str(e).splitlines()[0]}") from None
    if getattr(merge_options, "lora_merge_cache", None):  # no half-merged LoRA from a stopped run
        fresh_lora_cache(merge.referenced_models(), Path(merge_options.lora_merge_cache))
    run_merge(merge, str(out), options=merge_options, config_source=config_source)


def merge_multi_stage(text: str, out: str | Path, intermediate_dir: str | Path,
                      merge_options: Any) -> None:
    """Run a mergekit-multi YAML with mergekit's own multimerge machinery.

    Args:
        text: the multi-document YAML (named stages, one unnamed final merge).
        out: the final model's folder.
        intermediate_dir: where the named stages are written.
        merge_options: mergekit's MergeOptions.
    """
    from mergekit.graph import Executor
    from mergekit.scripts import multimerge

    Path(intermediate_dir).mkdir(parents=True, exist_ok=True)
    configs, deps = multimerge.load_config(text, str(intermediate_dir))
    tasks = multimerge.make_tasks(configs, deps, merge_options, str(intermediate_dir), str(out),
                                  lazy=False)
    Executor(tasks, math_device="cpu", storage_device="cpu").execute(desc="Merging stages")
