"""Benchmark cases of GEGLU: y = a · gelu(b), (a, b) = h.chunk(2, dim=-1), at Stable Diffusion 1.5's
feed-forward shapes, forward and forward+backward, on every pydpm backend against the eager composition and
torch.compile of it.

Cases (h = [B, L, 2D], y = [B, L, D]; N = B·L·D elements of the dtype; bytes are the floor of one fused call:
every input read once, every output written once):

  geglu       y = a · gelu(b)                        bytes: read h 2N, write y N: 3N
  geglu+bwd   (y, dh) given dy                       bytes: 3N + read dy N, h 2N, write dh 2N: 8N

Shapes: the feed-forward of SD 1.5's transformer blocks at batch 2 (classifier-free guidance), widths
D = 4·320, 4·640, 4·1280 over L = 64², 32², 16² latent tokens: h (2,4096,2560), (2,1024,5120), (2,256,10240) in
fp16 (forward), and (2,4096,2560) bf16 forward+backward. CUDA `--quick`: the first and the last forward shape, and
the backward case. CPU: (2,64,320) fp32, forward and forward+backward.

Implementations:
  pydpm[triton], pydpm[reference]   `pydpm.ops.geglu` forced onto each backend. Forward-only rows run under
                   torch.no_grad() (every row does), forward+backward rows through autograd; the backward
                   re-enters the forward's forced backend.
  eager            diffusers' GEGLU after its projection: `a, b = h.chunk(2, dim=-1); a * F.gelu(b)`.
  torch.compile(eager)  the same function under torch.compile (default mode); in forward+backward rows the
                   forward is compiled (AOTAutograd compiles its backward) and autograd.grad runs outside.

Checks: every row against a float64 oracle (the eager composition in float64 on the device): forward rows
compare y; forward+backward rows compare y and dh, flattened together.
"""
from __future__ import annotations

import math
import torch
import torch.nn.functional as F

from pydpm.ops import geglu
from pydpm.ops.geglu import OP, check_geglu

from .frequency import COMPILED, EAGER, _randn, oracle_of, timed
from .harness import Case, Impl, Inputs, Row, backend_impls, op_targets

SD15_SHAPES = ((2, 4096, 2560), (2, 1024, 5120), (2, 256, 10240))
BACKWARD_CASE = ((2, 4096, 2560), torch.bfloat16)
CPU_SHAPE = (2, 64, 320)

OURS = "pydpm[triton]"
BANDWIDTH_TARGET = 0.70   # of the measured copy bandwidth
SPEEDUP_TARGET = 3.0      # device time against eager


def eager_geglu(h: torch.Tensor) -> torch.Tensor:
    """diffusers' GEGLU.forward after self.proj."""
    hidden_states, gate = h.chunk(2, dim=-1)
    return hidden_states * F.gelu(gate)


def geglu_case(shape, dtype, device, backward: bool) -> Case:
    wrt = ("h",) if backward else ()
    scales = (1.0, 1.0)
    out_shape = shape[:-1] + (shape[-1] // 2,)

    def inputs() -> Inputs:
        t = {"h": _randn(shape, device, dtype, grad=backward)}
        if backward:
            t["dy"] = _randn(out_shape, device, dtype)
        return t

    def ours(t):
        return geglu(t["h"])

    def eager(t):
        return eager_geglu(t["h"])

    def make(fn):
        return timed(fn, wrt, 1, scales)

    impls = backend_impls(OP, lambda t: check_geglu(t["h"]), make(ours)) + [
        Impl(EAGER, lambda: make(eager)),
        Impl(COMPILED, lambda: make(torch.compile(eager))),
    ]
    n = math.prod(out_shape) * dtype.itemsize
    return Case("geglu", "geglu+bwd" if backward else "geglu", shape, dtype, device, inputs,
                oracle_of(eager, wrt, 1, scales), impls, nbytes=8 * n if backward else 3 * n)


def cases(device: torch.device, quick: bool) -> list[Case]:
    if device.type != "cuda":
        return [geglu_case(CPU_SHAPE, torch.float32, device, backward) for backward in (False, True)]
    shapes = (SD15_SHAPES[0], SD15_SHAPES[-1]) if quick else SD15_SHAPES
    shape, dtype = BACKWARD_CASE
    return [geglu_case(s, torch.float16, device, backward=False) for s in shapes] + [
        geglu_case(shape, dtype, device, backward=True)]


# --------------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------------

def footer(results: list[tuple[Case, list[Row]]]) -> list[str]:
    """The targets, each read off pydpm[triton]'s rows (the worst case, and every case's value): >= 70% of
    copy bandwidth, >= 3x eager and >= torch.compile(eager) in device time, host cost per call <= eager's."""
    return op_targets(results, "geglu", OURS, EAGER, COMPILED, BANDWIDTH_TARGET, SPEEDUP_TARGET)
