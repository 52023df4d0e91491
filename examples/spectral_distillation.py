"""Spectral Diffusion's recipe end to end, on data PyWavelets ships (no download): train a SlimUNet teacher,
distil a ≥ 8× slimmer student three ways (spectrum-aware, spatial-only, no distillation: the paper's
ablation), sample every model with pydpm's DPM-Solver++(2M), and report a Fréchet distance, MACs and
sampling time.

    python examples/spectral_distillation.py --out demo [--device cuda] [--steps 1400] [--scale paper|cpu|smoke]

The defaults (1400 teacher steps, 650 per student) take about 6.5 minutes on an H200, where training runs at
8-17 steps/s (host-bound); the models are then still far from trained (docs/distillation/README.md).

Data: 32×32 patches of PyWavelets' "camera" photograph (`pydpm.data.patches`). Models: the "teacher" and
"student" presets of `pydpm.models.SlimUNet` (one input channel), trained by `pydpm.training` (the DDPM
objective; the students through `pydpm.distill.SpectrumAwareDistiller`). Metric: the Fréchet distance between
generated and held-out real patches in the feature space of a small CNN trained here to tell the three
PyWavelets photographs apart (camera, ascent, aero): an Inception network is neither shipped nor meaningful for
32×32 grayscale patches, so the distance is comparable between the models of one run, not with published FIDs.
MACs per forward call come from `pydpm.models.count_macs`; sampling time is the wall time of generating the
evaluation batch (one solver loop, synchronised).

Writes to --out: teacher/ and student-{spectral,spatial,none}/ (each `pydpm train` / `pydpm distill` run:
checkpoint, log.jsonl, loss.png, samples.png), results.json and results.md (the table), and comparison.png (rows:
held-out real patches, then the first evaluation samples of each model, in the table's order, enlarged 3×).
--evaluate-only re-evaluates the runs already in --out (same settings) without training.

--scale: "paper" (default) the presets at 32×32 (a GPU run); "cpu" the same recipe scaled down to 16×16
patches, a 3-level teacher of base width 32 and a student of width 10 (≥ 8× fewer MACs), which a 2-core CPU
trains in minutes; "smoke" tiny models and a few steps (a CI check that the path works, not a result).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pydpm import data, training
from pydpm.distill import MODE_WEIGHTS
from pydpm.metrics import frechet_distance
from pydpm.models import count_macs

# Image size, teacher overrides of the "teacher" preset and student overrides of the "student" preset (which
# takes the teacher's layout) per --scale; "smoke" also fixes every count, so that the path runs in seconds.
SCALES: dict[str, dict] = {
    "paper": dict(size=32, model={}, student={}),
    "cpu": dict(size=16, model=dict(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                                    attention_resolutions=(4,), groups=8),
                student=dict(base_channels=10, groups=2)),
    "smoke": dict(size=16, steps=4, distill_steps=3, batch=4, eval_count=16, sample_steps=4, classifier_steps=10,
                  model=dict(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(),
                             groups=4),
                  student=dict(base_channels=8, groups=2)),
}


class PatchClassifier(nn.Module):
    """A small CNN telling the source photograph of a patch; its 64 penultimate features are the Fréchet
    distance's feature space."""

    def __init__(self, classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_classifier(size: int, steps: int, device: torch.device, count: int = 2048) -> tuple[PatchClassifier, float]:
    """The classifier trained on patches of the three photographs (seed 1) and its accuracy on others (seed 2)."""
    torch.manual_seed(0)
    def labelled(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        xs = [data.patches(name, size=size, count=count, seed=seed) for name in data.IMAGES]
        return torch.cat(xs).to(device), torch.arange(len(xs)).repeat_interleave(count).to(device)
    x, y = labelled(1)
    model = PatchClassifier(len(data.IMAGES)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=g).to(device)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    x_test, y_test = labelled(2)
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    return model.eval(), accuracy


def evaluate(run: Path, classifier: PatchClassifier, real_features: torch.Tensor, count: int, size: int,
             sample_steps: int, device: torch.device) -> tuple[dict[str, float], torch.Tensor]:
    """A run's EMA model: MACs per forward call, parameters, the time to sample `count` patches and their
    Fréchet distance to the held-out real patches; and the samples."""
    model = training.load_model(run).to(device)
    x, t = torch.zeros(1, 1, size, size, device=device), torch.tensor([500], device=device)
    macs = count_macs(model, x, t)
    training.sample_images(model, 2, (1, size, size), steps=sample_steps, device=device)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    samples = training.sample_images(model, count, (1, size, size), steps=sample_steps, seed=123, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - began
    with torch.no_grad():
        features = classifier.features(samples.clamp(-1, 1))
    return {"params_m": sum(p.numel() for p in model.parameters()) / 1e6, "gmacs": macs / 1e9,
            "sample_s": seconds, "fd": frechet_distance(features, real_features)}, samples


def comparison(rows: list[torch.Tensor], per_row: int = 16, zoom: int = 3, pad: int = 2) -> torch.Tensor:
    """One uint8 picture: a row of `per_row` images [N, 1, H, W] in [-1, 1] for each entry of `rows`, enlarged
    `zoom`× (nearest), on gray padding."""
    strips = []
    for images in rows:
        x = ((images[:per_row, 0].clamp(-1, 1).cpu() + 1) * 127.5).round().to(torch.uint8)
        x = x.repeat_interleave(zoom, -1).repeat_interleave(zoom, -2)
        n, h, w = x.shape
        strip = torch.full((h + pad, per_row * (w + pad) + pad), 128, dtype=torch.uint8)
        for i in range(n):
            strip[pad:, pad + i * (w + pad):pad + i * (w + pad) + w] = x[i]
        strips.append(strip)
    return torch.cat([*strips, torch.full((pad, strips[0].shape[1]), 128, dtype=torch.uint8)])


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo", help="the results' directory")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=1400, help="teacher training steps")
    parser.add_argument("--distill-steps", type=int, default=650, help="training steps of each student")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--eval-count", type=int, default=1024, help="patches generated per model for the metric")
    parser.add_argument("--sample-steps", type=int, default=20, help="DPM-Solver++(2M) steps")
    parser.add_argument("--classifier-steps", type=int, default=1500)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast while training")
    parser.add_argument("--scale", choices=list(SCALES), default="paper", help="models and image size (above)")
    parser.add_argument("--evaluate-only", action="store_true", help="evaluate the runs already in --out")
    args = parser.parse_args(argv)
    settings = dict(steps=args.steps, distill_steps=args.distill_steps, batch=args.batch,
                    eval_count=args.eval_count, sample_steps=args.sample_steps,
                    classifier_steps=args.classifier_steps)
    settings.update(SCALES[args.scale])
    out, device, size = Path(args.out), torch.device(args.device), settings["size"]
    common = dict(data="camera", size=size, batch=settings["batch"], device=args.device, bf16=args.bf16,
                  sample_steps=settings["sample_steps"], samples=16, progress=args.scale != "smoke",
                  log_every=max(1, settings["steps"] // 50))
    runs = {"teacher": out / "teacher", **{f"student-{mode}": out / f"student-{mode}" for mode in MODE_WEIGHTS}}
    if not args.evaluate_only:
        training.train(training.TrainConfig(out=str(runs["teacher"]), steps=settings["steps"], **common,
                                            **settings["model"]))
        for mode in MODE_WEIGHTS:
            training.distill(training.DistillConfig(out=str(runs[f"student-{mode}"]), teacher=str(runs["teacher"]),
                                                    mode=mode, steps=settings["distill_steps"],
                                                    **dict(common, size=None), **settings["student"]))
    classifier, accuracy = train_classifier(size, settings["classifier_steps"], device)
    real = data.patches("camera", size=size, count=settings["eval_count"], seed=7).to(device)
    other = data.patches("camera", size=size, count=settings["eval_count"], seed=8).to(device)
    with torch.no_grad():
        real_features = classifier.features(real)
        floor = frechet_distance(classifier.features(other), real_features)  # two real sets: the metric's noise
    evaluated = {name: evaluate(run, classifier, real_features, settings["eval_count"], size,
                                settings["sample_steps"], device) for name, run in runs.items()}
    results = {name: r for name, (r, _) in evaluated.items()}
    training.write_png(out / "comparison.png", comparison([real, *(samples for _, samples in evaluated.values())]))
    teacher_macs = results["teacher"]["gmacs"]
    lines = [f"scale {args.scale}, device {device}, {settings['steps']} teacher steps, {settings['distill_steps']} steps per student, "
             f"batch {settings['batch']}, {settings['eval_count']} samples per model ({settings['sample_steps']} "
             f"DPM-Solver++(2M) steps); classifier accuracy on held-out patches {accuracy:.3f}; Fréchet distance "
             f"between two real sets of this size {floor:.3f}", "",
             "| model | params (M) | GMACs / call | vs teacher | Fréchet distance | sampling (s) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['params_m']:.2f} | {r['gmacs']:.3f} | {r['gmacs'] / teacher_macs:.3f} | "
                     f"{r['fd']:.3f} | {r['sample_s']:.2f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({"settings": settings, "classifier_accuracy": accuracy,
                                                  "real_vs_real_fd": floor, "results": results}, indent=1))
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()
