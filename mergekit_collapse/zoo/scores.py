"""Score the zoo with lm-eval: each adapter on its own task, and the base model on every task."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mergekit_collapse.zoo.taskfiles import eval_name
from mergekit_collapse.zoo.tasks import TASKS_DEF

logger = logging.getLogger(__name__)

#: The default document limit per task (test sets hold 105-200 documents).
DEFAULT_LIMIT = 100


def metric_of(task: str) -> str:
    """The headline lm-eval metric of a zoo task: `acc` (multiple choice) or `exact_match`."""
    return "acc" if TASKS_DEF[task].kind == "choice" else "exact_match"


def load_adapted(base: str | Path, adapter: str | Path | None) -> tuple[Any, Any]:
    """The base model in fp32 with a LoRA adapter merged in (none: the base itself), and its tokenizer."""
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
              log: Callable[[str], None] = logger.info) -> dict[str, Any]:
    """Evaluate the base model and each task's adapter on that task (fp32, chat template).

    Args:
        tasks: zoo task names.
        limit: lm-eval document limit per task (None: the whole test set).
        batch_size: lm-eval batch size.
        out_file: write the scores here as JSON (merged into an existing file's tasks).
        base: the base model folder (default: `ensure_smollm2()`).
        log: progress sink.

    Returns:
        `{"base_model", "limit", "apply_chat_template", "tasks": {task: {eval, metric, base,
        adapter}}}`.

    Raises:
        BadInputError: unknown task, missing adapter or base model.
    """
    import torch

    from mergekit_collapse.base_model import HUB_ID, ensure_smollm2
    from mergekit_collapse.evaluation import run_tasks
    from mergekit_collapse.zoo import adapter_path, task_yamls

    torch.set_num_threads(2)
    adapters = {t: adapter_path(t) for t in tasks}
    base = Path(base) if base else ensure_smollm2()
    yamls = task_yamls()
    names = [eval_name(t) for t in tasks]
    result: dict[str, Any] = {"base_model": HUB_ID, "limit": limit, "apply_chat_template": True,
                              "dtype": "float32", "tasks": {}}
    if out_file and Path(out_file).is_file():
        previous = json.loads(Path(out_file).read_text())
        if previous.get("limit") == limit:
            result["tasks"] = previous.get("tasks", {})
    start = time.time()
    model, tok = load_adapted(base, None)
    base_scores = run_tasks(model, tok, names, include_path=yamls, limit=limit,
                            batch_size=batch_size)
    log(f"base scored on {len(names)} tasks ({time.time() - start:.0f}s)")
    for task in tasks:
        metric = metric_of(task)
        model, tok = load_adapted(base, adapters[task])
        own = run_tasks(model, tok, [eval_name(task)], include_path=yamls, limit=limit,
                        batch_size=batch_size)
        entry = {"eval": eval_name(task), "metric": metric,
                 "base": base_scores[eval_name(task)][metric],
                 "adapter": own[eval_name(task)][metric]}
        training = adapters[task] / "training.json"
        if training.is_file():
            entry["train_steps"] = json.loads(training.read_text())["steps"]
        result["tasks"][task] = entry
        log(f"{task}: base {entry['base']:.3f} adapter {entry['adapter']:.3f} ({metric})")
        if out_file:
            Path(out_file).write_text(json.dumps(result, indent=1) + "\n")
    return result
