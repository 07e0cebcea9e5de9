"""The forward pass that turns probes into pooled hidden states: tokenised, batched by length, the
shared prefix (the chat template's opening) run once, stopped after the layer read.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from mergekit_collapse.errors import (
    BadInputError,
)

log = logging.getLogger(__name__)


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


def encode_probes(tokenizer: Any, texts: list[str],
                  settings: ExtractionSettings) -> list[list[int]]:
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
    return run_forward(body, token_ids, settings, pad_id, share_prefix=share_prefix)[0]


def _non_finite(body: Any) -> str:
    """Why the hidden states hold NaN or inf: a weight that holds NaN (named; a cast never makes
    one), a weight that is inf (in the file, or past float16's range once cast), else the
    activations overflow the dtype."""
    import torch

    dtype = str(body.get_input_embeddings().weight.dtype).removeprefix("torch.")
    rerun = "rerun in float32 (--dtype float32, under mergekit-yaml --guard-dtype float32)"
    params = list(body.named_parameters())
    if (nan := next((n for n, p in params if torch.isnan(p).any()), None)) is not None:
        return (f"hidden states contain NaN or inf in {dtype}: the weights hold NaN ({nan}); "
                "check the checkpoint")
    if (inf := next((n for n, p in params if torch.isinf(p).any()), None)) is not None:
        if dtype == "float32":
            return (f"hidden states contain NaN or inf in float32: the weights hold inf ({inf}); "
                    "check the checkpoint")
        return (f"hidden states contain NaN or inf in {dtype}: weight {inf} overflows {dtype}; "
                f"{rerun}")
    if dtype == "float32":
        return ("hidden states contain NaN or inf in float32: the model overflows even in float32; "
                "check the checkpoint")
    return f"hidden states contain NaN or inf in {dtype}: the activations overflow {dtype}; {rerun}"


def run_forward(body: Any, token_ids: list[list[int]], settings: ExtractionSettings, pad_id: int,
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
                hidden = _hidden(body, captured, input_ids=ids, attention_mask=mask,
                                 use_cache=False)
                pooled = _pool(hidden, mask, settings.pooling)
            else:
                pooled = prefix.pool(_hidden(body, captured, **prefix.inputs(ids, mask)), mask,
                                     settings.pooling)
            pooled = pooled.float().cpu().numpy()
            if out.shape[1] == 0:
                out = np.zeros((len(token_ids), pooled.shape[1]), dtype=np.float32)
            out[batch] = pooled
    if not np.isfinite(out).all():
        raise BadInputError(_non_finite(body))
    return out, start + sum(len(x) - start for x in token_ids)
