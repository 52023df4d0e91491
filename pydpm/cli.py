"""Command line: `pydpm info` (build, devices, backends and why others are unavailable), `pydpm bench`,
`pydpm train` (a SlimUNet with the DDPM objective), `pydpm distill` (a slim student from a trained teacher),
`pydpm --version`. Each command imports what it needs when it runs: `pydpm info` imports no training code.

Output piped into a reader that stops early (`pydpm info | head -3`) ends the command quietly with exit
status 141, the status of a command killed by SIGPIPE, as `cat` and other shell tools report it.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
from typing import Any

# 128 + SIGPIPE: what the shell reports for a command whose reader closed the pipe.
EXIT_BROKEN_PIPE = 141


def info() -> dict[str, Any]:
    """Version, build info of `_C` (or its load error), devices, and per-op backend availability."""
    import torch

    from pydpm import __version__, _backend
    from pydpm.ops import REGISTRY

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    ops = {}
    for name, op in REGISTRY.items():
        probe = next(iter(op.sample_inputs(device, torch.float32, small=True)))[1]
        ops[name] = op.not_supported_reasons(op.check(**probe))
    return {
        "pydpm": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "build": _backend.build_info() or {"load_error": _backend.C_LOAD_ERROR},
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.machine()})",
        "triton": _backend.triton_reason(device, forced=False) or "available",
        "ops": ops,
    }


def _print_info() -> int:
    data = info()
    for key in ("pydpm", "python", "torch", "device", "triton"):
        print(f"{key:8s} {data[key]}")
    print("build    " + ", ".join(f"{k}={v}" for k, v in data["build"].items()))
    for op, reasons in data["ops"].items():
        print(f"op {op} (float32 on {data['device']}):")
        for backend, why in reasons.items():
            print(f"  {backend:10s} {'available' if not why else 'unavailable: ' + '; '.join(why)}")
    return 0


def _int_list(text: str) -> tuple[int, ...]:
    """"1,2,2,4" -> (1, 2, 2, 4); "none" or "" -> () (attention nowhere)."""
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints such as 1,2,2,4, got {text!r}") from None


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written; "(default: ...)" after the options that have one (not None, not a flag)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is not None and action.default is not False and action.default is not argparse.SUPPRESS \
                and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


_TRAIN_HELP = """\
Train a SlimUNet on a small image set shipped with PyWavelets or scikit-learn, with the DDPM objective
(ε prediction, betas linear 1e-4..0.02 over 1000 steps), AdamW, an EMA of the weights and gradient clipping.
Writes OUT/checkpoint.pt (every --checkpoint-every steps and at the end), OUT/log.jsonl, OUT/metrics.json,
OUT/loss.png (with matplotlib) and OUT/samples.png (EMA model, DPM-Solver++(2M)). --resume continues from
OUT/checkpoint.pt and gives, bit for bit, the result of an uninterrupted run. Under torchrun
(`torchrun --nproc_per_node N -m pydpm train ...`) the processes split the global --batch (DDP: NCCL on CUDA,
gloo on the CPU); only rank 0 writes files."""

_DISTILL_HELP = """\
Distill a slim student (the "student" preset: wavelet gates, base width 40, the teacher's layout) from a
`pydpm train` teacher (its EMA weights) with spectrum-aware distillation (pydpm.distill):
  --mode spectral  DDPM loss + 0.1 · spatial feature loss + 0.1 · frequency-weighted feature loss
  --mode spatial   DDPM loss + 0.1 · spatial feature loss
  --mode none      the DDPM loss alone (the student trained without a teacher, for comparison)
The data default to the teacher's; the image size is the teacher's. Outputs, --resume and torchrun as for
`pydpm train`."""


def _training_parser(command: str) -> argparse.ArgumentParser:
    """The options of `pydpm train` / `pydpm distill`, with the defaults of pydpm.training's configs."""
    from pydpm.data import DATASETS
    from pydpm.training import MODES, DistillConfig, TrainConfig

    distill = command == "distill"
    d = DistillConfig() if distill else TrainConfig()
    p = argparse.ArgumentParser(prog=f"pydpm {command}", description=_DISTILL_HELP if distill else _TRAIN_HELP,
                                formatter_class=_HelpFormatter)
    if distill:
        p.add_argument("--teacher", required=True, metavar="DIR_OR_CKPT",
                       help="the teacher: a `pydpm train` --out directory or its checkpoint.pt")
        p.add_argument("--mode", choices=MODES, default=d.mode if isinstance(d, DistillConfig) else None,
                       help="the distillation loss (see above)")
        p.add_argument("--lambda-spatial", type=float, metavar="λs",
                       help="weight of the spatial feature loss (default: 0.1 in modes spectral and spatial)")
        p.add_argument("--lambda-freq", type=float, metavar="λf",
                       help="weight of the frequency feature loss (default: 0.1 in mode spectral)")
    p.add_argument("--out", default=d.out, metavar="DIR", help="the run's directory (created)")
    run = p.add_argument_group("data and schedule")
    run.add_argument("--data", choices=DATASETS, default=None,
                     help="PyWavelets image to cut patches from, or scikit-learn's digits (default: "
                          + ("the teacher's)" if distill else "camera)"))
    run.add_argument("--size", type=int, metavar="PX",
                     help="image size (default: " + ("the teacher's, the only one allowed)" if distill else "32)"))
    run.add_argument("--dataset-size", type=int, default=d.dataset_size, metavar="N",
                     help="patches cut from the image (digits: all 1797)")
    run.add_argument("--steps", type=int, default=d.steps, metavar="N", help="optimizer steps in all")
    run.add_argument("--batch", type=int, default=d.batch, metavar="B",
                     help="global batch, split evenly over the processes")
    run.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate (constant)")
    run.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    run.add_argument("--grad-clip", type=float, default=d.grad_clip, metavar="NORM",
                     help="clip the gradient norm to this (0: off)")
    run.add_argument("--ema", type=float, default=d.ema, metavar="DECAY",
                     help="EMA decay of the weights sampled and saved as 'ema' (in [0, 1))")
    run.add_argument("--bf16", action="store_true", help="bf16 autocast of the forward pass (CUDA or the CPU)")
    run.add_argument("--seed", type=int, default=d.seed, help="seeds the init, the patches, the data order, the noise")
    run.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available; cuda:LOCAL_RANK under "
                                      "torchrun)")
    files = p.add_argument_group("checkpoints and outputs")
    files.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, metavar="K",
                       help="save OUT/checkpoint.pt every K steps (0: only at the end)")
    files.add_argument("--resume", action="store_true",
                       help="continue the run in OUT from its checkpoint (same settings; --steps may grow)")
    files.add_argument("--log-every", type=int, default=d.log_every, metavar="N",
                       help="steps per line of log.jsonl and per progress update")
    files.add_argument("--samples", type=int, default=d.samples, metavar="N",
                       help="images in samples.png (0: no sampling)")
    files.add_argument("--sample-steps", type=int, default=d.sample_steps, metavar="N",
                       help="DPM-Solver++(2M) steps for samples.png")
    files.add_argument("--quiet", action="store_true", help="no progress line")
    model = p.add_argument_group(
        "model (SlimUNet; unset: the preset's" + (", with the teacher's layout)" if distill else ")"))
    model.add_argument("--preset", choices=("teacher", "student"), default=d.preset, help="SlimUNet preset")
    model.add_argument("--base-channels", type=int, metavar="C", help="width of the first level")
    model.add_argument("--channel-mult", type=_int_list, metavar="M,M,...", help="width multiplier per level")
    model.add_argument("--num-res-blocks", type=int, metavar="N", help="ResBlocks per level")
    model.add_argument("--attention-resolutions", type=_int_list, metavar="R,R,...|none",
                       help="feature sizes with self-attention")
    model.add_argument("--groups", type=int, metavar="G", help="GroupNorm groups")
    model.add_argument("--heads", type=int, metavar="H", help="attention heads")
    model.add_argument("--dropout", type=float, metavar="P", help="ResBlock dropout")
    return p


def _train(command: str, argv: list[str]) -> int:
    """`pydpm train` / `pydpm distill`: parse, run, and report a bad setting as argparse does (status 2)."""
    from pydpm import training

    parser = _training_parser(command)
    args = vars(parser.parse_args(argv))
    args["progress"] = not args.pop("quiet")
    config_type = training.DistillConfig if command == "distill" else training.TrainConfig
    config = config_type(**args)
    try:
        if isinstance(config, training.DistillConfig):
            training.distill(config)
        else:
            training.train(config)
    except training.ConfigError as e:
        parser.error(f"argument {e.flag}: {e.problem}")
    return 0


def _run(argv: list[str]) -> int:
    from pydpm import __version__

    parser = argparse.ArgumentParser(prog="pydpm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"pydpm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version, build, devices and available backends")
    sub.add_parser("bench", help="run the benchmark suite (pydpm bench --help for options)", add_help=False)
    sub.add_parser("train", help="train a SlimUNet (pydpm train --help for options)", add_help=False)
    sub.add_parser("distill", help="distill a slim student from a trained teacher (pydpm distill --help)",
                   add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        return _print_info()
    if args.command in ("train", "distill"):
        return _train(args.command, rest)
    from pydpm.bench import run

    return run(rest)


def main(argv: list[str] | None = None) -> int:
    try:
        status = _run(argv if argv is not None else sys.argv[1:])
        sys.stdout.flush()  # a closed pipe raises here, not in the interpreter's flush at exit
    except BrokenPipeError:
        # Python flushes stdout again at exit: point it at /dev/null so that flush cannot fail too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    return status
