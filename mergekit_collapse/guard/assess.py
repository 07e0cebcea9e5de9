"""The guard: config -> probes -> hidden states -> geometry -> verdict, as a GuardReport."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from mergekit_collapse._constants import cache_root
from mergekit_collapse._version import __version__
from mergekit_collapse.errors import BadInputError, CollapseError
from mergekit_collapse.guard import geometry
from mergekit_collapse.guard.calibration import Calibration, load_calibration
from mergekit_collapse.guard.config import Budget, LoadedConfig, load_config, with_guard
from mergekit_collapse.guard.decision import (
    DecidedBy,
    ResolvedBudget,
    Verdict,
    decide,
    resolve_budget,
    verdict,
)
from mergekit_collapse.guard.distributed import extract_shared, world
from mergekit_collapse.guard.extract import Extraction, extract
from mergekit_collapse.guard.forward import ExtractionSettings
from mergekit_collapse.guard.preflight import preflight
from mergekit_collapse.guard.probes import ProbeSet, build_probes
from mergekit_collapse.guard.rehearsal import Answers
from mergekit_collapse.guard.report import (
    Bounds,
    BudgetInfo,
    Distances,
    GuardReport,
    ModelEntry,
    ProbeInfo,
    RehearsalInfo,
    RiskInfo,
    RunInfo,
    display_names,
)
from mergekit_collapse.guard.weights import planned_weights
from mergekit_collapse.runtime import Runtime

log = logging.getLogger(__name__)

#: the relative budget when neither the config nor the calibration sets one
DEFAULT_RELATIVE_BUDGET = 0.25


@dataclass
class GuardRun:
    """A finished guard run: the report and what it was computed from (for re-organisation)."""

    cfg: LoadedConfig
    probes: ProbeSet
    extraction: Extraction
    report: GuardReport

    def vectors(self, refs: list[Any]) -> np.ndarray:
        """(N, P, d) hidden states of the given model references."""
        return np.stack([self.extraction.vectors[str(r)] for r in refs])


def apply_overrides(cfg: LoadedConfig, *, budget: float | None = None,
                    absolute_budget: float | None = None, **settings: Any) -> LoadedConfig:
    """CLI flags override the file: budgets and any GuardSettings field given as not None."""
    update = {k: v for k, v in settings.items() if v is not None}
    if budget is not None and absolute_budget is not None:
        raise BadInputError("give either a relative budget or an absolute one, not both")
    if budget is not None:
        update["budget"] = {"relative": budget}
    if absolute_budget is not None:
        update["budget"] = {"absolute": absolute_budget}
    if not update:
        return cfg
    try:
        guard = cfg.guard.model_validate({**cfg.guard.model_dump(), **update})
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise BadInputError(f"invalid override {where}={err.get('input')!r}: "
                            f"{err['msg']}") from None
    return with_guard(cfg, guard)


def extraction_settings(cfg: LoadedConfig, runtime: Runtime | None = None) -> ExtractionSettings:
    """What extraction (and the rehearsal) needs: the config's `guard:` settings and the run's
    device, dtype and what it may load."""
    g, rt = cfg.guard, runtime or Runtime()
    return ExtractionSettings(layer=g.layer, pooling=g.pooling, dtype=rt.dtype, device=rt.device,
                              batch_size=g.batch_size, max_length=g.max_length,
                              chat_template=g.chat_template, allow_pickle=rt.allow_pickle,
                              trust_remote_code=rt.trust_remote_code)


def run_guard(config: str | Path | LoadedConfig, *, extra_models: tuple[Any, ...] = (),
              runtime: Runtime | None = None, **overrides: Any) -> GuardRun | None:
    """Run the guard and keep its inputs (see `check` for the arguments).

    Under `accelerate launch` on several processes, each extracts a share of the models into the
    cache (`guard.distributed`); the main process then reads them all and assesses alone.

    Args:
        extra_models: more references to extract (e.g. `replace` candidates); not in the report.

    Returns:
        The run; None on the other processes of a multi-process run.
    """
    t0 = time.perf_counter()
    cfg = config if isinstance(config, LoadedConfig) else load_config(config)
    cfg = apply_overrides(cfg, **overrides)
    _check_models(cfg)
    probes = build_probes(cfg, models=[*cfg.models, *extra_models])
    refs = ([cfg.base] if cfg.base is not None else []) + list(cfg.models) + list(extra_models)
    rt = runtime or Runtime()
    settings = extraction_settings(cfg, rt)
    refs = list(dict.fromkeys(refs))
    labels = display_names([str(r) for r in refs], _root(cfg))
    preflight(cfg, refs, labels, trust_remote_code=rt.trust_remote_code)
    cache, progress = rt.cache_dir, rt.progress
    state = world()
    if state is not None:
        computed = extract_shared(state, refs, probes.texts, settings, cache_dir=cache,
                                  progress=progress, labels=labels)
        if not state.is_main_process:
            return None
    gate = rehearsal_gate(cfg, probes, settings)
    answers = None if gate is not None else Answers(
        list(cfg.models), probes_by_model(cfg, probes), settings, cfg.guard.answer_tokens,
        cache or cache_root())
    # the rehearsal's answers come from the same load as the hidden states
    ext = extract(refs, probes.texts, settings, cache_dir=cache, progress=progress, labels=labels,
                  visit=answers.compute if answers else None,
                  visit_models=answers.missing() if answers else ())
    if state is not None:  # what the processes computed; this read computed nothing
        ext.computed = computed
    t1 = time.perf_counter()
    base = ext.vectors[str(cfg.base)] if cfg.base is not None else None
    hidden = np.stack([ext.vectors[str(m)] for m in cfg.models])
    rehearsal = (None, gate) if gate is not None else run_rehearsal(
        cfg, probes, settings, cache_dir=cache, progress=progress, labels=labels)
    t2 = time.perf_counter()
    report = assess(cfg, hidden, base, probes=probes, hidden_size=ext.hidden_size, dtype=ext.dtype,
                    rehearsal=rehearsal)
    t3 = time.perf_counter()
    report.run_info = _run_info((t0, t1, t2, t3), answers.seconds if answers else 0.0,
                                rehearsal[0])
    return GuardRun(cfg=cfg, probes=probes, extraction=ext, report=report)


def _check_models(cfg: LoadedConfig) -> None:
    """Refuse a config that merges fewer than two models: there is nothing to compare."""
    if not cfg.models:
        raise BadInputError("the config merges no models")
    if len(cfg.models) == 1:
        raise BadInputError(f"the config merges only one model ({cfg.models[0]}): the guard "
                            "compares two or more; add the others under models:")


def _run_info(times: tuple[float, float, float, float], answered: float,
              rehearsed: Any) -> RunInfo:
    """The run's date and the seconds of each stage (start, extracted, rehearsed, assessed).

    `answered`: seconds of rehearsal answers made on the extraction's loads (moved from extract).
    """
    t0, t1, t2, t3 = times
    seconds = {"extract": t1 - t0 - answered}
    if rehearsed is not None:
        seconds |= {f"rehearsal.{k}": v for k, v in rehearsed.seconds.items()}
        if answered:
            seconds["rehearsal.answers"] = seconds.get("rehearsal.answers", 0.0) + answered
    seconds |= {"assess": t3 - t2, "total": t3 - t0}
    return RunInfo(date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   seconds={k: round(v, 3) for k, v in seconds.items()})


def _root(cfg: LoadedConfig) -> Path | None:
    """The folder display names are relative to: the config's."""
    return cfg.path.parent if cfg.path is not None else None


def prefill_rehearsals(configs: list[Path], *, runtime: Runtime | None = None,
                       **overrides: Any) -> None:
    """On the processes of a multi-process run: process r rehearses configs r, r + n, ... into the
    rehearsal cache, then every process waits for the others; the checks that follow read the
    results (one process a config, all at once, instead of the main process one after another).

    Errors are left to those checks, which report them. Outside a launcher this does nothing.
    """
    from dataclasses import replace

    state = world()
    if state is None:
        return
    for path in configs[state.process_index :: state.num_processes]:
        try:
            cfg = apply_overrides(load_config(path), **overrides)
            probes = build_probes(cfg)
            settings = extraction_settings(cfg, runtime)
            if settings.device == "auto" and state.device.type == "cuda":
                settings = replace(settings, device=str(state.device))  # this process's GPU
            if len(cfg.models) > 1 and rehearsal_gate(cfg, probes, settings) is None:
                run_rehearsal(cfg, probes, settings, progress=False,
                              cache_dir=runtime.cache_dir if runtime else None)
        except CollapseError as e:
            log.debug("prefilling the rehearsal of %s: %s", path, e)
    state.wait_for_everyone()


def rehearsal_gate(cfg: LoadedConfig, probes: ProbeSet,
                   settings: ExtractionSettings) -> RehearsalInfo | None:
    """None when the rehearsal is to run; else why not: `guard.rehearse: off`, or under "auto" a
    streamed pass whose estimated peak memory (`rehearsal_memory`) does not fit."""
    from mergekit_collapse.guard.rehearsal import rehearsal_memory

    g = cfg.guard
    if g.rehearse == "off":
        return RehearsalInfo(status="off", reason="guard.rehearse: off")
    if g.rehearse == "auto":
        need, limit, where = rehearsal_memory(cfg.merge, settings, n_sequences=len(probes.texts),
                                              answer_tokens=g.answer_tokens,
                                              limit_gb=g.rehearse_max_gb)
        if need > limit:
            return RehearsalInfo(status="skipped", reason=(
                f"the streamed pass needs about {need / 1e9:.1f} GB > {limit / 1e9:.1f} GB "
                f"{where}; --rehearse on forces it"))
    return None


def probes_by_model(cfg: LoadedConfig, probes: ProbeSet) -> dict[str, list[str]]:
    """Each merged model's own task probes, by str(model reference)."""
    return {str(m): [t for t, task in zip(probes.texts, probes.tasks, strict=True)
                     if task == cfg.task_of(m).name] for m in cfg.models}


def run_rehearsal(cfg: LoadedConfig, probes: ProbeSet, settings: ExtractionSettings, *,
                  cache_dir: Path | None = None, progress: bool = True,
                  labels: dict[str, str] | None = None) -> tuple[Any, RehearsalInfo]:
    """The rehearsal, once `rehearsal_gate` let it run: (Rehearsal or None, what happened and why).

    Under "auto" a merge mergekit cannot merge is skipped with its reason; "on" raises instead.
    """
    from mergekit_collapse.guard.rehearsal import rehearse

    g = cfg.guard
    try:
        r = rehearse(cfg.merge, cfg.models, probes_by_model(cfg, probes), settings,
                     answer_tokens=g.answer_tokens, seed=g.seed, cache_dir=cache_dir,
                     progress=progress, labels=labels)
    except BadInputError as e:
        if g.rehearse == "on":
            raise
        return None, RehearsalInfo(status="skipped", reason=str(e))
    return r, RehearsalInfo(status="ran", answer_tokens=r.answer_tokens, dtype=r.dtype)


def check(config: str | Path | LoadedConfig, *, budget: float | None = None,
          absolute_budget: float | None = None, runtime: Runtime | None = None,
          **overrides: Any) -> GuardReport | None:
    """Predict whether a mergekit config's models merge within a distortion budget.

    Args:
        config: path to a mergekit YAML with a `guard:` section, or a LoadedConfig.
        budget: relative budget (overrides `guard.budget`), a multiple of the base's probe spread.
        absolute_budget: budget in squared hidden-state units.
        runtime: device, dtype, cache, what may be loaded, progress (default: `Runtime()`:
            auto device and dtype, $MERGEKIT_COLLAPSE_CACHE, safetensors only, no remote code).
        **overrides: any `guard:` setting (k, seed, layer, pooling, chat_template, jung_dim, ...).

    Returns:
        The GuardReport (verdict, bounds, per-model scores); None on the other processes of a
        multi-process run (`run_guard`).

    Raises:
        BadInputError: invalid config, missing/mismatched models, empty probes, NaNs, unsafe
            weights.
    """
    run = run_guard(config, budget=budget, absolute_budget=absolute_budget, runtime=runtime,
                    **overrides)
    return run.report if run is not None else None


def _budget_scale(base: np.ndarray | None, hidden: np.ndarray) -> tuple[float, str]:
    if base is not None:
        return (geometry.probe_spread(base),
                "base model probe spread mean_x ||h_base(x) - mean h_base||²")
    return (float(np.mean([geometry.probe_spread(h) for h in hidden])),
            "no base model: mean of the constituents' probe spreads")


def _finite(x: float) -> float | None:
    return None if x is None or np.isnan(x) else float(x)


def assess(cfg: LoadedConfig, hidden: np.ndarray, base: np.ndarray | None, *, probes: ProbeSet,
           hidden_size: int, dtype: str, names: list[str] | None = None,
           calibration: Calibration | None = None,
           rehearsal: tuple[Any, RehearsalInfo] | None = None) -> GuardReport:
    """Geometry, budget and verdict from hidden states alone (numpy; no model is touched).

    Args:
        cfg: the config (its guard settings, merge method and planned weights).
        hidden: (N, P, d) hidden states of the constituents, in `cfg.models` order.
        base: (P, d) base hidden states, or None.
        probes: the probe set the states were computed on.
        hidden_size: d. dtype: the extraction dtype (for the report).
        names: model names for the report (default: the config's references).
        calibration: default budget and risk bands (default: `load_calibration()`).
        rehearsal: `run_rehearsal`'s result, or None (not asked for).
    """
    g = cfg.guard
    cal = calibration or load_calibration()
    names = names or [str(m) for m in cfg.models]
    shown = display_names([*names, *([str(cfg.base)] if cfg.base is not None else [])], _root(cfg))
    tasks = [cfg.task_of(m).name for m in cfg.models]
    geo = geometry.analyse(hidden, hidden_size=hidden_size, jung_dim=g.jung_dim)
    bud = _budget(g.budget, cal, base, hidden)
    bounds = verdict(jung=geo.jung, converse=geo.converse, exact=geo.exact, budget=bud.absolute)
    notes = _geometry_notes(cfg, geo, base)
    w, planned, anchored = _planned(cfg, geo, hidden, base, len(names), notes)
    entries = _entries(names, shown, tasks, geo, planned, anchored, cal)
    info = _rehearsal_info(rehearsal, entries, cfg, cal, notes)
    v, by = _decide(bounds, bud.source, cal, entries, info, notes)
    return GuardReport(
        tool_version=__version__,
        config=str(cfg.path) if cfg.path else None,
        merge_method=cfg.merge.merge_method,
        base_model=str(cfg.base) if cfg.base is not None else None,
        models=entries,
        hidden_sim=geo.hidden_sim.tolist() if geo.hidden_sim is not None else None,
        hidden_sim_note=geo.hidden_sim_note,
        distances=Distances(mean=geo.distances.mean.tolist(), rms=geo.distances.rms.tolist()),
        bounds=Bounds(diameter=geo.diameter, converse=geo.converse, jung=geo.jung,
                      jung_n=geo.jung_n, jung_dim=g.jung_dim, exact=geo.exact,
                      uniform=float(geo.uniform.max()),
                      planned=float(planned.max()) if planned is not None else None),
        weights={n: float(a) for n, a in zip(names, geo.ball.weights, strict=True)},
        planned_weights=({n: float(x) for n, x in zip(names, w, strict=True)} if w is not None
                         else None),
        budget=BudgetInfo(mode=bud.mode, value=bud.value, absolute=bud.absolute, scale=bud.scale,
                          scale_source=bud.scale_source, source=bud.source),
        risk=RiskInfo(score=cal.score, direction=cal.direction, elevated=cal.bands.elevated,
                      collapse=cal.bands.collapse, calibration=cal.source,
                      auroc=cal.validity.auroc if cal.validity else None),
        rehearsal=info,
        verdict=v, decided_by=by,
        probes=ProbeInfo(k=probes.k, count=len(probes), sha256=probes.sha256, seed=probes.seed,
                         chat_template=probes.chat_template),
        layer=g.layer, pooling=g.pooling, dtype=dtype, hidden_size=hidden_size, notes=notes,
    )


def _budget(setting: Budget, cal: Calibration, base: np.ndarray | None,
            hidden: np.ndarray) -> ResolvedBudget:
    """The absolute budget: the setting, else the calibration's relative one, on the spread."""
    scale, source = _budget_scale(base, hidden)
    try:
        return resolve_budget(setting, scale, source,
                              cal.relative_budget or DEFAULT_RELATIVE_BUDGET)
    except ValueError:
        raise BadInputError("relative budget needs a non-degenerate probe spread; "
                            "use an absolute budget") from None


def _geometry_notes(cfg: LoadedConfig, geo: geometry.Geometry,
                    base: np.ndarray | None) -> list[str]:
    """The report's first notes: the geometry's, the base model's, a missing risk score."""
    notes = list(geo.notes)
    if cfg.base_note:
        notes.append(cfg.base_note)
    if base is None:
        notes.append(f"risk score unavailable: {cfg.base_source or 'no base model'}")
    return notes


def _planned(cfg: LoadedConfig, geo: geometry.Geometry, hidden: np.ndarray,
             base: np.ndarray | None, n: int, notes: list[str],
             ) -> tuple[np.ndarray | None, np.ndarray | None, geometry.BaseAnchored | None]:
    """The config's planned weights, their distortions, and the base-anchored shifts.

    Returns:
        (planned weights or None, planned distortions or None, `base_anchored` or None).
    """
    w, why = planned_weights(cfg)
    planned = anchored = None
    if why:
        notes.append(f"planned weights: {why}")
    if base is not None:
        sq_ext = geometry.pairwise_distances(np.concatenate([base[None], hidden])).sq
        if w is not None:
            anchored = geometry.base_anchored(sq_ext, w)
            planned = geometry.distortions(sq_ext, np.concatenate([[1 - w.sum()], w]))[1:]
        else:
            anchored = geometry.base_anchored(sq_ext, np.full(n, 1.0 / n))
    elif w is not None and np.all(w >= 0) and np.isclose(w.sum(), 1):
        planned = geometry.distortions(geo.distances.sq, w)
    return w, planned, anchored


def _entries(names: list[str], shown: dict[str, str], tasks: list[str], geo: geometry.Geometry,
             planned: np.ndarray | None, anchored: geometry.BaseAnchored | None,
             cal: Calibration) -> list[ModelEntry]:
    """One report entry per model: its geometry, distortions and calibrated risk band."""
    entries = []
    for i, name in enumerate(names):
        entries.append(ModelEntry(
            name=name, display=shown[name], task=tasks[i],
            mds=float(geo.mds[i]) if geo.mds is not None else None,
            mean_hidden_sim=(float(geo.mean_hidden_sim[i]) if geo.mean_hidden_sim is not None
                             else None),
            distortion_optimal=float(geo.optimal[i]), distortion_uniform=float(geo.uniform[i]),
            distortion_planned=float(planned[i]) if planned is not None else None,
            shift=float(anchored.shift[i]) if anchored is not None else None,
            retention=_finite(anchored.retention[i]) if anchored is not None else None,
            relative_distortion=(_finite(anchored.relative_distortion[i]) if anchored is not None
                                 else None),
        ))
        score = (getattr(entries[-1], cal.score, None) if cal.score in ModelEntry.model_fields
                 else None)
        entries[-1].risk_score = score
        entries[-1].risk_band = cal.band(score)
    return entries


def _rehearsal_info(rehearsal: tuple[Any, RehearsalInfo] | None, entries: list[ModelEntry],
                    cfg: LoadedConfig, cal: Calibration,
                    notes: list[str]) -> RehearsalInfo | None:
    """Put the rehearsal's scores and bands on the entries; return the report's rehearsal part."""
    result, info = rehearsal or (None, None)
    info = info.model_copy() if info is not None else None
    if result is not None:
        info.score = cal.rehearsal.score if cal.rehearsal else "rehearsal_token_agreement"
        if cal.rehearsal:
            info.direction = cal.rehearsal.direction
            bands = cal.rehearsal.bands
            info.elevated, info.collapse = bands.elevated, bands.collapse
        for e, m in zip(entries, cfg.models, strict=True):
            for k, x in result.models[str(m)].items():
                setattr(e, k, x)
            e.predicted_retention = getattr(e, info.score)
            e.rehearsal_band = cal.rehearsal.band(e.predicted_retention) if cal.rehearsal else None
    elif info is not None and info.reason:
        notes.append(f"rehearsal {info.status}: {info.reason}")
    return info


def _decide(bounds: tuple[str, str], budget_source: str, cal: Calibration,
            entries: list[ModelEntry], info: RehearsalInfo | None,
            notes: list[str]) -> tuple[Verdict, DecidedBy]:
    """The verdict and the signal that decided it; notes why, and the models it flags."""
    v, by, why = decide(bounds=bounds, budget_source=budget_source, prefer=cal.decides, signals={
        "risk": [e.risk_band for e in entries], "rehearsal": [e.rehearsal_band for e in entries]})
    if why:
        notes.append(why)
    score = cal.score if by == "risk" else info.score if by == "rehearsal" else None
    flagged = [f"{e.task} ({score} {e.signal(by)[1]:.3g})" for e in entries
               if score and e.signal(by)[0] == "collapse"]
    if flagged:
        notes.append(f"the calibrated {by} signal puts {', '.join(flagged)} in the collapse band")
    return v, by
