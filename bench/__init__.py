"""pydpm's benchmark suite: `pydpm bench [--quick] [--ops ... | --models] [--cases REGEX] [--impls REGEX]
[--device cpu|cuda] [--out DIR]`, `pydpm bench --compare OLD NEW [--threshold PCT]` and
`pydpm bench --plot RESULTS... [--out DIR]`.

One harness (harness.py) and one thin file per op family that declares its cases and peers; compare.py and
plot.py read results.json files. From a checkout, `python -m bench` runs the same suite;
`python -m pytest bench --benchmark-only` runs a few cases under pytest-benchmark.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch

from . import harness

# One module of this package per op family, and `models`: pydpm inside real diffusers models.
OPS = ("solver_step", "samplers", "time_shift", "wavelet", "frequency", "spectral", "norm", "geglu", "attention",
       "models")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pydpm bench", description="Time every pydpm op on each of its backends against its peers, side by "
        "side on the device at hand; print a table and write results.json, results.md and plots. Or compare "
        "two runs (--compare), or plot one (--plot).")
    parser.add_argument("--out", type=Path, help="results folder, a new one (default: a new folder per run, "
                        "bench-results/<UTC time>-<card>-<commit>[-quick]); with --plot, the folder for the "
                        "plots (default: beside the results)")
    parser.add_argument("--ops", nargs="+", choices=OPS, help="op families to run (default: all)")
    parser.add_argument("--models", action="store_true", help="the model benchmarks alone (bench/models.py: "
                        "diffusers' SD1.5, SDXL, DiT-XL/2 and PixArt-alpha with random weights, CUDA only); the same "
                        "as --ops models")
    parser.add_argument("--quick", action="store_true", help="small sizes and few repetitions")
    parser.add_argument("--cases", metavar="REGEX", help="only the cases whose label ('attn+bwd (2,8,4096,40) fp16') "
                        "matches REGEX (re.search)")
    parser.add_argument("--impls", metavar="REGEX", help="only the implementations (rows) whose name ('eager', "
                        "'pydpm[triton]', 'torch.compile[max-autotune]') matches REGEX (re.search): a slow peer on its "
                        "own, beside the row the speed-ups are taken against")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to run (default: cuda when available); CPU runs use small shapes and fp32")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("OLD", "NEW"),
                        help="compare two runs (results.json files or their folders) row by row on eager us; "
                        "exit status 1 when a row regressed")
    parser.add_argument("--threshold", type=float, default=10.0, metavar="PCT",
                        help="--compare: a row more than PCT percent slower is a regression (default: 10)")
    parser.add_argument("--plot", nargs="+", type=Path, metavar="RESULTS",
                        help="plot runs (results.json files or their folders; per card and op family the newest "
                        "run that has it): speed-up over each peer and fraction of the ceiling, one PNG per family")
    return parser


def run(argv: list[str] | None = None) -> int:
    """Run the benchmark suite (or --compare, --plot) with command-line arguments `argv`; returns the exit
    status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.compare and args.plot:
        parser.error("--compare and --plot: one at a time")
    if args.models and args.ops:
        parser.error("--models is --ops models: give one of them")
    args.ops = ["models"] if args.models else args.ops or list(OPS)
    if args.compare:
        from . import compare

        return compare.main(*args.compare, threshold=args.threshold / 100)
    if args.plot:
        from . import plot

        return plot.main(args.plot, args.out)
    if args.out is not None and (args.out / "results.json").exists():
        parser.error(f"--out {args.out} holds another run's results; name a new folder (without --out, every "
                     f"run gets its own under bench-results/)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device; run with --device cpu")
    modules = {name: importlib.import_module(f".{name}", __name__) for name in args.ops}
    arguments = {"argv": list(sys.argv[1:] if argv is None else argv), "quick": args.quick, "ops": args.ops,
                 "cases": args.cases, "impls": args.impls, "device": args.device,
                 "out": None if args.out is None else str(args.out)}
    return harness.run_suite(modules, torch.device(args.device), quick=args.quick, out=args.out, cases=args.cases,
                             impls=args.impls, arguments=arguments)
