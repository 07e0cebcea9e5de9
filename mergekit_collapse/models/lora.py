"""A LoRA reference read as mergekit reads a model, without writing a merged copy of the base.

mergekit merges a `base+adapter` reference by saving the whole merged model to its LoRA cache
(`ModelReference.merged`: one copy of the base per adapter). `LoraTensorLoader` serves the same
tensors from the base's own lazy loader instead, adding the adapter's update to each tensor as it
is read, with peft's rules (`peft.tuners.lora.layer.Linear.merge`): `W + (scale·B·A).to(W.dtype)`,
the product in float32, `scale = alpha / r` (or `alpha / sqrt(r)` with rsLoRA), per-module
`rank_pattern` / `alpha_pattern`, transposed for `fan_in_fan_out`.

Adapters this rule does not describe (DoRA, `modules_to_save`, trained biases, embedding or
parameter targets, pickle weights) are left to mergekit's cache: `lora_loader` returns None.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mergekit_collapse._io import atomic_write_bytes
from mergekit_collapse.models.identity import model_identity

#: adapter config fields and the values under which the update is W + scale·B·A
_PLAIN = {"use_dora": (None, False), "modules_to_save": (None, []), "bias": (None, "none"),
          "target_parameters": (None, []), "layer_replication": (None, []),
          "lora_bias": (None, False)}
_PREFIX = "base_model.model."


class LoraTensorLoader:
    """mergekit's `LazyTensorLoader` interface over a base model, with a LoRA update per tensor."""

    def __init__(self, base: Any, updates: dict[str, tuple[Any, Any, float, bool]]):
        self.base = base
        self.index = base.index
        self.updates = updates  # tensor name -> (A, B, scale, fan_in_fan_out)

    def get_tensor(self, key: str, device: str = "cpu", aliases: list[str] | None = None,
                   raise_on_missing: bool = True) -> Any:
        weight = self.base.get_tensor(key, device=device, aliases=aliases,
                                      raise_on_missing=raise_on_missing)
        if weight is None or key not in self.updates:
            return weight
        a, b, scale, fan_in_fan_out = self.updates[key]
        delta = (b.to(device).float() @ a.to(device).float()) * scale
        if fan_in_fan_out:
            delta = delta.T
        return weight + delta.to(weight.dtype)

    def flush(self) -> None:
        self.base.flush()


def lora_updates(adapter_dir: Path,
                 base_names: set[str]) -> dict[str, tuple[Any, Any, float, bool]] | None:
    """Each targeted tensor's (A, B, scale, fan_in_fan_out) from a peft LoRA folder, or None where
    the adapter is not a plain LoRA on weights the base has (see the module docstring)."""
    from peft.utils.other import get_pattern_key
    from safetensors.torch import load_file

    weights = adapter_dir / "adapter_model.safetensors"
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return None
    if not weights.is_file() or config.get("peft_type", "LORA") != "LORA" or any(
            config.get(k) not in plain for k, plain in _PLAIN.items()):
        return None
    tensors = load_file(weights)
    pairs: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        module, dot, kind = key.removeprefix(_PREFIX).rpartition(".lora_")
        if not key.startswith(_PREFIX) or not dot or kind not in ("A.weight", "B.weight"):
            return None  # embedding LoRA, magnitude vectors, saved modules...
        pairs.setdefault(module, {})[kind[0]] = value
    r0, alpha0 = config.get("r", 8), config.get("lora_alpha", 8)
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    out = {}
    for module, ab in pairs.items():
        name = f"{module}.weight"
        if set(ab) != {"A", "B"} or name not in base_names:
            return None
        r = ranks.get(get_pattern_key(ranks.keys(), module), r0)
        alpha = alphas.get(get_pattern_key(alphas.keys(), module), alpha0)
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        out[name] = (ab["A"], ab["B"], scale, bool(config.get("fan_in_fan_out")))
    return out


def fresh_lora_cache(refs: Iterable[Any], cache_dir: Path) -> None:
    """mergekit writes each `base+adapter` reference merged into its LoRA cache, named by the
    paths: drop a cached one whose adapter content changed, or that was never finished (its
    identity stamp is written last), and merge the missing ones."""
    for ref in refs:
        if ref.lora is None:
            continue
        out = cache_dir / f"{ref.model._unique_id()}_{ref.lora._unique_id()}"
        stamp = out / ".mergekit_collapse_identity"
        ident = model_identity(ref)
        if out.exists() and (not stamp.is_file() or stamp.read_text() != ident):
            shutil.rmtree(out, ignore_errors=True)
        if not out.exists():
            ref.merged(cache_dir=str(cache_dir))
            atomic_write_bytes(stamp, ident.encode())
