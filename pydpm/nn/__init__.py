"""nn.Modules over the fused ops of `pydpm.ops`."""
from pydpm.nn.attention import Attention
from pydpm.nn.frequency import (FFParser, LayerNorm2d, NAFBlock, SimpleGate, SimplifiedChannelAttention,
                                naf_block_reference, pointwise_conv_residual)
from pydpm.nn.wavelet import WaveletGateDown, WaveletGateUp, band_means

__all__ = [
    "Attention", "FFParser", "LayerNorm2d", "NAFBlock", "SimpleGate", "SimplifiedChannelAttention", "naf_block_reference",
    "pointwise_conv_residual", "WaveletGateDown", "WaveletGateUp", "band_means",
]
