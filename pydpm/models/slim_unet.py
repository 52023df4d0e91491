"""The slim, wavelet-gated UNet of Spectral Diffusion ("Diffusion Probabilistic Model Made Slim", Yang et al.,
CVPR 2023): an LDM / diffusers-style noise-prediction UNet whose down- and up-sampling are the wavelet gates
of `pydpm.nn.wavelet` (fed the timestep embedding), with named feature points for teacher-student distillation.

    model(x [B, C_in, H, W], t [B] or scalar, class_labels [B] = None, context [B, M, D] = None)
        -> eps [B, C_out, H, W]

Layout (diffusers' / LDM's, with `L = len(channel_mult)` levels; level i works at H/2^i):

    sinusoidal(t) -> MLP (4·base_channels) [+ class embedding] -> SiLU = temb, fed to every ResBlock and gate
    conv_in
    down: per level, num_res_blocks × (ResBlock [+ AttentionBlock]); between levels a downsample
    mid: ResBlock, AttentionBlock, ResBlock
    up: per level, deepest first, (num_res_blocks + 1) × (ResBlock on [h, skip] [+ AttentionBlock]); between
        levels an upsample
    GroupNorm, SiLU, conv_out

Downsample / upsample are WaveletGateDown / WaveletGateUp (wavelet_gates=True) or a stride-2 3×3 convolution /
nearest ×2 and a 3×3 convolution (wavelet_gates=False, the ablation and the plain LDM teacher).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from pydpm.nn._checks import check_input, given_iff_built, positive_int, real_in
from pydpm.nn.attention import Attention
from pydpm.nn.wavelet import WaveletGateDown, WaveletGateUp
from pydpm.ops._framework import ArgumentTypeError

_NAME = "SlimUNet"

# The constructor arguments of SlimUNet.preset(name) (public: pydpm.training records them in its checkpoints).
# Teacher: an LDM-style UNet (channels 128·(1, 2, 2, 4), self-attention at 16×16 and 8×8) with plain resampling,
# as the paper's pretrained LDM teachers have. Student: the same layout with every width × 40/128 and the wavelet
# gates; at (1, 3, 32, 32) it costs 0.091 of the teacher's MACs (count_macs: 0.63 G against 6.95 G; 0.104 against
# the teacher with gates, whose resampling costs less than the plain convolutions).
PRESETS: dict[str, dict[str, Any]] = {
    "teacher": dict(base_channels=128, channel_mult=(1, 2, 2, 4), num_res_blocks=2, attention_resolutions=(16, 8),
                    heads=4, groups=32, wavelet_gates=False),
    "student": dict(base_channels=40, channel_mult=(1, 2, 2, 4), num_res_blocks=2, attention_resolutions=(16, 8),
                    heads=4, groups=8, wavelet_gates=True),
}


def _positive(name: str, value: object) -> int:
    return cast(int, positive_int(_NAME, name, value))


def _positive_ints(name: str, value: object) -> tuple[int, ...]:
    """A sequence of positive ints (an empty one allowed: attention_resolutions=() puts attention nowhere)."""
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise ArgumentTypeError(f"{_NAME}: {name} must be a sequence of positive ints, got {type(value).__name__} "
                                f"{value!r}")
    return tuple(_positive(f"{name}[{i}]", v) for i, v in enumerate(value))


class ResBlock(nn.Module):
    """[B, C_in, H, W] -> [B, C_out, H, W]: GroupNorm, SiLU, conv3×3, + a projection of the timestep embedding,
    GroupNorm, SiLU, dropout, conv3×3, plus the input (through a 1×1 convolution when C_in ≠ C_out).

    `temb` [B, temb_dim] arrives already through its SiLU (SlimUNet applies it once for every block)."""

    def __init__(self, in_channels: int, out_channels: int, temb_dim: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(temb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """[B, C, H, W] -> [B, C, H, W]: x + SelfAttention(GroupNorm(x)) over the H·W tokens, then, when built with
    context_dim, h + CrossAttention(GroupNorm(h), context [B, M, context_dim]). `pydpm.nn.Attention` with
    `heads` heads of C // heads channels."""

    def __init__(self, channels: int, heads: int, groups: int, context_dim: int | None):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.attn = Attention(channels, heads=heads)
        self.cross_norm = nn.GroupNorm(groups, channels) if context_dim else None
        self.cross = Attention(channels, heads=heads, context_dim=context_dim) if context_dim else None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        B, C, H, W = x.shape
        h = x + self.attn(self.norm(x).flatten(2).transpose(1, 2)).transpose(1, 2).reshape(B, C, H, W)
        if self.cross is None or self.cross_norm is None:
            return h
        tokens = self.cross_norm(h).flatten(2).transpose(1, 2)
        return h + self.cross(tokens, context).transpose(1, 2).reshape(B, C, H, W)


class _Layer(nn.Module):
    """One step of a path: ResBlock, then the AttentionBlock where the level has one."""

    def __init__(self, res: ResBlock, attn: AttentionBlock | None):
        super().__init__()
        self.res, self.attn = res, attn

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        h = self.res(x, temb)
        return h if self.attn is None else self.attn(h, context)


class _DownLevel(nn.ModuleList):
    """The `_Layer`s of one level on the way down; each output is also kept as a skip for the way up."""

    def forward(self, h: torch.Tensor, temb: torch.Tensor, context: torch.Tensor | None,
                skips: list[torch.Tensor]) -> torch.Tensor:
        for block in self:
            h = block(h, temb, context)
            skips.append(h)
        return h


class _UpLevel(nn.ModuleList):
    """The `_Layer`s of one level on the way up; each takes [h, the latest skip] concatenated on channels."""

    def forward(self, h: torch.Tensor, temb: torch.Tensor, context: torch.Tensor | None,
                skips: list[torch.Tensor]) -> torch.Tensor:
        for block in self:
            h = block(torch.cat([h, skips.pop()], dim=1), temb, context)
        return h


class _ConvDown(nn.Module):
    """[B, C, H, W] -> [B, C, H/2, W/2] by a stride-2 3×3 convolution. Takes temb only to be called like
    WaveletGateDown; it does not use it."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(x)


class _ConvUp(nn.Module):
    """[B, C, H, W] -> [B, C, 2H, 2W]: nearest ×2, then a 3×3 convolution. temb unused, as in `_ConvDown`."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class SlimUNet(nn.Module):
    """Noise-prediction UNet with wavelet-gated resampling (Spectral Diffusion); see the module docstring for
    the layout. forward(x [B, in_channels, H, W], t, class_labels=None, context=None) -> [B, out_channels, H, W].

    Args (keyword):
        in_channels, out_channels (default in_channels).
        sample_size: the H = W the model is built for; attention_resolutions refer to it. It (and every input's
            H and W) must be divisible by 2**(len(channel_mult) - 1).
        base_channels, channel_mult: level i has base_channels · channel_mult[i] channels.
        num_res_blocks: ResBlocks per level on the way down (num_res_blocks + 1 on the way up).
        attention_resolutions: feature-map sizes (sample_size / 2**i) whose levels get an AttentionBlock after
            every ResBlock; each must be the size of some level. The middle always has one.
        heads: attention heads per AttentionBlock, each of width // heads channels (heads must divide the width
            of every level that has attention).
        dropout: in every ResBlock, in [0, 1).
        num_classes: class conditioning: an embedding of class_labels [B] (ints in [0, num_classes)) added to the
            timestep embedding; forward then requires class_labels.
        context_dim: cross-attention on context [B, M, context_dim] in every AttentionBlock; forward then
            requires context.
        groups: GroupNorm groups; must divide base_channels and every level's width.
        wavelet_gates: WaveletGateDown / WaveletGateUp (gates fed the timestep embedding) between levels; False:
            stride-2 convolution down, nearest ×2 and convolution up.

    Bad arguments raise a ValueError (a TypeError that is also a ValueError for a wrong type) naming SlimUNet and
    the argument; so do bad inputs to forward, naming the input and the shape expected.

    t: timesteps as a [B] tensor (int or float; the embedding takes them as float32) or a scalar (a 0-dim tensor
    or a Python number) used for the whole batch.

    Distillation: `feature_points()` names modules whose outputs are matched between a teacher and a student,
    `feature_channels()` their channel counts; see those. `SlimUNet.preset("teacher" | "student", **overrides)`
    builds the paper's pair.
    """

    freqs: torch.Tensor  # the sinusoidal embedding's frequencies [base_channels // 2], a buffer

    def __init__(self, *, in_channels: int = 4, out_channels: int | None = None, sample_size: int = 32,
                 base_channels: int = 128, channel_mult: Sequence[int] = (1, 2, 2, 4), num_res_blocks: int = 2,
                 attention_resolutions: Sequence[int] = (16, 8), heads: int = 4, dropout: float = 0.0,
                 num_classes: int | None = None, context_dim: int | None = None, groups: int = 32,
                 wavelet_gates: bool = True):
        super().__init__()
        in_channels = _positive("in_channels", in_channels)
        out_channels = _positive("out_channels", in_channels if out_channels is None else out_channels)
        sample_size = _positive("sample_size", sample_size)
        base = _positive("base_channels", base_channels)
        mults = _positive_ints("channel_mult", channel_mult)
        if not mults:
            raise ValueError(f"{_NAME}: channel_mult=() has no levels; pass at least one multiplier, e.g. (1, 2)")
        num_res_blocks = _positive("num_res_blocks", num_res_blocks)
        attn_res = set(_positive_ints("attention_resolutions", attention_resolutions))
        heads = _positive("heads", heads)
        dropout = real_in(_NAME, "dropout", dropout, 0.0, 1.0, hi_open=True)
        num_classes = positive_int(_NAME, "num_classes", num_classes, optional=True)
        context_dim = positive_int(_NAME, "context_dim", context_dim, optional=True)
        groups = _positive("groups", groups)
        if not isinstance(wavelet_gates, bool):
            raise ArgumentTypeError(f"{_NAME}: wavelet_gates must be a bool, got {type(wavelet_gates).__name__}")

        levels = len(mults)
        factor = 2 ** (levels - 1)
        if sample_size % factor:
            raise ValueError(f"{_NAME}: sample_size={sample_size} must be divisible by 2**(len(channel_mult) - 1) = "
                             f"{factor} ({levels} levels halve it {levels - 1} times)")
        sizes = [sample_size // 2 ** i for i in range(levels)]
        missing = sorted(attn_res - set(sizes))
        if missing:
            raise ValueError(f"{_NAME}: attention_resolutions={tuple(attention_resolutions)} names {missing}, but the "
                             f"levels work at sizes {sizes} (sample_size={sample_size}); pick from those")
        widths = [base * m for m in mults]
        failing = [w for w in sorted({base, *widths}) if w % groups]
        if failing:
            fits = max(g for g in range(1, groups) if base % g == 0)
            raise ValueError(f"{_NAME}: groups={groups} does not divide the widths {failing} (base_channels={base}, "
                             f"the output of conv_in, times channel_mult={mults}); GroupNorm needs groups dividing "
                             f"every width: pick a divisor of base_channels, e.g. groups={fits}")
        for i, width in enumerate(widths):
            if (sizes[i] in attn_res or i == levels - 1) and width % heads:
                raise ValueError(f"{_NAME}: heads={heads} does not divide the width {width} of level {i}, which has "
                                 f"attention; pick heads dividing it")

        self.in_channels, self.out_channels, self.sample_size = in_channels, out_channels, sample_size
        self.num_classes, self.context_dim, self.wavelet_gates = num_classes, context_dim, wavelet_gates
        self.widths = tuple(widths)
        self._factor = factor
        temb_dim = 4 * base

        # cos/sin at base_channels // 2 frequencies, 1 down to 1/10000 (diffusers' flip_sin_to_cos=True, shift 0)
        half = max(base // 2, 1)
        self.register_buffer("freqs", torch.exp(-math.log(10000.0) * torch.arange(half) / half), persistent=False)
        self.time_mlp = nn.Sequential(nn.Linear(2 * half, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.class_embedding = nn.Embedding(num_classes, temb_dim) if num_classes else None

        def layer(c_in: int, c_out: int, size: int) -> _Layer:
            attn = AttentionBlock(c_out, heads, groups, context_dim) if size in attn_res else None
            return _Layer(ResBlock(c_in, c_out, temb_dim, dropout, groups), attn)

        def down(c: int) -> nn.Module:
            return WaveletGateDown(c, temb_dim=temb_dim) if wavelet_gates else _ConvDown(c)

        def up(c: int) -> nn.Module:
            return WaveletGateUp(c, temb_dim=temb_dim) if wavelet_gates else _ConvUp(c)

        self.conv_in = nn.Conv2d(in_channels, base, 3, padding=1)
        skip_channels, ch = [base], base
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()                     # downsample[i]: level i -> level i + 1
        for i, width in enumerate(widths):
            down_level = _DownLevel()
            for _ in range(num_res_blocks):
                down_level.append(layer(ch, width, sizes[i]))
                ch = width
                skip_channels.append(ch)
            self.down.append(down_level)
            if i < levels - 1:
                self.downsample.append(down(ch))
                skip_channels.append(ch)

        self.mid = nn.ModuleList([
            _Layer(ResBlock(ch, ch, temb_dim, dropout, groups), AttentionBlock(ch, heads, groups, context_dim)),
            _Layer(ResBlock(ch, ch, temb_dim, dropout, groups), None),
        ])

        up_levels: list[_UpLevel] = []
        upsample: list[nn.Module] = []
        for i in reversed(range(levels)):
            up_level = _UpLevel()
            for _ in range(num_res_blocks + 1):
                up_level.append(layer(ch + skip_channels.pop(), widths[i], sizes[i]))
                ch = widths[i]
            up_levels.append(up_level)
            if i > 0:
                upsample.append(up(ch))
        self.up = nn.ModuleList(reversed(up_levels))          # up[i]: level i, as down[i]
        self.upsample = nn.ModuleList(reversed(upsample))     # upsample[i]: level i + 1 -> level i

        self.norm_out = nn.GroupNorm(groups, ch)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> SlimUNet:
        """The paper's pair: "teacher" (an LDM-style UNet: base_channels 128, channel_mult (1, 2, 2, 4), attention
        at 16 and 8, groups 32, plain resampling) or "student" (the same layout at base_channels 40, groups 8, with
        wavelet gates; at most 1/8 of the teacher's MACs). `overrides` replace any constructor argument, e.g.
        in_channels=3, sample_size=32 for pixel-space CIFAR-10."""
        if name not in PRESETS:
            raise ValueError(f"{_NAME}.preset: unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def feature_points(self) -> dict[str, nn.Module]:
        """Modules whose forward outputs are the features to match in distillation, by name:

        - "down{i}" (i < L = len(channel_mult)): level i's blocks on the way down, whose output is that of its
          last ResBlock/AttentionBlock, before the downsample: [B, feature_channels()["down{i}"], H/2^i, W/2^i];
        - "mid": the middle's last ResBlock, [B, ·, H/2^(L-1), W/2^(L-1)];
        - "up{i}": level i's blocks on the way up (output before the upsample), [B, ·, H/2^i, W/2^i];
        - "out": conv_out, the prediction [B, out_channels, H, W].

        Any two SlimUNets with the same number of levels share these names and, at the same input size, the
        spatial size at each name: the "teacher" and "student" presets differ in channels (and resampling),
        not in layout, so a distiller pairs them with one 1×1 convolution per name (feature_channels() gives both
        sides' widths). Register forward hooks on these modules to read the features."""
        points: dict[str, nn.Module] = {f"down{i}": level for i, level in enumerate(self.down)}
        points["mid"] = self.mid[-1]
        points.update({f"up{i}": level for i, level in enumerate(self.up)})
        points["out"] = self.conv_out
        return points

    def feature_channels(self) -> dict[str, int]:
        """The channel count of each feature point's output, under the names of `feature_points()`."""
        channels = {f"down{i}": w for i, w in enumerate(self.widths)}
        channels["mid"] = self.widths[-1]
        channels.update({f"up{i}": w for i, w in enumerate(self.widths)})
        channels["out"] = self.out_channels
        return channels

    def _timesteps(self, t: Any, batch: int, device: torch.device) -> torch.Tensor:
        """t as a [batch] tensor, with the input checks of t."""
        if isinstance(t, numbers.Real) and not isinstance(t, bool):
            return torch.full((batch,), float(t), device=device)
        if not isinstance(t, torch.Tensor):
            raise ArgumentTypeError(f"{_NAME}: t must be a tensor [B] or a scalar, got {type(t).__name__}")
        if t.dim() == 0:
            return t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"{_NAME}: t has shape {tuple(t.shape)} but x has batch {batch}; pass t as [B={batch}] "
                             f"or a scalar")
        return t

    def _check(self, x: torch.Tensor, class_labels: torch.Tensor | None, context: torch.Tensor | None) -> None:
        layout = f"[B, {self.in_channels}, H, W] with H, W divisible by {self._factor}"
        check_input(_NAME, "x", x, dims=4, channels=self.in_channels, layout=layout)
        if x.shape[2] % self._factor or x.shape[3] % self._factor:
            raise ValueError(f"{_NAME}: x has shape {tuple(x.shape)}; H and W must be divisible by {self._factor} "
                             f"(2**(len(channel_mult) - 1)): it takes {layout}")
        B = x.shape[0]
        if given_iff_built(_NAME, "class_labels", class_labels, "num_classes", self.num_classes,
                           f"[B] (ints in [0, {self.num_classes}))", what="model") and (
                not isinstance(class_labels, torch.Tensor) or class_labels.shape != (B,)
                or class_labels.dtype not in (torch.int64, torch.int32)):
            shown = (f"{class_labels.dtype} {tuple(class_labels.shape)}" if isinstance(class_labels, torch.Tensor)
                     else type(class_labels).__name__)
            raise ValueError(f"{_NAME}: class_labels is {shown}; pass an int64 or int32 tensor [B={B}] of classes in "
                             f"[0, {self.num_classes})")
        if given_iff_built(_NAME, "context", context, "context_dim", self.context_dim,
                           f"[B, M, {self.context_dim}]", what="model"):
            context = cast(torch.Tensor, context)  # given: given_iff_built returned True
            check_input(_NAME, "context", context, dims=3, channels=self.context_dim, channel_dim=2, unit="features",
                        layout=f"[B={B}, M, context_dim={self.context_dim}]")
            if context.shape[0] != B or context.shape[1] == 0:
                raise ValueError(f"{_NAME}: context has shape {tuple(context.shape)}; it takes [B={B}, M ≥ 1, "
                                 f"context_dim={self.context_dim}]")

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, class_labels: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        """The noise prediction [B, out_channels, H, W] for x [B, in_channels, H, W] at timesteps t."""
        self._check(x, class_labels, context)
        t = self._timesteps(t, x.shape[0], x.device)
        angles = t.to(device=x.device, dtype=torch.float32)[:, None] * self.freqs[None]
        emb = self.time_mlp(torch.cat([angles.cos(), angles.sin()], dim=1).to(x.dtype))
        if self.class_embedding is not None:
            emb = emb + self.class_embedding(class_labels)
        temb = F.silu(emb)

        h = self.conv_in(x)
        skips = [h]
        for i, level in enumerate(self.down):
            h = level(h, temb, context, skips)
            if i < len(self.downsample):
                h = self.downsample[i](h, temb)
                skips.append(h)
        for block in self.mid:
            h = block(h, temb, context)
        for i in reversed(range(len(self.up))):
            h = self.up[i](h, temb, context, skips)
            if i > 0:
                h = self.upsample[i - 1](h, temb)
        return self.conv_out(F.silu(self.norm_out(h)))
