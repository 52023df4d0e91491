"""Triton kernels and their plain launchers (installed as pydpm.kernels; no torch.library here)."""
