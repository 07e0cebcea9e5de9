"""Rehearsal: merge in memory with mergekit, and compare the merged model's answers with each
constituent's own answers on that constituent's probes. Label-free: no lm-eval task is needed.

Each constituent answers its task's probes greedily (at most `answer_tokens` tokens; cached on
disk per model identity). The merged model is then run once, teacher-forced, on every probe
followed by its constituent's answer. Per probe:

* *agreement* — the merged model's greedy answer is the constituent's, token for token (its
  argmax matches at every answer position, end-of-answer token included: exactly when greedy
  decoding would reproduce the answer);
* *token agreement* — the fraction of answer positions whose argmax matches;
* *partial agreement* — the agreement, its ties broken by the token agreement
  (`partial_credit`): as coarse a score as the agreement where it is 0 or 1, finer between;
* *first-token KL* — KL(constituent ‖ merged) of the first answer token's distribution.

The merge is mergekit's own (its planner's task per tensor, run by its `Executor`), so every
method, parameter filter, slice and LoRA reference is merged as `mergekit-yaml` would merge it;
the merged model is never whole in memory: `models.streamed.merged_logits` merges and runs it a
layer at a time, and reads each LoRA as base + scale·B·A without a merged copy on disk.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mergekit_collapse._console import Progress, quiet_third_party
from mergekit_collapse._constants import cache_root
from mergekit_collapse._io import atomic_write_bytes, read_npz
from mergekit_collapse.errors import BadInputError
from mergekit_collapse.guard.cache import probe_key
from mergekit_collapse.guard.forward import ExtractionSettings, encode_probes
from mergekit_collapse.models.identity import model_identity
from mergekit_collapse.models.loading import (
    load_causal_lm,
    load_tokenizer,
    local_dir,
    pad_id,
    release,
    resolve_device,
    resolve_dtype,
    swap_adapter,
)
from mergekit_collapse.models.streamed import Batch, merged_logits

log = logging.getLogger(__name__)

#: bump when what a cached answer means changes
ANSWER_CACHE_VERSION = "2"
#: bump when what a cached rehearsal result means changes
REHEARSAL_CACHE_VERSION = "2"


def partial_credit(agreement: float, token_agreement: float, probes: int) -> float:
    """The agreement with partial credit from the token agreement: the agreement moves in steps
    of 1/probes, the token agreement adds less than one step (at most half of one), so it only
    orders merges of equal agreement. Same pass, no extra cost."""
    return agreement + token_agreement / (2 * probes)


@dataclass
class ProbeComparison:
    """One constituent's probes: the merged model against the constituent's own answers."""

    agreement: list[bool]
    token_agreement: list[float]
    first_token_kl: list[float]

    def summary(self) -> dict[str, float]:
        agreement, tokens = float(np.mean(self.agreement)), float(np.mean(self.token_agreement))
        return {"rehearsal_agreement": agreement, "rehearsal_token_agreement": tokens,
                "rehearsal_partial": partial_credit(agreement, tokens, len(self.agreement)),
                "rehearsal_kl": float(np.mean(self.first_token_kl))}


@dataclass
class Rehearsal:
    """Per-constituent comparisons (by model reference), and what they cost."""

    models: dict[str, dict[str, float]]
    seconds: dict[str, float] = field(default_factory=dict)
    answer_tokens: int = 32
    dtype: str = "float32"


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


def forced_batches(prompts: list[list[int]], answers: list[list[int]], pad_id: int,
                   batch_size: int = 16) -> list[tuple[list[int], Batch]]:
    """The teacher-forced pass's batches: (rows, Batch) over each prompt + answer.

    Rows are left-padded (every answer ends at the right edge, so only the last longest-answer + 1
    positions need logits) and batched in a fixed order: two models run on the same prompts and
    answers see the same layout, so an unchanged model reproduces itself exactly.
    """
    seqs = [p + a for p, a in zip(prompts, answers, strict=True)]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = []
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        ids, mask, pos = _left_padded([seqs[i] for i in rows], pad_id)
        out.append((rows, Batch(ids, mask, pos, max(len(answers[i]) for i in rows) + 1)))
    return out


def read_forced(batches: list[tuple[list[int], Batch]], logits: list[Any],
                answers: list[list[int]]) -> tuple[list[list[int]], np.ndarray]:
    """The argmax at every answer position and the first answer token's log-probabilities (P,
    vocab), from each batch's logits over its last `keep` positions."""
    import torch

    argmax: list[list[int]] = [[] for _ in answers]
    first: list[np.ndarray | None] = [None] * len(answers)
    for (rows, batch), out in zip(batches, logits, strict=True):
        for row, i in enumerate(rows):
            steps = out[row, batch.keep - 1 - len(answers[i]) : batch.keep - 1]  # the answer's
            argmax[i] = steps.argmax(-1).tolist()
            first[i] = torch.log_softmax(steps[0], dim=-1).cpu().numpy()
    return argmax, np.stack(first)


def teacher_forced(model: Any, prompts: list[list[int]], answers: list[list[int]], pad_id: int,
                   batch_size: int = 16) -> tuple[list[list[int]], np.ndarray]:
    """Run `model` once on each prompt + answer (`forced_batches`): `read_forced`'s result."""
    import torch

    device = model.get_input_embeddings().weight.device
    batches = forced_batches(prompts, answers, pad_id, batch_size)
    logits = []
    for _, b in batches:
        with torch.inference_mode():
            logits.append(model(input_ids=b.ids.to(device), attention_mask=b.mask.to(device),
                                position_ids=b.positions.to(device), use_cache=False,
                                logits_to_keep=b.keep).logits.float())
    return read_forced(batches, logits, answers)


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


class RehearsalCache:
    """A rehearsal's result, keyed by everything it depends on: the merge as written, the content
    of every model it reads, each constituent's probes, dtype, device type, tokenisation, batch
    size, answer length and seed. A re-run (CI, `mergekit-yaml --guard` after `check`) reads it."""

    def __init__(self, merge: Any, models: list[Any], probes: dict[str, list[str]],
                 settings: ExtractionSettings, dtype_name: str, device: str, answer_tokens: int,
                 seed: int, root: Path):
        spec = {"v": REHEARSAL_CACHE_VERSION, "merge": merge.model_dump(mode="json"),
                "identities": {str(r): model_identity(r) for r in merge.referenced_models()},
                "models": [str(m) for m in models], "probes": probes, "dtype": dtype_name,
                "device": device.split(":")[0], "max_length": settings.max_length,
                "chat_template": settings.chat_template, "batch_size": settings.batch_size,
                "answer_tokens": answer_tokens, "seed": seed}
        digest = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()
        self.path = root / "rehearsals" / digest[:2] / f"{digest}.json"

    def get(self) -> Rehearsal | None:
        try:
            data = json.loads(self.path.read_text())
            return Rehearsal(models={k: {m: float(x) for m, x in v.items()}
                                     for k, v in data["models"].items()},
                             answer_tokens=int(data["answer_tokens"]), dtype=str(data["dtype"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            log.warning("recomputing malformed rehearsal cache entry %s", self.path)
            return None

    def put(self, result: Rehearsal) -> None:
        atomic_write_bytes(self.path, json.dumps({"models": result.models, "dtype": result.dtype,
                                                  "answer_tokens": result.answer_tokens}).encode())


@dataclass
class Reference:
    """A constituent's prompts and answers (token ids), and its own argmax and first-token
    log-probs over them: what the merged model is run on and compared with."""

    prompts: list[list[int]]
    answers: list[list[int]]
    argmax: list[list[int]]
    pad_id: int
    first_logp: np.ndarray


class Answers:
    """The constituents' answers to their own probes: cached per model identity, computed on a
    model wherever it is loaded (during extraction: one load per model), else by `references`."""

    def __init__(self, models: list[Any], probes: dict[str, list[str]],
                 settings: ExtractionSettings, answer_tokens: int, root: Path):
        dtype = str(resolve_dtype(settings.dtype, _device(settings.device))).removeprefix("torch.")
        self.models, self.probes, self.settings = models, probes, settings
        self.answer_tokens = answer_tokens
        self.keys = {str(m): [probe_key(t, settings.chat_template) for t in probes[str(m)]]
                     for m in models}
        self.caches = {str(m): AnswerCache(model_identity(m), settings, dtype, answer_tokens, root)
                       for m in models}
        self.found: dict[str, Reference] = {}
        self.seconds = 0.0  # spent computing answers

    def missing(self) -> set[str]:
        """The models (as str) whose answers are not cached yet."""
        for name, cache in self.caches.items():
            if name not in self.found and (hit := cache.get(self.keys[name])) is not None:
                self.found[name] = hit
        return set(self.caches) - set(self.found)

    def compute(self, ref: Any, model: Any, tok: Any) -> None:
        """Answer `ref`'s probes on `model` (the loaded model, or the base with its adapter)."""
        name, t0 = str(ref), time.perf_counter()
        ids = encode_probes(tok, self.probes[name], self.settings)
        answers = generate_answers(model, tok, ids, self.answer_tokens, self.settings.batch_size)
        pad = pad_id(tok)
        argmax, logp = teacher_forced(model, ids, answers, pad, self.settings.batch_size)
        self.found[name] = Reference(ids, answers, argmax, pad, logp)
        self.caches[name].put(self.keys[name], self.found[name])
        self.seconds += time.perf_counter() - t0

    def references(self, progress: Progress | None = None) -> dict[str, Reference]:
        """Every model's answers: those not computed yet on one load per base (LoRAs swapped).

        `progress` counts one step per model.
        """
        progress = progress or Progress("answers", 0, enabled=False)
        todo = self.missing()
        device = _device(self.settings.device)
        dtype = resolve_dtype(self.settings.dtype, device)
        by_base: dict[Path, list[Any]] = {}
        for ref in self.models:
            by_base.setdefault(local_dir(ref.model).resolve(), []).append(ref)
        for base_dir, group in by_base.items():
            tok = load_tokenizer(base_dir, self.settings)
            model = peft_model = None
            for ref in sorted(group, key=lambda r: r.lora is not None):
                label = f"{progress.label(str(ref))}: answers"
                progress.start(label)
                t0 = time.perf_counter()
                if str(ref) in todo:
                    if model is None:
                        model = load_causal_lm(base_dir, self.settings, device, dtype)
                    target = model
                    if ref.lora is not None:
                        peft_model = swap_adapter(model, peft_model, local_dir(ref.lora))
                        target = peft_model
                    self.compute(ref, target, tok)
                progress.done(label, seconds=time.perf_counter() - t0,
                              note="" if str(ref) in todo else "cached")
            gone = [weakref.ref(model)] if model is not None else []
            del model, peft_model  # all of it, before the next base loads
            release(*gone)
        return {str(m): self.found[str(m)] for m in self.models}


def rehearse(merge: Any, models: list[Any], probes: dict[str, list[str]],
             settings: ExtractionSettings, *, answer_tokens: int = 32, seed: int = 0,
             cache_dir: Path | None = None, progress: bool = True,
             labels: Mapping[str, str] | None = None) -> Rehearsal:
    """Merge `merge` a layer at a time and compare it with each constituent on its own probes.

    Args:
        merge: the mergekit MergeConfiguration, merged as written.
        models: the constituents (mergekit ModelReferences) to compare with.
        probes: probe texts by str(model reference): each constituent's own task probes.
        settings: tokenisation (chat template, max length), dtype, device and batch size.
        answer_tokens: the longest greedy answer compared.
        seed: the seed of randomised merge methods (DARE), drawn per tensor.
        cache_dir: cache root for the constituents' answers.
        progress: show progress: each constituent's answers, then the merged pass stage by stage.
        labels: display names by str(model reference), for the progress.

    Returns:
        A `Rehearsal`: rehearsal_agreement, _token_agreement, _partial and _kl per model.

    Raises:
        BadInputError: the merge cannot be planned or run; models that cannot be loaded.
    """
    quiet_third_party("transformers")
    device = _device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    t0 = time.perf_counter()
    root = cache_dir or cache_root()
    cache = RehearsalCache(merge, models, probes, settings, str(dtype).removeprefix("torch."),
                           device, answer_tokens, seed, root)
    if (hit := cache.get()) is not None:
        hit.seconds = {"cached": round(time.perf_counter() - t0, 2)}
        return hit
    bar = Progress("rehearsal", len(models) + 1, enabled=progress, labels=labels)
    refs = Answers(models, probes, settings, answer_tokens, root).references(bar)
    t1 = time.perf_counter()
    layout = {str(m): forced_batches(refs[str(m)].prompts, refs[str(m)].answers,
                                     refs[str(m)].pad_id, settings.batch_size) for m in models}
    batches = [Batch(b.ids.to(device), b.mask.to(device), b.positions.to(device), b.keep)
               for m in models for _, b in layout[str(m)]]
    bar.start("merged model, a layer at a time")
    seconds: dict[str, float] = {}
    logits = merged_logits(merge, batches, dtype=dtype, device=device, seed=seed,
                           trust_remote_code=settings.trust_remote_code,
                           lora_cache=root / "lora_merged", seconds=seconds,
                           on_stage=lambda stage: bar.start(f"merged model: {stage}"))
    result = _compare_models(models, refs, layout, logits)
    t2 = time.perf_counter()
    bar.done("merged model, a layer at a time", seconds=t2 - t1)
    bar.close()
    merge_s = round(seconds.get("merge", 0.0), 2)
    out = Rehearsal(models=result, answer_tokens=answer_tokens,
                    dtype=str(dtype).removeprefix("torch."),
                    seconds={"answers": round(t1 - t0, 2), "merge": merge_s,
                             "compare": round(t2 - t1 - merge_s, 2)})
    cache.put(out)
    return out


def _compare_models(models: list[Any], refs: dict[str, Reference],
                    layout: dict[str, list[tuple[list[int], Batch]]],
                    logits: list[Any]) -> dict[str, dict[str, float]]:
    """Each constituent's answers against the merged model's logits on its own probes."""
    result: dict[str, dict[str, float]] = {}
    for ref in models:
        own, mine = refs[str(ref)], logits[: len(layout[str(ref)])]
        logits = logits[len(mine):]
        merged = read_forced(layout[str(ref)], mine, own.answers)
        result[str(ref)] = compare((own.argmax, own.first_logp), merged).summary()
        if not all(math.isfinite(v) for v in result[str(ref)].values()):
            raise BadInputError(f"the rehearsal of {ref} produced NaN or inf (try --dtype float32)")
    return result


def rehearsal_memory(merge: Any, settings: ExtractionSettings, *, n_sequences: int,
                     answer_tokens: int, limit_gb: float | None = None) -> tuple[int, int, str]:
    """(bytes the streamed pass needs at its peak, bytes it may use, what the limit is).

    The need is `models.streamed.estimate_bytes` with the activations of `n_sequences` probes of
    at most `max_length + answer_tokens` tokens; the limit is `limit_gb`, else the free memory of
    the device the rehearsal runs on.
    """
    import torch
    from transformers import AutoConfig

    from mergekit_collapse.models.streamed import estimate_bytes

    device = _device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    first = merge.base_model or merge.referenced_models()[0]
    text = AutoConfig.from_pretrained(local_dir(first.model),
                                      trust_remote_code=settings.trust_remote_code).get_text_config()
    tokens = settings.max_length + answer_tokens
    activations = 4 * (3 * n_sequences * tokens * text.hidden_size  # hidden states, kept + working
                       + settings.batch_size * tokens * tokens * text.num_attention_heads  # scores
                       + n_sequences * (answer_tokens + 1) * text.vocab_size)  # logits
    need = estimate_bytes(merge, dtype_bytes=torch.finfo(dtype).bits // 8,
                          activations=activations)["total"]
    if limit_gb is not None:
        return need, int(limit_gb * 1e9), "(rehearse_max_gb)"
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return need, free, f"free on {device}"
    return need, _available_ram(), "of available memory"


def _available_ram() -> int:
    """MemAvailable from /proc/meminfo (bytes); where it cannot be read, no limit."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def _device(device: str) -> str:
    """One device for the rehearsal: "auto" is the first GPU when there is one."""
    import torch

    resolved = resolve_device(device)
    return ("cuda" if torch.cuda.is_available() else "cpu") if resolved == "auto" else resolved
