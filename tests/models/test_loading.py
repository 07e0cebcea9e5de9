"""Loading models: what every model the guard loads is given."""

from __future__ import annotations

import torch
from common import make_lora

from mergekit_collapse.guard.forward import ExtractionSettings
from mergekit_collapse.models.loading import load_causal_lm, swap_adapter


def test_the_head_gets_a_contiguous_input_on_a_frozen_lora_model(tiny_zoo):
    """transformers slices the hidden states before the head (`logits_to_keep`); with peft's frozen
    base, torch multiplies such a slice by a copy of the head per row (60x slower in bfloat16 on
    CPU). The loaded model's head is handed a contiguous input, and its logits are unchanged."""
    s = ExtractionSettings(dtype="float32")
    model = swap_adapter(load_causal_lm(tiny_zoo["base"], s, "cpu", torch.float32), None,
                         tiny_zoo["lora1"])
    assert not any(p.requires_grad for p in model.parameters())  # peft froze the base
    seen = []
    model.get_output_embeddings().register_forward_pre_hook(
        lambda _, args: seen.append(args[0].is_contiguous()))
    ids = torch.randint(3, 100, (3, 7), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        kept = model(input_ids=ids, use_cache=False, logits_to_keep=2).logits
        full = model(input_ids=ids, use_cache=False).logits
    assert seen == [True, True]
    torch.testing.assert_close(kept, full[:, -2:], rtol=0, atol=1e-5)


def test_an_adapter_of_the_same_config_is_copied_into_the_slot_and_computes_as_if_loaded_anew(
        tiny_zoo, tmp_path):
    """The next adapter of the loaded one's config (rank, alpha, targets) goes into its slot
    (peft's hotswap): bitwise the logits of a fresh load, in bfloat16; another config (rank 2) is
    loaded anew and replaces the slot."""
    s = ExtractionSettings(dtype="bfloat16")
    other = make_lora(tiny_zoo["base"], tmp_path / "r2", seed=5, r=2)
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(1))

    def logits(model):
        with torch.inference_mode():
            return model(input_ids=ids, use_cache=False).logits

    def fresh(lora):
        return logits(swap_adapter(load_causal_lm(tiny_zoo["base"], s, "cpu", torch.bfloat16),
                                   None, lora))

    base = load_causal_lm(tiny_zoo["base"], s, "cpu", torch.bfloat16)
    model = swap_adapter(base, None, tiny_zoo["lora1"])
    slot = model.active_adapter
    model = swap_adapter(base, model, tiny_zoo["lora2"])
    assert model.active_adapter == slot and list(model.peft_config) == [slot]
    assert torch.equal(logits(model), fresh(tiny_zoo["lora2"]))
    model = swap_adapter(base, model, other)
    assert model.active_adapter != slot and list(model.peft_config) == [model.active_adapter]
    assert torch.equal(logits(model), fresh(other))
    model = swap_adapter(base, model, tiny_zoo["lora3"])  # back to rank 4: anew again
    assert torch.equal(logits(model), fresh(tiny_zoo["lora3"]))
