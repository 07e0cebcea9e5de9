"""The straightforward parameter-conflict metrics a user would write: load whole models, loop over
pairs.

Kept ONLY as the test oracle of `mergekit_collapse.analysis.conflicts.conflict_metrics` (which
streams one tensor block at a time and reads each tensor once for all pairs) and as its benchmark
baseline (`benchmarks/speed.py`, section e).
For each pair it loads the base and both models whole (`safetensors.torch.load_file`), builds both
task vectors as dicts, and evaluates Eqs. 4–7 with numpy on the flattened union of their tensors —
N² full reads and three whole models in memory. Same conventions as the package (see its module
docstring): sign(0) = 0, Eq. 7 averaged per tensor, a LoRA's τ = scaling · B @ A on its modules.

Run as a script to time both on a mergekit config:

    python tests/naive_conflicts.py merge_configs/demo.yml
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

METRICS = ("magnitude_change_ratio", "sign_change_ratio", "conflicting_magnitude_ratio",
           "cosine_similarity", "cosine_similarity_flat")


def _load_dir(path: Path) -> dict[str, np.ndarray]:
    import torch
    from safetensors.torch import load_file

    out: dict[str, np.ndarray] = {}
    for f in sorted(path.glob("*.safetensors")):
        if f.name.startswith("adapter_"):
            continue
        for k, v in load_file(str(f)).items():
            if v.is_floating_point():
                out[k] = v.to(torch.float64).numpy()
    return out


def _lora_tau(path: Path) -> dict[str, np.ndarray]:
    import torch
    from peft import LoraConfig
    from safetensors.torch import load_file

    cfg = LoraConfig.from_pretrained(str(path))
    scaling = cfg.lora_alpha / math.sqrt(cfg.r) if cfg.use_rslora else cfg.lora_alpha / cfg.r
    sd = {k.removeprefix("base_model.model."): v.to(torch.float64).numpy()
          for k, v in load_file(str(path / "adapter_model.safetensors")).items()}
    tau = {}
    for k, a in sd.items():
        if k.endswith(".lora_A.weight"):
            module = k[: -len(".lora_A.weight")]
            b = sd[f"{module}.lora_B.weight"]
            delta = b @ a
            tau[f"{module}.weight"] = scaling * (delta.T if cfg.fan_in_fan_out else delta)
        elif k.endswith(".lora_embedding_A"):
            module = k[: -len(".lora_embedding_A")]
            tau[f"{module}.weight"] = scaling * (sd[f"{module}.lora_embedding_B"] @ a).T
    return tau


def _task_vector(ref: str, base_dir: Path, base_sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    model, _, lora = ref.partition("+")
    tau: dict[str, np.ndarray] = {}
    if Path(model).resolve() != base_dir.resolve():
        full = _load_dir(Path(model))
        tau = {k: full[k] - base_sd[k] for k in full}
    if lora:
        for k, v in _lora_tau(Path(lora)).items():
            tau[k] = tau[k] + v if k in tau else v
    return tau


def _pair(ti: dict[str, np.ndarray], tj: dict[str, np.ndarray]) -> dict[str, float | None]:
    names = sorted(set(ti) | set(tj))
    cos = []
    for n in names:
        a, b = ti.get(n), tj.get(n)
        if a is None or b is None:
            continue
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        if na > 0 and nb > 0:
            cos.append(float(np.sum(a * b) / (na * nb)))
    shape = {n: (ti.get(n) if n in ti else tj[n]).shape for n in names}
    a = np.concatenate([ti.get(n, np.zeros(shape[n])).ravel() for n in names])
    b = np.concatenate([tj.get(n, np.zeros(shape[n])).ravel() for n in names])
    mag = np.abs(a).sum() + np.abs(b).sum()
    differ = np.sign(a) != np.sign(b)
    diff = np.abs(a - b)
    norm = np.linalg.norm(a) * np.linalg.norm(b)
    return {
        "magnitude_change_ratio": float(diff.sum() / mag) if mag else None,
        "sign_change_ratio": float(differ.sum() / a.size),
        "conflicting_magnitude_ratio": float(diff[differ].sum() / mag) if mag else None,
        "cosine_similarity": float(np.mean(cos)) if cos else None,
        "cosine_similarity_flat": float(a @ b / norm) if norm else None,
    }


def naive_conflict_metrics(models: list[str], base: str) -> dict[str, list[list[float | None]]]:
    """Eqs. 4–7 for every pair, loading the base and both models whole for each pair.

    Args:
        models: model references as mergekit writes them: `"path"` or `"base_path+lora_path"`.
        base: the base model folder.

    Returns:
        metric name -> N×N matrix (diagonal included), as in `ConflictReport`.
    """
    n = len(models)
    out: dict[str, list[list[float | None]]] = {m: [[None] * n for _ in range(n)] for m in METRICS}
    base_dir = Path(base)
    for i in range(n):
        for j in range(i, n):
            base_sd = _load_dir(base_dir)  # a user's loop reloads everything per pair
            ti = _task_vector(models[i], base_dir, base_sd)
            tj = _task_vector(models[j], base_dir, base_sd)
            for k, v in _pair(ti, tj).items():
                out[k][i][j] = out[k][j][i] = v
    return out


def main(argv: list[str]) -> int:
    """Time the naive loop against the streamed implementation on one mergekit config."""
    from mergekit_collapse.analysis.conflicts import conflict_metrics
    from mergekit_collapse.guard.config import load_config

    cfg = load_config(argv[0])
    refs: list[Any] = [str(m) for m in cfg.models]
    t0 = time.perf_counter()
    streamed = conflict_metrics(cfg)
    t1 = time.perf_counter()
    naive = naive_conflict_metrics(refs, str(cfg.base))
    t2 = time.perf_counter()
    worst = max(abs((a or 0.0) - (b or 0.0)) for m in METRICS
                for ra, rb in zip(streamed.metric(m), naive[m], strict=True)
                for a, b in zip(ra, rb, strict=True))
    print(json.dumps({"models": len(refs), "streamed_s": t1 - t0, "naive_s": t2 - t1,
                      "max_abs_diff": worst}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
