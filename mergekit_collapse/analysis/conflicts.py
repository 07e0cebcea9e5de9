"""Parameter-conflict metrics of the paper (Eqs. 4–7), streamed tensor by tensor from safetensors.

The paper's baseline predictors of merging collapse (section 2, "Parameter update conflicts";
appendix A, Eqs. 4–7), computed pairwise over task vectors ``τ_i = θ_i − θ_base``:

* **magnitude change ratio** (Eq. 4): ``||θ_i − θ_j||₁ / (||τ_i||₁ + ||τ_j||₁)``
  (``θ_i − θ_j = τ_i − τ_j``);
* **sign change ratio** (Eq. 5): ``#[sign(τ_i) ≠ sign(τ_j)] / #positions``;
* **conflicting magnitude ratio** (Eq. 6):
  ``||(θ_i − θ_j)[sign(τ_i) ≠ sign(τ_j)]||₁ / (||τ_i||₁ + ||τ_j||₁)``;
* **average cosine similarity** (Eq. 7):
  ``Average_{τ_i, τ_j ∈ θ_i, θ_j} τ_i·τ_j / (||τ_i||₂ ||τ_j||₂)``.

Decisions (where the paper's text leaves room):

* **Eq. 7 is averaged per tensor.** The paper writes the average *over* the pairs of
  corresponding task-vector pieces ``τ_i, τ_j ∈ θ_i, θ_j`` ("average cosine similarity between
  two model's parameter vectors"); a single flattened vector would need no "Average". So
  ``cosine_similarity`` is the unweighted mean over parameter tensors of the per-tensor cosine,
  over the tensors where both task vectors are non-zero (elsewhere the cosine is undefined).
  The cosine of the whole flattened vectors is reported beside it as ``cosine_similarity_flat``.
* ``sign`` is the ordinary sign with ``sign(0) = 0``: a position one model changed and the other
  did not counts as a sign change (the literal Eq. 5). With this, Eq. 6's numerator equals
  ``Σ_{sign differs} (|τ_i| + |τ_j|)``, which is how it is accumulated.
* The positions of a pair are the union of the tensors on which either task vector is defined:
  every tensor of a full fine-tune, the adapted modules of a LoRA (``τ = 0`` on the rest).
  A LoRA's τ for a module is ``scaling · B @ A`` (peft's ``get_delta_weight``), with
  ``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA, ``rank_pattern`` /
  ``alpha_pattern`` honoured); it needs only the adapter file (and the base's safetensors header,
  to check names and shapes), never the base weights.
* Undefined values (a zero denominator, no tensor with both task vectors non-zero) are ``None``.

Streaming: one pass over the tensor names; for each tensor, row blocks of at most
``chunk_elements`` elements are read from every model that defines it (``safe_open`` slices,
so no model is ever loaded whole) and all pairs are updated at once from the stacked block
(Gram matrix, sign-indicator products, ``torch.cdist(p=1)``). N models cost one read of each
tensor, not N².
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from mergekit_collapse.errors import BadInputError
from mergekit_collapse.models.loading import local_dir

if TYPE_CHECKING:
    import torch
    from peft import LoraConfig

#: metric field name -> (paper equation, one-line meaning)
METRICS: dict[str, str] = {
    "magnitude_change_ratio": "Eq. 4: ||θi−θj||₁ / (||τi||₁+||τj||₁)",
    "sign_change_ratio": "Eq. 5: #[sign τi ≠ sign τj] / #positions",
    "conflicting_magnitude_ratio": "Eq. 6: ||(θi−θj)[sign differs]||₁ / (||τi||₁+||τj||₁)",
    "cosine_similarity": "Eq. 7: mean over tensors of cos(τi, τj)",
    "cosine_similarity_flat": "cos(τi, τj) of the whole flattened task vectors (not in the paper)",
}

_PEFT_PREFIXES = ("base_model.model.", "base_model.")
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}

Matrix = list[list[float | None]]


class ConflictReport(BaseModel):
    """Pairwise parameter-conflict metrics (Eqs. 4–7): one N×N matrix per metric, rows in `names` order."""  # noqa: E501 - pydantic puts this docstring in the JSON Schema

    names: list[str] = Field(description="the model references, in input order")
    base: str | None = Field(description="the base model the task vectors are taken against")
    magnitude_change_ratio: Matrix = Field(description=METRICS["magnitude_change_ratio"])
    sign_change_ratio: Matrix = Field(description=METRICS["sign_change_ratio"])
    conflicting_magnitude_ratio: Matrix = Field(description=METRICS["conflicting_magnitude_ratio"])
    cosine_similarity: Matrix = Field(description=METRICS["cosine_similarity"])
    cosine_similarity_flat: Matrix = Field(description=METRICS["cosine_similarity_flat"])
    positions: list[list[int]] = Field(description="parameter positions compared for each pair")
    tensors: int = Field(description="parameter tensors read (each once per model defining it)")
    notes: list[str] = Field(default_factory=list)

    def metric(self, name: str) -> Matrix:
        """One metric's matrix by field name (a key of `METRICS`).

        Raises:
            KeyError: unknown metric name.
        """
        if name not in METRICS:
            raise KeyError(f"unknown conflict metric '{name}'; one of {sorted(METRICS)}")
        return getattr(self, name)

    def to_text(self, digits: int = 4) -> str:
        """A plain-text rendering: one labelled matrix per metric (tabulate), "—" where
        undefined."""
        from tabulate import tabulate

        labels = [f"[{i}]" for i in range(len(self.names))]
        lines = [f"base: {self.base}"] + [f"{lab} {n}"
                                          for lab, n in zip(labels, self.names, strict=True)]
        for name, meaning in METRICS.items():
            rows = [[lab, *row] for lab, row in zip(labels, self.metric(name), strict=True)]
            lines += ["", f"{name} ({meaning})",
                      tabulate(rows, headers=["", *labels], tablefmt="plain",
                               floatfmt=f".{digits}f", numalign="right", missingval="—")]
        for note in self.notes:
            lines += ["", f"note: {note}"]
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Weight sources
# ---------------------------------------------------------------------------------------------


def _float_dtype(name: str) -> bool:
    return name in _FLOAT_DTYPES


class WeightDir:
    """The tensors of one model folder, read one row block at a time (safetensors, maybe sharded).

    Args:
        path: a local model folder with `model.safetensors`, sharded safetensors with
            `model.safetensors.index.json`, or (only with `allow_pickle`) `pytorch_model*.bin`.
        allow_pickle: accept pickle-only weights; they are loaded whole with
            `torch.load(weights_only=True)`, so nothing is streamed for them.
        files: read exactly these safetensors files of the folder (e.g. an adapter's).
        pickle_files: read exactly these pickled files (still only with `allow_pickle`).

    Raises:
        BadInputError: the folder is missing, has no weights, or only pickled weights without
            `allow_pickle`.
    """

    def __init__(self, path: str | Path, *, allow_pickle: bool = False,
                 files: Sequence[str] | None = None, pickle_files: Sequence[str] | None = None):
        self.path = Path(path)
        if not self.path.is_dir():
            raise BadInputError(f"model folder not found: {self.path}")
        self._pickled: dict[str, torch.Tensor] | None = None
        self._handles: dict[Path, Any] = {}
        self._where: dict[str, Path] = {}
        self._shape: dict[str, tuple[int, ...]] = {}
        self._dtype: dict[str, str] = {}
        names = [] if pickle_files is not None else \
            list(files) if files is not None else self._safetensors_files()
        if names:
            self._index_safetensors([self.path / n for n in names])
            return
        # HF's pickled weight names only (training_args.bin and the like are not weights)
        bins = list(pickle_files) if pickle_files is not None else \
            sorted(p.name for p in self.path.glob("pytorch_model*.bin"))
        if not bins:
            raise BadInputError(f"{self.path}: no safetensors (or pytorch_model*.bin) "
                                "weights found")
        if not allow_pickle:
            raise BadInputError(
                f"{self.path}: only pickled weights ({', '.join(bins)}); pickle can run code on "
                "load — convert to safetensors, or pass allow_pickle=True / --allow-pickle")
        self._load_pickled([self.path / b for b in bins])

    def _safetensors_files(self) -> list[str]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            from mergekit.io import ShardedTensorIndex

            try:  # mergekit's own reading of the index's weight_map
                shards = ShardedTensorIndex.from_disk(str(self.path)).shards
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise BadInputError(f"{index}: unreadable shard index ({e})") from None
            return [s.filename for s in shards]
        if (self.path / "model.safetensors").is_file():
            return ["model.safetensors"]
        return sorted(p.name for p in self.path.glob("*.safetensors")
                      if not p.name.startswith("adapter_"))

    def _index_safetensors(self, files: list[Path]) -> None:
        from safetensors import safe_open

        for f in files:
            if not f.is_file():
                raise BadInputError(f"{self.path}: shard {f.name} listed in the index is missing")
            try:
                handle = safe_open(str(f), framework="pt")
            except Exception as e:  # noqa: BLE001 - safetensors raises several error types
                raise BadInputError(f"{f}: not a readable safetensors file ({e})") from None
            keys: list[str] = handle.keys()
            for name in keys:
                sl = handle.get_slice(name)
                self._where[name] = f
                self._shape[name] = tuple(sl.get_shape())
                self._dtype[name] = sl.get_dtype()

    def _load_pickled(self, files: list[Path]) -> None:
        import torch

        self._pickled = {}
        for f in files:
            try:
                sd = torch.load(str(f), map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001
                raise BadInputError(f"{f}: cannot load pickled weights ({e})") from None
            for name, t in sd.items():
                self._pickled[name] = t
                self._shape[name] = tuple(t.shape)
                self._dtype[name] = "F32" if t.is_floating_point() else "I64"

    def release(self) -> None:
        """Drop the open memory maps (their touched pages would otherwise stay resident)."""
        self._handles.clear()

    def float_names(self) -> set[str]:
        """Names of the floating-point tensors (the parameters; integer buffers are skipped)."""
        return {n for n, d in self._dtype.items() if _float_dtype(d)}

    def has(self, name: str) -> bool:
        return name in self._shape

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shape[name]

    def read(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Rows `start:stop` of a tensor (the whole tensor when both are None), as float64.

        Raises:
            BadInputError: the rows hold NaN or inf (a broken checkpoint: every metric would be
                NaN).
        """
        import torch

        if self._pickled is not None:
            t = self._pickled[name]
            if start is not None:
                t = t[start:stop]
        else:
            from safetensors import safe_open

            where = self._where[name]
            handle = self._handles.get(where)
            if handle is None:  # memory-mapped; slices read only the rows asked for
                handle = self._handles[where] = safe_open(str(where), framework="pt")
            sl = handle.get_slice(name)
            t = sl[start:stop] if start is not None else sl[:]
        t = t.to(torch.float64)
        if not torch.isfinite(t).all():
            raise BadInputError(f"{self.path}: tensor {name} holds NaN or inf: the checkpoint is "
                                "broken; re-export or re-download it")
        return t


@dataclass
class _LoraModule:
    # the base tensor this module's delta applies to, e.g. "model.layers.0.q_proj.weight"
    target: str
    a_key: str
    b_key: str
    scaling: float
    kind: str  # "linear" | "linear_t" (fan_in_fan_out) | "embedding"
    shape: tuple[int, ...] = ()


def _lora_config(path: Path) -> LoraConfig:
    """peft's own reading of the adapter's `adapter_config.json`, which must be a LoRA's."""
    from peft import LoraConfig, PeftType

    cfg_path = path / "adapter_config.json"
    if not cfg_path.is_file():  # checked first: peft would look for it on the Hub
        raise BadInputError(f"{path}: no adapter_config.json (not a peft adapter)")
    try:
        cfg = LoraConfig.from_pretrained(str(path))
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise BadInputError(f"{cfg_path}: unreadable ({e})") from None
    if cfg.peft_type != PeftType.LORA:
        raise BadInputError(f"{path}: peft_type {getattr(cfg.peft_type, 'value', cfg.peft_type)} "
                            "is not LoRA")
    return cfg


class LoraAdapter:
    """A peft LoRA adapter folder: its τ per module is `scaling · B @ A`, read without the base.

    Args:
        path: a folder with `adapter_config.json` and `adapter_model.safetensors`.
        allow_pickle: accept an `adapter_model.bin`.

    Raises:
        BadInputError: not a LoRA adapter, DoRA or an unsupported layer type, pickled without
            `allow_pickle`, or inconsistent A/B shapes.
    """

    def __init__(self, path: str | Path, *, allow_pickle: bool = False):
        self.path = Path(path)
        cfg = _lora_config(self.path)
        if cfg.use_dora:
            raise BadInputError(f"{self.path}: DoRA adapters are not supported "
                                "(τ depends on base norms)")
        if (self.path / "adapter_model.safetensors").is_file():
            self.weights = WeightDir(self.path, files=["adapter_model.safetensors"])
        elif (self.path / "adapter_model.bin").is_file():
            self.weights = WeightDir(self.path, allow_pickle=allow_pickle,
                                     pickle_files=["adapter_model.bin"])
        else:
            raise BadInputError(f"{self.path}: no adapter_model.safetensors")
        self.modules: dict[str, _LoraModule] = {}
        #: adapter tensors that replace a base tensor outright (modules_to_save, biases):
        #: τ = W − W_base
        self.replaced: dict[str, str] = {}
        self._ab: tuple[str, torch.Tensor, torch.Tensor] | None = None
        self._parse(cfg)

    def _parse(self, cfg: LoraConfig) -> None:
        rank_pattern, alpha_pattern = cfg.rank_pattern or {}, cfg.alpha_pattern or {}
        pairs: dict[str, dict[str, str]] = {}
        for key in sorted(self.weights._shape):
            stripped = key
            for p in _PEFT_PREFIXES:
                if stripped.startswith(p):
                    stripped = stripped[len(p):]
                    break
            m = re.match(r"(.+)\.(lora_A|lora_B)\.weight$", stripped) or \
                re.match(r"(.+)\.(lora_embedding_A|lora_embedding_B)$", stripped)
            if m:
                pairs.setdefault(m.group(1), {})[m.group(2)] = key
            elif re.search(r"(^|\.)lora_", stripped):
                raise BadInputError(f"{self.path}: unsupported adapter tensor "
                                    f"'{key}' (LoRA bias/DoRA)")
            else:
                self.replaced[stripped] = key
        from peft.utils.other import get_pattern_key

        for module, parts in pairs.items():
            embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
            a_key = parts.get("lora_embedding_A" if embedding else "lora_A")
            b_key = parts.get("lora_embedding_B" if embedding else "lora_B")
            if a_key is None or b_key is None:
                raise BadInputError(f"{self.path}: module '{module}' has only one of LoRA A/B")
            a_shape, b_shape = self.weights.shape(a_key), self.weights.shape(b_key)
            if len(a_shape) != 2 or len(b_shape) != 2:
                raise BadInputError(f"{self.path}: module '{module}' is not a Linear/Embedding "
                                    f"LoRA (A {a_shape}, B {b_shape}); only 2-D LoRA weights "
                                    "are supported")
            if a_shape[0] != b_shape[1]:
                raise BadInputError(f"{self.path}: module '{module}' "
                                    f"A {a_shape} and B {b_shape} disagree")
            # as peft's LoraModel._create_and_replace and LoraLayer.update_layer set them
            r = rank_pattern.get(get_pattern_key(rank_pattern, module), cfg.r)
            alpha = alpha_pattern.get(get_pattern_key(alpha_pattern, module), cfg.lora_alpha)
            scaling = alpha / math.sqrt(r) if cfg.use_rslora else alpha / r
            if embedding or cfg.fan_in_fan_out:
                kind, shape = ("embedding" if embedding else "linear_t"), (a_shape[1], b_shape[0])
            else:
                kind, shape = "linear", (b_shape[0], a_shape[1])
            target = f"{module}.weight"
            self.modules[target] = _LoraModule(target, a_key, b_key, float(scaling), kind, shape)

    def delta(self, target: str, start: int, stop: int) -> torch.Tensor:
        """Rows `start:stop` of `scaling · B @ A` for one module (peft's get_delta_weight),
        float64."""
        m = self.modules[target]
        if self._ab is None or self._ab[0] != target:  # A, B are small: keep the current module's
            self._ab = (target, self.weights.read(m.a_key), self.weights.read(m.b_key))
        a, b = self._ab[1], self._ab[2]
        if m.kind == "linear":
            return m.scaling * (b[start:stop] @ a)
        # (B @ A)ᵀ: embeddings always, Linear layers stored fan-in-first (Conv1D) too
        return m.scaling * (a[:, start:stop].T @ b.T)


# ---------------------------------------------------------------------------------------------
# Model references -> task-vector sources
# ---------------------------------------------------------------------------------------------


def _local_dir(path: str, what: str) -> Path:
    """A local folder or a Hub id already in the local cache; never touches the network."""
    from mergekit.common import ModelPath

    return local_dir(ModelPath(path=path), what=what, fetch=False)


def _as_reference(ref: Any) -> Any:
    from mergekit.common import ModelReference

    if isinstance(ref, ModelReference):
        return ref
    try:
        return ModelReference.model_validate(str(ref))
    except Exception as e:  # noqa: BLE001
        raise BadInputError(f"'{ref}' is not a model reference ({e})") from None


@dataclass
class TaskVectorSource:
    """Where one model's task vector comes from: full weights minus the base, plus a LoRA delta."""

    name: str
    full: WeightDir | None  # None when the model's weights are the base itself
    lora: LoraAdapter | None
    names: set[str] = field(default_factory=set)

    def defines(self, tensor: str) -> bool:
        return tensor in self.names


def resolve_sources(models: Sequence[Any], base: Any, *, allow_pickle: bool = False
                    ) -> tuple[list[TaskVectorSource], WeightDir | None, str, list[str]]:
    """Resolve mergekit model references to task-vector sources (nothing is read but headers).

    Args:
        models: mergekit `ModelReference`s (or their strings, e.g. `"base+path/to/lora"`).
        base: the base model reference; None only when every model is a LoRA on one shared model,
            which is then the base.
        allow_pickle: accept pickle-only weights.

    Returns:
        (sources in input order, the base's weights (only its header read so far; None when no
        model needed it), the base reference as text, notes).

    Raises:
        BadInputError: no base can be found, a folder is missing, or tensor names/shapes disagree.
    """
    refs = [_as_reference(m) for m in models]
    notes: list[str] = []
    base_ref = _base_reference(refs, base, notes)
    base_dir = _local_dir(base_ref.model.path, "base model")
    base_w: WeightDir | None = None

    def base_weights() -> WeightDir:
        nonlocal base_w
        if base_w is None:
            base_w = WeightDir(base_dir, allow_pickle=allow_pickle)
        return base_w

    sources: list[TaskVectorSource] = []
    for ref in refs:
        model_dir = _local_dir(ref.model.path, "model")
        full = None
        names: set[str] = set()
        if model_dir.resolve() != base_dir.resolve():
            full = WeightDir(model_dir, allow_pickle=allow_pickle)
            names |= _check_full(full, base_weights(), ref, base_ref)
        lora = None
        if ref.lora is not None:
            lora = LoraAdapter(_local_dir(ref.lora.path, "LoRA adapter"), allow_pickle=allow_pickle)
            names |= set(lora.modules)
            # the base's header (not its weights) checks that the adapter targets its tensors
            _check_targets(lora, base_weights(), ref, base_ref)
            if lora.replaced:
                bw = base_weights()
                missing = [n for n in lora.replaced if not bw.has(n)]
                if missing:
                    raise BadInputError(f"adapter '{ref.lora}' saves '{missing[0]}', which the "
                                        "base lacks")
                names |= set(lora.replaced)
        sources.append(TaskVectorSource(str(ref), full, lora, names))
    return sources, base_w, str(base_ref), notes


def _base_reference(refs: list[Any], base: Any, notes: list[str]) -> Any:
    """The base reference: the given one, else the one model every LoRA shares (noted)."""
    if base is None:
        bases = {r.model.path for r in refs}
        if len(bases) == 1 and all(r.lora is not None for r in refs):
            base_ref = _as_reference(next(iter(bases)))
            notes.append(f"no base given; using the LoRAs' shared model {base_ref} as base")
        else:
            raise BadInputError("conflict metrics need a base model (task vectors are θ − θ_base): "
                                "set base_model in the config or pass base=")
    else:
        base_ref = _as_reference(base)
    if base_ref.lora is not None:
        raise BadInputError(f"the base model '{base_ref}' cannot carry a LoRA")
    return base_ref


def _check_full(full: WeightDir, bw: WeightDir, ref: Any, base_ref: Any) -> set[str]:
    """A full model's float tensors, which must match the base's in names and shapes."""
    mine, theirs = full.float_names(), bw.float_names()
    if mine != theirs:
        diff = sorted(mine ^ theirs)
        raise BadInputError(f"model '{ref}' and base '{base_ref}' have different tensors "
                            f"(e.g. '{diff[0]}'; {len(diff)} differ)")
    for n in mine:
        if full.shape(n) != bw.shape(n):
            raise BadInputError(f"tensor '{n}': shape {full.shape(n)} in '{ref}' but "
                                f"{bw.shape(n)} in the base")
    return mine


def _check_targets(lora: LoraAdapter, header: WeightDir, ref: Any, base_ref: Any) -> None:
    """Every module the adapter targets is a base tensor of the shape of its τ."""
    for target, mod in lora.modules.items():
        if not header.has(target):
            raise BadInputError(f"adapter '{ref.lora}' targets '{target}', which the base "
                                f"'{base_ref}' does not have")
        if header.shape(target) != mod.shape:
            raise BadInputError(f"adapter '{ref.lora}': τ of '{target}' is {mod.shape}, "
                                f"the base tensor is {header.shape(target)}")


def _shape_of(tensor: str, sources: list[TaskVectorSource],
              base: WeightDir | None) -> tuple[int, ...]:
    shapes = set()
    for s in sources:
        if not s.defines(tensor):
            continue
        if s.full is not None:
            shapes.add(s.full.shape(tensor))
        if s.lora is not None and tensor in s.lora.modules:
            shapes.add(s.lora.modules[tensor].shape)
        if s.lora is not None and tensor in s.lora.replaced:
            shapes.add(s.lora.weights.shape(s.lora.replaced[tensor]))
    if base is not None and base.has(tensor):
        shapes.add(base.shape(tensor))
    if len(shapes) != 1:
        raise BadInputError(f"tensor '{tensor}' has different shapes across models: "
                            f"{sorted(shapes)}")
    return shapes.pop()


def task_vector_rows(source: TaskVectorSource, tensor: str, start: int | None, stop: int | None,
                     base_rows: Any) -> torch.Tensor | None:
    """Rows `start:stop` of one model's τ for one tensor (float64), or None where τ is zero.

    Args:
        source: the model.
        tensor: the parameter name (the base model's name, e.g.
            `model.layers.0.mlp.up_proj.weight`).
        start: first row (None with `stop` None: the whole tensor).
        stop: end row.
        base_rows: a zero-argument callable returning the base's same rows (read at most once).

    Returns:
        τ rows, or None when the model does not define this tensor.
    """
    if not source.defines(tensor):
        return None
    tau = None
    if source.full is not None:
        tau = source.full.read(tensor, start, stop) - base_rows()
    if source.lora is not None:
        lo = source.lora
        if tensor in lo.replaced:
            w = lo.weights.read(lo.replaced[tensor], start, stop) - base_rows()
            tau = w if tau is None else tau + w
        elif tensor in lo.modules:
            rows = lo.modules[tensor].shape[0]
            d = lo.delta(tensor, start or 0, rows if stop is None else stop)
            tau = d if tau is None else tau + d
    return tau


def task_vector(source: TaskVectorSource, base: WeightDir | None,
                tensor: str) -> torch.Tensor | None:
    """One model's whole τ for one tensor (float64), or None where it is zero. For tests and
    tools."""
    return task_vector_rows(source, tensor, None, None,
                            lambda: base.read(tensor) if base is not None else 0.0)


# ---------------------------------------------------------------------------------------------
# Streaming accumulation
# ---------------------------------------------------------------------------------------------


class _Accumulator:
    """Running sums for all pairs: one `update` per row block of one tensor."""

    def __init__(self, n: int):
        import torch

        z = lambda: torch.zeros(n, n, dtype=torch.float64)  # noqa: E731
        self.n = n
        self.l1 = torch.zeros(n, dtype=torch.float64)  # ||τ_i||₁ (over all its tensors)
        self.l1_pair = z()  # Σ over the pair's positions of |τ_i| (τ_i = 0 off its tensors)
        self.diff_l1 = z()  # ||τ_i − τ_j||₁
        self.sign_diff = z()  # #[sign τ_i ≠ sign τ_j]
        self.conflict = z()  # Σ_{sign differs} |τ_i − τ_j|
        self.dot = z()  # flattened Gram matrix
        self.positions = z()
        self.cos_sum = z()
        self.cos_count = z()
        self._tensor_dot = z()

    def start_tensor(self) -> None:
        self._tensor_dot.zero_()

    def update(self, taus: list[torch.Tensor | None], numel: int) -> None:
        import torch

        present = torch.tensor([t is not None for t in taus])
        zeros = None
        rows = []
        for tau in taus:
            if tau is None:
                zeros = zeros if zeros is not None else torch.zeros(numel, dtype=torch.float64)
                rows.append(zeros)
            else:
                rows.append(tau.reshape(-1))
        t = torch.stack(rows)
        pair = (present[:, None] | present[None, :]).to(torch.float64)  # pairs this tensor is in
        a = t.abs()
        sg = torch.sign(t)
        nz = sg.abs()
        l1, nnz = a.sum(1), nz.sum(1)
        both_nz = nz @ nz.T
        # same sign: both zero (numel − nnz_i − nnz_j + both_nz) or both non-zero and equal
        # ((both_nz + sg·sg)/2), all from two products of the sign matrix
        same = numel - nnz[:, None] - nnz[None, :] + both_nz + (both_nz + sg @ sg.T) / 2
        # Σ_{sign same} |τ_i| = Σ τ_i⁺[τ_j>0] + τ_i⁻[τ_j<0] = (|τ_i|·|s_j| + τ_i·s_j) / 2;
        # where signs differ, |τ_i − τ_j| = |τ_i| + |τ_j| (opposite, or one of them zero)
        same_abs = (a @ nz.T + t @ sg.T) / 2
        g = t @ t.T
        self.l1 += l1
        self.l1_pair += pair * l1[:, None]
        self.diff_l1 += pair * torch.cdist(t[None], t[None], p=1)[0]
        self.sign_diff += pair * (numel - same)
        self.conflict += pair * (l1[:, None] + l1[None, :] - same_abs - same_abs.T)
        self.dot += g
        self._tensor_dot += g
        self.positions += pair * numel

    def end_tensor(self) -> None:
        import torch

        norms = torch.sqrt(torch.diagonal(self._tensor_dot))
        ok = (norms[:, None] > 0) & (norms[None, :] > 0)
        denom = torch.where(ok, norms[:, None] * norms[None, :], torch.ones_like(self._tensor_dot))
        cos = torch.where(ok, self._tensor_dot / denom, torch.zeros_like(self._tensor_dot))
        self.cos_sum += cos
        self.cos_count += ok.to(torch.float64)


class _BaseRows:
    """The base's rows for one block, read on first use and shared by every model of the block."""

    def __init__(self, base: WeightDir | None, tensor: str, rows: tuple[int | None, int | None]):
        self.base, self.tensor, self.rows = base, tensor, rows
        self._value: torch.Tensor | None = None

    def __call__(self) -> torch.Tensor:
        if self._value is None:
            if self.base is None:
                raise BadInputError(f"tensor '{self.tensor}' needs the base model's weights")
            self._value = self.base.read(self.tensor, *self.rows)
        return self._value


def _ratio(num: float, den: float) -> float | None:
    return None if den == 0 or not math.isfinite(num / den) else float(num / den)


def _finish(acc: _Accumulator) -> dict[str, Matrix]:
    n = acc.n
    out: dict[str, Matrix] = {k: [[None] * n for _ in range(n)] for k in METRICS}
    norms = [math.sqrt(float(acc.dot[i, i])) for i in range(n)]
    for i in range(n):
        for j in range(n):
            mag = float(acc.l1_pair[i, j] + acc.l1_pair[j, i])
            out["magnitude_change_ratio"][i][j] = _ratio(float(acc.diff_l1[i, j]), mag)
            out["conflicting_magnitude_ratio"][i][j] = _ratio(float(acc.conflict[i, j]), mag)
            out["sign_change_ratio"][i][j] = _ratio(float(acc.sign_diff[i, j]),
                                                    float(acc.positions[i, j]))
            c = float(acc.cos_count[i, j])
            out["cosine_similarity"][i][j] = float(acc.cos_sum[i, j]) / c if c else None
            out["cosine_similarity_flat"][i][j] = _ratio(float(acc.dot[i, j]), norms[i] * norms[j])
    return out


def _load_inputs(config_or_models: Any, base: Any) -> tuple[list[Any], Any]:
    from mergekit_collapse.guard.config import LoadedConfig, load_config

    if (isinstance(config_or_models, (str, Path))
            and Path(config_or_models).suffix in {".yml", ".yaml"}):
        config_or_models = load_config(config_or_models)
    if isinstance(config_or_models, LoadedConfig):
        return list(config_or_models.models), base if base is not None else config_or_models.base
    if isinstance(config_or_models, (str, Path)) or not isinstance(config_or_models, Iterable):
        raise BadInputError(f"expected a config path (.yml), a LoadedConfig or a list of models, "
                            f"got {config_or_models!r}")
    return list(config_or_models), base


def conflict_metrics(config_or_models: Any, *, base: Any = None, allow_pickle: bool = False,
                     chunk_elements: int = 1 << 20) -> ConflictReport:
    """Pairwise parameter-conflict metrics (Eqs. 4–7) of a merge's models, in one streamed pass.

    Every parameter tensor is read once per model that defines it, in row blocks of at most
    `chunk_elements` elements; the base's block is read once and shared. Peak memory is a few
    stacked blocks (≈ 10 · N · chunk_elements · 8 bytes), never a whole model.

    Args:
        config_or_models: a mergekit YAML path, a `LoadedConfig`, or a list of mergekit
            `ModelReference`s / reference strings (`"path"` or `"base_path+lora_path"`).
        base: the base model reference; defaults to the config's `base_model`.
        allow_pickle: accept pickle-only weights (`*.bin`); they are loaded whole.
        chunk_elements: the most elements of one tensor held per model at a time.

    Returns:
        A `ConflictReport` with one N×N matrix per metric (diagonal included).

    Raises:
        BadInputError: fewer than 2 models, no base, missing folders, pickle without
            `allow_pickle`, or tensor names/shapes that disagree.
    """
    import torch

    models, base = _load_inputs(config_or_models, base)
    if len(models) < 2:
        raise BadInputError("conflict metrics compare pairs: need at least 2 models, "
                            f"got {len(models)}")
    if chunk_elements < 1:
        raise BadInputError("chunk_elements must be ≥ 1")
    sources, base_w, base_name, notes = resolve_sources(models, base, allow_pickle=allow_pickle)
    tensors = sorted(set().union(*(s.names for s in sources)))
    acc = _Accumulator(len(sources))
    weight_dirs = [w for s in sources for w in (s.full, s.lora.weights if s.lora else None) if w]
    weight_dirs += [base_w] if base_w is not None else []
    with torch.no_grad():
        for tensor in tensors:
            shape = _shape_of(tensor, sources, base_w)
            rows = shape[0] if shape else 1
            row_numel = math.prod(shape[1:]) if len(shape) > 1 else 1
            step = max(1, chunk_elements // max(row_numel, 1)) if len(shape) > 1 else rows
            acc.start_tensor()
            for start in range(0, rows, step):
                stop = min(rows, start + step)
                sl = (start, stop) if shape else (None, None)
                base_rows = _BaseRows(base_w, tensor, sl)
                taus = [task_vector_rows(s, tensor, *sl, base_rows) for s in sources]
                numel = (stop - start) * row_numel if shape else 1
                acc.update(taus, numel)
            acc.end_tensor()
            for w in weight_dirs:
                w.release()
    mats = _finish(acc)
    positions = [[int(v) for v in row] for row in acc.positions.tolist()]
    return ConflictReport(names=[s.name for s in sources], base=base_name,
                          positions=positions, tensors=len(tensors), notes=notes, **mats)
