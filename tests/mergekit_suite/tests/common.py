# Test helpers for MergeKit's own test suite (mergekit 0.1.5).
#
# The mergekit 0.1.5 sdist ships tests/ without tests/common.py, which every merge test imports.
# This is a reconstruction written for mergekit-collapse from how the tests call it (the names,
# arguments and return values they use); it is not MergeKit's own file. See ../README.md.
#
# Like the tests beside it, it is offered under the GNU Lesser General Public License v3.0
# (../LICENSE), the license of MergeKit.
"""Tiny random models and a merge-and-check runner for MergeKit's tests."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from mergekit.architecture import arch_info_for_config, get_architecture_info
from mergekit.config import MergeConfiguration
from mergekit.io import LazyTensorLoader
from mergekit.io.lazy_tensor_loader import ShardedTensorIndex
from mergekit.merge import run_merge
from mergekit.options import MergeOptions


def _save(model, path) -> str:
    model.save_pretrained(path, safe_serialization=True)
    return str(path)


def make_picollama(path, vocab_size: int = 64) -> str:
    """A 2-layer, 32-wide random LlamaForCausalLM saved as one model.safetensors in `path`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48,
                      num_attention_heads=16, num_hidden_layers=2)
    return _save(LlamaForCausalLM(cfg), path)


def make_picogranite(path, vocab_size: int = 64) -> str:
    """A 2-layer, 32-wide random GraniteForCausalLM."""
    from transformers import GraniteConfig, GraniteForCausalLM

    cfg = GraniteConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48,
                        num_attention_heads=16, num_key_value_heads=16, num_hidden_layers=2)
    return _save(GraniteForCausalLM(cfg), path)


def make_gpt2size(path) -> str:
    """A random GPT-2 of the real size (12 layers, 768 wide, 50257 tokens)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_ctx=1024, n_positions=1024, n_embd=768, n_head=12, n_layer=12,
                     vocab_size=50257)
    return _save(GPT2LMHeadModel(cfg), path)


def make_picoLlaVa(path) -> str:  # noqa: N802 - the name the tests import
    """A tiny random LLaVA: a 2-layer CLIP vision tower and a 2-layer Llama text model (a
    multi-module model, merged with an inferred architecture)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(image_size=32, patch_size=4, num_hidden_layers=2,
                              num_attention_heads=2, hidden_size=64, intermediate_size=128)
    text = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                       num_attention_heads=16, num_hidden_layers=2)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_seq_length=16)
    return _save(LlavaForConditionalGeneration(cfg), path)


def run_and_check_merge(config: MergeConfiguration, check_nan: bool = True,
                        check_tensors: bool = True,
                        validate: Callable[[str], None] | None = None,
                        index_json_name: str | None = None, auto_arch: bool = False) -> None:
    """Run the merge into a temporary folder and check what it wrote.

    Checks: a model (a safetensors index, or a single safetensors file) and a config.json were
    written; no output tensor holds NaN (`check_nan`); every non-optional weight of the
    architecture is present (`check_tensors`; the architecture inferred from the inputs when
    `auto_arch`, else the output config's known one); then `validate(output_folder)`.
    """
    index_name = index_json_name or "model.safetensors.index.json"
    with tempfile.TemporaryDirectory() as out:
        run_merge(config, out_path=out, options=MergeOptions())
        index_path = Path(out) / index_name
        single = Path(out) / index_name.replace(".index.json", "")
        assert index_path.exists() or single.exists(), "the merge wrote no model"
        assert os.path.exists(os.path.join(out, "config.json")), "the merge wrote no config.json"

        if check_nan:
            loader = LazyTensorLoader.from_disk(out, lazy_unpickle=False)
            for name in sorted(loader.index.tensor_paths):
                assert not loader.get_tensor(name).isnan().any(), f"{name} contains NaN"

        if check_tensors:
            from transformers import AutoConfig

            model_config = AutoConfig.from_pretrained(out)
            arch = (get_architecture_info(config, MergeOptions()) if auto_arch
                    else arch_info_for_config(model_config))
            written = ShardedTensorIndex.from_disk(out).tensor_paths
            for weight in arch.all_weights(model_config):
                if weight.optional:
                    continue
                names = [weight.name, *(weight.aliases or ())]
                assert any(n in written for n in names), f"the merge left out {weight.name}"

        if validate is not None:
            validate(out)
