"""Loading models: what every model the guard loads is given."""

from __future__ import annotations

import torch

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
