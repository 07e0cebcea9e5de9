"""Publishing: the mergeability card (`card`, `templates/`) and the atomic Hub push (`hub`)."""
