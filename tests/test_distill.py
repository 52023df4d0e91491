"""Spectrum-aware distillation: the loss against its terms written out from hooks of our own and the float64
references, the frozen teacher, the ablation modes, Parseval (alpha = 0: the spectral term is the spatial one),
and argument errors naming the pair or argument."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pydpm.distill import SpectrumAwareDistiller, distillation_weights
from pydpm.models import SlimUNet
from pydpm.ops.spectral import frequency_weighted_mse_reference, spectrum_weight_reference

TINY = dict(in_channels=1, sample_size=16, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
            attention_resolutions=(8,), heads=2, groups=4)


def _pair(**student):
    torch.manual_seed(0)
    teacher = SlimUNet(**dict(TINY, wavelet_gates=False))
    return teacher, SlimUNet(**dict(TINY, base_channels=8, groups=2, **student))


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    x0, noise = torch.randn(3, 1, 16, 16, generator=g), torch.randn(3, 1, 16, 16, generator=g)
    return 0.8 * x0 + 0.6 * noise, torch.tensor([10, 500, 990]), x0, noise


def _features(model, names, x, t):
    points, out = model.feature_points(), {}
    handles = [points[n].register_forward_hook(lambda m, i, o, n=n: out.__setitem__(n, o)) for n in names]
    with torch.no_grad():
        prediction = model(x, t)
    for h in handles:
        h.remove()
    return prediction, out


@pytest.mark.parametrize("normalize", [True, False])
def test_the_loss_is_its_terms_written_out(normalize):
    teacher, student = _pair()
    distiller = SpectrumAwareDistiller(teacher, student, normalize=normalize)
    assert distiller.pairs == ("down0", "down1", "mid", "up0", "up1", "out")
    x_t, t, x0, noise = _batch()
    terms = distiller(x_t, t, x0, noise)
    prediction, s_feat = _features(student, distiller.pairs, x_t, t)
    _, t_feat = _features(teacher, distiller.pairs, x_t, t)
    spatial = freq = 0.0
    for name in distiller.pairs:
        with torch.no_grad():
            aligned = distiller.align[name](s_feat[name]).double()
        target = t_feat[name].double()
        spatial += F.mse_loss(aligned, target).item()
        weight = spectrum_weight_reference(x0.double(), target.shape[-2:])
        if normalize:
            weight = weight / weight.mean(dim=(-2, -1), keepdim=True)
        freq += frequency_weighted_mse_reference(aligned, target, weight).item()
    ddpm = F.mse_loss(prediction.double(), noise.double()).item()
    assert terms["ddpm"].item() == pytest.approx(ddpm, rel=1e-5)
    assert terms["spatial"].item() == pytest.approx(spatial, rel=1e-4)
    assert terms["freq"].item() == pytest.approx(freq, rel=1e-4)
    assert terms["loss"].item() == pytest.approx(ddpm + 0.1 * spatial + 0.1 * freq, rel=1e-4)
    assert terms["freq"].item() > 0 and terms["spatial"].item() > 0


def test_the_teacher_stays_frozen_and_the_student_and_alignment_learn():
    teacher, student = _pair()
    distiller = SpectrumAwareDistiller(teacher, student).train()
    assert not teacher.training and student.training
    distiller(*_batch())["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is not None for p in distiller.trainable_parameters())
    assert {id(p) for p in distiller.trainable_parameters()} == \
        {id(p) for p in [*student.parameters(), *distiller.align.parameters()]}


@pytest.mark.parametrize("mode", ["spectral", "spatial", "none"])
def test_the_ablation_modes(mode):
    teacher, student = _pair()
    distiller = SpectrumAwareDistiller(teacher, student, **distillation_weights(mode))
    terms = distiller(*_batch())
    if mode == "none":
        assert len(distiller.align) == 0 and terms["loss"] is terms["ddpm"]
    assert (terms["freq"].item() > 0) == (mode == "spectral")
    assert (terms["spatial"].item() > 0) == (mode != "none")


def test_alpha_zero_makes_the_spectral_term_the_spatial_one():
    teacher, student = _pair()
    terms = SpectrumAwareDistiller(teacher, student, alpha=0.0)(*_batch())
    assert terms["freq"].item() == pytest.approx(terms["spatial"].item(), rel=1e-5)


def test_a_student_with_gates_and_a_subset_of_pairs():
    teacher, student = _pair(wavelet_gates=True)
    distiller = SpectrumAwareDistiller(teacher, student, pairs=["mid", "out"])
    assert set(distiller.align) == {"mid", "out"}
    assert torch.isfinite(distiller(*_batch())["loss"])


@pytest.mark.parametrize("make, error, match", [
    (lambda t, s: SpectrumAwareDistiller(t, s, pairs=["down7"]), ValueError, "pair 'down7' is not a feature point"),
    (lambda t, s: SpectrumAwareDistiller(t, s, pairs="mid"), TypeError, "pairs must be a sequence"),
    (lambda t, s: SpectrumAwareDistiller(torch.nn.Conv2d(1, 1, 1), s), TypeError, "teacher .* has no feature_points"),
    (lambda t, s: SpectrumAwareDistiller(t, s, lambda_freq=-0.1), ValueError, "must be >= 0"),
    (lambda t, s: SpectrumAwareDistiller(t, s, lambda_spatial=float("nan")), ValueError, "lambda_spatial"),
])
def test_construction_errors_name_the_argument(make, error, match):
    teacher, student = _pair()
    with pytest.raises(error, match=match):
        make(teacher, student)


def test_call_errors_name_the_input_or_the_pair():
    teacher, student = _pair()
    distiller = SpectrumAwareDistiller(teacher, student)
    x_t, t, x0, noise = _batch()
    with pytest.raises(ValueError, match="x0 is"):
        distiller(x_t, t, x0[:2], noise)
    with pytest.raises(ValueError, match="noise has shape"):
        distiller(x_t, t, x0, noise[:, :, :8])
    deeper = SlimUNet(**dict(TINY, base_channels=8, groups=2, channel_mult=(1, 2, 2), attention_resolutions=(4,)))
    with pytest.raises(ValueError, match="pair 'mid'"):
        SpectrumAwareDistiller(teacher, deeper, pairs=["mid"])(x_t, t, x0, noise)


def test_the_demo_runs_end_to_end(tmp_path):
    """examples/spectral_distillation.py --scale smoke: teacher, three students, samples, classifier, metric, table
    (tiny models and a few steps: that the path works, not a result)."""
    import importlib.util
    import json
    import math
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "spectral_distillation.py"
    spec = importlib.util.spec_from_file_location("spectral_distillation", path)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    results = demo.main(["--out", str(tmp_path), "--scale", "smoke", "--device", "cpu"])
    assert list(results) == ["teacher", "student-spectral", "student-spatial", "student-none"]
    for name, r in results.items():
        assert math.isfinite(r["fd"]) and r["fd"] >= 0 and r["sample_s"] > 0, (name, r)
        assert (tmp_path / name / "samples.png").read_bytes().startswith(b"\x89PNG"), name
        if name != "teacher":
            assert r["gmacs"] < results["teacher"]["gmacs"], name
    table = (tmp_path / "results.md").read_text()
    assert table.count("| student-") == 3 and json.loads((tmp_path / "results.json").read_text())["results"]
    assert (tmp_path / "comparison.png").read_bytes().startswith(b"\x89PNG")
    again = demo.main(["--out", str(tmp_path), "--scale", "smoke", "--device", "cpu", "--evaluate-only"])
    assert [r["fd"] for r in again.values()] == [r["fd"] for r in results.values()]  # seeded: the same samples
