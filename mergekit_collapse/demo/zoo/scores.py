"""Score the zoo with lm-eval: each adapter on its own task, and the base model on every task."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mergekit_collapse.demo.zoo.taskfiles import eval_name
from mergekit_collapse.demo.zoo.tasks import TASKS_DEF

logger = logging.getLogger(__name__)

#: The default document limit per task (test sets hold 105-200 documents).
DEFAULT_LIMIT = 100


def metric_of(task: str) -> str:
    """The headline lm-eval metric of a zoo task: `acc` (multiple choice) or `exact_match`."""
    return "acc" if TASKS_DEF[task].kind == "choice" else "exact_match"


def load_adapted(base: str | Path, adapter: str | Path | None) -> tuple[Any, Any]:
    """The base model in fp32 with a LoRA adapter merged in (none: the base itself), and its
    tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    model.eval()
    return model, tokenizer


def score_zoo(tasks: list[str], *, limit: int | None = DEFAULT_LIMIT, batch_size: int = 16,
              out_file: str | Path | None = None, base: str | Path | None = None,
              adapters: bool = True, threads: int | None = None, family: str = "smollm2",
              log: Callable[[str], None] = logger.info) -> dict[str, Any]:
    """Evaluate the base model and each task's adapter on that task (fp32, chat template).

    Scores already in `out_file` under the same `limit` are kept: the base is only evaluated on
    tasks it has no score for, so tasks can be scored as their adapters finish training.

    Args:
        tasks: zoo task names.
        limit: lm-eval document limit per task (None: the whole test set).
        batch_size: lm-eval batch size.
        out_file: read previous scores from and write the scores to this JSON file.
        base: the base model folder (default: the family's converted base).
        adapters: also score the adapters (False: the base model only).
        threads: torch CPU threads (default: leave torch's setting).
        family: the zoo (`smollm2` or `gemma3`): its base and Hub id.
        log: progress sink.

    Returns:
        `{"base_model", "limit", "apply_chat_template", "dtype", "base": {task: score},
        "tasks": {task: {eval, metric, base, adapter, train_steps}}}`.

    Raises:
        BadInputError: unknown task, missing adapter or base model.
    """
    import torch

    from mergekit_collapse.demo.base_model import ensure_base
    from mergekit_collapse.demo.base_model import family as base_family
    from mergekit_collapse.demo.zoo import adapter_path, task_yamls

    if threads:
        torch.set_num_threads(threads)
    paths = {t: adapter_path(t) for t in tasks} if adapters else {}
    spec = base_family(family)
    base = Path(base) if base else ensure_base(spec)
    yamls = task_yamls()
    result = _previous_scores(out_file, limit, spec.hub_id)

    missing = [t for t in tasks if t not in result["base"]]
    if missing:
        start = time.time()
        scores = _evaluate(base, None, [eval_name(t) for t in missing], yamls, limit, batch_size)
        for t in missing:
            result["base"][t] = scores[eval_name(t)][metric_of(t)]
        log(f"base scored on {len(missing)} tasks ({time.time() - start:.0f}s)")
        _save(result, out_file)
    for task, path in paths.items():
        entry = _adapter_entry(task, path, result["base"], base, yamls, limit, batch_size)
        result["tasks"][task] = entry
        log(f"{task}: base {entry['base']:.3f} adapter {entry['adapter']:.3f} "
            f"({entry['metric']})")
        _save(result, out_file)
    return result


def _previous_scores(out_file: str | Path | None, limit: int | None,
                     hub_id: str) -> dict[str, Any]:
    """The scores dict, with the scores already in `out_file` when they have the same limit."""
    result: dict[str, Any] = {"base_model": hub_id, "limit": limit,
                              "apply_chat_template": True, "dtype": "float32", "base": {},
                              "tasks": {}}
    if out_file and Path(out_file).is_file():
        previous = json.loads(Path(out_file).read_text())
        if previous.get("limit") == limit:
            result["base"] = previous.get("base", {})
            result["tasks"] = previous.get("tasks", {})
    return result


def _save(result: dict[str, Any], out_file: str | Path | None) -> None:
    """Write the scores to `out_file` (if any); tasks no longer in the zoo are dropped."""
    if out_file:
        result["base"] = {t: v for t, v in sorted(result["base"].items()) if t in TASKS_DEF}
        result["tasks"] = {t: v for t, v in result["tasks"].items() if t in TASKS_DEF}
        Path(out_file).write_text(json.dumps(result, indent=1) + "\n")


def _adapter_entry(task: str, path: Path, base_scores: dict[str, float], base: Path, yamls: Path,
                   limit: int | None, batch_size: int) -> dict[str, Any]:
    """One task's entry: its adapter's score beside the base's, and its training steps."""
    metric = metric_of(task)
    own = _evaluate(base, path, [eval_name(task)], yamls, limit, batch_size)
    entry = {"eval": eval_name(task), "metric": metric, "base": base_scores[task],
             "adapter": own[eval_name(task)][metric]}
    training = path / "training.json"
    if training.is_file():
        entry["train_steps"] = json.loads(training.read_text())["steps"]
    return entry


def _evaluate(base: Path, adapter: Path | None, names: list[str], yamls: Path,
              limit: int | None, batch_size: int) -> dict[str, dict[str, float]]:
    """lm-eval scores of the base (with `adapter` merged in, if any) on the named tasks."""
    from mergekit_collapse.evaluate.harness import run_tasks

    model, tok = load_adapted(base, adapter)
    return run_tasks(model, tok, names, include_path=yamls, limit=limit, batch_size=batch_size)
