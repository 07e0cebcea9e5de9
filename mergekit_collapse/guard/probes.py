"""Probe prompts: k per task, seeded; the probe set X is the union over tasks (as in the paper)."""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass
from typing import Any

from mergekit_collapse._io import check_path
from mergekit_collapse.errors import BadInputError
from mergekit_collapse.guard.config import LoadedConfig, ProbeFile, ProbeLmEval, TaskSpec

log = logging.getLogger(__name__)

#: the longest line a probe file may hold: far past any max_length, so a longer one is a wrong file
MAX_PROBE_CHARS = 100_000


@dataclass(frozen=True)
class ProbeSet:
    """The probes every model is run on, with the task each was drawn from."""

    texts: tuple[str, ...]
    tasks: tuple[str, ...]
    k: int
    seed: int
    chat_template: bool

    @property
    def sha256(self) -> str:
        """Content hash: the texts, their tasks and whether the chat template wraps them."""
        payload = json.dumps([self.texts, self.tasks, self.chat_template], ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def __len__(self) -> int:
        return len(self.texts)


def _read_file(spec: ProbeFile, cfg: LoadedConfig) -> list[str]:
    check_path(spec.file, "probe file")
    path = cfg.resolve(spec.file)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise BadInputError(f"probe file {path} is not UTF-8 text (byte {e.start}): save it as "
                            "UTF-8") from None
    except OSError as e:
        raise BadInputError(f"cannot read probe file {path}: {e.strerror or e}") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if len(line) > MAX_PROBE_CHARS:
            raise BadInputError(f"{path}:{n}: this line is {len(line.encode()) / 1e6:.1f} MB; a "
                                f"probe is at most {MAX_PROBE_CHARS:,} characters: is it the "
                                "right file?")
        if path.suffix in {".jsonl", ".json"}:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise BadInputError(f"{path}:{n}: not valid JSON") from None
            if not isinstance(row, dict) or spec.field not in row:
                raise BadInputError(f"{path}:{n}: no field '{spec.field}'")
            value = row[spec.field]
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise BadInputError(f"{path}:{n}: field '{spec.field}' is "
                                    f"{json.dumps(value)[:40]}, not a string: a probe is text")
            out.append(str(value))
        else:
            out.append(line)
    return out


def _read_lm_eval(spec: ProbeLmEval, cfg: LoadedConfig) -> list[str]:
    from lm_eval.tasks import TaskManager, get_task_dict

    include = str(cfg.resolve(spec.include_path)) if spec.include_path else None
    try:
        task = get_task_dict([spec.lm_eval], TaskManager(include_path=include))[spec.lm_eval]
    except Exception as e:  # noqa: BLE001 - lm-eval raises many types for an unknown task
        raise BadInputError(f"cannot load lm-eval task '{spec.lm_eval}': {e}") from None
    for split in ("test", "validation", "training"):
        if getattr(task, f"has_{split}_docs")():
            docs = getattr(task, f"{split}_docs")()
            break
    else:
        raise BadInputError(f"lm-eval task '{spec.lm_eval}' has no documents")
    return [str(task.doc_to_text(doc)) for doc in docs]


def task_texts(spec: TaskSpec, cfg: LoadedConfig) -> list[str]:
    """Every candidate probe text of one task (before sampling)."""
    if spec.probes is None:
        raise BadInputError(f"guard.tasks '{spec.name}' has no probes")
    if isinstance(spec.probes, list):
        texts = [str(t) for t in spec.probes]
    elif isinstance(spec.probes, ProbeFile):
        texts = _read_file(spec.probes, cfg)
    else:
        texts = _read_lm_eval(spec.probes, cfg)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise BadInputError(f"task '{spec.name}' has no non-empty probes")
    return texts


def build_probes(cfg: LoadedConfig, *, models: list[Any] | None = None) -> ProbeSet:
    """Sample k probes per task (seeded, per task) and take their union in model order.

    Args:
        cfg: the parsed config; every model needs a `guard.tasks` entry.
        models: the models whose tasks form X (default: the config's constituents).

    Returns:
        The probe set; a task with fewer than k probes contributes all it has.

    Raises:
        BadInputError: a model has no task entry, or a task has no probes.
    """
    g = cfg.guard
    if not g.tasks:
        raise BadInputError("the config has no guard.tasks: each model needs a task with probes")
    texts: list[str] = []
    tasks: list[str] = []
    seen_tasks: set[str] = set()
    short: list[str] = []
    for model in models if models is not None else cfg.models:
        spec = cfg.task_of(model)
        if spec.name in seen_tasks:
            continue
        seen_tasks.add(spec.name)
        pool = task_texts(spec, cfg)
        # a per-task RNG: adding a task never changes another task's sample
        rng = random.Random(f"{g.seed}:{spec.name}")
        picked = rng.sample(pool, min(g.k, len(pool)))
        if len(pool) < g.k:
            short.append(f"{spec.name} ({len(pool)})")
        texts.extend(picked)
        tasks.extend([spec.name] * len(picked))
    if short:
        log.warning("task(s) %s have fewer than k=%d probes: each contributes all it has",
                    ", ".join(short), g.k)
    return ProbeSet(texts=tuple(texts), tasks=tuple(tasks), k=g.k, seed=g.seed,
                    chat_template=g.chat_template)


def more_probes(cfg: LoadedConfig, probes: ProbeSet) -> ProbeSet:
    """A second sample of k probes per task of `probes`, disjoint from it (seeded apart from the
    first: the planner's confirmation), for the tasks of `cfg`. A task with no probe left
    contributes none."""
    g = cfg.guard
    used = set(probes.texts)
    specs = {spec.name: spec for spec in g.tasks.values()}
    texts: list[str] = []
    tasks: list[str] = []
    for name in (n for n in dict.fromkeys(probes.tasks) if n in specs):
        spec = specs[name]
        pool = [t for t in task_texts(spec, cfg) if t not in used]
        picked = random.Random(f"{g.seed}:{name}:more").sample(pool, min(g.k, len(pool)))
        texts.extend(picked)
        tasks.extend([name] * len(picked))
    return ProbeSet(texts=tuple(texts), tasks=tuple(tasks), k=g.k, seed=g.seed,
                    chat_template=g.chat_template)


def format_probes(texts: tuple[str, ...] | list[str], tokenizer: Any,
                  chat_template: bool) -> list[str]:
    """Wrap each probe as a user turn of the tokenizer's chat template, when asked and available."""
    if not chat_template or not getattr(tokenizer, "chat_template", None):
        return list(texts)
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                          add_generation_prompt=True) for t in texts]

