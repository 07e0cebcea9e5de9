"""Rehearsal: merge in memory with mergekit, and compare the merged model's answers with each
constituent's own answers on that constituent's probes. Label-free: no lm-eval task is needed.

Each constituent answers its task's probes greedily (at most `answer_tokens` tokens; cached on
disk per model identity). The merged model is then run once, teacher-forced, on every probe
followed by its constituent's answer. Per probe:

* *agreement* — the merged model's greedy answer is the constituent's, token for token (its
  argmax matches at every answer position, end-of-answer token included: exactly when greedy
  decoding would reproduce the answer);
* *token agreement* — the fraction of answer positions whose argmax matches;
* *first-token KL* — KL(constituent ‖ merged) of the first answer token's distribution.

The merge is mergekit's own: `MergePlanner.plan_in_memory()` run by mergekit's `Executor` (as
mergekit-evolve does), so every method, parameter filter, slice and LoRA reference is merged as
`mergekit-yaml` would merge it, without writing the merged model to disk.
"""

from __future__ import annotations

import gc
import hashlib
import io
import json
import logging
import math
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mergekit_collapse._console import Progress, quiet_third_party
from mergekit_collapse._constants import cache_root
from mergekit_collapse.errors import BadInputError
from mergekit_collapse.guard.extract import (
    ExtractionSettings,
    atomic_write_bytes,
    encode,
    load_causal_lm,
    load_tokenizer,
    local_dir,
    model_identity,
    pad_id,
    probe_key,
    read_npz,
    resolve_dtype,
    swap_adapter,
)

log = logging.getLogger(__name__)

#: bump when what a cached answer means changes
ANSWER_CACHE_VERSION = "2"


@dataclass
class ProbeComparison:
    """One constituent's probes: the merged model against the constituent's own answers."""

    agreement: list[bool]
    token_agreement: list[float]
    first_token_kl: list[float]

    def summary(self) -> dict[str, float]:
        return {"rehearsal_agreement": float(np.mean(self.agreement)),
                "rehearsal_token_agreement": float(np.mean(self.token_agreement)),
                "rehearsal_kl": float(np.mean(self.first_token_kl))}


@dataclass
class Rehearsal:
    """Per-constituent comparisons (by model reference), and what they cost."""

    models: dict[str, dict[str, float]]
    seconds: dict[str, float] = field(default_factory=dict)
    answer_tokens: int = 32
    dtype: str = "float32"


# ---------------------------------------------------------------- size gate


def input_bytes(merge: Any) -> int:
    """Bytes of the distinct weight files a merge reads (a LoRA reference counts its base once)."""
    folders: set[Path] = set()
    for ref in merge.referenced_models():
        folders.add(local_dir(ref.model).resolve())
        if ref.lora is not None:
            folders.add(local_dir(ref.lora, what="LoRA adapter").resolve())
    return sum(f.stat().st_size for d in folders for f in d.iterdir()
               if f.is_file() and f.name.endswith((".safetensors", ".bin")))


# ---------------------------------------------------------------- the in-memory merge


def fresh_lora_cache(merge: Any, cache_dir: Path) -> None:
    """mergekit names a merged LoRA by its paths; drop a cached one whose adapter content changed,
    or that was never finished (its identity stamp is written last)."""
    for ref in merge.referenced_models():
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


def merge_in_memory(merge: Any, *, dtype: Any, seed: int = 0, trust_remote_code: bool = False,
                    cache_dir: Path | None = None) -> Any:
    """The merged model, built by mergekit's planner and executor in memory (nothing written
    but mergekit's merged-LoRA cache, kept under the cache root: `cache_dir` or `cache_root()`).

    Raises:
        BadInputError: mergekit cannot merge these models (architectures, shapes, a tokenizer section).
    """
    import torch
    from mergekit.architecture import get_architecture_info
    from mergekit.graph import Executor
    from mergekit.io.tasks import LoaderCache
    from mergekit.merge import _model_out_config
    from mergekit.options import MergeOptions
    from mergekit.plan import MergePlanner
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    if merge.tokenizer is not None or merge.tokenizer_source is not None:
        raise BadInputError("rehearsal does not support configs with a tokenizer section")
    merge = merge.model_copy(deep=True)  # mergekit's planner rewrites its config in place
    lora_cache = (cache_dir or cache_root()) / "lora_merged"
    lora_cache.mkdir(parents=True, exist_ok=True)
    fresh_lora_cache(merge, lora_cache)
    options = MergeOptions(lora_merge_cache=str(lora_cache), quiet=True, random_seed=seed,
                           trust_remote_code=trust_remote_code)
    LoaderCache().setup(options=options)
    try:
        arch = get_architecture_info(merge, options)
        cfg_out = _model_out_config(merge, arch, trust_remote_code=trust_remote_code)
        planner = MergePlanner(merge, arch, options=options, out_model_config=cfg_out)
        # plan_in_memory() of mergekit 0.1.5 fails validating ReturnTensor(tensor_task=...)
        # ("Can't instantiate abstract class Task[Tensor]"); its own plan, run directly, is the same
        planner._plan()
        targets = {task: weight.name for weight, task in planner._tensors}
    except (RuntimeError, ValueError, KeyError) as e:
        raise BadInputError(f"mergekit cannot plan this merge: {str(e).splitlines()[0]}") from None
    with no_init_weights():  # every weight is filled from the merge below (checked)
        model = AutoModelForCausalLM.from_config(cfg_out, dtype=dtype,
                                                 trust_remote_code=trust_remote_code).eval()
    params = dict(model.named_parameters())
    filled: set[str] = set()
    try:
        for task, value in Executor(list(targets), math_device="cpu",
                                    storage_device="cpu").run(quiet=True):
            name = targets[task]
            if name not in params:
                raise BadInputError(f"mergekit produced tensor '{name}', which the model has not")
            with torch.no_grad():
                params[name].copy_(value)
            filled.add(name)
    except BadInputError:  # ours, already one line (and a ValueError too)
        raise
    except (RuntimeError, ValueError) as e:
        raise BadInputError(f"mergekit cannot merge these models: {str(e).splitlines()[0]}") from None
    model.tie_weights()  # e.g. lm_head shares the merged embeddings
    filled_ptrs = {params[n].data_ptr() for n in filled}
    missing = sorted(n for n, p in model.named_parameters() if p.data_ptr() not in filled_ptrs)
    if missing:
        raise BadInputError(f"the in-memory merge left {len(missing)} tensors unset, e.g. {missing[0]}")
    return model


# ---------------------------------------------------------------- answers and comparison


def _eos_ids(model: Any, tok: Any) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    return ids


def generate_answers(model: Any, tok: Any, prompts: list[list[int]], max_new_tokens: int,
                     batch_size: int = 16) -> list[list[int]]:
    """Greedy answers, each cut after its first end-of-answer token."""
    import torch

    eos, pad = _eos_ids(model, tok), pad_id(tok)
    answers: list[list[int]] = [[] for _ in prompts]
    device = model.get_input_embeddings().weight.device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        ids, mask, _ = _left_padded([prompts[i] for i in batch], pad)
        with torch.inference_mode():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 pad_token_id=pad, eos_token_id=sorted(eos) or None,
                                 temperature=None, top_p=None, top_k=None)
        for row, i in enumerate(batch):
            for t in out[row, ids.shape[1]:].tolist():  # left padding: answers start here
                answers[i].append(t)
                if t in eos:
                    break
    return answers


def _left_padded(seqs: list[list[int]], pad_id: int) -> tuple[Any, Any, Any]:
    """ids, attention mask and position ids of left-padded rows (as `generate` lays them out)."""
    import torch

    width = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, x in enumerate(seqs):
        ids[row, width - len(x):] = torch.tensor(x)
        mask[row, width - len(x):] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def teacher_forced(model: Any, prompts: list[list[int]], answers: list[list[int]], pad_id: int,
                   batch_size: int = 16) -> tuple[list[list[int]], np.ndarray]:
    """Run `model` once on each prompt + answer: its argmax at every answer position, and the
    log-probabilities (P, vocab) of the first answer token.

    Rows are left-padded (every answer ends at the right edge, so only the last longest-answer + 1
    positions need logits) and batched in a fixed order: two models run on the same prompts and
    answers see the same layout, so an unchanged model reproduces itself exactly.
    """
    import torch

    argmax: list[list[int]] = [[] for _ in prompts]
    first: list[np.ndarray | None] = [None] * len(prompts)
    device = model.get_input_embeddings().weight.device
    seqs = [p + a for p, a in zip(prompts, answers, strict=True)]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        ids, mask, pos = _left_padded([seqs[i] for i in batch], pad_id)
        keep = max(len(answers[i]) for i in batch) + 1
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                           position_ids=pos.to(device), use_cache=False,
                           logits_to_keep=keep).logits.float()
        for row, i in enumerate(batch):
            steps = logits[row, keep - 1 - len(answers[i]) : keep - 1]  # predictions of the answer
            argmax[i] = steps.argmax(-1).tolist()
            first[i] = torch.log_softmax(steps[0], dim=-1).cpu().numpy()
    return argmax, np.stack(first)


def compare(reference: tuple[list[list[int]], np.ndarray],
            merged: tuple[list[list[int]], np.ndarray]) -> ProbeComparison:
    """Agreement of two `teacher_forced` results on the same prompts and answers."""
    agree, tokens, kls = [], [], []
    for a, b, lp, lq in zip(reference[0], merged[0], reference[1], merged[1], strict=True):
        match = np.asarray(a) == np.asarray(b)
        agree.append(bool(match.all()))
        tokens.append(float(match.mean()))
        kls.append(float(np.sum(np.exp(lp) * (lp - lq))))
    return ProbeComparison(agreement=agree, token_agreement=tokens, first_token_kl=kls)


class AnswerCache:
    """A constituent's greedy answers to its probes and its own teacher-forced pass over them."""

    def __init__(self, identity: str, settings: ExtractionSettings, dtype_name: str,
                 answer_tokens: int, root: Path):
        spec = {"v": ANSWER_CACHE_VERSION, "model": identity, "dtype": dtype_name,
                "max_length": settings.max_length, "batch_size": settings.batch_size,
                "chat_template": settings.chat_template, "answer_tokens": answer_tokens}
        self.digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
        self.root = root / "answers" / self.digest[:2]

    def _path(self, keys: list[str]) -> Path:
        # the reference pass depends on which probes share a batch: key the file by the probe list
        probes = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]
        return self.root / f"{self.digest}-{probes}.npz"

    def get(self, keys: list[str]) -> Reference | None:
        path = self._path(keys)
        z = read_npz(path)
        if z is None:
            return None
        try:
            ints = json.loads(str(z["ints"]))
            return Reference(ints["prompts"], ints["answers"], ints["argmax"], ints["pad_id"],
                             z["logp"].astype(np.float32))
        except (ValueError, KeyError, TypeError):
            log.warning("recomputing malformed answer cache entry %s", path)
            return None

    def put(self, keys: list[str], ref: Reference) -> None:
        ints = {"prompts": ref.prompts, "answers": ref.answers, "argmax": ref.argmax,
                "pad_id": ref.pad_id}
        buf = io.BytesIO()
        np.savez(buf, ints=np.array(json.dumps(ints)), logp=ref.first_logp.astype(np.float32))
        atomic_write_bytes(self._path(keys), buf.getvalue())


@dataclass
class Reference:
    """A constituent's prompts and answers (token ids), and its own argmax and first-token
    log-probs over them: what the merged model is run on and compared with."""

    prompts: list[list[int]]
    answers: list[list[int]]
    argmax: list[list[int]]
    pad_id: int
    first_logp: np.ndarray


def constituent_references(models: list[Any], probes: dict[str, list[str]],
                           settings: ExtractionSettings, answer_tokens: int, *,
                           cache_dir: Path | None = None,
                           progress: Progress | None = None) -> dict[str, Reference]:
    """Each constituent's answers to its own probes (LoRAs swapped on one loaded base), cached.

    `progress` counts one step per constituent.
    """
    progress = progress or Progress("answers", 0, enabled=False)
    dtype = resolve_dtype(settings.dtype, "cpu")
    dtype_name = str(dtype).removeprefix("torch.")
    root = cache_dir or cache_root()
    out: dict[str, Reference] = {}
    by_base: dict[Path, list[Any]] = {}
    for ref in models:
        by_base.setdefault(local_dir(ref.model).resolve(), []).append(ref)
    for base_dir, group in by_base.items():
        tok = load_tokenizer(base_dir, settings)
        model = peft_model = None
        for ref in sorted(group, key=lambda r: r.lora is not None):
            cache = AnswerCache(model_identity(ref), settings, dtype_name, answer_tokens, root)
            texts = probes[str(ref)]
            keys = [probe_key(t, settings.chat_template) for t in texts]
            hit = cache.get(keys)
            label, note = f"{progress.label(str(ref))}: answers", "" if hit is None else "cached"
            progress.start(label)
            t0 = time.perf_counter()
            if hit is None:
                if model is None:
                    model = load_causal_lm(base_dir, settings, "cpu", dtype)
                target = model
                if ref.lora is not None:
                    peft_model = swap_adapter(model, peft_model, local_dir(ref.lora))
                    target = peft_model
                ids = encode(tok, texts, settings)
                answers = generate_answers(target, tok, ids, answer_tokens, settings.batch_size)
                pad = pad_id(tok)
                argmax, logp = teacher_forced(target, ids, answers, pad, settings.batch_size)
                hit = Reference(ids, answers, argmax, pad, logp)
                cache.put(keys, hit)
            progress.done(label, seconds=time.perf_counter() - t0, note=note)
            out[str(ref)] = hit
        if model is not None:
            del model, peft_model, target  # all of it, before the next base loads
            gc.collect()
    return out


def rehearse(merge: Any, models: list[Any], probes: dict[str, list[str]],
             settings: ExtractionSettings, *, answer_tokens: int = 32, seed: int = 0,
             cache_dir: Path | None = None, progress: bool = True,
             labels: Mapping[str, str] | None = None) -> Rehearsal:
    """Merge `merge` in memory and compare it with each constituent on that constituent's probes.

    Args:
        merge: the mergekit MergeConfiguration, merged as written.
        models: the constituents (mergekit ModelReferences) to compare with.
        probes: probe texts by str(model reference): each constituent's own task probes.
        settings: tokenisation (chat template, max length), dtype and batch size.
        answer_tokens: the longest greedy answer compared.
        seed: mergekit's random seed (DARE's random drop).
        cache_dir: cache root for the constituents' answers.
        progress: show progress: each constituent's answers, the merge, the comparison.
        labels: display names by str(model reference), for the progress.

    Returns:
        A `Rehearsal`: rehearsal_agreement, rehearsal_token_agreement and rehearsal_kl per model.

    Raises:
        BadInputError: the merge cannot be planned or run in memory; models that cannot be loaded.
    """
    quiet_third_party("transformers")
    dtype = resolve_dtype(settings.dtype, "cpu")
    bar = Progress("rehearsal", len(models) + 2, enabled=progress, labels=labels)
    t0 = time.perf_counter()
    refs = constituent_references(models, probes, settings, answer_tokens, cache_dir=cache_dir,
                                  progress=bar)
    t1 = time.perf_counter()
    bar.start("in-memory merge")
    merged = merge_in_memory(merge, dtype=dtype, seed=seed, trust_remote_code=settings.trust_remote_code,
                             cache_dir=cache_dir)
    t2 = time.perf_counter()
    bar.done("in-memory merge", seconds=t2 - t1)
    bar.start("merge vs constituents")
    result: dict[str, dict[str, float]] = {}
    for ref in models:
        own = refs[str(ref)]
        mine = teacher_forced(merged, own.prompts, own.answers, own.pad_id, settings.batch_size)
        result[str(ref)] = compare((own.argmax, own.first_logp), mine).summary()
        if not all(math.isfinite(v) for v in result[str(ref)].values()):
            raise BadInputError(f"the rehearsal of {ref} produced NaN or inf (try --dtype float32)")
    t3 = time.perf_counter()
    bar.done("merge vs constituents", seconds=t3 - t2)
    bar.close()
    del merged
    gc.collect()
    return Rehearsal(models=result, answer_tokens=answer_tokens,
                     dtype=str(dtype).removeprefix("torch."),
                     seconds={"answers": round(t1 - t0, 2), "merge": round(t2 - t1, 2),
                              "compare": round(t3 - t2, 2)})

