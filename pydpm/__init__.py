"""pydpm: fused kernels and samplers for diffusion probabilistic models.

`pydpm.ops` holds the fused ops (each with a PyTorch reference, CUDA / Triton / CPU backends and
torch.library registration); `pydpm.info()` says what this build and machine can run. `pydpm.nn` (modules),
`pydpm.models` (SlimUNet, count_macs), `pydpm.distill` (spectrum-aware distillation) and `pydpm.integrations`
(diffusers) are imported on first access, so `import pydpm` never imports diffusers.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

__version__ = "0.1.0"

from pydpm import ops  # noqa: E402  (registers the ops with torch.library)
from pydpm import schedules, samplers  # noqa: E402
from pydpm.cli import info  # noqa: E402
from pydpm.samplers import sample  # noqa: E402

if TYPE_CHECKING:
    from pydpm import distill, integrations, models, nn

_LAZY = ("distill", "integrations", "models", "nn")

__all__ = ["__version__", "distill", "info", "integrations", "models", "nn", "ops", "sample", "samplers",
           "schedules"]


def __getattr__(name: str) -> ModuleType:
    """`pydpm.nn`, `pydpm.models`, `pydpm.distill` and `pydpm.integrations`, imported on first access (the
    import sets the attribute, so this runs once per module)."""
    if name in _LAZY:
        return importlib.import_module(f"pydpm.{name}")
    raise AttributeError(f"module 'pydpm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
