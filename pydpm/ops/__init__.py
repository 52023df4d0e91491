"""Fused ops. Each family module (one per family, on the skeleton of `_framework.py`) owns its reference,
backends, tolerances and torch.library registration; importing it here registers the family."""
from pydpm.ops._framework import REGISTRY, BackendUnavailable, forced_backend, use_backend
from pydpm.ops.attention import attention, attention_reference
from pydpm.ops.solver_step import PhiloxNoise, Threshold, philox_normal, solver_step, solver_step_reference
from pydpm.ops.ff_parser import ff_parser
from pydpm.ops.geglu import geglu
from pydpm.ops.naf import simple_gate, simple_gate_sca, simplified_channel_attention
from pydpm.ops.norm import group_norm, layer_norm_modulate
from pydpm.ops.time_shift import time_shift_pick
from pydpm.ops.spectral import (focal_frequency_loss, frequency_weighted_mse, spectral_distill_loss,
                                spectrum_weight)
from pydpm.ops.wavelet import (haar_dwt2, haar_idwt2, haar_waverec2, haar_wavedec2, wavelet_gate_down,
                               wavelet_gate_up)

__all__ = [
    "REGISTRY", "BackendUnavailable", "PhiloxNoise", "Threshold", "forced_backend", "philox_normal", "solver_step",
    "solver_step_reference", "use_backend", "haar_dwt2", "haar_idwt2", "haar_wavedec2", "haar_waverec2",
    "wavelet_gate_down", "wavelet_gate_up", "ff_parser", "simple_gate", "simple_gate_sca",
    "simplified_channel_attention", "geglu", "attention", "attention_reference", "focal_frequency_loss",
    "frequency_weighted_mse", "spectral_distill_loss", "spectrum_weight", "group_norm", "layer_norm_modulate",
    "time_shift_pick",
]
