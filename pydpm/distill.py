"""Spectrum-aware distillation (Spectral Diffusion, "Diffusion Probabilistic Model Made Slim", CVPR 2023): a slim
student learns from a frozen teacher on same-scale pairs of features (intermediate features and the output),

    L = L_DDPM + λs · Σ_pairs ‖X_T − A(X_S)‖² + λf · Σ_pairs Σ_bins ω · |DFT(X_T − A(X_S))|²,
    ω = spectrum_weight(x0 at the pair's scale, alpha),  alpha = −1,  λs = λf = 0.1,

where A is one 1×1 convolution per pair mapping the student's channels onto the teacher's, ‖·‖² and Σ_bins are
means over the pair's elements (frequency bins: the orthonormal DFT, so ω = 1 gives the spatial term), and ω is
computed once per scale and batch and shared by every pair at that scale. L_DDPM is the student's
epsilon-prediction loss. λf = 0 is the spatial-only distillation, λs = λf = 0 plain training of the student.

ω is scaled to mean 1 over each sample's bins by default (`normalize=True`): |DFT(x0)|^−1 of natural images
averages tens to hundreds at 32×32 (the high-frequency bins are small), which made λf·freq outweigh the DDPM
loss 10-40× on small models here; normalised, λf weighs a spectral term on the spatial term's scale (α = 0 still
gives exactly the spatial term) and only the distribution of weight over frequencies changes. `normalize=False`
is the formula above literally.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pydpm.ops._framework import check_real
from pydpm.ops.spectral import frequency_weighted_mse, spectrum_weight

_NAME = "SpectrumAwareDistiller"


def _feature_protocol(model: nn.Module, role: str) -> tuple[dict[str, nn.Module], dict[str, int]]:
    points, channels = getattr(model, "feature_points", None), getattr(model, "feature_channels", None)
    if not callable(points) or not callable(channels):
        raise TypeError(f"{_NAME}: the {role} ({type(model).__name__}) has no feature_points() / feature_channels(); "
                        f"pass models that name their features as pydpm.models.SlimUNet does (or wrap yours)")
    return points(), channels()


class SpectrumAwareDistiller(nn.Module):
    """The distillation loss of a frozen teacher and a trainable student (see the module docstring).

    Args:
        teacher, student: noise-prediction models called as model(x_t, t, **cond), each with feature_points()
            (name -> module whose forward output is that feature) and feature_channels() (name -> channels), as
            `pydpm.models.SlimUNet`. The teacher is put in eval mode and frozen (requires_grad False).
        pairs: the feature names to match, each present in both models with the same spatial size (default: every
            name both models have; SlimUNet's presets share down0.., mid, up0.., out).
        lambda_spatial, lambda_freq: λs and λf (≥ 0; the paper's 0.1 each).
        alpha, eps: the spectrum weight's exponent and magnitude clamp (`pydpm.ops.spectrum_weight`).
        normalize: scale ω to mean 1 over each sample's bins (see the module docstring).

    `align` holds the 1×1 convolutions (student channels -> teacher channels), trained with the student:
    optimise `trainable_parameters()`. forward(x_t, t, x0, noise, **cond) returns the loss and its terms."""

    def __init__(self, teacher: nn.Module, student: nn.Module, pairs: Sequence[str] | None = None, *,
                 lambda_spatial: float = 0.1, lambda_freq: float = 0.1, alpha: float = -1.0, eps: float = 1e-3,
                 normalize: bool = True):
        super().__init__()
        t_points, t_channels = _feature_protocol(teacher, "teacher")
        s_points, s_channels = _feature_protocol(student, "student")
        if pairs is None:
            pairs = [name for name in t_points if name in s_points]
        elif isinstance(pairs, str) or not isinstance(pairs, Sequence):
            raise TypeError(f"{_NAME}: pairs must be a sequence of feature names, got {pairs!r}")
        for name in pairs:
            for role, points in (("teacher", t_points), ("student", s_points)):
                if name not in points:
                    raise ValueError(f"{_NAME}: pair {name!r} is not a feature point of the {role}; it has "
                                     f"{sorted(points)}")
        self.lambda_spatial = check_real(_NAME, "lambda_spatial", lambda_spatial)
        self.lambda_freq = check_real(_NAME, "lambda_freq", lambda_freq)
        if self.lambda_spatial < 0 or self.lambda_freq < 0:
            raise ValueError(f"{_NAME}: lambda_spatial={lambda_spatial} and lambda_freq={lambda_freq} must be >= 0")
        self.alpha, self.eps = check_real(_NAME, "alpha", alpha), check_real(_NAME, "eps", eps)
        if not isinstance(normalize, bool):
            raise TypeError(f"{_NAME}: normalize must be True or False, got {normalize!r}")
        self.normalize = normalize
        self.pairs = tuple(pairs)
        self.teacher, self.student = teacher, student
        teacher.eval().requires_grad_(False)
        distilling = self.lambda_spatial > 0 or self.lambda_freq > 0
        self.align = nn.ModuleDict({name: nn.Conv2d(s_channels[name], t_channels[name], kernel_size=1)
                                    for name in (self.pairs if distilling else ())})
        self._modules_at = {name: (t_points[name], s_points[name]) for name in self.align}

    def train(self, mode: bool = True) -> SpectrumAwareDistiller:
        """Train or eval the student and the alignment; the teacher stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The student's parameters and the alignment convolutions' (what the optimiser updates)."""
        return [*self.student.parameters(), *self.align.parameters()]

    def _run(self, model: nn.Module, side: int, x_t, t, cond) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """model(x_t, t, **cond) and the outputs of the paired modules, read by forward hooks held for the call."""
        features: dict[str, torch.Tensor] = {}
        handles = []
        for name, modules in self._modules_at.items():
            def keep(module, inputs, output, name=name):
                features[name] = output
            handles.append(modules[side].register_forward_hook(keep))
        try:
            out = model(x_t, t, **cond)
        finally:
            for h in handles:
                h.remove()
        return out, features

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
                **cond: Any) -> dict[str, torch.Tensor]:
        """{"loss", "ddpm", "spatial", "freq"} for noisy inputs x_t [B, C, H, W] at timesteps t, their clean data
        x0 [B, C0, H0, W0] (ω's source) and the noise added (the student's target); cond goes to both models."""
        for name, v in (("x0", x0), ("noise", noise)):
            if not isinstance(v, torch.Tensor) or v.dim() != 4 or v.shape[0] != x_t.shape[0]:
                shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"{_NAME}: {name} is {shape}; it must be [B={x_t.shape[0]}, C, H, W]")
        if noise.shape != x_t.shape:
            raise ValueError(f"{_NAME}: noise has shape {tuple(noise.shape)} but x_t has {tuple(x_t.shape)}")
        prediction, s_features = self._run(self.student, 1, x_t, t, cond)
        ddpm = F.mse_loss(prediction.float(), noise.float())
        zero = ddpm.new_zeros(())
        if not self.align:
            return {"loss": ddpm, "ddpm": ddpm, "spatial": zero, "freq": zero}
        with torch.no_grad():
            _, t_features = self._run(self.teacher, 0, x_t, t, cond)
        spatial, freq = zero, zero
        weights: dict[tuple[int, int], torch.Tensor] = {}
        for name in self.align:
            target, feature = t_features.get(name), s_features.get(name)
            if not isinstance(target, torch.Tensor) or not isinstance(feature, torch.Tensor):
                raise ValueError(f"{_NAME}: pair {name!r}: a hooked module did not run or returned no tensor")
            aligned = self.align[name](feature)
            if aligned.shape != target.shape:
                raise ValueError(f"{_NAME}: pair {name!r}: the aligned student feature has shape "
                                 f"{tuple(aligned.shape)}, the teacher's {tuple(target.shape)}; pair features "
                                 f"of the same spatial size")
            if self.lambda_spatial > 0:
                spatial = spatial + F.mse_loss(aligned.float(), target.float())
            if self.lambda_freq > 0:
                size = (target.shape[-2], target.shape[-1])
                if size not in weights:
                    w = spectrum_weight(x0, size, alpha=self.alpha, eps=self.eps)
                    weights[size] = w / w.mean(dim=(-2, -1), keepdim=True) if self.normalize else w
                freq = freq + frequency_weighted_mse(aligned, target, weights[size])
        loss = ddpm + self.lambda_spatial * spatial + self.lambda_freq * freq
        return {"loss": loss, "ddpm": ddpm, "spatial": spatial, "freq": freq}


# The paper's ablation as loss weights (λs, λf): "none" trains the student on the DDPM loss alone.
MODE_WEIGHTS = {"spectral": (0.1, 0.1), "spatial": (0.1, 0.0), "none": (0.0, 0.0)}


def distillation_weights(mode: str) -> Mapping[str, float]:
    """The keyword arguments (lambda_spatial, lambda_freq) of the ablation's `mode`: "spectral" (λs = λf = 0.1),
    "spatial" (λf = 0) or "none" (plain training of the student)."""
    if mode not in MODE_WEIGHTS:
        raise ValueError(f"{_NAME}: mode {mode!r}; choose one of {sorted(MODE_WEIGHTS)}")
    spatial, freq = MODE_WEIGHTS[mode]
    return {"lambda_spatial": spatial, "lambda_freq": freq}
