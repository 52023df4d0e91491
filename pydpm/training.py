"""Train a SlimUNet teacher with the DDPM objective, or distill a slim student from one, on one process or many.

The objective (Ho et al., 2020): the DDPM noise schedule, betas linear from 1e-4 to 0.02 over N = 1000 steps,
ᾱ_k = Π_{i≤k} (1 − β_i); each step draws k ~ U{0, …, 999} and ε ~ N(0, I) per image, forms
x_k = √ᾱ_k · x0 + √(1 − ᾱ_k) · ε and minimises the mean squared error of the network's ε prediction at the
step label k. Sampling uses the same table (`NoiseScheduleVP("discrete", betas=ddpm_betas())`, whose
`model_wrapper` feeds the network the label k) with DPM-Solver++(2M).

`train(TrainConfig(...))` trains a network (the "teacher" preset by default); `distill(DistillConfig(...))`
trains a student through `pydpm.distill.SpectrumAwareDistiller` on a teacher checkpoint, in mode "spectral"
(λs = λf = 0.1), "spatial" (λf = 0) or "none" (plain DDPM training of the student: the ablation's baseline).
`pydpm train` / `pydpm distill` are the command-line front ends (pydpm.cli).

What a run does: AdamW at a constant learning rate, gradient-norm clipping, an exponential moving average
(EMA) of the weights (the weights sampled and used as a teacher), optional bf16 autocast, a progress line on
stderr, and these files in `out` (written by rank 0 only):

    checkpoint.pt   every `checkpoint_every` steps and at the end: weights, EMA, optimizer, step, the data
                    order, the noise generator and every rank's torch RNG states
    log.jsonl       one JSON line per `log_every` steps (and at each checkpoint): the loss terms averaged over
                    the steps since the last line and over the ranks, it/s, seconds elapsed
    metrics.json    the final numbers and the resolved configuration
    loss.png        the loss curves (needs matplotlib; skipped with a message without it)
    samples.png     a grid of samples of the EMA model (DPM-Solver++(2M), `sample_steps` steps), written by
                    `write_png` (zlib + struct: no imaging library needed)

Resuming (`resume=True`) from checkpoint.pt continues the run exactly: the data order and the noise come
from generators whose states are saved, so an interrupted and resumed run ends with the same parameters,
bit for bit, as one that was not interrupted (with the same number of processes and threads).

Multi-process: launched by `torchrun` (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR in the environment), a
run joins a torch.distributed group (NCCL on CUDA, gloo on the CPU) and wraps the trained module in
DistributedDataParallel. Every rank draws the same global batch (indices, steps k and noise from the shared
generators) and takes its contiguous shard of `batch // world_size` images, so N processes compute the
gradient of the same global batch as one process: the results agree to float rounding (the gradient is
averaged across ranks instead of over one batch).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import nn

from pydpm import data as datasets
from pydpm.distill import MODE_WEIGHTS
from pydpm.models import PRESETS, SlimUNet

NUM_TRAIN_STEPS = 1000
BETA_START, BETA_END = 1e-4, 0.02
CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "pydpm-training/1"
MODES = tuple(MODE_WEIGHTS)  # the distillation modes: spectral, spatial, none (pydpm.distill.MODE_WEIGHTS)
# Settings a resumed run may change; any other difference from the checkpoint's configuration is refused.
RESUMABLE = ("out", "steps", "checkpoint_every", "log_every", "samples", "sample_steps", "resume", "device",
             "progress")
# The SlimUNet constructor arguments a configuration may override (None: the preset's, or the teacher's).
MODEL_FIELDS = ("base_channels", "channel_mult", "num_res_blocks", "attention_resolutions", "groups", "heads",
                "dropout")


class ConfigError(ValueError):
    """A bad setting, named by its command-line flag: str(e) is "--steps: must be an int >= 1, got 0"."""

    def __init__(self, flag: str, problem: str):
        super().__init__(f"{flag}: {problem}")
        self.flag, self.problem = flag, problem


def ddpm_betas() -> torch.Tensor:
    """DDPM's β table, float64 [1000]: linear from 1e-4 to 0.02."""
    return torch.linspace(BETA_START, BETA_END, NUM_TRAIN_STEPS, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------------------
# Configuration

@dataclass
class TrainConfig:
    """Settings of a training run; each field is the command-line flag of the same name (`batch` is --batch,
    `checkpoint_every` is --checkpoint-every). None means "the default described here"."""

    out: str = "runs/teacher"            # the run's directory (created)
    data: str | None = None              # camera | ascent | aero | digits (None: camera; distill: the teacher's)
    size: int | None = None              # image size (None: 32; distill: the teacher's, the only one allowed)
    dataset_size: int = 2048             # patches cut from the image (digits: all 1797, this is ignored)
    steps: int = 5000                    # optimizer steps in all (a resumed run continues up to this)
    batch: int = 64                      # the global batch, split evenly over the processes
    lr: float = 2e-4                     # AdamW learning rate (constant)
    weight_decay: float = 0.0
    grad_clip: float = 1.0               # max gradient norm (0: no clipping)
    ema: float = 0.999                   # EMA decay (warmed up as min(ema, (1 + n) / (10 + n)) at update n)
    bf16: bool = False                   # bf16 autocast of the forward pass (CUDA, or the CPU)
    checkpoint_every: int = 1000         # steps between checkpoints (0: only at the end)
    log_every: int = 50                  # steps per line of log.jsonl and per progress update
    samples: int = 16                    # images in samples.png (0: no sampling)
    sample_steps: int = 20               # DPM-Solver++(2M) steps for samples.png
    seed: int = 0                        # seeds the model init, the data (crops and order) and the noise
    resume: bool = False                 # continue from out/checkpoint.pt
    preset: str = "teacher"              # SlimUNet preset: teacher | student
    base_channels: int | None = None     # SlimUNet overrides (None: the preset's)
    channel_mult: tuple[int, ...] | None = None
    num_res_blocks: int | None = None
    attention_resolutions: tuple[int, ...] | None = None
    groups: int | None = None
    heads: int | None = None
    dropout: float | None = None
    device: str | None = None            # None: cuda (cuda:LOCAL_RANK under torchrun) when available, else cpu
    progress: bool = True                # the progress line on stderr

    def model_overrides(self) -> dict[str, Any]:
        """The SlimUNet arguments this configuration sets (those not None)."""
        return {name: getattr(self, name) for name in MODEL_FIELDS if getattr(self, name) is not None}


@dataclass
class DistillConfig(TrainConfig):
    """A distillation run: TrainConfig's settings (the model ones describe the student), and the teacher.

    The student is the "student" preset (base_channels 40, groups 8, wavelet gates) with the teacher's layout
    (in_channels, sample_size, channel_mult, num_res_blocks, attention_resolutions), so that the feature points
    pair up level by level; the model fields override it. The teacher is the EMA weights of its checkpoint."""

    out: str = "runs/student"
    preset: str = "student"
    teacher: str = ""                    # a `pydpm train` directory, or a checkpoint file
    mode: str = "spectral"               # spectral | spatial | none
    lambda_spatial: float | None = None  # λs (None: the mode's, 0.1; "none" has no spatial term)
    lambda_freq: float | None = None     # λf (None: the mode's, 0.1 for "spectral"; only "spectral" has it)

    def loss_weights(self) -> tuple[float, float]:
        """(λs, λf) of this mode, with the overrides."""
        spatial, freq = MODE_WEIGHTS[self.mode]
        if self.lambda_spatial is not None:
            spatial = self.lambda_spatial
        if self.lambda_freq is not None:
            freq = self.lambda_freq
        return spatial, freq


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_int(cfg: TrainConfig, name: str, low: int) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(_flag(name), f"must be an int >= {low}, got {value!r}")


def _check_real(cfg: TrainConfig, name: str, low: float, high: float = math.inf, *, low_open: bool = False,
                high_open: bool = False) -> None:
    value = getattr(cfg, name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ConfigError(_flag(name), f"must be a number in {interval}, got {value!r}")


def check_config(cfg: TrainConfig) -> None:
    """Raise ConfigError, naming the flag and the fix, for a setting out of range; the model's own arguments
    are checked by SlimUNet when it is built."""
    for name, low in (("steps", 1), ("batch", 1), ("dataset_size", 1), ("checkpoint_every", 0), ("log_every", 1),
                      ("samples", 0), ("sample_steps", 1), ("seed", 0)):
        _check_int(cfg, name, low)
    if cfg.size is not None:
        _check_int(cfg, "size", 1)
    _check_real(cfg, "lr", 0.0, low_open=True)
    _check_real(cfg, "weight_decay", 0.0)
    _check_real(cfg, "grad_clip", 0.0)
    _check_real(cfg, "ema", 0.0, 1.0, high_open=True)
    if cfg.data is not None and cfg.data not in datasets.DATASETS:
        raise ConfigError("--data", f"unknown dataset {cfg.data!r}; choose one of {', '.join(datasets.DATASETS)}")
    if cfg.preset not in PRESETS:
        raise ConfigError("--preset", f"unknown preset {cfg.preset!r}; choose one of {', '.join(PRESETS)}")
    if cfg.device is not None:
        try:
            kind = torch.device(cfg.device).type
        except RuntimeError as e:
            raise ConfigError("--device", f"{cfg.device!r} is not a device ({e}); use cpu, cuda or cuda:N") from e
        if kind not in ("cpu", "cuda"):
            raise ConfigError("--device", f"{cfg.device!r}: use cpu, cuda or cuda:N")
        if kind == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device", f"{cfg.device!r}, but torch sees no CUDA device; use --device cpu")
    if isinstance(cfg, DistillConfig):
        if cfg.mode not in MODES:
            raise ConfigError("--mode", f"unknown mode {cfg.mode!r}; choose one of {', '.join(MODES)}")
        for name in ("lambda_spatial", "lambda_freq"):
            if getattr(cfg, name) is not None:
                _check_real(cfg, name, 0.0)
        if cfg.mode != "spectral" and cfg.lambda_freq:
            raise ConfigError("--lambda-freq", f"mode {cfg.mode!r} has no frequency term; use --mode spectral")
        if cfg.mode == "none" and cfg.lambda_spatial:
            raise ConfigError("--lambda-spatial", "mode 'none' has no spatial term; use --mode spatial or spectral")
        if not cfg.teacher:
            raise ConfigError("--teacher", "required: the --out directory of a `pydpm train` run, or its "
                                           "checkpoint.pt")


# ---------------------------------------------------------------------------------------------------------------
# Processes

@dataclass
class Distributed:
    """This process's place in the run: rank, world size, device, and whether this run created the process
    group (then it also destroys it)."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def main(self) -> bool:
        """Rank 0, the one process that prints and writes files."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch_dist.barrier()


def setup_distributed(device: str | None) -> Distributed:
    """Join the torch.distributed group that torchrun describes in the environment (WORLD_SIZE > 1), with the
    NCCL backend on CUDA and gloo on the CPU, or reuse one already initialised; a single process otherwise.
    Under torchrun on CUDA each rank uses cuda:LOCAL_RANK, so a node runs at most one process per CUDA device (NCCL
    takes no two ranks on one device): more is a ConfigError, raised before the group is joined."""
    cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda and world > 1 and local_rank >= (devices := torch.cuda.device_count()):
        raise ConfigError("--device", f"local rank {local_rank} of a {world}-process run, but this node has "
                                      f"{devices} CUDA device(s) and each process takes its own: start at most "
                                      f"{devices} per node (torchrun --nproc_per_node), or train on the CPU with "
                                      f"gloo (--device cpu)")
    owns = False
    if torch_dist.is_available() and torch_dist.is_initialized():
        world = torch_dist.get_world_size()
    elif world > 1:
        torch_dist.init_process_group(backend="nccl" if cuda else "gloo")
        owns = True
    rank = torch_dist.get_rank() if world > 1 else 0
    if cuda:
        dev = torch.device(device) if device is not None and world == 1 else torch.device("cuda", local_rank)
        if dev.index is None:  # "cuda": the current device, named, as set_device and the checkpoints need
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    return Distributed(rank=rank, world=world, device=dev, owns_group=owns)


# ---------------------------------------------------------------------------------------------------------------
# Data order, EMA, checkpoints

class EpochSampler:
    """Global batches of dataset indices: a fresh random permutation per epoch, drawn from its own generator,
    a batch running on into the next epoch where one ends. `state_dict()` holds all that fixes the order that
    follows, so a resumed run sees the same batches as an uninterrupted one."""

    def __init__(self, n: int, seed: int):
        self.n = n
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch, self.pos = 0, 0
        self.perm = torch.randperm(n, generator=self.generator)

    def next(self, batch: int) -> torch.Tensor:
        """The next `batch` indices (int64, on the CPU)."""
        parts = []
        while batch:
            if self.pos == self.n:
                self.perm = torch.randperm(self.n, generator=self.generator)
                self.epoch, self.pos = self.epoch + 1, 0
            take = min(batch, self.n - self.pos)
            parts.append(self.perm[self.pos:self.pos + take])
            self.pos, batch = self.pos + take, batch - take
        return torch.cat(parts)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "perm": self.perm.clone(), "epoch": self.epoch,
                "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.perm, self.epoch, self.pos = state["perm"].clone(), int(state["epoch"]), int(state["pos"])


class EMA:
    """An exponential moving average of a model's parameters, held in a frozen copy of the model (eval mode,
    no gradients) that is sampled and saved; buffers are copied. Update n uses the decay
    min(decay, (1 + n) / (10 + n)), so that in a short run the average is not dominated by the random
    initialisation."""

    def __init__(self, model: nn.Module, decay: float):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for avg, p in zip(self.model.parameters(), model.parameters()):
            avg.lerp_(p.detach(), 1.0 - decay)
        for avg_b, b in zip(self.model.buffers(), model.buffers()):
            avg_b.copy_(b)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])


def checkpoint_path(path: str | os.PathLike[str], flag: str = "--teacher") -> Path:
    """The checkpoint a path names: `path/checkpoint.pt` for a run directory, else the file itself; a
    ConfigError naming `flag` when there is none."""
    p = Path(path)
    file = p / CHECKPOINT if p.is_dir() else p
    if not file.is_file():
        raise ConfigError(flag, f"no checkpoint at {file}; pass the --out directory of a `pydpm train` run, or "
                                f"its {CHECKPOINT}")
    return file


def load_checkpoint(path: str | os.PathLike[str], flag: str = "--teacher") -> dict[str, Any]:
    """A training checkpoint (see the module docstring) from a run directory or a file, on the CPU."""
    file = checkpoint_path(path, flag)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated file, another program's pickle
        raise ConfigError(flag, f"cannot read {file} as a pydpm training checkpoint: {type(e).__name__}: {e}") from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(flag, f"{file} is not a pydpm training checkpoint (format {CHECKPOINT_FORMAT})")
    return state


def load_model(path: str | os.PathLike[str], ema: bool = True) -> SlimUNet:
    """The SlimUNet of a training checkpoint (a run directory or a file), with its EMA weights (ema=True, the
    ones sampled) or the raw trained ones, in eval mode on the CPU."""
    state = load_checkpoint(path, flag="path")
    model = SlimUNet(**state["model_kwargs"])
    model.load_state_dict(state["ema"]["model"] if ema else state["model"])
    return model.eval()


def _save_atomic(obj: Any, file: Path) -> None:
    """torch.save to a temporary file and rename it over `file`, so an interruption never leaves half a file."""
    tmp = file.with_name(file.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, file)


def _rng_states(dist: Distributed) -> dict[str, list[torch.Tensor | None]]:
    """Every rank's torch CPU (and CUDA) RNG state, gathered on all ranks (a collective call)."""
    local = (torch.get_rng_state(), torch.cuda.get_rng_state(dist.device) if dist.device.type == "cuda" else None)
    states: list[Any] = [local]
    if dist.world > 1:
        states = [None] * dist.world
        torch_dist.all_gather_object(states, local)
    return {"cpu": [s[0] for s in states], "cuda": [s[1] for s in states]}


def _restore_rng(rng: dict[str, list[Any]], dist: Distributed, seed: int) -> None:
    if len(rng["cpu"]) != dist.world:  # a different number of processes: fresh per-rank streams
        if dist.main:
            print(f"resuming with {dist.world} processes, saved with {len(rng['cpu'])}: the torch RNG streams are "
                  f"reseeded (the data order and noise are not affected)", file=sys.stderr)
        torch.manual_seed(seed + 1 + dist.rank)
        return
    torch.set_rng_state(rng["cpu"][dist.rank])
    cuda_state = rng["cuda"][dist.rank]
    if cuda_state is not None and dist.device.type == "cuda":
        torch.cuda.set_rng_state(cuda_state, dist.device)


# ---------------------------------------------------------------------------------------------------------------
# What is trained

Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


@dataclass
class Task:
    """What a run trains. `net` is the network sampled and saved (EMA'd); `module` is what the objective calls
    (`net` itself, or the distiller holding it), and is what DistributedDataParallel wraps; `params` are the
    parameters optimised; `extra` is further trained state saved in the checkpoint (the alignment convs)."""

    kind: str                                # "train" | "distill"
    net: SlimUNet
    model_kwargs: dict[str, Any]
    ema: EMA
    module: nn.Module
    params: list[nn.Parameter]
    objective: Objective
    data: torch.Tensor
    extra: nn.Module | None = None
    extra_skip: tuple[str, ...] = ()        # state_dict prefixes of `extra` not saved (the teacher, the student)


def _ddpm_objective(module: nn.Module, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor,
                    noise: torch.Tensor) -> dict[str, torch.Tensor]:
    """The DDPM loss: mean squared error of the ε prediction, in float32 (also under bf16 autocast)."""
    return {"loss": F.mse_loss(module(x_t, t).float(), noise.float())}


def _distill_objective(module: nn.Module, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor,
                       noise: torch.Tensor) -> dict[str, torch.Tensor]:
    """The distiller's loss and terms ("loss", "ddpm", "spatial", "freq")."""
    return dict(module(x_t, t, x0, noise))


def _build_model(kwargs: dict[str, Any]) -> SlimUNet:
    """SlimUNet(**kwargs); its error for a bad argument becomes a ConfigError naming the flag that sets it."""
    try:
        return SlimUNet(**kwargs)
    except ValueError as e:
        named = re.match(r"SlimUNet: (\w+)", str(e))
        name = named.group(1) if named else ""
        flag = "--size" if name == "sample_size" else _flag(name) if name in MODEL_FIELDS else "--preset"
        raise ConfigError(flag, str(e)) from e


def _load_data(name: str, size: int, count: int, seed: int) -> torch.Tensor:
    try:
        return datasets.load(name, size=size, count=count, seed=seed)
    except ImportError as e:
        raise ConfigError("--data", str(e)) from e
    except ValueError as e:
        raise ConfigError("--size" if "size" in str(e) else "--data", str(e)) from e


def _teacher_task(cfg: TrainConfig) -> tuple[TrainConfig, Task]:
    data, size = cfg.data or "camera", cfg.size or 32
    cfg = dataclasses.replace(cfg, data=data, size=size)
    images = _load_data(data, size, cfg.dataset_size, cfg.seed)
    kwargs = {**PRESETS[cfg.preset], "in_channels": images.shape[1], "sample_size": size,
              **cfg.model_overrides()}
    torch.manual_seed(cfg.seed)
    net = _build_model(kwargs)
    return cfg, Task("train", net, kwargs, EMA(net, cfg.ema), net, list(net.parameters()), _ddpm_objective, images)


def _distill_task(cfg: DistillConfig) -> tuple[DistillConfig, Task]:
    from pydpm.distill import SpectrumAwareDistiller

    source = load_checkpoint(cfg.teacher, "--teacher")
    teacher_kwargs = source["model_kwargs"]
    teacher = SlimUNet(**teacher_kwargs)
    teacher.load_state_dict(source["ema"]["model"])
    trained = source["config"]
    data, size = cfg.data or trained["data"], teacher_kwargs["sample_size"]
    if cfg.size is not None and cfg.size != size:
        raise ConfigError("--size", f"the teacher works at {size} × {size}; leave --size out (a student is "
                                    f"distilled at its teacher's size)")
    cfg = dataclasses.replace(cfg, data=data, size=size, teacher=str(checkpoint_path(cfg.teacher).resolve()))
    images = _load_data(data, size, cfg.dataset_size, cfg.seed)
    if images.shape[1] != teacher_kwargs["in_channels"]:
        raise ConfigError("--data", f"{data} has {images.shape[1]} channels, the teacher takes "
                                    f"{teacher_kwargs['in_channels']}")
    layout = {k: teacher_kwargs[k] for k in ("in_channels", "sample_size", "channel_mult", "num_res_blocks",
                                             "attention_resolutions")}
    kwargs = {**PRESETS[cfg.preset], **layout, **cfg.model_overrides()}
    if len(kwargs["channel_mult"]) != len(teacher_kwargs["channel_mult"]):
        raise ConfigError("--channel-mult", f"the student needs as many levels as the teacher "
                                            f"(channel_mult {tuple(teacher_kwargs['channel_mult'])}), got "
                                            f"{tuple(kwargs['channel_mult'])}")
    torch.manual_seed(cfg.seed)
    student = _build_model(kwargs)
    ema = EMA(student, cfg.ema)  # copied before the distiller exists: the copy carries none of its state
    spatial, freq = cfg.loss_weights()
    distiller = SpectrumAwareDistiller(teacher, student, lambda_spatial=spatial, lambda_freq=freq)
    return cfg, Task("distill", student, kwargs, ema, distiller, distiller.trainable_parameters(),
                     _distill_objective, images, extra=distiller, extra_skip=("teacher.", "student."))


# ---------------------------------------------------------------------------------------------------------------
# Outputs: progress line, PNGs, loss plot

class Progress:
    """One line on stderr: step, loss, it/s; redrawn in place on a terminal, a line per update otherwise."""

    def __init__(self, total: int, label: str, enabled: bool):
        self.total, self.label, self.enabled = total, label, enabled
        self.tty = enabled and sys.stderr.isatty()

    def update(self, record: dict[str, float]) -> None:
        if not self.enabled:
            return
        terms = " ".join(f"{k} {record[k]:.4f}" for k in record if k not in ("step", "it_s", "elapsed_s"))
        line = f"{self.label} step {int(record['step'])}/{self.total} {terms} {record['it_s']:.2f} it/s"
        sys.stderr.write(f"\r{line}\x1b[K" if self.tty else line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


def write_png(path: str | os.PathLike[str], image: torch.Tensor) -> None:
    """Write a uint8 image [H, W] (grayscale) or [H, W, 3] (RGB) as an 8-bit PNG, with zlib and struct only
    (no imaging library needed)."""
    import struct
    import zlib

    if image.dtype != torch.uint8 or image.dim() not in (2, 3) or (image.dim() == 3 and image.shape[2] != 3):
        raise ValueError(f"write_png: image must be uint8 [H, W] or [H, W, 3], got {image.dtype} "
                         f"{tuple(image.shape)}")
    h, w = image.shape[:2]
    rows = image.reshape(h, -1).cpu().numpy()
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter type 0 (none) per scanline

    def chunk(tag: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))

    header = struct.pack(">IIBBBBB", w, h, 8, 0 if image.dim() == 2 else 2, 0, 0, 0)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6))
                           + chunk(b"IEND", b""))


def image_grid(images: torch.Tensor, pad: int = 2) -> torch.Tensor:
    """[N, C, H, W] in [-1, 1] -> one uint8 image: a near-square grid, gray padding; C = 3 gives RGB, any
    other C shows channel 0 in grayscale."""
    n, c, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    x = images[:, :3] if c == 3 else images[:, :1]
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    grid = torch.full((x.shape[1], rows * (h + pad) + pad, cols * (w + pad) + pad), 128, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top:top + h, left:left + w] = x[i]
    return grid[0] if grid.shape[0] == 1 else grid.permute(1, 2, 0).contiguous()


@torch.no_grad()
def sample_images(model: nn.Module, count: int, shape: tuple[int, int, int], steps: int = 20, seed: int = 0,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """`count` samples [count, *shape] of an ε-prediction network trained on the DDPM schedule (above), by
    DPM-Solver++(2M) in `steps` steps from noise drawn with torch.Generator().manual_seed(seed)."""
    from pydpm.samplers import DPMSolver
    from pydpm.schedules import NoiseScheduleVP, model_wrapper

    schedule = NoiseScheduleVP("discrete", betas=ddpm_betas())
    noise = torch.randn((count, *shape), generator=torch.Generator().manual_seed(seed)).to(device)
    solver = DPMSolver(model_wrapper(model, schedule, model_type="noise"), schedule, algorithm_type="dpmsolver++")
    out = solver.sample(noise, steps=steps, order=2)
    assert isinstance(out, torch.Tensor)
    return out


def plot_losses(history: list[dict[str, float]], path: str | os.PathLike[str]) -> bool:
    """The loss terms of `history` (log.jsonl's records) against the step, log-scale, as a PNG; False (and one
    printed line) when matplotlib is not installed. Terms that are ever <= 0 (an unused term) are left out."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print(f"loss plot skipped: pip install matplotlib to get {Path(path).name}")
        return False
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.subplots()
    steps = [r["step"] for r in history]
    for key in (k for k in history[0] if k not in ("step", "it_s", "elapsed_s")):
        values = [r[key] for r in history]
        if min(values) > 0:
            ax.plot(steps, values, label=key, linewidth=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean over the log interval)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


# ---------------------------------------------------------------------------------------------------------------
# The loop

@dataclass
class RunResult:
    """What a run produced: its directory, the step reached, the log records (as in log.jsonl) and the files."""

    out: Path
    step: int
    history: list[dict[str, float]]
    files: list[Path]


def _read_log(file: Path, upto: int) -> list[dict[str, float]]:
    if not file.is_file():
        return []
    records = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    return [r for r in records if r["step"] <= upto]


def _fit(cfg: TrainConfig, task: Task, dist: Distributed, on_step: Callable[[int], None] | None) -> RunResult:
    out = Path(cfg.out)
    ckpt_file, log_file = out / CHECKPOINT, out / "log.jsonl"
    device = dist.device
    net, ema = task.net.to(device), task.ema
    ema.model.to(device)
    task.module.to(device)
    images = task.data.to(device)
    optimizer = torch.optim.AdamW(task.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sampler = EpochSampler(len(images), cfg.seed)
    noise_gen = torch.Generator().manual_seed(cfg.seed + 1)  # the steps k and the noise ε, global batch
    torch.manual_seed(cfg.seed + 1 + dist.rank)              # the torch RNG: dropout, distinct per rank
    if cfg.batch % dist.world:
        raise ConfigError("--batch", f"{cfg.batch} does not split evenly over {dist.world} processes; pass a "
                                     f"multiple of {dist.world}")
    start = 0
    if cfg.resume:
        start = _resume(cfg, task, out, dist, optimizer, sampler, noise_gen)
    elif ckpt_file.exists():
        raise ConfigError("--out", f"{out} already holds a run ({CHECKPOINT}); pass --resume to continue it or "
                                   f"choose another --out")
    history = _read_log(log_file, start) if cfg.resume else []
    dist.barrier()  # every rank has read the log before rank 0 rewrites it
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        log_file.write_text("".join(json.dumps(r) + "\n" for r in history))

    module: nn.Module = task.module
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        module = DistributedDataParallel(task.module, device_ids=[device.index] if device.type == "cuda" else None)
    local = cfg.batch // dist.world
    shard = slice(dist.rank * local, (dist.rank + 1) * local)
    alphas_cumprod = torch.cumprod(1.0 - ddpm_betas(), dim=0)
    signal = alphas_cumprod.sqrt().float().to(device)
    sigma = (1.0 - alphas_cumprod).sqrt().float().to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)

    if dist.main:
        n_params = sum(p.numel() for p in net.parameters())
        what = f"distilling ({getattr(cfg, 'mode', '')}) a" if task.kind == "distill" else "training a"
        print(f"pydpm: {what} {n_params / 1e6:.2f} M-parameter SlimUNet on {cfg.data} "
              f"{tuple(images.shape)}, batch {cfg.batch} over {dist.world} process(es) on {device}, steps "
              f"{start + 1}..{cfg.steps} -> {out}", file=sys.stderr)
    progress = Progress(cfg.steps, task.kind, cfg.progress and dist.main)
    window: list[torch.Tensor] = []
    keys: list[str] = []
    tick, tick_step, began = time.perf_counter(), start, time.perf_counter()
    task.module.train()
    for step in range(start + 1, cfg.steps + 1):
        idx = sampler.next(cfg.batch)[shard].to(device)
        t_all = torch.randint(0, NUM_TRAIN_STEPS, (cfg.batch,), generator=noise_gen)
        noise_all = torch.randn((cfg.batch, *images.shape[1:]), generator=noise_gen)
        t, noise, x0 = t_all[shard].to(device), noise_all[shard].to(device), images[idx]
        x_t = signal[t].view(-1, 1, 1, 1) * x0 + sigma[t].view(-1, 1, 1, 1) * noise
        with autocast:
            terms = task.objective(module, x_t, t, x0, noise)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(task.params, cfg.grad_clip)
        optimizer.step()
        ema.update(net)
        keys = keys or ["loss", *sorted(k for k in terms if k != "loss")]
        window.append(torch.stack([terms[k].detach().float() for k in keys]))

        save = (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.steps
        if step % cfg.log_every == 0 or save:  # the log window ends at every checkpoint: resumes keep it whole
            means = torch.stack(window).mean(0)
            if dist.world > 1:
                torch_dist.all_reduce(means)
                means /= dist.world
            if not torch.isfinite(means).all():
                raise FloatingPointError(f"step {step}: the loss is {means.tolist()} ({', '.join(keys)}); lower --lr "
                                         f"or keep --grad-clip on, and restart from the last checkpoint in {out}")
            now = time.perf_counter()
            record = {"step": step, **dict(zip(keys, means.tolist())),
                      "it_s": (step - tick_step) / max(now - tick, 1e-9), "elapsed_s": now - began}
            tick, tick_step, window = now, step, []
            history.append(record)
            if dist.main:
                with log_file.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            progress.update(record)
        if save:
            rng = _rng_states(dist)  # a collective: every rank takes part
            if dist.main:
                _save_atomic({
                    "format": CHECKPOINT_FORMAT, "kind": task.kind, "step": step, "world_size": dist.world,
                    "config": asdict(cfg), "model_kwargs": task.model_kwargs, "model": net.state_dict(),
                    "ema": ema.state_dict(), "extra": _extra_state(task), "optimizer": optimizer.state_dict(),
                    "sampler": sampler.state_dict(), "generator": noise_gen.get_state(), "rng": rng,
                }, ckpt_file)
        if on_step is not None:
            on_step(step)
    progress.close()

    files = [ckpt_file, log_file]
    if dist.main:
        files += _finish(cfg, task, history, out, device, start)
    dist.barrier()
    return RunResult(out=out, step=cfg.steps, history=history, files=files)


def _resume(cfg: TrainConfig, task: Task, out: Path, dist: Distributed, optimizer: torch.optim.Optimizer,
            sampler: EpochSampler, noise_gen: torch.Generator) -> int:
    """Load out/checkpoint.pt into the run's state (after checking it was made with the same settings) and
    return its step."""
    if not (out / CHECKPOINT).is_file():
        raise ConfigError("--resume", f"nothing to resume: no {CHECKPOINT} in {out}; drop --resume to start a new "
                                      f"run there")
    state = load_checkpoint(out, "--resume")
    saved, now = state["config"], asdict(cfg)
    changed = [f"{_flag(k)} {saved.get(k)!r} -> {now[k]!r}" for k in now
               if k not in RESUMABLE and _jsonable(saved.get(k)) != _jsonable(now[k])]
    if changed:
        may = ", ".join(_flag(k) for k in ("steps", "checkpoint_every", "log_every", "samples", "sample_steps",
                                            "device"))
        raise ConfigError("--resume", f"the run in {out} was made with other settings ({'; '.join(changed)}); "
                                      f"repeat its command line (only {may} may change) or use a new --out")
    step = int(state["step"])
    if step > cfg.steps:
        raise ConfigError("--steps", f"the checkpoint in {out} is at step {step}, beyond --steps {cfg.steps}; pass "
                                     f"--steps >= {step}")
    task.net.load_state_dict(state["model"])
    task.ema.load_state_dict(state["ema"])
    if task.extra is not None:
        missing, unexpected = task.extra.load_state_dict(state["extra"], strict=False)
        if unexpected or any(not k.startswith(task.extra_skip) for k in missing):
            raise ConfigError("--resume", f"the checkpoint's extra state does not fit this run (missing "
                                          f"{missing}, unexpected {unexpected})")
    optimizer.load_state_dict(state["optimizer"])
    sampler.load_state_dict(state["sampler"])
    noise_gen.set_state(state["generator"])
    _restore_rng(state["rng"], dist, cfg.seed)
    return step


def _jsonable(value: Any) -> Any:
    """A config value as it compares across a save: tuples and lists alike."""
    return list(value) if isinstance(value, (tuple, list)) else value


def _extra_state(task: Task) -> dict[str, torch.Tensor]:
    if task.extra is None:
        return {}
    return {k: v for k, v in task.extra.state_dict().items() if not k.startswith(task.extra_skip)}


def _finish(cfg: TrainConfig, task: Task, history: list[dict[str, float]], out: Path, device: torch.device,
            start: int) -> list[Path]:
    """Rank 0, after the last step: metrics.json, loss.png, samples.png."""
    files = [out / "metrics.json"]
    def terms(record: dict[str, float]) -> dict[str, float]:
        return {k: v for k, v in record.items() if k not in ("step", "it_s", "elapsed_s")}

    metrics = {"step": cfg.steps, "kind": task.kind, "resumed_from": start,
               "first": terms(history[0]) if history else {}, "final": terms(history[-1]) if history else {},
               "it_s": history[-1]["it_s"] if history else None,
               "parameters": sum(p.numel() for p in task.net.parameters()), "config": asdict(cfg),
               "model_kwargs": task.model_kwargs}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if history and plot_losses(history, out / "loss.png"):
        files.append(out / "loss.png")
    if cfg.samples:
        shape = (task.net.in_channels, task.net.sample_size, task.net.sample_size)
        images = sample_images(task.ema.model, cfg.samples, shape, steps=cfg.sample_steps, seed=cfg.seed,
                               device=device)
        write_png(out / "samples.png", image_grid(images))
        files.append(out / "samples.png")
    print(f"pydpm: step {cfg.steps}; wrote {', '.join(f.name for f in files + [out / CHECKPOINT, out / 'log.jsonl'])}"
          f" in {out}", file=sys.stderr)
    return files


def _run(cfg: TrainConfig, build: Callable[[Any], tuple[TrainConfig, Task]],
         on_step: Callable[[int], None] | None) -> RunResult:
    check_config(cfg)
    dist = setup_distributed(cfg.device)
    try:
        resolved, task = build(cfg)
        return _fit(resolved, task, dist, on_step)
    finally:
        if dist.owns_group:
            torch_dist.destroy_process_group()


def train(cfg: TrainConfig, on_step: Callable[[int], None] | None = None) -> RunResult:
    """Train a SlimUNet on `cfg.data` with the DDPM objective (module docstring); `on_step(step)` is called
    after each step (and its checkpoint). Raises ConfigError for a bad setting."""
    return _run(cfg, _teacher_task, on_step)


def distill(cfg: DistillConfig, on_step: Callable[[int], None] | None = None) -> RunResult:
    """Train a student from the teacher checkpoint `cfg.teacher` through SpectrumAwareDistiller in `cfg.mode`;
    otherwise as `train`."""
    if not isinstance(cfg, DistillConfig):
        raise TypeError(f"distill takes a DistillConfig, got {type(cfg).__name__}")
    return _run(cfg, _distill_task, on_step)


__all__ = ["BETA_END", "BETA_START", "CHECKPOINT", "ConfigError", "DistillConfig", "EMA", "EpochSampler", "MODES",
           "NUM_TRAIN_STEPS", "RunResult", "TrainConfig", "check_config", "checkpoint_path", "ddpm_betas",
           "distill", "image_grid", "load_checkpoint", "load_model", "plot_losses", "sample_images",
           "setup_distributed", "train", "write_png"]
