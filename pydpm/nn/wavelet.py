"""Wavelet-gated down- and up-sampling (Spectral Diffusion, Yang et al., CVPR 2023), ready to replace a
UNet's `Downsample` / `Upsample`.

The gates are sigmoid(FFN(avgpool(bands))) per channel and band: the spatial means of the four Haar bands
feed a two-layer FFN whose 4·C outputs gate the bands (an optional timestep embedding is added to the
hidden layer). The gated transform itself is one fused op (`pydpm.ops.wavelet_gate_down` / `_up`).
"""
from __future__ import annotations

import torch
from torch import nn

from pydpm.nn._checks import check_input, given_iff_built, positive_int
from pydpm.ops.wavelet import haar_bands, wavelet_gate_down, wavelet_gate_up


def band_means(x: torch.Tensor) -> torch.Tensor:
    """The spatial mean of each Haar band of x [B, C, H, W] as [B, 4, C], without forming the bands: the
    band means are the Haar transform of the four 2×2-parity means of x (one read of x)."""
    B, C, H, W = x.shape
    parity = x.reshape(B, C, H // 2, 2, W // 2, 2).mean(dim=(2, 4))          # [B, C, 2, 2]
    return haar_bands(parity).reshape(B, C, 4).transpose(1, 2)


class _BandGates(nn.Module):
    """sigmoid(FFN(band statistics)) -> gates [B, 4, C]."""

    def __init__(self, channels: int, reduction: int, temb_dim: int | None, module: str):
        super().__init__()
        channels = positive_int(module, "channels", channels)
        reduction = positive_int(module, "reduction", reduction)
        temb_dim = positive_int(module, "temb_dim", temb_dim, optional=True)
        self.module, self.temb_dim = module, temb_dim
        hidden = max(4 * channels // reduction, 8)
        self.fc1 = nn.Linear(4 * channels, hidden)
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(hidden, 4 * channels)
        self.temb = nn.Linear(temb_dim, hidden) if temb_dim else None
        self.channels = channels

    def forward(self, stats: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        h = self.fc1(stats.flatten(1))
        if given_iff_built(self.module, "temb", temb, "temb_dim", self.temb_dim, f"[B, {self.temb_dim}]"):
            check_input(self.module, "temb", temb, dims=2, channels=self.temb_dim, unit="features",
                        layout=f"[B, temb_dim={self.temb_dim}]")
            if temb.shape[0] != stats.shape[0]:
                raise ValueError(f"{self.module}: temb has batch {temb.shape[0]} but x has {stats.shape[0]}")
            h = h + self.temb(temb)
        return torch.sigmoid(self.fc2(self.act(h))).reshape(-1, 4, self.channels)


class WaveletGateDown(nn.Module):
    """WG-Down: [B, C, H, W] -> [B, C, H/2, W/2] = Σᵢ gateᵢ · bandᵢ(x), gates from the band means.

    Args (positive ints, else a ValueError naming the module; the forward checks x's rank and channels the same
    way): channels C; reduction of the FFN's hidden width (4C/reduction, at least 8); temb_dim: add a
    timestep embedding [B, temb_dim] to the FFN's hidden layer (off by default)."""

    def __init__(self, channels: int, reduction: int = 4, temb_dim: int | None = None):
        super().__init__()
        self.gates = _BandGates(channels, reduction, temb_dim, "WaveletGateDown")

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        C = self.gates.channels
        check_input("WaveletGateDown", "x", x, dims=4, channels=C, layout=f"[B, {C}, H, W] with even H, W")
        if x.dim() != 4 or x.shape[-2] % 2 or x.shape[-1] % 2:
            raise ValueError(f"WaveletGateDown: x has shape {tuple(x.shape)}; it needs [B, C, H, W] with even H, W")
        return wavelet_gate_down(x, self.gates(band_means(x), temb))


class WaveletGateUp(nn.Module):
    """WG-Up: [B, C, H, W] -> [B, C, 2H, 2W]. A 1×1 convolution makes four band chunks (4C channels), the
    gates come from their means, and the gated inverse Haar transform is one fused op.

    Args as `WaveletGateDown`."""

    def __init__(self, channels: int, reduction: int = 4, temb_dim: int | None = None):
        super().__init__()
        channels = positive_int("WaveletGateUp", "channels", channels)
        self.expand = nn.Conv2d(channels, 4 * channels, kernel_size=1)
        self.gates = _BandGates(channels, reduction, temb_dim, "WaveletGateUp")

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        C = self.gates.channels
        check_input("WaveletGateUp", "x", x, dims=4, channels=C, layout=f"[B, {C}, H, W]")
        bands = self.expand(x)                                                   # [B, 4C, H, W]
        B, C4 = bands.shape[:2]
        stats = bands.mean(dim=(2, 3)).reshape(B, 4, C4 // 4)
        return wavelet_gate_up(bands, self.gates(stats, temb))
