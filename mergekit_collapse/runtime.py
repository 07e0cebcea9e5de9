"""How and where the guard runs, as one object: `Runtime`.

Not what the guard decides (those are the `guard:` settings) but where it computes, in what dtype,
with which cache, what it may load and whether it shows progress. `check`, `run_guard`,
`guarded_merge`, `run_pipeline` and `plan` take one; the CLI builds it from its flags
(`cli.options.RuntimeOptions`) and extraction derives its settings from it
(`guard.assess.extraction_settings`).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class Runtime(BaseModel):
    """Device, dtype, cache, what may be loaded, progress: the same for every stage of a run."""

    model_config = ConfigDict(frozen=True)

    device: str = Field(default="auto", description=(
        "auto (accelerate over GPUs, else CPU), cpu, cuda, cuda:1, ..."))
    dtype: str = Field(default="auto", description=(
        "auto (bfloat16 on CUDA and on CPUs that compute in it, else float32), float32, "
        "bfloat16, float16"))
    cache_dir: Path | None = Field(default=None, description=(
        "hidden-state cache (default $MERGEKIT_COLLAPSE_CACHE)"))
    allow_pickle: bool = Field(default=False, description="allow .bin/.pt weights (unsafe)")
    trust_remote_code: bool = Field(default=False, description="allow custom model code")
    progress: bool = Field(default=True, description="progress bars")
