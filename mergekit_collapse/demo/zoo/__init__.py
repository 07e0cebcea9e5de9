"""The model zoos: a base model plus one LoRA adapter per procedurally generated task.

The SmolLM2-135M-Instruct zoo (12 tasks) runs the demo, the benchmarks and the calibration; the
Gemma 3 270M zoo (8 other tasks) is the validity run's second family. All offline. `export_zoo`
lays a zoo out as plain folders that mergekit configs can name (`zoo/smollm2+zoo/adapters/<task>`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from mergekit_collapse.demo.zoo.taskfiles import (
    DATA_DIR,
    EVAL_TAG,
    ZOO_MISSING,
    ZOO_ROOT,
    eval_name,
    write_task_yamls,
)
from mergekit_collapse.demo.zoo.tasks import ALL_TASKS, GEMMA_TASKS, TASKS, TASKS_DEF
from mergekit_collapse.errors import BadInputError

#: Shipped adapters (in the zoo's data distribution, `mergekit-collapse-zoo`):
#: <ADAPTER_DIR>/<task>/{adapter_config.json, adapter_model.safetensors}
ADAPTER_DIR = DATA_DIR.parent / "adapters"
#: Each family's adapter folder and tasks.
ADAPTER_DIRS = {"smollm2": ADAPTER_DIR, "gemma3": DATA_DIR.parent / "adapters_gemma3"}
FAMILY_TASKS: dict[str, tuple[str, ...]] = {"smollm2": TASKS, "gemma3": GEMMA_TASKS}
#: Each adapter's own-task score and the base model's, with the lm-eval limit used.
SCORES_FILE = DATA_DIR.parent / "scores.json"
SCORES_FILES = {"smollm2": SCORES_FILE, "gemma3": DATA_DIR.parent / "scores_gemma3.json"}
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")

__all__ = ["ADAPTER_DIR", "ADAPTER_DIRS", "EVAL_TAG", "FAMILY_TASKS", "SCORES_FILE", "TASKS",
           "adapter_path", "data_path",
           "eval_name", "export_zoo", "load_scores", "task_yamls"]


def _check(task: str) -> None:
    if task not in TASKS_DEF:
        raise BadInputError(f"unknown zoo task '{task}'; choose from {', '.join(TASKS)}")
    if ZOO_ROOT is None:
        raise BadInputError(ZOO_MISSING)


def adapter_path(task: str) -> Path:
    """The shipped LoRA adapter folder of a zoo task (either zoo's).

    Args:
        task: a name from `TASKS` or `GEMMA_TASKS`.

    Returns:
        The folder holding `adapter_config.json` and `adapter_model.safetensors`.

    Raises:
        BadInputError: unknown task, or its adapter is not in this installation.
    """
    _check(task)
    family = "gemma3" if task in GEMMA_TASKS else "smollm2"
    path = ADAPTER_DIRS[family] / task
    if not all((path / f).is_file() for f in ADAPTER_FILES):
        raise BadInputError(f"zoo adapter '{task}' is missing; train it: "
                            f"mergekit-collapse zoo train --family {family} {task}")
    return path


def data_path(task: str, split: str = "test") -> Path:
    """The shipped JSONL of a task's `train` or `test` split (fields `prompt`, `answer`, ...).

    Raises:
        BadInputError: unknown task or split.
    """
    _check(task)
    if split not in ("train", "test"):
        raise BadInputError(f"split must be 'train' or 'test', got '{split}'")
    return DATA_DIR / task / f"{split}.jsonl"


def task_yamls(out_dir: str | Path | None = None) -> Path:
    """Write the zoo's lm-eval task YAMLs (absolute paths to the shipped data) and return the
    folder.

    Pass the result as `include_path` to `mergekit_collapse.evaluate.harness.run_tasks`; task names
    are `zoo_<task>` (see `eval_name`), tag `zoo` selects all.

    Args:
        out_dir: where to write; default `cache_root()/zoo_tasks`.

    Returns:
        The folder of YAMLs.
    """
    from mergekit_collapse._constants import cache_root

    return write_task_yamls(Path(out_dir) if out_dir else cache_root() / "zoo_tasks", DATA_DIR)


def load_scores() -> dict[str, Any]:
    """The recorded scores (`scores.json`): per task the adapter's and the base model's score.

    Raises:
        BadInputError: the zoo has not been scored yet.
    """
    if ZOO_ROOT is None:
        raise BadInputError(ZOO_MISSING)
    if not SCORES_FILE.is_file():
        raise BadInputError("zoo scores.json is missing; run: mergekit-collapse zoo score")
    return json.loads(SCORES_FILE.read_text(encoding="utf-8"))


def _place(src: Path, dst: Path, *, link: bool = False) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    if link:  # the 540 MB base: no second copy on the same file system
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copy2(src, dst)  # small files are copied: editing the export never touches the package


def export_zoo(out_dir: str | Path, *, tasks: list[str] | None = None,
               family: str = "smollm2") -> Path:
    """Lay a zoo out as plain folders for mergekit, lm-eval and the guard.

    Writes `out_dir/<family>` (the converted base, hard-linked where possible),
    `out_dir/adapters/<task>` (each LoRA), and `out_dir/tasks/` (each task's `<task>/train.jsonl`,
    `<task>/test.jsonl` and the lm-eval YAMLs `zoo_<task>.yaml`, with absolute paths valid there),
    plus `scores.json` when the zoo has been scored.

    Args:
        out_dir: target folder (created; existing zoo files are replaced).
        tasks: export only these tasks (default: all of the family's with a trained adapter).
        family: `smollm2` (the demo's zoo) or `gemma3`.

    Returns:
        `out_dir`, resolved.

    Raises:
        BadInputError: an unknown task or family, a missing adapter, or the base's package not
            installed.
    """
    from mergekit_collapse.demo.base_model import ensure_base
    from mergekit_collapse.demo.base_model import family as base_family

    if ZOO_ROOT is None:
        raise BadInputError(ZOO_MISSING)
    spec = base_family(family)
    out = Path(out_dir).resolve()
    names = list(tasks) if tasks is not None else [
        t for t in FAMILY_TASKS[family] if (ADAPTER_DIRS[family] / t).is_dir()]
    adapters = {t: adapter_path(t) for t in names}
    base = ensure_base(spec)
    for f in base.iterdir():
        if f.is_file():
            _place(f, out / family / f.name, link=True)
    for task, src in adapters.items():
        for name in ADAPTER_FILES:
            _place(src / name, out / "adapters" / task / name)
    task_dir = out / "tasks"
    for task in ALL_TASKS:
        for split in ("train", "test"):
            _place(data_path(task, split), task_dir / task / f"{split}.jsonl")
    write_task_yamls(task_dir, task_dir)
    if SCORES_FILES[family].is_file():
        shutil.copy2(SCORES_FILES[family], out / "scores.json")
    return out
