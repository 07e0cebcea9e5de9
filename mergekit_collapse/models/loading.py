"""Models as folders and as loaded modules: where they run (device, dtype), where their files are
(a local folder or a Hub snapshot), whether they are safe to load (safetensors unless pickle is
allowed, custom code only when trusted), and loading them (a causal LM converted a tensor at a
time, its tokenizer, a LoRA adapter swapped on a loaded base).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from mergekit_collapse.errors import (
    BadInputError,
    CollapseError,
    HubError,
    ModelNotFoundError,
    http_status,
)

log = logging.getLogger(__name__)



class LoadSettings(Protocol):
    """What loading a model asks of its caller's settings (an ExtractionSettings has both)."""

    allow_pickle: bool
    trust_remote_code: bool


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


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


def looks_local(path: str) -> bool:
    """A reference that can only be a local path: `./x`, `../x`, `/x`, `~/x`, or more than one `/`
    (Hub ids are `name` or `org/name`)."""
    return path.startswith((".", "/", "~")) or "\\" in path or path.count("/") > 1


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
        return Path(snapshot_download(str(path.path), revision=path.revision,
                                      local_files_only=not fetch,
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
    if (constants.HF_HUB_OFFLINE
            or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}):
        return ModelNotFoundError(f"{named} is not a local folder nor in the HF cache, and "
                                  "HF_HUB_OFFLINE is set: check the path, or download it first")
    status = http_status(exc)
    if isinstance(exc, GatedRepoError):
        return HubError(f"{named} is a gated Hub repository (HTTP {status}): accept its terms on "
                        "the Hub and log in (`hf auth login` or HF_TOKEN)", status=status)
    if isinstance(exc, RepositoryNotFoundError | RevisionNotFoundError):
        missing = "revision" if isinstance(exc, RevisionNotFoundError) else "repository"
        return ModelNotFoundError(f"{named} is not a local folder, and the Hub has no such "
                                  f"{missing} (HTTP {status}; a private one needs a login: "
                                  "`hf auth login` or HF_TOKEN): check the path or id")
    if status is not None:
        return HubError(f"{named}: the Hub answered HTTP {status} while fetching it: retry later",
                        status=status)
    root: BaseException = exc
    for _ in range(8):  # the transport error under the client's wrappers
        root = root.__cause__ or root.__context__ or root
    return HubError(f"{named} is not a local folder and the Hub cannot be reached "
                    f"({type(root).__name__}): check the connection or HF_ENDPOINT, or "
                    "download it first")


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
        raise BadInputError(f"cannot read the config of '{ref}': "
                            f"{str(e).splitlines()[0]}") from None


def load_causal_lm(folder: Path, settings: LoadSettings, device: str, dtype: Any) -> Any:
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
                            f"not safetensors ({str(e).splitlines()[0]}); "
                            "download it again") from None
    contiguous_head_input(model)
    return model.eval()


def contiguous_head_input(model: Any) -> None:
    """Hand the output head a contiguous input.

    transformers slices the hidden states before the head (`logits_to_keep`); torch's matmul does
    not fold a sliced 3-D input into one matrix product when the weight is frozen (peft freezes the
    base) and multiplies by a copy of the head per row instead: on CPU in bfloat16 that is 60× the
    product (SmolLM2-135M, 5 prompts: 280 ms against 4.4 ms), half of a LoRA's teacher-forced pass.
    """
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(
            lambda _, args: (args[0].contiguous(), *args[1:]) if args else None)


_SLICE_ELEMENTS = 1 << 22  # read at most 16 MB of float32 at once


def _safetensors_files(folder: Path) -> list[Path]:
    """The checkpoint's safetensors files: those its index names, else model.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    return [folder / "model.safetensors"] if (folder / "model.safetensors").exists() else []


def tensor_shapes(folder: Path) -> dict[str, list[int]]:
    """Every tensor's shape in a model folder's safetensors files, from their headers alone."""
    from safetensors import safe_open

    shapes: dict[str, list[int]] = {}
    for path in _safetensors_files(folder):
        with safe_open(path, "pt") as fh:
            shapes |= {name: fh.get_slice(name).get_shape() for name in fh.keys()}  # noqa: SIM118
    return shapes


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


def _load_converted(folder: Path, settings: LoadSettings, dtype: Any) -> Any | None:
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


def load_tokenizer(folder: Path, settings: LoadSettings) -> Any:
    """The folder's tokenizer (custom code only when trusted).

    Raises:
        BadInputError: no tokenizer files, or a tokenizer transformers cannot load; one line.
    """
    from transformers import AutoTokenizer

    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise BadInputError(f"{folder} has no tokenizer ({', '.join(TOKENIZER_FILES)}): copy its "
                            "base model's tokenizer files into it")
    try:
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=settings.trust_remote_code)
    except (OSError, ValueError) as e:
        raise BadInputError(f"cannot load the tokenizer of {folder}: "
                            f"{' '.join(str(e).split())[:300]}"
                            ) from None
    return tok


def pad_id(tok: Any) -> int:
    """The tokenizer's padding id: its pad token, else its end-of-sequence token, else 0."""
    for t in (tok.pad_token_id, tok.eos_token_id):
        if t is not None:
            return int(t)
    return 0


def swap_adapter(model: Any, peft_model: Any, lora_dir: Path) -> Any:
    """Make `lora_dir` the only active adapter on the shared base; drop the previous one.

    An adapter whose config is the loaded one's (rank, alpha, targets, ...; not DoRA) is copied into
    its slot with peft's `hotswap_adapter`: the same tensors as building its layers anew, in 0.025 s
    instead of 0.18 s (SmolLM2-135M, r = 8 on four projections).
    """
    from peft import PeftConfig, PeftModel
    from peft.utils.hotswap import hotswap_adapter

    name = "a" + hashlib.sha256(str(lora_dir.resolve()).encode()).hexdigest()[:12]
    try:
        if peft_model is None:
            return PeftModel.from_pretrained(model, lora_dir, adapter_name=name, is_trainable=False)
        if _same_adapter_shape(peft_model, PeftConfig.from_pretrained(lora_dir), lora_dir):
            hotswap_adapter(peft_model, str(lora_dir), peft_model.active_adapter,
                            torch_device=str(model.get_input_embeddings().weight.device))
            return peft_model
        previous = peft_model.active_adapter
        peft_model.load_adapter(lora_dir, adapter_name=name, is_trainable=False)
        peft_model.set_adapter(name)
        if previous != name:
            peft_model.delete_adapter(previous)
        return peft_model
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        if "size mismatch" in str(e):
            raise BadInputError(f"LoRA adapter {lora_dir} does not fit its base model "
                                "(size mismatch): it was trained on another base; "
                                "pair it with that one") from None
        raise BadInputError(f"cannot load LoRA adapter {lora_dir}: "
                            f"{str(e).splitlines()[0]}") from None


#: config fields that say where an adapter came from, not what it computes
_ADAPTER_PROVENANCE = ("base_model_name_or_path", "revision", "inference_mode", "peft_version")


def _same_adapter_shape(peft_model: Any, config: Any, lora_dir: Path) -> bool:
    """Whether the adapter in `lora_dir` (its `config`) computes as the loaded one does but for its
    weights: the same LoRA config apart from where it came from, and tensors of the same shapes
    (an adapter of another base's width has the same config; peft's loading names the mismatch).
    DoRA's magnitudes are left to peft's own loading."""
    from safetensors import safe_open

    one, two = ({k: v for k, v in c.to_dict().items() if k not in _ADAPTER_PROVENANCE}
                for c in (peft_model.active_peft_config, config))
    weights = lora_dir / "adapter_model.safetensors"
    if one != two or one.get("peft_type") != "LORA" or one.get("use_dora") or \
            not weights.is_file():
        return False
    with safe_open(weights, "pt") as fh:
        new = sorted(tuple(fh.get_slice(k).get_shape()) for k in fh.keys())  # noqa: SIM118
    slot = f".{peft_model.active_adapter}."
    return new == sorted(tuple(p.shape) for n, p in peft_model.named_parameters()
                         if "lora_" in n and slot in n)


def release(*alive: weakref.ref) -> None:
    """After the last references to models were dropped: collect garbage only if one of them
    (`alive`: weak references taken before) survived reference counting, as a model in a reference
    cycle would (a full collection costs ~0.2 s once transformers is imported, and models are
    freed without one); then return the GPU's cached blocks."""
    import gc

    import torch

    if any(ref() is not None for ref in alive):
        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

