"""The offline demo: the SmolLM2-135M base (`base_model`), its task-adapter zoo (`zoo`), the run."""
