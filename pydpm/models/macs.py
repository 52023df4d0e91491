"""Multiply-accumulates of one forward call, counted by torch's FLOP counter."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pydpm.ops import use_backend


def count_macs(model: nn.Module, *inputs: Any, **kwargs: Any) -> int:
    """The multiply-accumulates of `model(*inputs, **kwargs)`, counted on a real forward call (under
    torch.no_grad(); the module's train/eval mode is left as it is).

    torch.utils.flop_counter.FlopCounterMode counts the matrix products torch dispatches: matmul / mm / bmm /
    addmm / baddbmm (linear layers, attention), convolutions and torch's scaled-dot-product attention, at 2
    FLOPs per multiply-accumulate; MACs = FLOPs // 2. Biases, elementwise ops (activations, residual sums,
    the Haar transforms and gating of the wavelet gates), normalisations, softmax, pooling, interpolation
    and embedding lookups are not counted.

    pydpm's ops are forced onto their reference backends ("reference") for the call, so that pydpm's attention
    runs as the matrix products torch counts (QKᵀ and AV) instead of a fused kernel the counter cannot see.
    """
    with use_backend("reference"), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*inputs, **kwargs)
    return counter.get_total_flops() // 2
