"""The evaluation in the Hub's `.eval_results/*.yaml` format, beside the card's `model-index`.

The Hub reads every `.eval_results/*.yaml` of a model repo (a YAML list of entries, see
https://huggingface.co/docs/hub/eval-results) and shows the scores on the model page and on the
benchmark's leaderboard. The entries are built with huggingface_hub's `EvalResultEntry` and
`eval_result_entries_to_yaml`, and read back with its `parse_eval_result_entries`.

What an entry holds, per lm-eval task of `evaluation.json`:

- `dataset.id` is the lm-eval task name, as the card's `model-index` has it (`dataset.type`);
- `dataset.task_id` is that same lm-eval task name: the merged model's score depends only on the
  task, so two constituents evaluated on one task give one entry (the guard's task names stay in the
  card);
- `value` is the MERGED model's headline score. The constituents' scores and the merging loss
  (Eq. 1) are not entries: the Hub credits every entry of this repository to this model, so they
  stay in the card (`model-index` metric names and the `mergeability.observed` block);
- `notes` is the setup: the metric, the lm-eval document limit and the dtype.

One file per task, `.eval_results/<task>.yaml`, starting with a marker comment; rewriting the card
replaces the marked files (files of your own there are left alone).
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

from mergekit_collapse._constants import REPORT_DIR
from mergekit_collapse._io import write_all
from mergekit_collapse.evaluate.observed import Evaluation

if TYPE_CHECKING:
    from huggingface_hub import EvalResultEntry

#: the folder the Hub reads evaluation results from
EVAL_RESULTS_DIR = ".eval_results"
#: first line of every file written here: marks the files `write_eval_results` may replace
MARKER = (f"# written by mergekit-collapse from {REPORT_DIR}/evaluation.json; "
          "rewritten with the card")


def eval_result_entries(evaluation: Evaluation) -> list[EvalResultEntry]:
    """The merged model's score on each lm-eval task, as Hub evaluation-result entries.

    Args:
        evaluation: the evaluation (evaluation.json).

    Returns:
        One entry per distinct lm-eval task, in evaluation order; tasks whose merged score is
        missing or NaN are left out.
    """
    from huggingface_hub import EvalResultEntry

    entries: dict[str, EvalResultEntry] = {}
    for t in evaluation.tasks:
        if t.eval in entries or t.merged is None or math.isnan(t.merged):
            continue
        setup = [t.metric, "lm-eval" + (f" limit {evaluation.limit}" if evaluation.limit else ""),
                 evaluation.dtype, "merged with mergekit-collapse"]
        entries[t.eval] = EvalResultEntry(dataset_id=t.eval, task_id=t.eval, value=float(t.merged),
                                          notes=", ".join(setup))
    return list(entries.values())


def _file_name(dataset_id: str) -> str:
    """A safe file name for a dataset id (`org/name` -> `org__name.yaml`); a long id is cut and
    given a hash of itself, so the name fits a file system (255 bytes) and stays unique."""
    name = re.sub(r"[^\w.-]", "_", dataset_id.replace("/", "__"))
    if len(name.encode()) > 120:
        name = f"{name[:100]}-{hashlib.sha256(dataset_id.encode()).hexdigest()[:12]}"
    return name + ".yaml"


def _ours(path: Path) -> bool:
    """A file this module wrote (its first line is MARKER); a user's own file, whatever it holds
    (not UTF-8, a folder named *.yaml), is not."""
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.readline().rstrip(b"\r\n") == MARKER.encode()


def plan_eval_results(out_dir: str | Path,
                      evaluation: Evaluation | None) -> dict[Path, bytes | None]:
    """What `write_eval_results` changes: file -> its new bytes, or None for a file to remove (the
    files written before). Nothing is written; `_io.write_all` applies it as one unit.

    Args:
        out_dir: the merged model folder.
        evaluation: the evaluation, or None (then only the previously written files are removed).
    """
    import yaml
    from huggingface_hub import eval_result_entries_to_yaml

    folder = Path(out_dir) / EVAL_RESULTS_DIR
    changes: dict[Path, bytes | None] = {old: None for old in sorted(folder.glob("*.yaml"))
                                         if _ours(old)}
    groups: dict[str, list[EvalResultEntry]] = {}
    for entry in eval_result_entries(evaluation) if evaluation is not None else []:
        groups.setdefault(_file_name(entry.dataset_id), []).append(entry)
    for name, entries in groups.items():
        text = yaml.safe_dump(eval_result_entries_to_yaml(entries), sort_keys=False,
                              allow_unicode=True)
        changes[folder / name] = f"{MARKER}\n{text}".encode()
    return changes


def write_eval_results(out_dir: str | Path, evaluation: Evaluation | None) -> list[Path]:
    """Write the evaluation as `out_dir/.eval_results/<task>.yaml`, replacing the files written
    before (all or nothing: `_io.write_all`).

    Args:
        out_dir: the merged model folder.
        evaluation: the evaluation, or None (then only the previously written files are removed).

    Returns:
        The files written, sorted.
    """
    changes = plan_eval_results(out_dir, evaluation)
    write_all(changes)
    tidy_eval_results(out_dir)
    return sorted(p for p, data in changes.items() if data is not None)


def tidy_eval_results(out_dir: str | Path) -> None:
    """Remove `.eval_results/` when nothing is left in it."""
    folder = Path(out_dir) / EVAL_RESULTS_DIR
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def read_eval_results(out_dir: str | Path) -> list[EvalResultEntry]:
    """Read every `.eval_results/*.yaml` of a model folder back, with huggingface_hub's own parser.

    Args:
        out_dir: the model folder.

    Returns:
        The entries of all files, files in name order; empty when there is no such folder.
    """
    import yaml
    from huggingface_hub import parse_eval_result_entries

    entries: list[EvalResultEntry] = []
    for path in sorted((Path(out_dir) / EVAL_RESULTS_DIR).glob("*.yaml")):
        entries += parse_eval_result_entries(yaml.safe_load(path.read_text(encoding="utf-8")) or [])
    return entries
