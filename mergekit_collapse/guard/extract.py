"""Pooled hidden states per (model, probe), from the decoder body only, cached on disk.

Full fine-tunes are loaded one at a time and freed; LoRA adapters are swapped on one loaded base
(peft). The LM head is never run: for small models it costs more than the body. Vectors are cached
per (model identity, settings) and per probe, so a re-run computes only missing (model, probe)
pairs.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mergekit_collapse._constants import cache_root
from mergekit_collapse.errors import BadInputError
from mergekit_collapse.guard.cache import VectorCache, probe_key
from mergekit_collapse.guard.forward import ExtractionSettings, encode_probes, run_forward
from mergekit_collapse.models.identity import model_identity
from mergekit_collapse.models.loading import (
    check_weights,
    load_causal_lm,
    load_tokenizer,
    local_dir,
    pad_id,
    release,
    resolve_device,
    resolve_dtype,
    swap_adapter,
)

if TYPE_CHECKING:
    from mergekit_collapse._console import Progress

log = logging.getLogger(__name__)

__all__ = ["Extraction", "ExtractionSettings", "extract"]


@dataclass
class Extraction:
    """Vectors by model reference (as str), plus what had to be computed this time."""

    vectors: dict[str, np.ndarray]
    computed: dict[str, int] = field(default_factory=dict)  # probes computed per model
    hidden_size: int = 0
    dtype: str = "float32"
    tokens_computed: int = 0  # probe tokens run through the models (padding aside)
    tokens_saved: int = 0  # probe tokens not run: the shared prefix, computed once per model


@dataclass
class _Job:
    """One model to extract: its folders, its cache entry and the probe keys it lacks."""

    ref: Any
    base_dir: Path
    lora_dir: Path | None
    cache: VectorCache
    missing: list[str]


def _jobs(models: list[Any], keys: list[str], settings: ExtractionSettings, dtype_name: str,
          root: Path) -> list[_Job]:
    """Resolve and validate every model (folders, safe weights, identity) before loading any."""
    jobs = []
    for ref in models:
        base_dir = local_dir(ref.model)
        check_weights(base_dir, str(ref.model), allow_pickle=settings.allow_pickle)
        lora_dir = local_dir(ref.lora, what="LoRA adapter") if ref.lora is not None else None
        if lora_dir is not None:
            check_weights(lora_dir, str(ref.lora), allow_pickle=settings.allow_pickle)
        cache = VectorCache(model_identity(ref), settings, dtype_name, root)
        jobs.append(_Job(ref, base_dir, lora_dir, cache, list(dict.fromkeys(cache.missing(keys)))))
    return jobs


def extract(models: list[Any], texts: list[str] | tuple[str, ...], settings: ExtractionSettings,
            *, cache_dir: Path | None = None, progress: bool = True,
            labels: Mapping[str, str] | None = None,
            on_model: Callable[[str], None] | None = None,
            visit: Callable[[Any, Any, Any], None] | None = None,
            visit_models: Collection[str] = ()) -> Extraction:
    """Pooled hidden states of every model on every probe.

    Args:
        models: mergekit ModelReferences (full models and/or base+LoRA references).
        texts: the probe texts (X).
        settings: layer, pooling, dtype, device, batching, safety switches.
        cache_dir: cache root (default: $MERGEKIT_COLLAPSE_CACHE or ~/.cache/mergekit_collapse).
        progress: show progress, one step per model computed.
        labels: display names by str(model reference), for the progress (default: `display_names`).
        on_model: called with each model's name as it starts (for outer progress displays).
        visit: called as `visit(ref, model, tokenizer)` while each model named in `visit_models`
            is loaded (a LoRA: its base with the adapter on), e.g. to answer the rehearsal's
            probes on the same load; such a model is loaded even when its vectors are cached.
        visit_models: the models (as str) to visit.

    Returns:
        An Extraction: vectors[str(ref)] is a (P, d) float32 array in the order of `texts`.

    Raises:
        BadInputError: missing or pickle-only weights, mismatched hidden sizes, NaNs, empty probes.
    """

    from mergekit_collapse._console import Progress, quiet_third_party
    from mergekit_collapse.guard.report import display_names

    quiet_third_party("transformers")  # our progress is one step per model; no per-tensor bars
    if not texts:
        raise BadInputError("the probe set is empty")
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    dtype_name = str(dtype).removeprefix("torch.")
    keys = [probe_key(t, settings.chat_template) for t in texts]
    jobs = _jobs(models, keys, settings, dtype_name, cache_dir or cache_root())

    result = Extraction(vectors={}, dtype=dtype_name)
    todo = [j for j in jobs if j.missing or (visit and str(j.ref) in visit_models)]
    groups: dict[Path, list[_Job]] = {}  # adapters by their base folder: each base loads once
    for job in todo:
        groups.setdefault(job.base_dir.resolve(), []).append(job)
    names = labels or display_names([str(m) for m in models])
    run = _Pass(texts, {k: i for i, k in enumerate(keys)}, settings, device, dtype, names, result,
                on_model, visit, visit_models)
    bar = Progress("hidden states", len(todo), enabled=progress, labels=names)
    for base_dir, group in groups.items():
        _extract_group(base_dir, group, run, bar)
    bar.close()
    if result.tokens_computed:
        log.info("hidden states: %d probe tokens computed, %d saved by the shared prefix",
                 result.tokens_computed, result.tokens_saved)
    _stack(jobs, keys, result)
    return result


@dataclass
class _Pass:
    """What one `extract` call shares between its models: probes, loading, hooks, the result."""

    texts: list[str] | tuple[str, ...]
    position: dict[str, int]  # probe key -> index in texts
    settings: ExtractionSettings
    device: Any
    dtype: Any
    names: Mapping[str, str]
    result: Extraction
    on_model: Callable[[str], None] | None
    visit: Callable[[Any, Any, Any], None] | None
    visit_models: Collection[str]


def _extract_group(base_dir: Path, group: list[_Job], run: _Pass, bar: Progress) -> None:
    """Load one base once and extract it and its adapters; release it all before the next."""
    settings, visit = run.settings, run.visit
    tok = load_tokenizer(group[0].base_dir, settings)
    model = load_causal_lm(base_dir, settings, run.device, run.dtype)
    peft_model = body = None
    try:
        # the plain base first, before any adapter is injected
        for job in sorted(group, key=lambda j: j.lora_dir is not None):
            if run.on_model:
                run.on_model(str(job.ref))
            with bar.step(bar.label(str(job.ref)), note=f"{len(job.missing)} probes"):
                if job.lora_dir is None:
                    body = model.get_decoder()
                else:
                    peft_model = swap_adapter(model, peft_model, job.lora_dir)
                    body = peft_model.get_base_model().get_decoder()
                if visit and str(job.ref) in run.visit_models:
                    visit(job.ref, model if job.lora_dir is None else peft_model, tok)
                if job.missing:
                    _compute(job, body, tok, run)
    finally:
        gone = [weakref.ref(model)]
        del model, peft_model, body  # all of it, before the next model loads
        release(*gone)


def _compute(job: _Job, body: Any, tok: Any, run: _Pass) -> None:
    """Run the probes one model lacks through its decoder, into its cache and the counts."""
    idx = [run.position[k] for k in job.missing]
    try:
        ids = encode_probes(tok, [run.texts[i] for i in idx], run.settings)
        vecs, tokens = run_forward(body, ids, run.settings, pad_id(tok))
    except BadInputError as e:
        raise BadInputError(f"{run.names.get(str(job.ref), str(job.ref))}: {e}") from None
    job.cache.update(dict(zip(job.missing, vecs, strict=True)))
    run.result.tokens_computed += tokens
    run.result.tokens_saved += sum(map(len, ids)) - tokens
    run.result.computed[str(job.ref)] = len(job.missing)


def _stack(jobs: list[_Job], keys: list[str], result: Extraction) -> None:
    """Every model's (P, d) vectors in probe order into `result`; their hidden sizes must agree."""
    for job in jobs:
        stacked = np.stack([job.cache.data[k] for k in keys])
        result.vectors[str(job.ref)] = stacked.astype(np.float32)
        result.computed.setdefault(str(job.ref), 0)
    sizes = {v.shape[1] for v in result.vectors.values()}
    if len(sizes) > 1:
        detail = ", ".join(f"{k}: {v.shape[1]}" for k, v in result.vectors.items())
        raise BadInputError(f"mismatched models: hidden sizes differ ({detail})")
    result.hidden_size = sizes.pop()
