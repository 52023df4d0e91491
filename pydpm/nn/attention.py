"""Multi-head attention over the fused `pydpm.ops.attention` (flash attention on CUDA, any head dim)."""
from __future__ import annotations

import torch
from torch import nn

from pydpm.ops.attention import attention


class Attention(nn.Module):
    """Multi-head self- or cross-attention: to_q, to_k, to_v projections, heads, to_out.

    Args: dim (query features), heads, dim_head (default dim // heads), context_dim (key/value features;
    default dim), bias (of the q/k/v projections), out_bias. forward(x [B, N, dim], context [B, M,
    context_dim] or None) -> [B, N, dim]. The heads are read in place ([B, N, H, D] views, layout 'bnhd'):
    no transposes or copies around the attention op."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int | None = None, context_dim: int | None = None,
                 bias: bool = False, out_bias: bool = True):
        super().__init__()
        dim_head = dim_head or dim // heads
        if dim_head < 1:
            raise ValueError(f"Attention: dim={dim} with heads={heads} leaves no head dimension; pass dim_head")
        inner = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=bias)
        self.to_out = nn.Linear(inner, dim, bias=out_bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        B, N = x.shape[:2]
        q = self.to_q(x).view(B, N, self.heads, self.dim_head)
        k = self.to_k(context).view(B, context.shape[1], self.heads, self.dim_head)
        v = self.to_v(context).view(B, context.shape[1], self.heads, self.dim_head)
        o = attention(q, k, v, layout="bnhd")
        return self.to_out(o.reshape(B, N, self.heads * self.dim_head))
