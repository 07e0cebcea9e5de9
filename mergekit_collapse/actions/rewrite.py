"""Rewriting mergekit configs as the user wrote them (plain YAML mappings)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from mergekit_collapse.actions.grouping import Stage
from mergekit_collapse.guard.config import parse_ref
from mergekit_collapse.guard.weights import task_family

# --------------------------------------------------------------------------------------------
# mergekit config rewriting (plain YAML mappings, as the user wrote them)
# --------------------------------------------------------------------------------------------


def model_lists(raw: dict) -> list[list]:
    """Every list of `{model: ...}` entries in a mergekit config: models, slice sources, modules."""
    lists = []
    if isinstance(raw.get("models"), list):
        lists.append(raw["models"])
    for s in raw.get("slices") or []:
        if isinstance(s, dict) and isinstance(s.get("sources"), list):
            lists.append(s["sources"])
    for mod in (raw.get("modules") or {}).values():
        if isinstance(mod, dict):
            sub = {"models": mod.get("models"), "slices": mod.get("slices")}
            lists.extend(model_lists(sub))
    return lists


def _entries_of(raw: dict, refs: Any) -> list[tuple[dict, Any]]:
    """(entry, its ModelReference) for every `{model: ...}` entry whose reference is in `refs`."""
    return [(e, ref) for entries in model_lists(raw) for e in entries
            if isinstance(e, dict) and (ref := parse_ref(e.get("model"))) in refs]


def subset_config(raw: dict, keep: Sequence[Any]) -> dict:
    """The config restricted to the kept constituents (base model, dtype, parameters unchanged).

    The base model stays wherever it is listed; `guard.tasks` and `guard.candidates` keep only the
    kept models' entries.

    Args:
        raw: the mergekit YAML mapping (with its `guard:` section).
        keep: the ModelReferences to keep.

    Returns:
        A new mapping.
    """
    out = copy.deepcopy(raw)
    base = parse_ref(out.get("base_model")) if out.get("base_model") is not None else None
    kept = set(keep) | ({base} if base is not None else set())
    for entries in model_lists(out):
        entries[:] = [e for e in entries
                      if not (isinstance(e, dict) and parse_ref(e.get("model")) not in kept)]
    guard = out.get("guard")
    if isinstance(guard, dict):
        tasks = guard.get("tasks") or {}
        guard["tasks"] = {k: v for k, v in tasks.items() if parse_ref(k) in kept}
        names = {_task_name(v) for v in guard["tasks"].values()}
        if guard.get("candidates"):
            guard["candidates"] = {t: c for t, c in guard["candidates"].items() if t in names}
    return out


def _task_name(spec: Any) -> str | None:
    return spec.get("name") if isinstance(spec, dict) else None


def replace_config(raw: dict, mapping: dict[Any, str]) -> dict:
    """The config with constituents swapped: `mapping` old ModelReference -> new reference text.

    The new model keeps the old one's per-model parameters and its `guard.tasks` entry; the used
    candidate leaves `guard.candidates` and the replaced model joins it (so a re-run can swap back).

    Args:
        raw: the mergekit YAML mapping.
        mapping: old reference -> the candidate, as written in guard.candidates.

    Returns:
        A new mapping.
    """
    out = copy.deepcopy(raw)
    for e, ref in _entries_of(out, mapping):
        e["model"] = mapping[ref]
    guard = out.get("guard")
    if isinstance(guard, dict):
        tasks = {}
        for key, spec in (guard.get("tasks") or {}).items():
            ref = parse_ref(key)
            new = mapping.get(ref)
            tasks[new if new is not None else key] = spec
            if new is not None and guard.get("candidates"):
                name = _task_name(spec)
                pool = [c for c in guard["candidates"].get(name, []) if c != new]
                guard["candidates"][name] = [key, *pool]
        guard["tasks"] = tasks
    return out


def weights_config(raw: dict, weights: dict[Any, float]) -> dict:
    """The config with each constituent's `weight:` set (per-model parameters), e.g. to α*.

    Args:
        raw: the mergekit YAML mapping.
        weights: ModelReference -> weight.

    Returns:
        A new mapping.
    """
    out = copy.deepcopy(raw)
    for e, ref in _entries_of(out, weights):
        params = e.get("parameters") if isinstance(e.get("parameters"), dict) else {}
        e["parameters"] = {**params, "weight": round(float(weights[ref]), 6)}
    return out


def dump_config(raw: dict) -> str:
    """YAML text of a config mapping, keys in their original order."""
    import yaml

    return yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)




def multi_stage_config(raw: dict, points: list[Any], stages: list[Stage]) -> str:
    """A mergekit-multi YAML (one document per stage, `name: stage-<k>`, the final one unnamed).

    Each stage merges its two sides with the config's own method and global parameters; the
    weights are the sides' model counts, so the tree ends at the group's plain average. slerp takes
    the left side as its base and t = right/(left+right); other methods keep the config's base.

    Args:
        raw: the user's mergekit YAML mapping.
        points: the models (ModelReferences), indices as in `stages`.
        stages: from `merge_tree`.

    Returns:
        The YAML text (documents separated by `---`).
    """
    method = raw.get("merge_method")
    common = {k: copy.deepcopy(v) for k, v in raw.items()
              if k not in {"models", "slices", "modules", "base_model", "parameters", "guard"}}
    params = copy.deepcopy(raw.get("parameters") or {})
    written = {parse_ref(e.get("model")): e.get("model") for entries in model_lists(raw)
               for e in entries if isinstance(e, dict)}
    if raw.get("base_model") is not None:
        written.setdefault(parse_ref(raw["base_model"]), raw["base_model"])
    ref_text = {i: written.get(p, str(p)) for i, p in enumerate(points)}
    docs = []
    for k, st in enumerate(stages, start=1):
        left, right = ref_text[st.left], ref_text[st.right]
        doc: dict[str, Any] = {}
        if k < len(stages):
            doc["name"] = f"stage-{k}"
        doc["merge_method"] = method
        if method == "slerp":
            doc["base_model"] = left
            doc["models"] = [{"model": left}, {"model": right}]
            doc["parameters"] = {**{p: v for p, v in params.items() if p != "t"},
                                 "t": round(st.right_size / (st.left_size + st.right_size), 6)}
        else:
            if raw.get("base_model") is not None:
                doc["base_model"] = raw["base_model"]
            doc["models"] = [{"model": left, "parameters": {"weight": st.left_size}},
                             {"model": right, "parameters": {"weight": st.right_size}}]
            doc["parameters"] = {p: v for p, v in params.items() if p != "weight"}
            if method == "linear" or method in task_family():
                doc["parameters"]["normalize"] = True  # size-weighted average, not a sum
        doc.update(copy.deepcopy(common))
        docs.append(doc)
        ref_text[st.node] = f"stage-{k}"
    import yaml

    return yaml.safe_dump_all(docs, sort_keys=False, allow_unicode=True)
