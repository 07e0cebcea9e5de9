"""Publishing: the mergeability card (`card`, `templates/`), `.eval_results/` entries
(`eval_results`) and the atomic Hub push (`hub`)."""
