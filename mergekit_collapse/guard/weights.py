"""The merge's own weights, read from the mergekit config and linearised for the geometry.

Under LMC the planned merge is the point p_m = p_0 + sum_j w_j (p_j - p_0) (p_0 the base). For
linear merges w is the normalised weights (a base model listed among the inputs takes its share of
the sum); for the task-arithmetic family (TIES, DARE, DELLA, breadcrumbs) w_j = lambda * weight_j,
divided by the weight sum when `normalize` is on (sparsification and sign election are ignored: a
first-order view); for SLERP between models A (its base_model) and B, w = [1 - t, t].
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np


@cache
def task_family() -> frozenset[str]:
    """The task-arithmetic merge methods: mergekit's registered
    `GeneralizedTaskArithmeticMerge`s."""
    from mergekit.merge_methods import GeneralizedTaskArithmeticMerge, registered_methods

    return frozenset(m.spec.name for m in registered_methods()
                     if isinstance(m, GeneralizedTaskArithmeticMerge))


def scalar(setting: Any, default: float | None = None) -> float | None:
    """One number for a mergekit parameter setting, evaluated by mergekit (`evaluate_setting`).

    A conditional list gives its unfiltered condition's value (else its first condition's); a
    gradient gives the mean of its points.

    Args:
        setting: a parameter's value in the config (number, gradient, conditions), or None.
        default: what a missing or non-numeric setting gives.

    Returns:
        The number, or `default`.
    """
    from mergekit.config import ConditionalParameter, evaluate_setting

    if isinstance(setting, ConditionalParameter):
        setting = [setting]
    if isinstance(setting, list) and setting and all(isinstance(c, ConditionalParameter)
                                                     for c in setting):
        setting = next((c for c in setting if c.filter in (None, "*")), setting[0]).value
    if setting is None:
        return default
    n = len(setting) if isinstance(setting, list) else 1
    try:  # a gradient's i-th point is its value at t = i / (n - 1)
        values = [evaluate_setting("", setting, i / max(n - 1, 1), validate=float)
                  for i in range(n)]
    except (AttributeError, TypeError, ValueError, RuntimeError):  # not a number, or not a setting
        return default
    return float(np.mean(values)) if values else default


def _method_default(method: str, name: str) -> Any:
    import mergekit.merge_methods as methods

    try:
        spec = methods.get(method).spec
    except Exception:  # noqa: BLE001 - custom or unknown methods: no default known
        return None
    for p in spec.parameters:
        if p.name == name and isinstance(p.default, (bool, int, float)):
            return p.default
    return None


def _param(cfg: Any, name: str, per_model: dict | None = None) -> Any:
    if per_model and name in per_model:
        return per_model[name]
    return (cfg.merge.parameters or {}).get(name)


def planned_weights(cfg: Any) -> tuple[np.ndarray | None, str | None]:
    """The config's own weights w_1..w_N (constituent order), or (None, why not).

    Args:
        cfg: a LoadedConfig.

    Returns:
        (w, None) with w in task space (see the module docstring), or (None, reason).
    """
    merge = cfg.merge
    method = merge.merge_method
    if merge.models is None:
        return None, "slice/module configs: planned weights not derived"
    params = {m.model: (m.parameters or {}) for m in merge.models}
    n = len(cfg.models)
    if method == "slerp":
        t = scalar(_param(cfg, "t"))
        if t is None or n != 2:
            return None, "slerp needs two models and a t"
        return np.array([1 - t, t]), None
    if method not in task_family() | {"linear"}:
        return None, f"{method}: no linear weights; using the uniform average"
    w = np.array([scalar(_param(cfg, "weight", params.get(m)), 1.0) for m in cfg.models])
    # linear weighs a listed base model as one more input: its weight joins the normaliser
    base_w = (scalar(_param(cfg, "weight", params[merge.base_model]), 1.0)
              if method == "linear" and merge.base_model in params else 0.0)
    normalize = scalar(_param(cfg, "normalize"), None)
    if normalize is None:
        normalize = bool(_method_default(method, "normalize"))
    if normalize:
        if w.sum() + base_w == 0:
            return None, "weights sum to zero"
        w = w / (w.sum() + base_w)
    if method in task_family():
        w = w * scalar(_param(cfg, "lambda"), 1.0)
    return w, None
