"""pydpm: fused kernels and samplers for diffusion probabilistic models.

`pydpm.ops` holds the fused ops (each with a PyTorch reference, CUDA / Triton / CPU backends and
torch.library registration); `pydpm.info()` says what this build and machine can run.
"""
from __future__ import annotations

__version__ = "0.1.0"

from pydpm import ops  # noqa: E402  (registers the ops with torch.library)
from pydpm import schedules, samplers  # noqa: E402
from pydpm.cli import info  # noqa: E402
from pydpm.samplers import sample  # noqa: E402

__all__ = ["__version__", "info", "ops", "sample", "samplers", "schedules"]
