"""The zoo's data files (train/test JSONL) and lm-eval task YAMLs over them.

The JSONL files ship in the zoo's data distribution (`mergekit-collapse-zoo`, the
repository's `zoo-data/` folder: `mergekit_collapse_zoo/data/<task>/`), not in the runtime
wheel. lm-eval needs the data paths inside its YAMLs, and those must be valid wherever the
package is installed, so the YAMLs are written at run time (`write_task_yamls`) with absolute
paths.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from mergekit_collapse.demo.zoo.tasks import ALL_TASKS, TASKS_DEF, generate

#: The zoo's data distribution, where it is installed (None: it is not)
try:
    from mergekit_collapse_zoo import ROOT as ZOO_ROOT
except ImportError:
    ZOO_ROOT = None
#: what to install when it is not
ZOO_MISSING = ("the task zoo's data is not installed: pip install -e ./zoo-data (from a checkout "
               "of mergekit-collapse; the README's install line does it)")
#: Shipped data: <DATA_DIR>/<task>/{train,test}.jsonl
DATA_DIR = (ZOO_ROOT or Path(__file__).parent / "missing-zoo") / "data"
#: Sizes and seed of the shipped data (`write_data` regenerates it bit for bit).
N_TRAIN, N_TEST, SEED = 1000, 200, 0
#: lm-eval task names are prefixed so they never clash with lm-eval's own (it has `arithmetic`).
EVAL_PREFIX = "zoo_"
#: The lm-eval tag that selects every zoo task (both zoos') at once.
EVAL_TAG = "zoo"


def eval_name(task: str) -> str:
    """The lm-eval task name of a zoo task (`zoo_<task>`)."""
    return EVAL_PREFIX + task


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL file into a list of dicts."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_data(data_dir: str | Path = DATA_DIR, *, n_train: int = N_TRAIN, n_test: int = N_TEST,
               seed: int = SEED) -> Path:
    """Generate every task's train/test JSONL (both zoos') under `data_dir/<task>/`.

    Args:
        data_dir: where to write; defaults to the package's own data folder.
        n_train: train examples per task.
        n_test: test examples per task (fewer where the input space is small).
        seed: generator seed.

    Returns:
        `data_dir`.
    """
    data_dir = Path(data_dir)
    for task in ALL_TASKS:
        train, test = generate(task, n_train=n_train, n_test=n_test, seed=seed)
        _write_jsonl(data_dir / task / "train.jsonl", train)
        _write_jsonl(data_dir / task / "test.jsonl", test)
    return data_dir


def task_yaml(task: str, data_dir: str | Path) -> dict[str, Any]:
    """The lm-eval task config of a zoo task over the JSONL files in `data_dir/<task>/`.

    Classifications are log-likelihood multiple choice (metric `acc`); sequence tasks are greedy
    `generate_until` with exact match (surrounding whitespace ignored). The prompt is the bare user
    message: run lm-eval with `apply_chat_template=True`, as the adapters were trained.
    """
    t = TASKS_DEF[task]
    folder = Path(data_dir).resolve() / task
    cfg: dict[str, Any] = {
        "task": eval_name(task),
        "tag": [EVAL_TAG],
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"train": str(folder / "train.jsonl"),
                                          "test": str(folder / "test.jsonl")}},
        "training_split": "train",
        "test_split": "test",
        "doc_to_text": "{{prompt}}",
        "metadata": {"version": 1.0},
    }
    if t.kind == "choice":
        cfg.update({
            "output_type": "multiple_choice",
            "doc_to_choice": "choices",
            "doc_to_target": "label",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        })
    else:
        cfg.update({
            "output_type": "generate_until",
            # the `json` loader (pyarrow) reads an ISO date answer ("2016-03-20") as a timestamp
            "doc_to_target": "{{answer if answer is string else answer.strftime('%Y-%m-%d')}}",
            "generation_kwargs": {"until": ["<|im_end|>", "<end_of_turn>", "\n\n"],
                                  "do_sample": False, "max_gen_toks": t.max_gen_toks},
            "metric_list": [{"metric": "exact_match", "aggregation": "mean",
                             "higher_is_better": True, "regexes_to_ignore": [r"^\s+", r"\s+$"]}],
        })
    return cfg


def write_task_yamls(out_dir: str | Path, data_dir: str | Path = DATA_DIR) -> Path:
    """Write one lm-eval YAML per zoo task into `out_dir`, pointing at `data_dir` (absolute).

    Pass `out_dir` as lm-eval's `include_path`; the tasks are then `zoo_<task>`, or tag `zoo`.

    Args:
        out_dir: folder for the YAMLs (created).
        data_dir: folder holding `<task>/{train,test}.jsonl`.

    Returns:
        `out_dir`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for task in ALL_TASKS:
        text = yaml.safe_dump(task_yaml(task, data_dir), sort_keys=False, allow_unicode=True)
        (out_dir / f"{eval_name(task)}.yaml").write_text(text, encoding="utf-8")
    return out_dir
