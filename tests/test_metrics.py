"""The Fréchet distance against closed forms: identical sets, a shift, and two Gaussians with diagonal
covariances (FD = ‖μa − μb‖² + Σ (σa − σb)²), estimated from large samples."""
import math

import pytest
import torch

from pydpm.metrics import frechet_distance


def test_identical_sets_and_a_shift():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 6, generator=g, dtype=torch.float64)
    assert abs(frechet_distance(a, a)) < 1e-9
    shift = torch.tensor([1.0, -2.0, 0.0, 0.5, 0.0, 3.0], dtype=torch.float64)
    assert frechet_distance(a, a + shift) == pytest.approx(shift.square().sum().item(), rel=1e-9)


def test_diagonal_gaussians_match_the_closed_form():
    g = torch.Generator().manual_seed(1)
    sa, sb = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([1.5, 1.0, 0.5])
    mb = torch.tensor([0.3, 0.0, -0.4])
    a = torch.randn(200_000, 3, generator=g) * sa
    b = torch.randn(200_000, 3, generator=g) * sb + mb
    expected = mb.square().sum().item() + (sa - sb).square().sum().item()
    assert frechet_distance(a, b) == pytest.approx(expected, abs=0.03)
    assert math.isfinite(frechet_distance(a[:5], b[:7]))  # fewer samples than needed for a full-rank covariance


@pytest.mark.parametrize("a, b, match", [
    (torch.randn(1, 3), torch.randn(4, 3), "a is"),
    (torch.randn(4, 3), torch.randn(4), "b is"),
    (torch.randn(4, 3), torch.randn(4, 2), "features per row"),
])
def test_errors_name_the_argument(a, b, match):
    with pytest.raises(ValueError, match=match):
        frechet_distance(a, b)
