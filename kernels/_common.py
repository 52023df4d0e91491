"""Helpers shared by the Triton kernels of several families (the ground floor: no pydpm.ops here)."""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

_TARGET_PROGRAMS = 8    # aim for this many programs per SM before splitting a batch or spatial loop
# CUDA's limit on the second and third grid dimensions (the first takes 2³¹ − 1): launchers that put a count
# which grows with the input on those axes loop, split the launch or fold the count over both.
MAX_GRID_YZ = 65535


@triton.jit
def acc(v, F64: tl.constexpr):
    """v in the accumulation type: float64 for float64 tensors (F64), float32 otherwise."""
    if F64:
        return v.to(tl.float64)
    else:
        return v.to(tl.float32)


def cdiv(a: int, b: int) -> int:
    """triton.cdiv's value, ⌈a / b⌉, in plain Python: Triton's helpers are ConstexprFunctions, and a call from
    a launcher costs about 1-6 µs of host time (the host-cost profile's "triton JIT" layer), this one 0.1."""
    return (a + b - 1) // b


def next_power_of_2(n: int) -> int:
    """triton.next_power_of_2's value (the smallest power of 2 ≥ n; 0 for 0) in plain Python (see cdiv)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """How many programs fill `device` (8 per SM); 1 under the interpreter, where the fewest run fastest."""
    if device.type != "cuda":
        return 1
    return _TARGET_PROGRAMS * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def channels_last(strides: tuple[int, int, int]) -> bool:
    """Whether `bcs_strides` put a position's channels next to each other in memory."""
    return strides[1] == 1 and strides[2] != 1


def bcs_strides(t: torch.Tensor) -> tuple[int, int, int] | None:
    """Strides (batch, channel, spatial) of t viewed as [B, C, S] with S the flattened dims after the
    first two, or None when those dims do not flatten to one stride (e.g. H and W transposed)."""
    if t.is_contiguous():
        return t.stride(0), t.stride(1), 1
    inner = [(n, st) for n, st in zip(t.shape[2:], t.stride()[2:]) if n != 1]
    for (n_out, st_out), (n_in, st_in) in zip(inner, inner[1:]):
        if st_out != st_in * n_in:
            return None
    return t.stride(0), t.stride(1), inner[-1][1] if inner else 1
