"""Small image datasets built from data that installed packages ship, for training and distilling without a
download: random patches of PyWavelets' sample photographs, and scikit-learn's handwritten digits.

Each function returns a float32 tensor [N, 1, size, size] in [-1, 1] (the range the DDPM objective of
`pydpm.training` assumes), the same for the same arguments on every machine: the random crops come from a
NumPy generator seeded with `seed`, and the resampling is plain averaging / bilinear interpolation.
"""
from __future__ import annotations

import importlib

import numpy as np
import torch
import torch.nn.functional as F

# PyWavelets' 512 × 512 grayscale sample images (pywt.data.<name>()).
IMAGES = ("camera", "ascent", "aero")
DATASETS = IMAGES + ("digits",)


def _positive(fn: str, name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{fn}: {name} must be an int >= 1, got {value!r}")
    return value


def patches(name: str = "camera", size: int = 32, count: int = 2048, seed: int = 0) -> torch.Tensor:
    """`count` random crops of PyWavelets' sample image `name` ("camera", "ascent" or "aero", 512 × 512
    grayscale), each 2·size × 2·size and average-pooled 2× to size × size (the pooling removes the JPEG-like
    pixel noise and gives small, smooth images a tiny model can learn), scaled from [0, 255] to [-1, 1]:
    a float32 tensor [count, 1, size, size]. Crop corners are drawn with numpy's default_rng(seed), so the same
    arguments give the same patches everywhere. size may be at most 256 (a crop of 2·size must fit)."""
    if name not in IMAGES:
        raise ValueError(f"patches: unknown image {name!r}; choose one of {', '.join(IMAGES)} (or digits())")
    size = _positive("patches", "size", size)
    count = _positive("patches", "count", count)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"patches: seed must be an int >= 0, got {seed!r}")
    try:
        pywt_data = importlib.import_module("pywt.data")
    except ImportError as e:
        raise ImportError(f"patches({name!r}) needs PyWavelets' sample images: pip install PyWavelets ({e})") from e
    image = np.asarray(getattr(pywt_data, name)(), dtype=np.float32)     # [512, 512], 0..255
    crop = 2 * size
    if crop > min(image.shape):
        raise ValueError(f"patches: size={size} needs {crop} × {crop} crops, larger than the {image.shape[0]} × "
                         f"{image.shape[1]} image; use size <= {min(image.shape) // 2}")
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, image.shape[0] - crop + 1, size=count)
    cols = rng.integers(0, image.shape[1] - crop + 1, size=count)
    crops = np.stack([image[r:r + crop, c:c + crop] for r, c in zip(rows, cols)])      # [count, crop, crop]
    pooled = crops.reshape(count, size, 2, size, 2).mean(axis=(2, 4))
    return torch.from_numpy(pooled / 127.5 - 1.0).float().unsqueeze(1).contiguous()


def digits(size: int = 32) -> torch.Tensor:
    """scikit-learn's 1797 handwritten digits (8 × 8, values 0..16), bilinearly upsampled to size × size and
    scaled to [-1, 1]: a float32 tensor [1797, 1, size, size] (all of them, in scikit-learn's order).
    Needs scikit-learn: without it, an ImportError says `pip install scikit-learn`."""
    size = _positive("digits", "size", size)
    try:
        load_digits = importlib.import_module("sklearn.datasets").load_digits
    except ImportError as e:
        raise ImportError(f"digits() needs scikit-learn, which ships the 8×8 digits: pip install scikit-learn "
                          f"({e})") from e
    images = torch.as_tensor(load_digits().images, dtype=torch.float32).unsqueeze(1)     # [1797, 1, 8, 8]
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return (images / 8.0 - 1.0).clamp(-1.0, 1.0).contiguous()


def load(name: str, size: int = 32, count: int = 2048, seed: int = 0) -> torch.Tensor:
    """The dataset called `name` (one of DATASETS): `patches(name, size, count, seed)` for an image name,
    `digits(size)` for "digits" (count and seed do not apply: it is the whole fixed set)."""
    if name == "digits":
        return digits(size)
    if name not in IMAGES:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return patches(name, size=size, count=count, seed=seed)


__all__ = ["DATASETS", "IMAGES", "digits", "load", "patches"]
