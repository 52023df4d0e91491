"""Benchmark cases of the time-shift pick (`pydpm.ops.time_shift_pick`): per sample, the variance of x, the
nearest of K candidate variances and the chained row index, as the time-shift sampler calls it once per
shifted model call, on every pydpm backend against the eager composition the sampler ran before and
torch.compile of it.

Case (x = [B, ...], K = 21 candidates: a TimeShift window of 10; the row chained with modulus 21, as at an
order-2 step; bytes are the floor of one fused call: x read once, the row read and written):

  time_shift_pick   out = (row mod 21)·21 + argmin_j |Var(x_b) − promised_j|

Shapes: latent diffusion's latents (SD 1.5 at batch 8 in fp16 [8, 4, 64, 64], SDXL at batch 2 [2, 4, 128, 128])
and a pixel-space CIFAR batch [64, 3, 32, 32] in fp32. CUDA `--quick`: the first. CPU: [4, 4, 16, 16] fp32.

Implementations:
  pydpm[triton], pydpm[reference]   `pydpm.ops.time_shift_pick` forced onto each backend.
  eager            the composition: x.reshape(B, -1).float().var(dim=1), the float64 distance to every
                   candidate, argmin, then (row % 21)·21 + pick.
  torch.compile(eager)  the same function under torch.compile (default mode).

Checks: every row against a float64 oracle (the reference on float64 x), exactly: the candidates are 0.02 apart
and every sample's variance at least 0.002 nearer one of them than the next, so no rounding moves a pick.
"""
from __future__ import annotations

import math

import torch

from pydpm.ops import time_shift_pick
from pydpm.ops.time_shift import OP, check_pick, time_shift_pick_reference

from .frequency import COMPILED, EAGER, oracle_of, timed
from .harness import Case, Impl, Inputs, Row, backend_impls, dtype_str, shape_str

CUDA_CASES = (((8, 4, 64, 64), torch.float16), ((2, 4, 128, 128), torch.float16), ((64, 3, 32, 32), torch.float32))
CPU_CASE = ((4, 4, 16, 16), torch.float32)
K = 21
MODULUS = 21

OURS = "pydpm[triton]"
SPEEDUP_TARGET = 3.0      # eager wall time per call against the eager composition


def eager_pick(x: torch.Tensor, promised: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """What the time-shift sampler ran per shifted model call before the fused op (with the row chained)."""
    var = x.reshape(x.shape[0], -1).to(torch.float32 if x.dtype != torch.float64 else x.dtype).var(dim=1)
    pick = (var.double()[:, None] - promised[None, :]).abs().argmin(dim=1)
    return (row % MODULUS) * promised.numel() + pick


def pick_case(shape, dtype, device) -> Case:
    B = shape[0]

    def inputs() -> Inputs:
        promised = torch.linspace(0.8, 1.2, K, dtype=torch.float64, device=device)
        level = 0.812 + 0.02 * torch.randint(0, K - 1, (B,), device=device) + 0.006 * torch.rand(B, device=device)
        z = torch.randn(shape, device=device, dtype=torch.float32)
        dims = tuple(range(1, len(shape)))
        z = (z - z.mean(dim=dims, keepdim=True)) / z.std(dim=dims, keepdim=True)
        x = (z * level.sqrt().reshape(B, *([1] * (len(shape) - 1)))).to(dtype)
        return {"x": x, "promised": promised, "row": torch.randint(0, MODULUS * K, (B,), device=device)}

    def ours(t):
        return time_shift_pick(t["x"], t["promised"], t["row"], MODULUS)

    def eager(t):
        return eager_pick(t["x"], t["promised"], t["row"])

    def reference64(t):
        return time_shift_pick_reference(t["x"], t["promised"], t["row"].long(), MODULUS)

    def make(fn):
        return timed(fn, (), 1, (1.0,))

    impls = backend_impls(OP, lambda t: check_pick(t["x"], t["promised"], t["row"], MODULUS), make(ours)) + [
        Impl(EAGER, lambda: make(eager)),
        Impl(COMPILED, lambda: make(torch.compile(eager))),
    ]
    return Case("time_shift", "time_shift_pick", shape, dtype, device, inputs, oracle_of(reference64, (), 1, (1.0,)),
                impls, nbytes=math.prod(shape) * dtype.itemsize + 16 * B, tolerance=0.0)


def cases(device: torch.device, quick: bool) -> list[Case]:
    if device.type != "cuda":
        return [pick_case(*CPU_CASE, device)]
    return [pick_case(shape, dtype, device) for shape, dtype in (CUDA_CASES[:1] if quick else CUDA_CASES)]


# --------------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------------

def footer(results: list[tuple[Case, list[Row]]]) -> list[str]:
    """The target, read off pydpm[triton]'s rows: eager wall time per call (back-to-back calls, host and device
    together) >= 3x the eager composition's; beside it, torch.compile's and the device times."""
    lines, worst = [], None
    for case, rows in results:
        by = {r.impl: r for r in rows if r.loop_us and not r.note}
        mine, eager, compiled = by.get(OURS), by.get(EAGER), by.get(COMPILED)
        if mine is None or eager is None:
            continue
        ratio = eager.loop_us / mine.loop_us
        worst = ratio if worst is None else min(worst, ratio)
        peer = f", torch.compile {compiled.loop_us:.1f} us" if compiled is not None else ""
        device = (f"; device {mine.median_ms * 1e3:.1f} us against eager's {eager.median_ms * 1e3:.1f} us"
                  if mine.median_ms and eager.median_ms else "")
        lines.append(f"  {shape_str(case.shape)} {dtype_str(case.dtype)}: {mine.loop_us:.1f} us per call against "
                     f"eager's {eager.loop_us:.1f} us ({ratio:.2f}x){peer}{device}")
    if worst is None:
        return [f"time_shift {OURS} >= {SPEEDUP_TARGET:.0f}x eager (wall time per call): not measured in this run "
                f"(no timed {OURS} row: it runs on CUDA only)"]
    verdict = "met" if worst >= SPEEDUP_TARGET else "NOT met"
    return [f"time_shift {OURS} >= {SPEEDUP_TARGET:.0f}x eager (wall time per call): worst {worst:.2f}x ({verdict})",
            *lines]
