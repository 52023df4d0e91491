"""Argument checks shared by the pydpm.nn modules: constructor arguments, and the input a forward receives
(its rank and channel count, checked before any layer runs, so that a wrong input is named with the module
and the channels it was built for instead of surfacing as a raw layer error)."""
from __future__ import annotations

import math
import numbers

import torch

from pydpm.ops._framework import ArgumentTypeError


def positive_int(module: str, name: str, value, *, optional: bool = False) -> int | None:
    """A constructor argument that must be a positive int (None allowed when `optional`)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentTypeError(f"{module}: {name} must be a positive int{' or None' if optional else ''}, got "
                                f"{type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{module}: {name}={value} must be a positive int")
    return int(value)


def real_in(module: str, name: str, value, lo: float, hi: float, *, lo_open: bool = False,
            hi_open: bool = False) -> float:
    """A constructor argument that must be a real number in [lo, hi] (open ends where asked)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{module}: {name} must be a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    ok = math.isfinite(v) or (v == hi == math.inf and not hi_open)
    ok = ok and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"{module}: {name}={value!r} must lie in {interval}")
    return v


def given_iff_built(module: str, name: str, value, setting: str, built, expected: str, *,
                    what: str = "module") -> bool:
    """An optional forward input a module takes exactly when it was built with `setting` (`built` not None):
    refuses it given without the setting or missing with it; returns whether it is there to check further.
    `expected` describes it, e.g. "[B, 8]"."""
    if built is None:
        if value is not None:
            raise ValueError(f"{module}: {name} given but the {what} was built without {setting}; pass {setting} to "
                             f"the constructor or drop {name}")
        return False
    if value is None:
        raise ValueError(f"{module}: built with {setting}={built}: pass {name} {expected}")
    return True


def check_input(module: str, name: str, x, *, dims: int | None, channels: int | None, layout: str,
                channel_dim: int = 1, min_dims: int = 0, unit: str = "channels") -> None:
    """x is a tensor of `dims` dimensions (or at least `min_dims`) with `channels` in dim `channel_dim`;
    `layout` describes the expected shape, e.g. "[B, 4, H, W]"."""
    if not isinstance(x, torch.Tensor):
        raise ArgumentTypeError(f"{module}: {name} must be a torch.Tensor {layout}, got {type(x).__name__}")
    if (dims is not None and x.dim() != dims) or x.dim() < min_dims:
        raise ValueError(f"{module}: {name} has shape {tuple(x.shape)}; this module takes {layout}")
    if channels is not None and x.shape[channel_dim] != channels:
        raise ValueError(f"{module}: {name} has {x.shape[channel_dim]} {unit} (shape {tuple(x.shape)}) but this "
                         f"module was built for {channels}: it takes {layout}")
