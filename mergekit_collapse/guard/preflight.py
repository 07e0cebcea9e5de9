"""Before any weight loads: the models' configs read, and the models agree in what merging needs."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from mergekit_collapse.errors import (
    BadInputError,
)
from mergekit_collapse.guard.config import LoadedConfig
from mergekit_collapse.guard.forward import layer_index
from mergekit_collapse.models.loading import local_dir, read_model_config

log = logging.getLogger(__name__)


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
        detail = ", ".join(f"{name}: {(c.architectures or ['?'])[0]}"
                           for name, c in configs.items())
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


def preflight(cfg: LoadedConfig, refs: list[Any], labels: dict[str, str], *,
              trust_remote_code: bool = False) -> None:
    """Before any weight is loaded: every model's config reads (custom code only when trusted), and
    the models agree in architecture, in width, in depth (a `models:` merge) and in vocabulary
    (unless mergekit builds the tokenizer), and have the layer the guard reads.

    Raises:
        BadInputError: a missing model, custom code, mismatched models, a layer out of range.
    """
    configs = {labels.get(str(r), str(r)): read_model_config(
        local_dir(r.model), str(r.model), trust_remote_code=trust_remote_code) for r in refs}
    check_architectures(configs)
    fields = ["hidden_size"]
    if cfg.merge.models:
        fields.append("num_hidden_layers")
    if cfg.merge.tokenizer_source is None and cfg.merge.tokenizer is None:
        fields.append("vocab_size")
    check_compatible(configs, layer=cfg.guard.layer, fields=fields)
