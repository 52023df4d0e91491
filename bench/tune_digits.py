"""Tuned sampler against every official DPM-Solver(++) and UniPC configuration, on a digits model trained here.

CPU, float32: a small noise-prediction model of scikit-learn's 8×8 handwritten digits, trained by this bench.

    python -m pydpm.bench.tune_digits [--nfe 5 10] [--data] [--time-shift]
                                                                (from a checkout: python bench/tune_digits.py)

The model: an MLP over the 64 pixels with a sinusoidal embedding of the step label, trained from scratch on
`pydpm.data.digits(size=8)` (all 1797 images, in [-1, 1]) with the DDPM ε-objective on the DDPM table
(`pydpm.training.ddpm_betas()`: β linear from 1e-4 to 0.02 over 1000 steps; Adam, cosine-decayed learning rate,
the EMA of `pydpm.training` with decay 0.999, whose weights are sampled), wrapped by
`pydpm.schedules.model_wrapper` on `NoiseScheduleVP("discrete", betas=ddpm_betas())`. The library's SlimUNet
is not used: even a small one (base 32 channels, two levels) costs about 0.7 ms per 8×8 sample on one CPU
thread, 30× this MLP, and the bench makes well over ten million model evaluations. Everything is seeded: the same
arguments and thread count give the same numbers.

What is measured, per NFE: M evaluation noises x_T (`--eval`, default 2000) are sampled by DPM-Solver++(3M)
with the corrected third order on 1000 λ-uniform steps (`--reference-steps`; the reference, and the row with
half as many steps shows how far it is from converged) and by each candidate with NFE model calls:

- every official DPM-Solver(++) and UniPC configuration (`tune_accuracy.official`: algorithms, orders,
  multistep / singlestep, solver and UniPC variants, prediction types, every skip type, lower_order_final on
  and off), the best chosen on the evaluation noises themselves (which favours it): one row for the best by
  Fréchet distance and, when another, one for the best by RMS distance;
- `pydpm.samplers.tune` at that NFE, calibrated on its own noise (another seed: it never sees the evaluation
  noises) against its own 500-step reference, then run once on the evaluation noises. `--data` also passes it
  the training images, adding DPM-Solver-v3 with statistics from them as a candidate.

Two distances of each candidate's M samples to the reference samples from the same noises:

- the Fréchet distance (`pydpm.metrics.frechet_distance`) between the two sets, on the raw pixels (64
  features). At 8×8 the pixels are a fair feature space: 64 dimensions are few enough for the means and
  covariances to be estimated from 2000 samples, and an image this small has no texture or fine structure
  that a learned feature extractor could see beyond the pixel statistics (FID's Inception network expects
  299×299 natural photographs: an 8×8 digit would reach it upsampled some 37×, far from what it was trained
  on). What it measures is the distribution error a few steps make.
- the RMS distance to the reference solution from the same noise (root mean square over samples and pixels):
  the pathwise ODE error, which the tuner minimises.

Since both sets come from the same noises, the Fréchet distance goes to 0 with the solver error; the row
"reference halves" gives the Fréchet distance between two independent halves of the reference set (M/2
samples each), the size of the metric's sampling noise between unpaired sets of that size. The ratio columns
are the best official value of that column over the row's (> 1: the row beats every official configuration).
Prints a Markdown table and a line with the settings, the model's training loss and the Fréchet distance of its
reference samples to the training images (how well it learned the digits).
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

try:
    from .sampler_accuracy import _row
    from .tune_accuracy import official
except ImportError:  # run as a script from a checkout
    from sampler_accuracy import _row  # type: ignore[no-redef]
    from tune_accuracy import official  # type: ignore[no-redef]

SHAPE = (1, 8, 8)
WIDTH, BLOCKS, EMBEDDING = 256, 3, 64   # the MLP: hidden width, residual blocks, time-embedding size
TRAIN_BATCH, LR, EMA_DECAY = 256, 1e-3, 0.999


class Denoiser(nn.Module):
    """ε(x, k) for images [B, *SHAPE] at DDPM step labels k [B] (floats in [0, 999]: `model_wrapper` passes
    1000·(t − 1/N)): the flattened pixels through a linear layer, `blocks` pre-norm residual MLP blocks each
    given a projection of the step embedding (sinusoidal, then a two-layer MLP), and a linear read-out. Plain
    torch ops, differentiable in x and k."""

    freqs: torch.Tensor

    def __init__(self, pixels: int, width: int, blocks: int, embedding: int) -> None:
        super().__init__()
        half = embedding // 2
        self.register_buffer("freqs", torch.exp(-math.log(10000.0) * torch.arange(half) / half))
        self.embed = nn.Sequential(nn.Linear(embedding, width), nn.SiLU(), nn.Linear(width, width))
        self.inp = nn.Linear(pixels, width)
        self.conds = nn.ModuleList(nn.Linear(width, width) for _ in range(blocks))
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
            for _ in range(blocks))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, pixels))

    def forward(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        angles = k.to(self.freqs.dtype).reshape(-1, 1) * self.freqs
        emb = self.embed(torch.cat([angles.sin(), angles.cos()], dim=1))
        act = F.silu(emb)
        h = self.inp(x.flatten(1)) + emb
        for cond, block in zip(self.conds, self.blocks):
            h = h + block(h + cond(act))
        return self.out(h).view_as(x)


def train(images: torch.Tensor, steps: int, seed: int) -> tuple[nn.Module, float, float]:
    """A Denoiser trained for `steps` Adam steps of the DDPM ε-objective on `images` [N, *SHAPE]: each step
    draws TRAIN_BATCH images, labels k ~ U{0, …, 999} and noise ε, forms x_k = √ᾱ_k·x₀ + √(1 − ᾱ_k)·ε and
    minimises the mean squared error of the ε prediction. Returns the EMA model (frozen), the mean loss of the
    last tenth of the steps and the seconds taken."""
    from pydpm.training import EMA, ddpm_betas

    began = time.perf_counter()
    torch.manual_seed(seed)
    net = Denoiser(math.prod(SHAPE), WIDTH, BLOCKS, EMBEDDING)
    ema = EMA(net, EMA_DECAY)
    alphas_cumprod = torch.cumprod(1.0 - ddpm_betas(), 0).float()
    optimizer = torch.optim.Adam(net.parameters(), lr=LR, foreach=True)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    gen = torch.Generator().manual_seed(seed)
    tail, losses = max(1, steps // 10), []
    for step in range(steps):
        x0 = images[torch.randint(0, images.shape[0], (TRAIN_BATCH,), generator=gen)]
        k = torch.randint(0, alphas_cumprod.numel(), (TRAIN_BATCH,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas_cumprod[k].view(-1, *[1] * len(SHAPE))
        loss = F.mse_loss(net(a.sqrt() * x0 + (1.0 - a).sqrt() * noise, k.float()), noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        ema.update(net)
        if step >= steps - tail:
            losses.append(float(loss.detach()))
    return ema.model, sum(losses) / len(losses), time.perf_counter() - began


def time_shift_table(model, ns, x: torch.Tensor, ref: torch.Tensor, steps: int, images: torch.Tensor,
                     nfes: list[int], frechet_distance) -> None:
    """DPM-Solver++(2M) (time_uniform, the time-shift paper's base solver) with and without the time-shift sampler
    (the paper's rule, data_variance = 0, at two window / cut-off settings, and the rule with the training images'
    mean per-image variance): the Fréchet distance of its samples to the training images (what exposure bias is
    about) and to the reference samples from the same noises (how far the shift moves them off the ODE)."""
    from pydpm.samplers import DPMSolver, TimeShift

    v = float(images.flatten(1).var(dim=1).mean())
    settings = [("none", None), ("window 10, cut-off 0.2", TimeShift(window=10, cutoff=0.2)),
                ("window 20, cut-off 0.3", TimeShift(window=20, cutoff=0.3)),
                (f"window 10, cut-off 0.2, data variance {v:.3f}", TimeShift(window=10, cutoff=0.2, data_variance=v))]
    flat_images, flat_ref = images.flatten(1), ref.flatten(1)
    print("| NFE | time shift | Fréchet distance to the training images | Fréchet distance to the reference |")
    print(_row("---:", ["---", "---:", "---:"]))
    print(_row(str(steps), ["reference (DPM-Solver++(3M))", f"{frechet_distance(flat_ref, flat_images):.3e}", "0"]))
    for nfe in nfes:
        for name, shift in settings:
            with torch.no_grad():
                y = DPMSolver(model, ns).sample(x, steps=nfe, order=2, time_shift=shift).flatten(1)
            print(_row(str(nfe), [name, f"{frechet_distance(y, flat_images):.3e}",
                                  f"{frechet_distance(y, flat_ref):.3e}"]), flush=True)


def _positive(parser: argparse.ArgumentParser, flag: str, value: int, low: int = 1) -> None:
    if value < low:
        parser.error(f"{flag}: must be an int >= {low}, got {value}")


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pydpm.bench.tune_digits", description=__doc__.split("\n")[0])
    parser.add_argument("--nfe", type=int, nargs="+", default=[5], help="model calls per sample (default 5)")
    parser.add_argument("--eval", type=int, default=2000, help="evaluation noises (default 2000)")
    parser.add_argument("--train-steps", type=int, default=7000, help="training steps of the model (default 7000)")
    parser.add_argument("--calibration", type=int, default=4096, help="tune's n_calibration (default 4096)")
    parser.add_argument("--iterations", type=int, default=1500, help="tune's iterations (default 1500)")
    parser.add_argument("--reference-steps", type=int, default=1000, help="steps of the reference solution "
                        "(default 1000)")
    parser.add_argument("--data", action="store_true", help="pass the training images to tune (adds DPM-Solver-v3 "
                        "with statistics from them as a candidate)")
    parser.add_argument("--seed", type=int, default=0, help="training seed; the evaluation noises use seed + 1 and "
                        "tune's calibration seed + 2 (default 0)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--time-shift", action="store_true", help="instead of the official solvers and tune: "
                        "DPM-Solver++(2M) with and without the time-shift sampler, by Fréchet distance to the "
                        "training images")
    args = parser.parse_args(argv)
    for nfe in args.nfe:
        _positive(parser, "--nfe", nfe)
    _positive(parser, "--eval", args.eval, 4)  # two halves of >= 2 samples for the noise floor
    _positive(parser, "--train-steps", args.train_steps)
    _positive(parser, "--reference-steps", args.reference_steps, 2)  # and half as many for the convergence row
    _positive(parser, "--calibration", args.calibration)
    _positive(parser, "--iterations", args.iterations, 0)
    _positive(parser, "--seed", args.seed, 0)
    _positive(parser, "--threads", args.threads)

    from pydpm.data import digits
    from pydpm.metrics import frechet_distance
    from pydpm.samplers import DPMSolver, tune
    from pydpm.schedules import NoiseScheduleVP, model_wrapper
    from pydpm.training import ddpm_betas

    torch.set_num_threads(args.threads)
    began = time.perf_counter()

    def stage(text: str) -> None:
        print(f"[{time.perf_counter() - began:5.0f} s] {text}", file=sys.stderr, flush=True)

    images = digits(size=SHAPE[-1])
    stage(f"training the model: {args.train_steps} steps")
    net, train_loss, train_seconds = train(images, args.train_steps, args.seed)
    ns = NoiseScheduleVP("discrete", betas=ddpm_betas())
    model = model_wrapper(net, ns)
    x = torch.randn((args.eval, *SHAPE), generator=torch.Generator().manual_seed(args.seed + 1))

    def reference(n: int) -> torch.Tensor:
        with torch.no_grad():
            return DPMSolver(model, ns).sample(x, steps=n, order=3, skip_type="logSNR", third_order="corrected")

    steps = args.reference_steps
    stage(f"reference: {steps} and {steps // 2} steps on {args.eval} noises")
    ref = reference(steps)
    flat_ref = ref.flatten(1)

    def distances(y: torch.Tensor) -> tuple[float, float]:
        """(Fréchet distance, RMS distance) of samples y to the reference samples from the same noises."""
        return frechet_distance(y.flatten(1), flat_ref), float((y - ref).square().mean().sqrt())

    if args.time_shift:
        time_shift_table(model, ns, x, ref, steps, images, args.nfe, frechet_distance)
        print(f"\n({time.perf_counter() - began:.0f} s; torch {torch.__version__}; {args.threads} thread(s); "
              f"model: {args.train_steps} training steps, final loss {train_loss:.4f}; {args.eval} evaluation noises "
              f"(seed {args.seed + 1}); the training images' variance per image, averaged: "
              f"{float(images.flatten(1).var(dim=1).mean()):.3f})")
        return 0
    half = args.eval // 2
    floor = frechet_distance(flat_ref[:half], flat_ref[half:])
    fd_half, rms_half = distances(reference(steps // 2))
    fd_data = frechet_distance(flat_ref, images.flatten(1))

    print("| NFE | sampler | configuration | Fréchet distance | RMS distance | best official ÷ this (Fréchet) "
          "| best official ÷ this (RMS) |")
    print(_row("---:", ["---", "---", "---:", "---:", "---:", "---:"]))
    print(_row(str(steps), ["reference halves", f"{half} vs {args.eval - half} samples (noise floor of the "
                            "Fréchet distance)", f"{floor:.2e}", "—", "—", "—"]))
    print(_row(str(steps // 2), ["reference, half the steps", f"DPM-Solver++(3M) corrected, logSNR, vs {steps} "
                                 "steps (convergence)", f"{fd_half:.2e}", f"{rms_half:.2e}", "—", "—"]), flush=True)
    ran = {}
    for nfe in args.nfe:
        stage(f"NFE {nfe}: official configurations")
        results, total = [], 0
        with torch.no_grad():
            for label, fn in official(model, ns):
                total += 1
                try:
                    y = fn(x, nfe)
                except ValueError:  # e.g. fewer steps than the order
                    continue
                if bool(torch.isfinite(y).all()):
                    results.append((*distances(y), label))
        ran[nfe] = (len(results), total)
        best_fd = min(results, key=lambda r: r[0])
        best_rms = min(results, key=lambda r: r[1])
        stage(f"NFE {nfe}: tune")
        tuned = tune(model, ns, nfe, shape=SHAPE, n_calibration=args.calibration, iterations=args.iterations,
                     seed=args.seed + 2, dtype=torch.float32, data=images if args.data else None)
        with torch.no_grad():
            fd_tuned, rms_tuned = distances(tuned.sample(x))
        r = tuned.report
        rows = [("best official (Fréchet)", best_fd[2], best_fd[0], best_fd[1])]
        if best_rms[2] != best_fd[2]:
            rows.append(("best official (RMS)", best_rms[2], best_rms[0], best_rms[1]))
        rows.append(("tune" + (" (data)" if args.data else ""),
                     f"chosen {r['chosen']}, {r['model_calls']} model calls, {r['seconds']:.0f} s", fd_tuned,
                     rms_tuned))
        for name, config, fd, rms in rows:
            print(_row(str(nfe), [name, config, f"{fd:.2e}", f"{rms:.2e}", f"{best_fd[0] / fd:.2f}×",
                                  f"{best_rms[1] / rms:.2f}×"]), flush=True)
    print(f"\n({time.perf_counter() - began:.0f} s; torch {torch.__version__}; {args.threads} thread(s); model: MLP "
          f"width {WIDTH}, {BLOCKS} blocks, {sum(p.numel() for p in net.parameters())} parameters, "
          f"{args.train_steps} training steps in {train_seconds:.0f} s, final loss {train_loss:.4f}, Fréchet "
          f"distance of its {steps}-step samples to the {images.shape[0]} training images {fd_data:.2e}; "
          f"{args.eval} evaluation noises (seed {args.seed + 1}); tune: {args.calibration} calibration samples "
          f"(seed {args.seed + 2}), {args.iterations} iterations" + (", data" if args.data else "") + "; official "
          "configurations that ran: " + ", ".join(f"{n} of {t} at NFE {nfe}" for nfe, (n, t) in ran.items()) + ")")
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
