"""The model zoo: SmolLM2-135M-Instruct plus one LoRA adapter per procedurally generated task."""

from __future__ import annotations

from pathlib import Path

from mergekit_collapse.zoo.tasks import TASKS

#: Shipped adapters: <ADAPTER_DIR>/<task>/{adapter_config.json, adapter_model.safetensors}
ADAPTER_DIR = Path(__file__).parent / "adapters"

__all__ = ["ADAPTER_DIR", "TASKS"]
