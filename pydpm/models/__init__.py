"""Models built from pydpm.nn: the slim wavelet-gated UNet of Spectral Diffusion, and a MAC counter."""
from pydpm.models.macs import count_macs
from pydpm.models.slim_unet import PRESETS, AttentionBlock, ResBlock, SlimUNet

__all__ = ["PRESETS", "AttentionBlock", "ResBlock", "SlimUNet", "count_macs"]
