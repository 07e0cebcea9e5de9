"""Pooled hidden states per (model, probe), from the decoder body only, cached on disk.

Full fine-tunes are loaded one at a time and freed; LoRA adapters are swapped on one loaded base
(peft). The LM head is never run: for small models it costs more than the body. Vectors are cached
per (model identity, settings) and per probe, so a re-run computes only missing (model, probe) pairs.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mergekit_collapse._constants import cache_root
from mergekit_collapse._io import atomic_write_bytes
from mergekit_collapse.errors import (
    BadInputError,
    CollapseError,
    HubError,
    ModelNotFoundError,
    http_status,
)
from mergekit_collapse.guard.config import looks_local

log = logging.getLogger(__name__)

#: bump when what a cached vector means changes
CACHE_VERSION = "1"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_IDENTITY_FILES = (".json", ".jinja", ".model", ".txt")


@dataclass(frozen=True)
class ExtractionSettings:
    """How to turn a model and a probe into one vector."""

    layer: int = -1
    pooling: str = "last"
    dtype: str = "auto"  # auto: bfloat16 (CPU too: 5x faster, ~0.3% distance error; RESULTS.md)
    device: str = "auto"  # auto: accelerate's device_map="auto" over GPUs, else CPU
    batch_size: int = 16
    max_length: int = 256
    chat_template: bool = True
    allow_pickle: bool = False
    trust_remote_code: bool = False


@dataclass
class Extraction:
    """Vectors by model reference (as str), plus what had to be computed this time."""

    vectors: dict[str, np.ndarray]
    computed: dict[str, int] = field(default_factory=dict)  # probes computed per model
    hidden_size: int = 0
    dtype: str = "float32"
    tokens_computed: int = 0  # probe tokens run through the models (padding aside)
    tokens_saved: int = 0  # probe tokens not run: the shared prefix, computed once per model


# ---------------------------------------------------------------- placement and identity


def resolve_device(device: str) -> str:
    """'auto' -> 'auto' (accelerate device_map over GPUs) when CUDA is present, else 'cpu'."""
    import torch

    if device == "auto":
        return "auto" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        raise BadInputError(f"unknown --device '{device}': use auto, cpu, cuda or cuda:N") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BadInputError(f"--device {device} asked for, but no CUDA device is available")
    return device


def resolve_dtype(dtype: str, device: str) -> Any:
    """The torch dtype. 'auto' is bfloat16 where the hardware computes in it natively (CUDA, or a
    CPU with AVX512-BF16/AMX: there 5x faster than float32 for a 0.3% median / 1.1% max relative
    error in drms, benchmarks/RESULTS.md) and float32 elsewhere (on an AVX2-only CPU bfloat16 is
    emulated and 5-10x slower than float32)."""
    import torch

    if dtype == "auto":
        native = (device != "cpu" and torch.cuda.is_available()) or \
            torch.ops.mkldnn._is_mkldnn_bf16_supported()
        return torch.bfloat16 if native else torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise BadInputError(f"unknown dtype '{dtype}' (use float32, bfloat16 or float16)")
    return names[dtype]


def local_dir(path: Any, *, what: str = "model", fetch: bool = True) -> Path:
    """A mergekit ModelPath as a local folder: a local path, or the Hub snapshot (cache first).

    Args:
        path: the ModelPath (its `path` and `revision`).
        what: how messages name it.
        fetch: download a Hub snapshot that is not cached yet (False: the local cache only).

    Raises:
        ModelNotFoundError: neither a local path nor a Hub repo (or revision) that exists.
        HubError: the Hub failed to answer, or refused (a gated repo).
        BadInputError: the path is a file.
    """
    p = Path(str(path.path)).expanduser()
    if p.exists():
        if not p.is_dir():
            raise BadInputError(f"{what} '{path}' is a file, not a model folder")
        return p
    if looks_local(str(path.path)):  # cannot be a Hub id: `org/name`
        raise ModelNotFoundError(f"{what} '{path}' is not a local folder (no such path): check the "
                                 "path (relative paths start from the working directory)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path.path), revision=path.revision, local_files_only=not fetch,
                                      allow_patterns=["*.json", "*.safetensors", "*.jinja",
                                                      "*.model", "*.txt", "*.bin"]))
    except Exception as e:  # noqa: BLE001 - offline, missing repo, gated repo, network...
        raise _fetch_error(e, f"{what} '{path}'", fetch) from None


def _fetch_error(exc: Exception, named: str, fetch: bool) -> CollapseError:
    """One line for a Hub snapshot that could not be had: exit 2 where the reference is at fault (no
    such repository or revision, offline and not cached), exit 4 where the Hub is (an HTTP error, a
    gated repository, no connection)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if not fetch:
        return ModelNotFoundError(f"{named} is not a local folder (and not in the HF cache)")
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES",
                                                                                 "TRUE"}:
        return ModelNotFoundError(f"{named} is not a local folder nor in the HF cache, and "
                                  "HF_HUB_OFFLINE is set: check the path, or download it first")
    status = http_status(exc)
    if isinstance(exc, GatedRepoError):
        return HubError(f"{named} is a gated Hub repository (HTTP {status}): accept its terms on the "
                        "Hub and log in (`hf auth login` or HF_TOKEN)", status=status)
    if isinstance(exc, RepositoryNotFoundError | RevisionNotFoundError):
        missing = "revision" if isinstance(exc, RevisionNotFoundError) else "repository"
        return ModelNotFoundError(f"{named} is not a local folder, and the Hub has no such {missing} "
                                  f"(HTTP {status}; a private one needs a login: `hf auth login` or "
                                  "HF_TOKEN): check the path or id")
    if status is not None:
        return HubError(f"{named}: the Hub answered HTTP {status} while fetching it: retry later",
                        status=status)
    root: BaseException = exc
    for _ in range(8):  # the transport error under the client's wrappers
        root = root.__cause__ or root.__context__ or root
    return HubError(f"{named} is not a local folder and the Hub cannot be reached "
                    f"({type(root).__name__}): check the connection or HF_ENDPOINT, or download it first")


def check_weights(folder: Path, ref: str, *, allow_pickle: bool) -> None:
    """Refuse pickle-only weights unless the user opted in; refuse folders with no weights."""
    names = [f.name for f in folder.iterdir()]
    if any(n.endswith(".safetensors") for n in names):
        return
    if any(n.endswith(WEIGHT_SUFFIXES) for n in names):
        if allow_pickle:
            return
        raise BadInputError(f"'{ref}' has only pickle weights (.bin/.pt): convert them to "
                            "safetensors or pass --allow-pickle if you trust the file")
    raise BadInputError(f"'{ref}' has no weight files in {folder}")


def _file_sha256(path: Path, memo: dict[str, str]) -> str:
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    if key not in memo:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        memo[key] = h.hexdigest()
    return memo[key]


def folder_identity(folder: Path) -> str:
    """sha256 over the weight, config and tokenizer files of a folder (hashes memoised on disk)."""
    memo_path = cache_root() / "file_hashes.json"
    memo = _read_memo(memo_path)
    before = len(memo)
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES + _IDENTITY_FILES) and f.name != "README.md":
            h.update(f"{f.name}:{_file_sha256(f, memo)}\n".encode())
    if len(memo) != before:
        with write_lock(memo_path.parent):  # keep what other processes added since we read
            atomic_write_bytes(memo_path, json.dumps({**_read_memo(memo_path, warn=False), **memo}).encode())
    return h.hexdigest()


def _read_memo(path: Path, *, warn: bool = True) -> dict[str, str]:
    """file_hashes.json: file key -> sha256; an unreadable or malformed one is dropped (with a warning
    unless `warn` is False: the re-read before a write)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        data = None
    memo = {k: v for k, v in data.items() if isinstance(v, str)} if isinstance(data, dict) else {}
    if warn and (not isinstance(data, dict) or len(memo) != len(data)):
        log.warning("recomputing the file hashes of %s: it is unreadable or malformed", path)
    return memo


def model_identity(ref: Any) -> str:
    """Identity of a mergekit ModelReference: content hashes of its base (and LoRA) folders."""
    ident = folder_identity(local_dir(ref.model))
    if ref.lora is not None:
        ident += "+" + folder_identity(local_dir(ref.lora, what="LoRA adapter"))
    return ident


def read_model_config(folder: Path, ref: str, *, trust_remote_code: bool = False) -> Any:
    """transformers' config of a model folder, read before any weight (custom code: only trusted).

    Raises:
        BadInputError: custom code without `trust_remote_code`, a LoRA adapter given as a model,
            or an unreadable config.
    """
    from transformers import AutoConfig

    adapter = folder / "adapter_config.json"
    if adapter.is_file() and not (folder / "config.json").is_file():
        try:
            base = json.loads(adapter.read_text()).get("base_model_name_or_path")
        except (OSError, ValueError, AttributeError):
            base = None
        how = (f"`{base}+{ref}` (the base its adapter_config.json names)" if base else
               f"`BASE+{ref}`, BASE the model it was trained on")
        raise BadInputError(f"'{ref}' is a LoRA adapter, not a model: write it as {how}")
    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        if "trust_remote_code" in str(e):
            raise BadInputError(f"'{ref}' needs custom code to load (config.json auto_map): pass "
                                "--trust-remote-code if you trust it") from None
        raise BadInputError(f"cannot read the config of '{ref}': {str(e).splitlines()[0]}") from None


def check_architectures(configs: Mapping[str, Any]) -> None:
    """Refuse models of different architectures, as mergekit does (`get_architecture_info`), before
    any weight is loaded. Models mergekit does not know are left to mergekit.

    Raises:
        BadInputError: one line naming each model's architecture.
    """
    from mergekit.architecture import arch_info_for_config

    archs = []
    for c in configs.values():
        try:
            archs.append(arch_info_for_config(c))
        except (RuntimeError, TypeError):  # no or several `architectures`
            archs.append(None)
    if None not in archs and any(a != archs[0] for a in archs):
        detail = ", ".join(f"{name}: {(c.architectures or ['?'])[0]}" for name, c in configs.items())
        raise BadInputError(f"mismatched models: architecture differs ({detail}); mergekit merges "
                            "models of one architecture")


#: the shape fields models to be merged share; what to do when they differ
SHAPE_FIELDS = {
    "hidden_size": "models of different widths cannot be merged",
    "num_hidden_layers": "merge models of one depth, or pick layer ranges with `slices:`",
    "vocab_size": "set `tokenizer_source: union` (or `base`) so mergekit aligns the vocabularies",
}


def check_compatible(configs: Mapping[str, Any], *, layer: int, fields: Iterable[str]) -> None:
    """Refuse models whose configs differ in a shape field (`SHAPE_FIELDS`), and a `layer` one of
    them lacks, before any weight is loaded.

    Args:
        configs: transformers configs by display name.
        layer: the hidden layer the guard reads (-1: the last).
        fields: the SHAPE_FIELDS to compare.

    Raises:
        BadInputError: one line naming the field, each model's value and what to do.
    """
    texts = {name: c.get_text_config() for name, c in configs.items()}
    for key in fields:
        values = {name: getattr(c, key, None) for name, c in texts.items()}
        if len({v for v in values.values() if v is not None}) > 1:
            detail = ", ".join(f"{name}: {v}" for name, v in values.items())
            raise BadInputError(f"mismatched models: {key} differs ({detail}); {SHAPE_FIELDS[key]}")
    for name, c in texts.items():
        if (n := getattr(c, "num_hidden_layers", None)) is not None:
            try:
                layer_index(layer, n)
            except BadInputError as e:
                raise BadInputError(f"{e} ({name}); guard.layer counts from 0 (embeddings) to "
                                    f"{n}, or from the end with -1") from None


# ---------------------------------------------------------------- cache


def write_lock(folder: Path) -> Any:
    """An inter-process lock on a cache folder. Writers re-read, merge and replace under it, so
    concurrent processes (a multi-process run, two runs at once) lose no update; readers need no
    lock (`atomic_write_bytes` replaces whole files)."""
    from mergekit_collapse._io import cache_lock

    return cache_lock(folder)  # an unwritable cache: one line (CacheError), not an OSError


def read_npz(path: Path, *, warn: bool = True) -> dict[str, np.ndarray] | None:
    """A cache entry's arrays, or None when it is missing or corrupt (a warning says so: recomputed).

    Every member's CRC-32 is checked before loading (`ZipFile.testzip`), so a truncated, emptied or
    bit-flipped entry is never used.
    """
    if not path.exists():
        return None
    try:
        with zipfile.ZipFile(path) as zf:
            if (bad := zf.testzip()) is not None:
                raise ValueError(f"checksum mismatch in {bad}")
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        if warn:
            log.warning("recomputing corrupt cache entry %s (%s)", path, type(e).__name__)
        return None


def probe_key(text: str, chat_template: bool) -> str:
    return hashlib.sha256(f"{int(chat_template)}\0{text}".encode()).hexdigest()[:32]


class VectorCache:
    """Vectors of one (model identity, settings) pair, keyed by probe, in one .npz file."""

    def __init__(self, identity: str, settings: ExtractionSettings, dtype_name: str, root: Path):
        spec = {"v": CACHE_VERSION, "model": identity, "layer": settings.layer,
                "pooling": settings.pooling, "dtype": dtype_name, "max_length": settings.max_length}
        digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
        self.path = root / "hidden_states" / digest[:2] / f"{digest}.npz"
        self.data: dict[str, np.ndarray] = self._read()

    def _read(self, *, warn: bool = True) -> dict[str, np.ndarray]:
        z = read_npz(self.path, warn=warn)
        if z is None:
            return {}
        keys, vectors = z.get("keys"), z.get("vectors")
        if keys is None or vectors is None or keys.ndim != 1 or vectors.ndim != 2 \
                or len(keys) != len(vectors):
            if warn:
                log.warning("recomputing malformed cache entry %s", self.path)
            return {}
        return dict(zip(keys.tolist(), vectors, strict=True))

    def missing(self, keys: Iterable[str]) -> list[str]:
        return [k for k in keys if k not in self.data]

    def update(self, new: dict[str, np.ndarray]) -> None:
        """Add vectors and rewrite the file, keeping what another process wrote since we read it."""
        if not new:
            return
        import io

        with write_lock(self.path.parent):
            self.data = {**self._read(warn=False), **self.data, **new}
            keys = list(self.data)
            buf = io.BytesIO()
            np.savez(buf, keys=np.array(keys), vectors=np.stack([self.data[k] for k in keys]))
            atomic_write_bytes(self.path, buf.getvalue())


# ---------------------------------------------------------------- the forward pass


class _Stop(Exception):
    """Raised by a forward hook to skip the layers after the one we read."""


def layer_index(layer: int, num_layers: int) -> int:
    """Index into HF's hidden_states tuple (0 = embeddings, num_layers = final-norm output)."""
    idx = layer if layer >= 0 else num_layers + 1 + layer
    if not 0 <= idx <= num_layers:
        raise BadInputError(f"layer {layer} is out of range for a model with {num_layers} layers")
    return idx


def _pool(hidden: Any, mask: Any, pooling: str) -> Any:
    import torch

    if pooling == "last":
        last = mask.sum(dim=1) - 1  # right padding: the last real token (where the answer starts)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(dim=1) / m.sum(dim=1)


def _batches(token_ids: list[list[int]], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))  # length-sorted
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def encode(tokenizer: Any, texts: list[str], settings: ExtractionSettings) -> list[list[int]]:
    """Token ids of each probe, chat-templated when asked, truncated to max_length."""
    from mergekit_collapse.guard.probes import format_probes

    formatted = format_probes(texts, tokenizer, settings.chat_template)
    templated = settings.chat_template and bool(getattr(tokenizer, "chat_template", None))
    enc = tokenizer(formatted, add_special_tokens=not templated, truncation=True,
                    max_length=settings.max_length)
    ids = enc["input_ids"]
    if any(len(x) == 0 for x in ids):
        raise BadInputError("a probe tokenises to zero tokens")
    return ids


def shared_prefix_length(token_ids: list[list[int]]) -> int:
    """Length of the probes' longest common token prefix, leaving each probe a token of its own."""
    first, n = token_ids[0], min(len(x) for x in token_ids) - 1
    for x in token_ids[1:]:
        n = next((i for i in range(n) if x[i] != first[i]), n)
    return n


@contextmanager
def _read_layer(body: Any, idx: int, layers: Any, n_layers: int) -> Iterator[list[Any]]:
    """Stop the forward pass after hidden_states[idx] (unless it is the last); yields what the hook
    caught."""
    captured: list[Any] = []
    handle = None
    if idx < n_layers:
        module = body.get_input_embeddings() if idx == 0 else layers[idx - 1]

        def hook(_m: Any, _inp: Any, out: Any) -> None:
            captured.append(out[0] if isinstance(out, tuple) else out)
            raise _Stop

        handle = module.register_forward_hook(hook)
    try:
        yield captured
    finally:
        if handle is not None:
            handle.remove()


def _hidden(body: Any, captured: list[Any], **inputs: Any) -> Any:
    """The hidden states at the layer read: the body's output, or what the hook caught."""
    captured.clear()
    try:
        return body(**inputs).last_hidden_state
    except _Stop:
        return captured[0]


def _padded(rows: list[list[int]], pad_id: int, device: Any) -> tuple[Any, Any]:
    """Right-padded ids and their attention mask."""
    import torch

    ids = torch.full((len(rows), max(map(len, rows))), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, x in enumerate(rows):
        ids[r, : len(x)] = torch.tensor(x)
        mask[r, : len(x)] = 1
    return ids.to(device), mask.to(device)


@dataclass
class _Prefix:
    """The probes' shared prefix, run once: its KV cache (batch 1, per layer; None past the layer
    read) and its hidden states at the layer read, summed (for mean pooling)."""

    length: int
    kv: list[tuple[Any, Any]]
    hidden_sum: Any
    kwarg: str  # the forward's name for the cache: `cache` (transformers 5) or `past_key_values`

    def inputs(self, ids: Any, mask: Any) -> dict[str, Any]:
        """Forward kwargs for a batch of suffixes: the prefix's cache expanded to the batch, the
        mask over prefix + suffix, positions after the prefix."""
        import torch
        from transformers import DynamicCache

        n, width = ids.shape
        cache = DynamicCache(ddp_cache_data=[(k, v) if k is None else
                                             (k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1))
                                             for k, v in self.kv])
        ones = torch.ones((n, self.length), dtype=mask.dtype, device=mask.device)
        positions = torch.arange(self.length, self.length + width, device=ids.device).unsqueeze(0)
        return {"input_ids": ids, "attention_mask": torch.cat([ones, mask], dim=1),
                "position_ids": positions, "use_cache": True, self.kwarg: cache}

    def pool(self, hidden: Any, mask: Any, pooling: str) -> Any:
        """Pool the suffixes' hidden states; `mean` averages over the prefix's tokens too."""
        if pooling == "last":
            return _pool(hidden, mask, pooling)
        m = mask.unsqueeze(-1).float()
        total = (hidden.float() * m).sum(dim=1) + self.hidden_sum.to(hidden.device)
        return total / (m.sum(dim=1) + self.length)


def _run_prefix(body: Any, token_ids: list[list[int]], idx: int, captured: list[Any],
                device: Any) -> _Prefix | None:
    """Run the probes' shared prefix once. None when there is nothing to share or the model's
    cache cannot be reused (sliding-window or linear-attention layers, no cache argument...)."""
    import inspect

    import torch
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    length = shared_prefix_length(token_ids) if len(token_ids) > 1 else 0
    params = inspect.signature(body.forward).parameters
    kwarg = next((k for k in ("cache", "past_key_values") if k in params), None)
    if length == 0 or kwarg is None:
        return None
    ids = torch.tensor([token_ids[0][:length]], device=device)
    try:
        cache = DynamicCache(config=body.config)
        if any(type(layer) is not DynamicLayer for layer in cache.layers):
            return None
        hidden = _hidden(body, captured, input_ids=ids, attention_mask=torch.ones_like(ids),
                         use_cache=True, **{kwarg: cache})
    except (TypeError, ValueError, AttributeError, RuntimeError) as e:  # a cache it cannot take
        log.debug("not sharing the probes' prefix: %s", e)
        return None
    kv = [(layer.keys, layer.values) if layer.is_initialized else (None, None)
          for layer in cache.layers]
    filled = [k for k, _ in kv if k is not None]
    # the layers before the one read must all hold the prefix, once
    if len(filled) < idx or any(k.shape[0] != 1 or k.shape[-2] != length for k in filled):
        return None
    return _Prefix(length, kv, hidden[0].float().sum(dim=0), kwarg)


def forward_pooled(body: Any, token_ids: list[list[int]], settings: ExtractionSettings,
                   pad_id: int, *, share_prefix: bool = True) -> np.ndarray:
    """Run the decoder body on every probe; return pooled vectors (P, d) in float32.

    Intermediate layers stop the forward pass early with a hook on that layer. With
    `share_prefix`, the probes' longest common token prefix (the chat template's opening) runs
    once and its KV cache serves every batch; a model whose cache cannot be reused runs whole.
    """
    return _forward(body, token_ids, settings, pad_id, share_prefix=share_prefix)[0]


def _forward(body: Any, token_ids: list[list[int]], settings: ExtractionSettings, pad_id: int,
             *, share_prefix: bool = True) -> tuple[np.ndarray, int]:
    """forward_pooled, and the number of probe tokens the model computed (padding aside)."""
    import torch

    layers = getattr(body, "layers", None)
    n_layers = len(layers) if layers is not None else body.config.num_hidden_layers
    idx = layer_index(settings.layer, n_layers)
    device = body.get_input_embeddings().weight.device
    out = np.zeros((len(token_ids), 0), dtype=np.float32)
    with _read_layer(body, idx, layers, n_layers) as captured, torch.inference_mode():
        prefix = _run_prefix(body, token_ids, idx, captured, device) if share_prefix else None
        start = prefix.length if prefix is not None else 0
        for batch in _batches(token_ids, settings.batch_size):
            ids, mask = _padded([token_ids[i][start:] for i in batch], pad_id, device)
            if prefix is None:
                hidden = _hidden(body, captured, input_ids=ids, attention_mask=mask, use_cache=False)
                pooled = _pool(hidden, mask, settings.pooling)
            else:
                pooled = prefix.pool(_hidden(body, captured, **prefix.inputs(ids, mask)), mask,
                                     settings.pooling)
            pooled = pooled.float().cpu().numpy()
            if out.shape[1] == 0:
                out = np.zeros((len(token_ids), pooled.shape[1]), dtype=np.float32)
            out[batch] = pooled
    if not np.isfinite(out).all():
        dtype = str(body.get_input_embeddings().weight.dtype).removeprefix("torch.")
        if dtype == "float32":
            raise BadInputError("hidden states contain NaN or inf in float32: the weights hold NaN/inf "
                                "or the model overflows even in float32; check the checkpoint")
        raise BadInputError(f"hidden states contain NaN or inf in {dtype}: the activations overflow "
                            f"{dtype}; rerun in float32 (--dtype float32, under mergekit-yaml "
                            "--guard-dtype float32)")
    return out, start + sum(len(x) - start for x in token_ids)


# ---------------------------------------------------------------- loading


def load_causal_lm(folder: Path, settings: ExtractionSettings, device: str, dtype: Any) -> Any:
    """Load a causal LM with accelerate placement; safetensors only unless allow_pickle.

    On CPU, safetensors weights stored in another dtype are converted a slice at a time
    (`_load_converted`): transformers' loading holds the file's pages and the converted copy at
    once (SmolLM2-135M, float32 file, bfloat16 model: peak RSS 907 MB above Python+torch, 396 MB
    this way, of which 257 MB are the model).
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": settings.trust_remote_code,
                              "low_cpu_mem_usage": True}
    if not settings.allow_pickle:
        kwargs["use_safetensors"] = True
    if device != "cpu":
        kwargs["device_map"] = device if device == "auto" else {"": device}
    try:
        model = _load_converted(folder, settings, dtype) if device == "cpu" else None
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as e:
        raise BadInputError(f"cannot load model from {folder}: {str(e).splitlines()[0]}") from None
    except SafetensorError as e:
        raise BadInputError(f"cannot load model from {folder}: a .safetensors file is truncated or "
                            f"not safetensors ({str(e).splitlines()[0]}); download it again") from None
    return model.eval()


_SLICE_ELEMENTS = 1 << 22  # read at most 16 MB of float32 at once


def _safetensors_files(folder: Path) -> list[Path]:
    """The checkpoint's safetensors files: those its index names, else model.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    return [folder / "model.safetensors"] if (folder / "model.safetensors").exists() else []


def _converted_tensors(path: Path, dtype: Any) -> Iterator[tuple[str, Any]]:
    """The tensors of one safetensors file, in `dtype`. Big ones are read in row slices, the file
    re-opened for each: safetensors maps the file, and mapped pages stay resident until unmapped."""
    import torch
    from safetensors import safe_open

    with safe_open(path, "pt") as fh:
        shapes = {name: fh.get_slice(name).get_shape() for name in fh.keys()}  # noqa: SIM118 - not iterable
    for name, shape in shapes.items():
        out = torch.empty(shape, dtype=dtype)
        if out.numel() <= _SLICE_ELEMENTS:
            with safe_open(path, "pt") as fh:
                out.copy_(fh.get_tensor(name))
        else:
            step = max(1, _SLICE_ELEMENTS * shape[0] // out.numel())
            for start in range(0, shape[0], step):
                with safe_open(path, "pt") as fh:
                    out[start : start + step] = fh.get_slice(name)[start : start + step]
        yield name, out


def _load_converted(folder: Path, settings: ExtractionSettings, dtype: Any) -> Any | None:
    """The model built on the meta device and filled from its safetensors files, converted to
    `dtype` tensor by tensor. None where transformers' loading is needed or as lean: weights
    already in `dtype` (it maps them), quantized or renamed weights, modules kept in float32."""
    import torch
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    files = _safetensors_files(folder)
    stored: set[str] = set()
    for f in files:
        with safe_open(f, "pt") as fh:
            stored |= {fh.get_slice(name).get_dtype() for name in fh.keys()}  # noqa: SIM118
    want = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}.get(dtype)
    if not files or want is None or stored <= {want} or not stored <= {"F32", "BF16", "F16"}:
        return None
    trust = settings.trust_remote_code
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust)
    if getattr(config, "quantization_config", None) is not None:
        return None
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust)
    if model._keep_in_fp32_modules or model._keep_in_fp32_modules_strict:
        return None
    state = {name: t for f in files for name, t in _converted_tensors(f, dtype)}
    unexpected = model.load_state_dict(state, strict=False, assign=True).unexpected_keys
    del state
    model.tie_weights()
    if unexpected or any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        return None  # renamed or fused weights: transformers' loading maps them
    if (folder / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model


#: the files a tokenizer loads from (one of them suffices)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(folder: Path, settings: ExtractionSettings) -> Any:
    """The folder's tokenizer (custom code only when trusted).

    Raises:
        BadInputError: no tokenizer files, or a tokenizer transformers cannot load; one line.
    """
    from transformers import AutoTokenizer

    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise BadInputError(f"{folder} has no tokenizer ({', '.join(TOKENIZER_FILES)}): copy its base "
                            "model's tokenizer files into it")
    try:
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=settings.trust_remote_code)
    except (OSError, ValueError) as e:
        raise BadInputError(f"cannot load the tokenizer of {folder}: {' '.join(str(e).split())[:300]}"
                            ) from None
    return tok


def pad_id(tok: Any) -> int:
    """The tokenizer's padding id: its pad token, else its end-of-sequence token, else 0."""
    for t in (tok.pad_token_id, tok.eos_token_id):
        if t is not None:
            return int(t)
    return 0


# ---------------------------------------------------------------- the public entry point


def extract(models: list[Any], texts: list[str] | tuple[str, ...], settings: ExtractionSettings,
            *, cache_dir: Path | None = None, progress: bool = True,
            labels: Mapping[str, str] | None = None,
            on_model: Callable[[str], None] | None = None) -> Extraction:
    """Pooled hidden states of every model on every probe.

    Args:
        models: mergekit ModelReferences (full models and/or base+LoRA references).
        texts: the probe texts (X).
        settings: layer, pooling, dtype, device, batching, safety switches.
        cache_dir: cache root (default: $MERGEKIT_COLLAPSE_CACHE or ~/.cache/mergekit_collapse).
        progress: show progress, one step per model computed.
        labels: display names by str(model reference), for the progress (default: `display_names`).
        on_model: called with each model's name as it starts (for outer progress displays).

    Returns:
        An Extraction: vectors[str(ref)] is a (P, d) float32 array in the order of `texts`.

    Raises:
        BadInputError: missing or pickle-only weights, mismatched hidden sizes, NaNs, empty probes.
    """
    import torch

    from mergekit_collapse._console import Progress, quiet_third_party
    from mergekit_collapse.guard.report import display_names

    quiet_third_party("transformers")  # our progress is one step per model; no per-tensor bars
    if not texts:
        raise BadInputError("the probe set is empty")
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    dtype_name = str(dtype).removeprefix("torch.")
    root = cache_dir or cache_root()
    keys = [probe_key(t, settings.chat_template) for t in texts]
    position = {k: i for i, k in enumerate(keys)}

    # resolve and validate everything before loading any weights
    plans = []
    for ref in models:
        base_dir = local_dir(ref.model)
        check_weights(base_dir, str(ref.model), allow_pickle=settings.allow_pickle)
        lora_dir = local_dir(ref.lora, what="LoRA adapter") if ref.lora is not None else None
        if lora_dir is not None:
            check_weights(lora_dir, str(ref.lora), allow_pickle=settings.allow_pickle)
        cache = VectorCache(model_identity(ref), settings, dtype_name, root)
        plans.append((ref, base_dir, lora_dir, cache, list(dict.fromkeys(cache.missing(keys)))))

    result = Extraction(vectors={}, dtype=dtype_name)
    todo = [p for p in plans if p[4]]
    # group adapters by their base folder: load each base once
    groups: dict[Path, list[tuple]] = {}
    for plan in todo:
        groups.setdefault(plan[1].resolve(), []).append(plan)
    names = labels or display_names([str(m) for m in models])
    bar = Progress("hidden states", len(todo), enabled=progress, labels=names)
    for base_dir, group in groups.items():
        tok = load_tokenizer(group[0][1], settings)
        model = load_causal_lm(base_dir, settings, device, dtype)
        peft_model = body = None
        try:
            # the plain base first, before any adapter is injected
            for ref, _, lora_dir, cache, missing in sorted(group, key=lambda p: p[2] is not None):
                if on_model:
                    on_model(str(ref))
                with bar.step(bar.label(str(ref)), note=f"{len(missing)} probes"):
                    if lora_dir is None:
                        body = model.get_decoder()
                    else:
                        peft_model = swap_adapter(model, peft_model, lora_dir)
                        body = peft_model.get_base_model().get_decoder()
                    idx = [position[k] for k in missing]
                    try:
                        ids = encode(tok, [texts[i] for i in idx], settings)
                        vecs, tokens = _forward(body, ids, settings, pad_id(tok))
                    except BadInputError as e:
                        raise BadInputError(f"{names.get(str(ref), str(ref))}: {e}") from None
                    cache.update(dict(zip(missing, vecs, strict=True)))
                    result.tokens_computed += tokens
                    result.tokens_saved += sum(map(len, ids)) - tokens
                    result.computed[str(ref)] = len(missing)
        finally:
            del model, peft_model, body  # all of it, before the next model loads
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    bar.close()
    if result.tokens_computed:
        log.info("hidden states: %d probe tokens computed, %d saved by the shared prefix",
                 result.tokens_computed, result.tokens_saved)

    for ref, _, _, cache, _ in plans:
        result.vectors[str(ref)] = np.stack([cache.data[k] for k in keys]).astype(np.float32)
        result.computed.setdefault(str(ref), 0)
    sizes = {v.shape[1] for v in result.vectors.values()}
    if len(sizes) > 1:
        detail = ", ".join(f"{k}: {v.shape[1]}" for k, v in result.vectors.items())
        raise BadInputError(f"mismatched models: hidden sizes differ ({detail})")
    result.hidden_size = sizes.pop()
    return result


def swap_adapter(model: Any, peft_model: Any, lora_dir: Path) -> Any:
    """Make `lora_dir` the only active adapter on the shared base; drop the previous one."""
    from peft import PeftModel

    name = "a" + hashlib.sha256(str(lora_dir.resolve()).encode()).hexdigest()[:12]
    try:
        if peft_model is None:
            return PeftModel.from_pretrained(model, lora_dir, adapter_name=name, is_trainable=False)
        previous = peft_model.active_adapter
        peft_model.load_adapter(lora_dir, adapter_name=name, is_trainable=False)
        peft_model.set_adapter(name)
        if previous != name:
            peft_model.delete_adapter(previous)
        return peft_model
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        if "size mismatch" in str(e):
            raise BadInputError(f"LoRA adapter {lora_dir} does not fit its base model (size mismatch): "
                                "it was trained on another base; pair it with that one") from None
        raise BadInputError(f"cannot load LoRA adapter {lora_dir}: {str(e).splitlines()[0]}") from None
