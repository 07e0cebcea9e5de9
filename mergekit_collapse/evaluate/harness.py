"""Evaluation with lm-eval-harness on an already loaded model, and the merging loss (Eq. 1)."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from mergekit_collapse.errors import BadInputError

logger = logging.getLogger(__name__)


def merging_loss(merged: float, constituent: float) -> float:
    """The merging loss of a task, in percent (paper Eq. 1).

    `L(T_i) = (P(merged, T_i) / P(theta_i, T_i) - 1) * 100`: 0 when merging kept the constituent's
    score, -100 when it lost all of it, positive when the merge is better.

    Args:
        merged: the merged model's score on the task.
        constituent: the task's own fine-tuned model's score on the task.

    Returns:
        The loss in percent.

    Raises:
        BadInputError: the constituent's score is 0 (the ratio is undefined) or a score is not
            finite.
    """
    if not (math.isfinite(merged) and math.isfinite(constituent)):
        raise BadInputError(f"merging loss needs finite scores, got {merged} and {constituent}")
    if constituent == 0:
        raise BadInputError("merging loss is undefined: the constituent model scores 0 on its task")
    return (merged / constituent - 1.0) * 100.0


def _clean_metrics(raw: dict[str, Any]) -> dict[str, float]:
    """lm-eval's `{'acc,none': 0.9, 'alias': ...}` -> `{'acc': 0.9}` (other filters keep their
    suffix)."""
    out: dict[str, float] = {}
    for key, value in raw.items():
        if key == "alias" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        metric, _, filt = key.partition(",")
        out[metric if filt in ("", "none") else key] = float(value)
    return out


@contextmanager
def _no_git_probe() -> Iterator[None]:
    """Skip lm-eval's `git describe` (for a `git_hash` we never read), unless verbose: outside a
    repository git prints `fatal: not a git repository` on every evaluation."""
    from lm_eval import evaluator

    from mergekit_collapse._console import is_verbose

    probe = evaluator.get_git_commit_hash
    if not is_verbose():
        evaluator.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = probe


def run_tasks(model: Any, tokenizer: Any, tasks: list[str], *,
              include_path: str | Path | None = None, limit: int | None = None,
              batch_size: int = 16, apply_chat_template: bool = True,
              include_defaults: bool | None = None,
              seed: int = 1234) -> dict[str, dict[str, float]]:
    """Evaluate a loaded causal LM on lm-eval tasks, offline.

    Args:
        model: a loaded `transformers.PreTrainedModel` (merge a peft adapter in first).
        tokenizer: its tokenizer (with a chat template when `apply_chat_template`).
        tasks: lm-eval task (or tag/group) names.
        include_path: a folder of extra task configs, e.g. the zoo's task YAMLs (a YAML file
            stands for its folder).
        limit: evaluate only the first `limit` documents of each task.
        batch_size: lm-eval batch size.
        apply_chat_template: wrap each prompt in the tokenizer's chat template (the zoo's format).
        include_defaults: also index lm-eval's built-in tasks; default: only without `include_path`.
        seed: lm-eval's random seeds.

    Returns:
        `{task: {metric: value}}`, e.g. `{"zoo_animal": {"acc": 0.9, "sample_len": 100.0}}`.

    Raises:
        BadInputError: no tasks, an unknown task, or a task whose data cannot be loaded.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from mergekit_collapse._console import is_verbose, quiet_third_party

    quiet_third_party("transformers", "datasets")
    if not tasks:
        raise BadInputError("no evaluation tasks given")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if include_defaults is None:
        include_defaults = include_path is None
    paths = _include_folder(include_path)
    manager = TaskManager(include_path=paths, include_defaults=include_defaults)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise BadInputError(f"unknown lm-eval task(s): {', '.join(unknown)}")
    device = str(getattr(model, "device", "cpu"))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    if not is_verbose():  # lm-eval's own switch for its per-request bars
        _quiet_requests(lm)
    try:
        with _no_git_probe():
            out = lm_eval.simple_evaluate(
                model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                apply_chat_template=apply_chat_template, log_samples=False, bootstrap_iters=0,
                random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                fewshot_random_seed=seed)
    except (FileNotFoundError, ConnectionError) as e:
        raise BadInputError(f"lm-eval could not load task data: {e}") from None
    if out is None:  # non-zero rank in a distributed run
        return {}
    return {name: _clean_metrics(metrics) for name, metrics in out["results"].items()}


def _include_folder(include_path: str | Path | None) -> str | None:
    """The folder lm-eval indexes for `include_path` (a YAML file stands for its folder)."""
    paths = str(include_path) if include_path is not None else None
    if paths is not None and not Path(paths).exists():
        raise BadInputError(f"lm-eval include path not found: {paths}")
    if paths is not None and Path(paths).is_file():  # lm-eval indexes folders, not single files
        paths = str(Path(paths).parent)
    return paths


def _quiet_requests(lm: Any) -> None:
    """Turn off the progress bar of each of lm-eval's request types on `lm`."""
    for request_type in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        setattr(lm, request_type, partial(getattr(lm, request_type), disable_tqdm=True))
