"""Frequency-domain and NAF-block modules: FFParser (MedSegDiff), and NAFNet's LayerNorm2d, SimpleGate,
simplified channel attention and block (the EANet block of EDiffSR), over the fused ops of
`pydpm.ops.ff_parser` and `pydpm.ops.naf`.

Parameter names follow the papers' reference code, so their checkpoints load as they are: NAFBlock holds
norm1, conv1, conv2, sca.1 (the 1×1 convolution after the pooling), conv3, norm2, conv4, conv5, beta and
gamma, as NAFNet's `NAFBlock`; FFParser holds `complex_weight` [C, H, W//2+1, 2] as MedSegDiff's.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pydpm.nn._checks import check_input, positive_int, real_in
from pydpm.ops.ff_parser import ff_parser
from pydpm.ops.naf import simple_gate, simple_gate_sca, simplified_channel_attention


class FFParser(nn.Module):
    """FF-Parser: y = irfft2(rfft2(x, ortho) · W, ortho) with a learnable complex map W per channel.

    Args:
        channels, height, width: the [C, H, W] of the inputs it filters (the map is [C, H, W//2+1]).
        init: "normal" (N(0, 0.02²) entries, as MedSegDiff) or "identity" (W = 1: starts as the identity).

    The map is the real parameter `complex_weight` [C, H, W//2+1, 2] (real and imaginary parts); it may
    stay float32 while x is float16/bfloat16 (the op reads it in float32 and returns x's dtype).
    """

    def __init__(self, channels: int, height: int, width: int, init: str = "normal"):
        super().__init__()
        channels = positive_int("FFParser", "channels", channels)
        height, width = positive_int("FFParser", "height", height), positive_int("FFParser", "width", width)
        if init not in ("normal", "identity"):
            raise ValueError(f"FFParser: init={init!r}; choose 'normal' or 'identity'")
        self.size = (height, width)
        weight = torch.zeros(channels, height, width // 2 + 1, 2)
        if init == "normal":
            weight.normal_(0.0, 0.02)
        else:
            weight[..., 0] = 1.0
        self.complex_weight = nn.Parameter(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        C = self.complex_weight.shape[0]
        check_input("FFParser", "x", x, dims=4, channels=C, layout=f"[B, {C}, {self.size[0]}, {self.size[1]}]")
        if x.dim() != 4 or tuple(x.shape[-2:]) != self.size or x.shape[1] != self.complex_weight.shape[0]:
            raise ValueError(f"FFParser: x has shape {tuple(x.shape)}; this module filters [B, "
                             f"{self.complex_weight.shape[0]}, {self.size[0]}, {self.size[1]}] inputs")
        return ff_parser(x, self.complex_weight)

    def extra_repr(self) -> str:
        return f"channels={self.complex_weight.shape[0]}, size={self.size}"


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of every pixel of [B, C, H, W] (NAFNet's LayerNorm2d), eps 1e-6.

    Runs F.layer_norm on the channels-last view; the output keeps x's layout (contiguous or channels-last).
    """

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        channels = positive_int("LayerNorm2d", "channels", channels)
        eps = real_in("LayerNorm2d", "eps", eps, 0.0, math.inf, lo_open=True, hi_open=True)
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        C = self.weight.shape[0]
        check_input("LayerNorm2d", "x", x, dims=4, channels=C, layout=f"[B, {C}, H, W]")
        y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps).permute(0, 3, 1, 2)
        return y.contiguous(memory_format=_layout(x))


class SimpleGate(nn.Module):
    """NAFNet's SimpleGate: x [B, 2C, ...] → x[:, :C] · x[:, C:] (`pydpm.ops.simple_gate`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return simple_gate(x)


class SimplifiedChannelAttention(nn.Sequential):
    """NAFNet's simplified channel attention, applied: x · conv1x1(avgpool(x)).

    Built as NAFNet's `sca` Sequential (AdaptiveAvgPool2d(1), Conv2d(C, C, 1)) so checkpoints load, but its
    forward returns the attended x (NAFNet writes `x * self.sca(x)`), computed by
    `pydpm.ops.simplified_channel_attention` in two passes.
    """

    def __init__(self, channels: int):
        channels = positive_int("SimplifiedChannelAttention", "channels", channels)
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, channels, 1, bias=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        C = self[1].in_channels
        check_input("SimplifiedChannelAttention", "x", x, dims=None, min_dims=2, channels=C, layout=f"[B, {C}, ...]")
        return simplified_channel_attention(x, self[1].weight, self[1].bias)


def _layout(x: torch.Tensor) -> torch.memory_format:
    channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


def pointwise_conv_residual(x: torch.Tensor, conv: nn.Conv2d, residual: torch.Tensor, gain: torch.Tensor,
                            scale: torch.Tensor | None = None) -> torch.Tensor | None:
    """residual + gain · conv(x · scale[..., None, None]) for a 1×1 `conv`, as one batched GEMM whose
    accumulator starts from the residual: the per-sample channel scale and the per-channel gain go into the
    weights ([B, C_out, C_in], tiny) instead of a pass over x and one over the conv's output.

    x and residual must share a layout (both contiguous, or both channels-last) and a dtype; returns None
    otherwise (the caller runs the unfolded composition). One pass remains for the bias.
    """
    B, C, H, W = x.shape
    Co = conv.out_channels
    fmt = _layout(x)
    if _layout(residual) != fmt or not x.is_contiguous(memory_format=fmt) or \
            not residual.is_contiguous(memory_format=fmt) or residual.dtype != x.dtype:
        return None  # (a float32 residual stream under autocast keeps its eager, float32 addition)
    g = gain.reshape(Co, 1)
    weight = conv.weight.reshape(Co, C) * g
    a = weight.unsqueeze(0) * scale.unsqueeze(1).to(weight.dtype) if scale is not None else weight.expand(B, Co, C)
    a = a.to(x.dtype)
    if fmt == torch.contiguous_format:
        out = torch.baddbmm(residual.reshape(B, Co, H * W), a, x.reshape(B, C, H * W)).view(B, Co, H, W)
    else:  # channels-last memory is [B, H·W, C]: out[b] = residual[b] + x[b] · aᵀ
        x_hwc = x.permute(0, 2, 3, 1).reshape(B, H * W, C)
        res = residual.permute(0, 2, 3, 1).reshape(B, H * W, Co)
        out = torch.baddbmm(res, x_hwc, a.transpose(1, 2)).view(B, H, W, Co).permute(0, 3, 1, 2)
    if conv.bias is not None:
        out = out + (conv.bias * g.reshape(Co)).to(out.dtype).reshape(1, Co, 1, 1)
    return out


class NAFBlock(nn.Module):
    """The NAFNet block (Chen et al., 2022), the EANet block of EDiffSR:

        x = SimpleGate(dwconv3x3(conv1x1(LayerNorm2d(inp))))          c → 2c·dw/2 … → dw_expand·c/2 channels
        x = conv1x1(SCA(x));  y = inp + β · dropout(x)
        x = conv1x1(SimpleGate(conv1x1(LayerNorm2d(y))))              c → ffn_expand·c → ffn_expand·c/2 → c
        out = y + γ · dropout(x)

    with SCA(x) = x · conv1x1(avgpool(x)) and β, γ [1, c, 1, 1] initialised to zero (the block starts as
    the identity). Fused: SimpleGate and SCA's pooling in one pass (`pydpm.ops.simple_gate_sca`); SCA's
    scale, β and the residual folded into conv3 as one batched GEMM per sample, and γ and the residual into
    conv5 (`pointwise_conv_residual`); the second SimpleGate is `pydpm.ops.simple_gate`. The folds need
    dropout inactive (eval, or drop = 0) and x and the residual in one layout; `fold=False` (or the
    attribute) runs the unfolded composition over the same ops. The unfused definition is
    `naf_block_reference`.
    """

    def __init__(self, c: int, dw_expand: int = 2, ffn_expand: int = 2, drop: float = 0.0, fold: bool = True):
        super().__init__()
        c = positive_int("NAFBlock", "c", c)
        dw_expand, ffn_expand = positive_int("NAFBlock", "dw_expand", dw_expand), positive_int("NAFBlock", "ffn_expand",
                                                                                               ffn_expand)
        drop = real_in("NAFBlock", "drop", drop, 0.0, 1.0, hi_open=True)
        dw_channels, ffn_channels = c * dw_expand, c * ffn_expand
        if dw_channels % 2 or ffn_channels % 2:
            raise ValueError(f"NAFBlock: c·dw_expand = {dw_channels} and c·ffn_expand = {ffn_channels} must be even "
                             f"(SimpleGate halves them)")
        self.conv1 = nn.Conv2d(c, dw_channels, 1, bias=True)
        self.conv2 = nn.Conv2d(dw_channels, dw_channels, 3, padding=1, groups=dw_channels, bias=True)
        self.conv3 = nn.Conv2d(dw_channels // 2, c, 1, bias=True)
        self.sca = SimplifiedChannelAttention(dw_channels // 2)
        self.sg = SimpleGate()
        self.conv4 = nn.Conv2d(c, ffn_channels, 1, bias=True)
        self.conv5 = nn.Conv2d(ffn_channels // 2, c, 1, bias=True)
        self.norm1 = LayerNorm2d(c)
        self.norm2 = LayerNorm2d(c)
        self.dropout1 = nn.Dropout(drop) if drop > 0 else nn.Identity()
        self.dropout2 = nn.Dropout(drop) if drop > 0 else nn.Identity()
        self.beta = nn.Parameter(torch.zeros((1, c, 1, 1)))
        self.gamma = nn.Parameter(torch.zeros((1, c, 1, 1)))
        self.fold = fold

    def _folds(self, dropout: nn.Module) -> bool:
        return self.fold and (isinstance(dropout, nn.Identity) or not self.training or dropout.p == 0)

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        C = self.conv1.in_channels
        check_input("NAFBlock", "inp", inp, dims=4, channels=C, layout=f"[B, {C}, H, W]")
        x = self.conv2(self.conv1(self.norm1(inp)))
        g, s = simple_gate_sca(x, self.sca[1].weight, self.sca[1].bias)
        y = pointwise_conv_residual(g, self.conv3, inp, self.beta, s) if self._folds(self.dropout1) else None
        if y is None:
            y = inp + self.dropout1(self.conv3(g * s.reshape(s.shape + (1, 1)))) * self.beta
        x = simple_gate(self.conv4(self.norm2(y)))
        out = pointwise_conv_residual(x, self.conv5, y, self.gamma) if self._folds(self.dropout2) else None
        if out is None:
            out = y + self.dropout2(self.conv5(x)) * self.gamma
        return out


def _layer_norm2d_reference(x: torch.Tensor, norm: LayerNorm2d) -> torch.Tensor:
    mu = x.mean(1, keepdim=True)
    var = (x - mu).pow(2).mean(1, keepdim=True)
    return (x - mu) / (var + norm.eps).sqrt() * norm.weight.reshape(1, -1, 1, 1) + norm.bias.reshape(1, -1, 1, 1)


def _simple_gate_reference(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=1)
    return x1 * x2


def naf_block_reference(block: NAFBlock, inp: torch.Tensor) -> torch.Tensor:
    """NAFNet's block written as in its reference code, in plain PyTorch with `block`'s parameters and
    dropout modules: the unfused definition `NAFBlock` is tested and benchmarked against."""
    x = _layer_norm2d_reference(inp, block.norm1)
    x = block.conv2(block.conv1(x))
    x = _simple_gate_reference(x)
    x = x * block.sca[1](F.adaptive_avg_pool2d(x, 1))
    x = block.dropout1(block.conv3(x))
    y = inp + x * block.beta
    x = block.conv4(_layer_norm2d_reference(y, block.norm2))
    x = block.conv5(_simple_gate_reference(x))
    x = block.dropout2(x)
    return y + x * block.gamma
