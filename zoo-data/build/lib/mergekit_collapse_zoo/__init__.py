"""The task zoos' data: LoRA adapters (`adapters/`, `adapters_gemma3/`), task data (`data/`) and
lm-eval scores (`scores.json`, `scores_gemma3.json`), read by `mergekit_collapse.demo.zoo`."""

from pathlib import Path

#: Where the zoos' files lie
ROOT = Path(__file__).parent
