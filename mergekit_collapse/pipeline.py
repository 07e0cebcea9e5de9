"""guard -> merge -> evaluate -> card -> push, as one resumable run (`mergekit-collapse run`).

Each finished stage is recorded in OUT/mergeability/pipeline.json with a hash of its inputs and the
sizes of its outputs; a re-run skips a stage whose record matches and whose outputs are intact.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergekit_collapse._constants import REPORT_DIR, cache_root
from mergekit_collapse._io import atomic_write_text
from mergekit_collapse.errors import ModelNotFoundError
from mergekit_collapse.publish.eval_results import EVAL_RESULTS_DIR

if TYPE_CHECKING:
    from mergekit_collapse.evaluate.observed import Evaluation
    from mergekit_collapse.guard.report import GuardReport
    from mergekit_collapse.publish.hub import PushResult
    from mergekit_collapse.runtime import Runtime

STATE_FILE = "pipeline.json"


@dataclass
class PipelineResult:
    """Where everything is, and what each stage did."""

    out: Path
    report: GuardReport | None = None
    evaluations: dict[str, Evaluation] = field(default_factory=dict)  # by output folder
    configs: list[Path] = field(default_factory=list)
    cards: list[Path] = field(default_factory=list)
    push: PushResult | None = None
    skipped: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def _sha(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _files(folder: Path) -> dict[str, int]:
    """Sizes of the files mergekit wrote (weights, config, tokenizer): the merge stage's outputs.

    README.md and `.eval_results/` (written by the card stage) and the report folder belong to
    later stages.
    """
    later = {REPORT_DIR, EVAL_RESULTS_DIR}
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "README.md"
            and not later & set(p.relative_to(folder).parts)}


class StageState:
    """pipeline.json: per stage, its inputs' hash and its outputs' sizes."""

    def __init__(self, out: Path):
        self.path = out / REPORT_DIR / STATE_FILE
        try:
            self.data: dict[str, Any] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.data = {}

    def done(self, stage: str, inputs: str, check: Callable[[dict], bool] = lambda r: True) -> bool:
        rec = self.data.get(stage)
        return bool(rec and rec.get("inputs") == inputs and check(rec))

    def record(self, stage: str, inputs: str, **info: Any) -> None:
        self.data[stage] = {"inputs": inputs, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                            **info}
        atomic_write_text(self.path, json.dumps(self.data, indent=2, default=str))

    def get(self, stage: str) -> dict[str, Any]:
        return self.data.get(stage, {})


def default_merge_options(**overrides: Any) -> Any:
    """mergekit's MergeOptions for the pipeline: LoRAs merged once into the shared cache."""
    from mergekit.options import MergeOptions

    opts = {"lora_merge_cache": str(cache_root() / "lora_merged"), "copy_tokenizer": True,
            "quiet": True}
    return MergeOptions(**{**opts, **overrides})


def run_pipeline(config: str | Path, out: str | Path, *, merge_options: Any = None,
                 action: str | None = None, budget: float | None = None,
                 absolute_budget: float | None = None, weights: str | None = None,
                 merge_all: bool = False, evaluate: bool = True, limit: int | None = None,
                 with_base: bool = False, push_repo: str | None = None, dry_run: bool = False,
                 private: bool = False, exist_ok: bool = False, template: Path | None = None,
                 runtime: Runtime | None = None, echo: Callable[[str], None] = print,
                 **settings: Any) -> PipelineResult:
    """Guard, merge with mergekit, evaluate with lm-eval, write the card, push to the Hub.

    Args:
        config: the mergekit YAML with its `guard:` section.
        out: the merged model's folder.
        merge_options: mergekit MergeOptions (default: `default_merge_options()`).
        action, budget, absolute_budget, weights, merge_all: guard overrides (see `guarded_merge`).
        evaluate: run lm-eval on the merge(s) and the constituents.
        limit: lm-eval documents per task.
        with_base: also score the base model.
        push_repo: push the (main) merged folder to this Hub repo.
        dry_run: plan the push, contact nothing.
        private, exist_ok: push options.
        template: a card template of the user's.
        runtime: the guard's device, dtype, cache, ... (default: `merge_runtime(merge_options)`
            with progress bars); its `progress` also drives the evaluation's.
        echo: where stage lines go.
        **settings: other guard settings to override (rehearse, layer, k, ...; see `guarded_merge`).

    Returns:
        The PipelineResult.

    Raises:
        BadInputError: bad config or inputs. GuardStoppedError: the guard stopped the merge.
        HubError: the push failed (nothing half-pushed).
    """
    from mergekit_collapse.merge import merge_runtime

    out, config = Path(out), Path(config)
    result = PipelineResult(out=out)
    state = StageState(out)
    opts = merge_options or default_merge_options()
    runtime = runtime or merge_runtime(opts, progress=True)
    stage = _stage_echo(echo)
    t0 = time.time()
    guard = {"action": action, "budget": budget, "absolute_budget": absolute_budget,
             "weights": weights, "merge_all": merge_all}
    merged = _merge_stage(config, out, opts, guard, settings, runtime, state, result, stage, echo)
    result.seconds["merge"] = time.time() - t0
    t0 = time.time()
    if evaluate:
        _evaluate_stage(out, merged, limit, with_base, runtime.progress, state, result, stage)
    result.seconds["evaluate"] = time.time() - t0
    _card_stage(merged, template, result, stage)  # cheap: always re-rendered from the disk
    if push_repo:
        _push_stage(out, push_repo, private, exist_ok, dry_run, result, stage)
    return result


_STAGES = ("guard + merge", "evaluate", "card", "push")

#: the merged folders, and the config merged in each
_Merged = tuple[list[Path], list[Path]]


def _stage_echo(echo: Callable[[str], None]) -> Callable[..., None]:
    """`stage(i, note)`: echo the line that starts (or skips) stage i."""

    def stage(i: int, note: str = "") -> None:
        echo(f"[{i + 1}/{len(_STAGES)}] {_STAGES[i]}{' — ' + note if note else ''}")

    return stage


def _merge_stage(config: Path, out: Path, opts: Any, guard: dict[str, Any],
                 settings: dict[str, Any], runtime: Runtime, state: StageState,
                 result: PipelineResult, stage: Callable[..., None],
                 echo: Callable[[str], None]) -> _Merged:
    """1. guard + merge, unless an earlier run's merge has the same inputs and intact outputs."""
    from mergekit_collapse.guard.report import GuardReport
    from mergekit_collapse.merge import guarded_merge

    try:
        text = config.read_text(encoding="utf-8")
    except OSError:
        raise ModelNotFoundError(f"config file not found: {config}") from None
    inputs = _sha(text, guard["action"], guard["budget"], guard["absolute_budget"],
                  guard["weights"], guard["merge_all"],
                  opts.model_dump(mode="json") if hasattr(opts, "model_dump") else str(opts),
                  *([settings] if settings else []))  # none given: earlier runs keep their hash
    rec = state.get("merge")
    intact = all(Path(o).is_dir() and _files(Path(o)) == sizes
                 for o, sizes in rec.get("outputs", {}).items())
    if state.done("merge", inputs) and intact and (out / REPORT_DIR / "report.json").exists():
        stage(0, "finished earlier, outputs intact: skipped")
        result.skipped.append("merge")
        result.report = GuardReport.read(out / REPORT_DIR)
        outputs = [Path(o) for o in rec["outputs"]]
        merged_configs = [Path(c) if c else config for c in rec["configs"]]
    else:
        stage(0)
        done = guarded_merge(config, out, opts, **guard, runtime=runtime, **settings)
        echo(done.summary())
        result.report = done.report
        outputs = done.outputs
        merged_configs = [src or config for src in done.sources]
        state.record("merge", inputs, outputs={str(o): _files(o) for o in outputs},
                     configs=[str(c) for c in merged_configs])
    result.configs = [c for c in merged_configs if c != config]
    return outputs, merged_configs


def _evaluate_stage(out: Path, merged: _Merged, limit: int | None, with_base: bool,
                    progress: bool, state: StageState, result: PipelineResult,
                    stage: Callable[..., None]) -> None:
    """2. evaluate each merged folder, unless an earlier run evaluated the same merge."""
    from mergekit_collapse.evaluate.observed import Evaluation, evaluate_merge, write_evaluation
    from mergekit_collapse.guard.config import load_config

    for folder, cfg_path in zip(*merged, strict=True):
        key = _sha(state.get("merge").get("outputs", {}).get(str(folder)), str(cfg_path), limit,
                   with_base)
        target = folder / REPORT_DIR / "evaluation.json"
        if state.done(f"evaluate:{folder}", key) and target.exists():
            stage(1, f"{folder.name}: finished earlier: skipped")
            result.evaluations[str(folder)] = Evaluation.model_validate_json(target.read_text())
            continue
        stage(1, f"{folder.name} (limit {limit or 'all'})")
        report = result.report if folder == out else None
        ev = evaluate_merge(folder, load_config(cfg_path), limit=limit, with_base=with_base,
                            report=report, progress=progress)
        write_evaluation(ev, folder / REPORT_DIR, report)
        result.evaluations[str(folder)] = ev
        state.record(f"evaluate:{folder}", key)


def _card_stage(merged: _Merged, template: Path | None, result: PipelineResult,
                stage: Callable[..., None]) -> None:
    """3. the card of each merged folder that has a report."""
    from mergekit_collapse.publish.card import write_card

    stage(2)
    for folder, cfg_path in zip(*merged, strict=True):
        if (folder / REPORT_DIR / "report.json").exists():
            result.cards.append(write_card(folder, template=template, config_path=cfg_path))


def _push_stage(out: Path, repo: str, private: bool, exist_ok: bool, dry_run: bool,
                result: PipelineResult, stage: Callable[..., None]) -> None:
    """4. push the (main) merged folder to the Hub."""
    from mergekit_collapse.publish.hub import push

    stage(3, f"{repo}{' (dry run)' if dry_run else ''}")
    result.push = push(out, repo, private=private, exist_ok=exist_ok, dry_run=dry_run)
