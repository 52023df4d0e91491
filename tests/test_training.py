"""pydpm.training, pydpm.data and the `pydpm train` / `pydpm distill` commands, on tiny models on the CPU: the
loss goes down, an interrupted and resumed run ends bit-equal to an uninterrupted one, the commands write their
files, two gloo processes under torchrun match one process, and bad settings are refused by name."""
from __future__ import annotations

import importlib.util
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from pydpm import data, training
from pydpm.cli import main
from pydpm.models import SlimUNet
from pydpm.training import ConfigError, TrainConfig

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
HAS_SKLEARN = importlib.util.find_spec("sklearn") is not None

# A ~60k-parameter SlimUNet at 16 × 16: two levels, attention only in the middle (8 × 8, the lowest resolution).
TINY = dict(size=16, dataset_size=32, batch=4, base_channels=8, channel_mult=(1, 2), attention_resolutions=(),
            groups=4, heads=2, lr=1e-3, samples=0, progress=False)
TINY_ARGS = ["--size", "16", "--dataset-size", "32", "--batch", "4", "--base-channels", "8", "--channel-mult", "1,2",
             "--attention-resolutions", "none", "--groups", "4", "--heads", "2", "--lr", "1e-3", "--quiet"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is faster and steadier on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _read_png(path: Path) -> tuple[int, int, int, bytes]:
    """(width, height, color type, raw scanlines) of an 8-bit PNG, decoded with zlib alone."""
    blob = path.read_bytes()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", b""
    while pos < len(blob):
        (length,) = struct.unpack(">I", blob[pos:pos + 4])
        tag, payload = blob[pos + 4:pos + 8], blob[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", blob[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(tag + payload), f"bad CRC in {tag!r}"
        header = payload if tag == b"IHDR" else header
        idat += payload if tag == b"IDAT" else b""
        pos += 12 + length
    width, height, depth, color = struct.unpack(">IIBB", header[:10])
    assert depth == 8
    return width, height, color, zlib.decompress(idat)


def _states(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    state = torch.load(run / training.CHECKPOINT, weights_only=True)
    optimizer = {f"{i}.{k}": v for i, s in state["optimizer"]["state"].items() for k, v in s.items()}
    return {"model": state["model"], "ema": state["ema"]["model"], "optimizer": optimizer, "extra": state["extra"]}


# -------------------------------------------------------------------------------------------------------------
# Data

def test_patches_are_deterministic_and_in_range():
    a = data.patches("camera", size=16, count=8, seed=3)
    assert a.shape == (8, 1, 16, 16) and a.dtype == torch.float32
    assert a.min() >= -1 and a.max() <= 1 and a.std() > 0.1
    assert torch.equal(a, data.patches("camera", size=16, count=8, seed=3))
    assert not torch.equal(a, data.patches("camera", size=16, count=8, seed=4))
    assert not torch.equal(a, data.patches("ascent", size=16, count=8, seed=3))
    assert data.patches("aero", size=8, count=2).shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="unknown image 'lena'"):
        data.patches("lena")
    with pytest.raises(ValueError, match="size <= 256"):
        data.patches("camera", size=300, count=1)


def test_digits():
    if HAS_SKLEARN:
        d = data.digits(16)
        assert d.shape == (1797, 1, 16, 16) and -1 <= d.min() and d.max() <= 1
    else:
        with pytest.raises(ImportError, match="pip install scikit-learn"):
            data.digits(16)


# -------------------------------------------------------------------------------------------------------------
# Training

def test_loss_decreases_on_a_fixed_batch(tmp_path):
    """Four images, every step the same four (dataset_size = batch): 30 steps must cut the loss in half."""
    result = training.train(TrainConfig(out=str(tmp_path / "run"), **{**TINY, "dataset_size": 4, "lr": 2e-3},
                                        steps=30, log_every=5))
    losses = [r["loss"] for r in result.history]
    assert len(losses) == 6 and all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-2:]) / 2 < 0.5 * losses[0], losses


class _Interrupt(Exception):
    pass


def _stop_at(step: int):
    def on_step(s: int) -> None:
        if s == step:
            raise _Interrupt
    return on_step


def test_resume_is_bit_equal_to_an_uninterrupted_run(tmp_path):
    """6 steps straight, against (a) a run killed after step 5 with checkpoints every 2 steps (so it resumes
    from step 4 and redoes step 5) and (b) a run of 3 steps continued with --steps 6."""
    cfg = dict(TINY, steps=6, checkpoint_every=2, log_every=1, ema=0.9)
    straight = training.train(TrainConfig(out=str(tmp_path / "straight"), **cfg))

    with pytest.raises(_Interrupt):
        training.train(TrainConfig(out=str(tmp_path / "killed"), **cfg), on_step=_stop_at(5))
    assert torch.load(tmp_path / "killed" / training.CHECKPOINT, weights_only=True)["step"] == 4
    killed = training.train(TrainConfig(out=str(tmp_path / "killed"), **cfg, resume=True))

    training.train(TrainConfig(out=str(tmp_path / "short"), **{**cfg, "steps": 3}))
    training.train(TrainConfig(out=str(tmp_path / "short"), **cfg, resume=True))

    want = _states(tmp_path / "straight")
    assert len(want["optimizer"]) > 0
    for run in ("killed", "short"):
        got = _states(tmp_path / run)
        for part in want:
            assert want[part].keys() == got[part].keys(), (run, part)
            for name in want[part]:
                assert torch.equal(want[part][name], got[part][name]), f"{run}: {part} {name} differs"
    # log_every=1: each record is one step's loss, so the logs agree too (the lost step 5 is logged once)
    assert [r["step"] for r in killed.history] == list(range(1, 7))
    assert [r["loss"] for r in killed.history] == [r["loss"] for r in straight.history]
    assert len((tmp_path / "killed" / "log.jsonl").read_text().splitlines()) == 6


def test_resume_refuses_other_settings_and_overwriting(tmp_path):
    out = str(tmp_path / "run")
    training.train(TrainConfig(out=out, **{**TINY, "steps": 2}))
    with pytest.raises(ConfigError, match="--out: .* already holds a run"):
        training.train(TrainConfig(out=out, **{**TINY, "steps": 4}))
    with pytest.raises(ConfigError, match=r"--resume: .*--lr 0\.001 -> 0\.002"):
        training.train(TrainConfig(out=out, **{**TINY, "steps": 4, "lr": 2e-3}, resume=True))
    with pytest.raises(ConfigError, match="--steps: .* at step 2, beyond --steps 1"):
        training.train(TrainConfig(out=out, **{**TINY, "steps": 1}, resume=True))
    with pytest.raises(ConfigError, match="--resume: nothing to resume"):
        training.train(TrainConfig(out=str(tmp_path / "empty"), **TINY, resume=True))


def test_bf16_autocast_runs(tmp_path):
    result = training.train(TrainConfig(out=str(tmp_path / "run"), **{**TINY, "steps": 2, "bf16": True}))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_train_and_distill_on_cuda(tmp_path, bf16):
    """--device cuda (no index) trains on the current device, bf16 autocast included, and a student distils from
    that teacher there, the spectral term on the GPU kernels: finite losses, a checkpoint that loads."""
    teacher = tmp_path / "teacher"
    result = training.train(TrainConfig(out=str(teacher), **{**TINY, "steps": 3, "bf16": bf16}, device="cuda"))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)
    assert isinstance(training.load_model(teacher), SlimUNet)
    student = training.distill(training.DistillConfig(
        out=str(tmp_path / "student"), teacher=str(teacher), mode="spectral", steps=2, batch=4, dataset_size=32,
        base_channels=8, groups=4, heads=2, samples=0, progress=False, bf16=bf16, device="cuda"))
    assert all(torch.isfinite(torch.tensor([r["loss"], r["freq"]])).all() for r in student.history)


# -------------------------------------------------------------------------------------------------------------
# The commands

def test_train_and_distill_end_to_end(tmp_path, capsys):
    teacher = tmp_path / "teacher"
    assert main(["train", "--out", str(teacher), *TINY_ARGS, "--steps", "4", "--log-every", "2",
                 "--samples", "4", "--sample-steps", "4"]) == 0
    assert main(["train", "--out", str(teacher), *TINY_ARGS, "--steps", "5", "--log-every", "2", "--samples", "4",
                 "--sample-steps", "4", "--resume"]) == 0
    state = torch.load(teacher / training.CHECKPOINT, weights_only=True)
    assert state["step"] == 5 and state["kind"] == "train"
    assert [json.loads(line)["step"] for line in (teacher / "log.jsonl").read_text().splitlines()] == [2, 4, 5]
    metrics = json.loads((teacher / "metrics.json").read_text())
    assert metrics["step"] == 5 and metrics["resumed_from"] == 4 and metrics["config"]["data"] == "camera"
    width, height, color, raw = _read_png(teacher / "samples.png")
    assert (width, height, color) == (2 + 2 * 18, 2 + 2 * 18, 0) and len(raw) == height * (width + 1)
    assert (teacher / "loss.png").is_file() == HAS_MATPLOTLIB
    model = training.load_model(teacher)
    assert isinstance(model, SlimUNet) and not model.training

    for mode in training.MODES:
        out = tmp_path / f"student-{mode}"
        assert main(["distill", "--teacher", str(teacher), "--out", str(out), "--mode", mode, "--steps", "3",
                     "--log-every", "1", "--batch", "4", "--dataset-size", "32", "--base-channels", "8",
                     "--groups", "4", "--heads", "2", "--samples", "4", "--sample-steps", "3", "--quiet"]) == 0
        state = torch.load(out / training.CHECKPOINT, weights_only=True)
        assert state["kind"] == "distill" and state["step"] == 3
        assert state["model_kwargs"]["wavelet_gates"] is True and state["model_kwargs"]["sample_size"] == 16
        assert state["config"]["teacher"] == str((teacher / training.CHECKPOINT).resolve())
        if mode != "none":  # the alignment convs are saved with the student
            assert any(k.startswith("align.") for k in state["extra"])
        assert not any(k.startswith(("teacher.", "student.")) for k in state["extra"])
        records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [1, 2, 3]
        spatial, freq = (max(r[k] for r in records) for k in ("spatial", "freq"))
        assert (spatial > 0, freq > 0) == {"spectral": (True, True), "spatial": (True, False),
                                            "none": (False, False)}[mode]
        assert all(abs(r["loss"] - r["ddpm"]) < 1e-6 for r in records) == (mode == "none")
        assert _read_png(out / "samples.png")[:3] == (38, 38, 0)
        assert (out / "loss.png").is_file() == HAS_MATPLOTLIB
    err = capsys.readouterr().err
    assert "distilling (spatial)" in err and "step 3; wrote" in err


def test_loss_plot_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import matplotlib.figure now fails
    assert not training.plot_losses([{"step": 1, "loss": 1.0}], tmp_path / "loss.png")
    assert capsys.readouterr().out == "loss plot skipped: pip install matplotlib to get loss.png\n"
    assert not (tmp_path / "loss.png").exists()


def test_info_does_not_import_the_training_code():
    code = ("import sys, io, contextlib\nfrom pydpm.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n    assert main(['info']) == 0\n"
            "loaded = {'pydpm.training', 'pydpm.data', 'pydpm.distill'} & set(sys.modules)\n"
            "assert not loaded, loaded\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("argv, message", [
    (["train", "--data", "lena"], "argument --data: invalid choice: 'lena'"),
    (["train", "--steps", "0"], "argument --steps: must be an int >= 1, got 0"),
    (["train", "--steps", "two"], "argument --steps: invalid int value: 'two'"),
    (["train", "--ema", "1.0"], r"argument --ema: must be a number in [0.0, 1.0), got 1.0"),
    (["train", "--channel-mult", "1,x"], "argument --channel-mult: expected comma-separated ints"),
    (["train", "--device", "tpu"], "argument --device:"),
    (["train", "--size", "8"], "argument --attention-resolutions: SlimUNet: attention_resolutions=(16, 8) names [16]"),
    (["train", "--base-channels", "8", "--groups", "3"], "argument --groups: SlimUNet: groups=3 does not divide"),
    (["distill", "--out", "x"], "the following arguments are required: --teacher"),
    (["distill", "--teacher", "/no/such/run"], "argument --teacher: no checkpoint at /no/such/run; pass the --out "
                                               "directory of a `pydpm train` run"),
    (["distill", "--teacher", "t", "--mode", "spatial", "--lambda-freq", "0.1"],
     "argument --lambda-freq: mode 'spatial' has no frequency term"),
])
def test_bad_arguments_are_named(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--out", str(tmp_path / "run")] if "--out" not in argv else argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"pydpm {argv[0]}: error: {message}" in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(HAS_SKLEARN, reason="scikit-learn is installed")
def test_digits_without_scikit_learn_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--out", str(tmp_path / "run"), "--data", "digits", *TINY_ARGS, "--steps", "1"])
    assert "argument --data: digits() needs scikit-learn" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------------------------
# Two processes

GLOO = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                          reason="torch.distributed with gloo is not available")


def _torchrun(args: list[str], cwd: Path) -> str:
    """`torchrun --standalone --nproc_per_node 2 -m pydpm ARGS` (gloo with `--device cpu` in ARGS, so that the test
    runs on a machine with fewer than two GPUs too; --standalone picks a free port); its stderr."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "pydpm", *args], capture_output=True, text=True, timeout=300, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stderr


def _assert_match(one_dir: Path, two_dir: Path, steps: int, keys: tuple[str, ...]) -> None:
    """The run in two_dir (2 processes) matches the one in one_dir (1 process), as test_two_gloo_processes_match_one
    describes."""
    one, two = (torch.load(d / training.CHECKPOINT, weights_only=True) for d in (one_dir, two_dir))
    assert (one["world_size"], two["world_size"]) == (1, 2) and one["step"] == two["step"] == steps
    assert len(two["rng"]["cpu"]) == 2  # both ranks' RNG states, gathered and saved by rank 0
    logs = [[json.loads(line) for line in (d / "log.jsonl").read_text().splitlines()] for d in (one_dir, two_dir)]
    assert [r["step"] for r in logs[1]] == list(range(1, steps + 1))  # rank 0 alone writes: one line per step
    for a, b in zip(*logs):
        for key in keys:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)

    torch.manual_seed(0)
    init = SlimUNet(**one["model_kwargs"]).state_dict()  # the init of both runs (seed 0)
    for part in ("model", "ema"):
        p1 = one[part] if part == "model" else one["ema"]["model"]
        p2 = two[part] if part == "model" else two["ema"]["model"]
        moved = max((p1[k] - init[k]).abs().max().item() for k in p1)
        diffs = torch.cat([(p1[k] - p2[k]).abs().flatten() for k in p1])
        assert moved > 1e-3, part                                    # training moved the weights (lr 1e-3)
        assert diffs.max() < 5e-2 * moved, (part, diffs.max(), moved)  # the largest difference: under 5% of that
        assert diffs.gt(1e-7).float().mean() < 5e-2, part            # the bulk: equal up to float rounding
        assert diffs.gt(1e-6).float().mean() < 1e-3, part            # all but a few elements within 1e-6


def test_more_processes_than_cuda_devices_is_refused(monkeypatch):
    """A torchrun rank on CUDA whose LOCAL_RANK has no device of its own (two processes on a one-GPU node) stops
    with an error naming --nproc_per_node and --device cpu, before it joins the process group (NCCL takes no two
    ranks on one device; it failed as "invalid device ordinal" inside set_device)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)

    def joined(**kwargs):
        raise AssertionError("joined the process group before refusing the rank")

    monkeypatch.setattr(torch.distributed, "init_process_group", joined)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ConfigError, match=r"--nproc_per_node.*--device cpu") as caught:
        training.setup_distributed(None)
    assert caught.value.flag == "--device" and "1 CUDA device(s)" in str(caught.value)
    monkeypatch.setenv("LOCAL_RANK", "0")  # the first rank has its device: it goes on to join the group
    with pytest.raises(AssertionError, match="joined the process group"):
        training.setup_distributed(None)


@GLOO
def test_two_gloo_processes_match_one(tmp_path):
    """`torchrun --nproc_per_node 2 -m pydpm train` (gloo) against one process with the same global batch of 4,
    4 steps. Both draw the same global batch; each rank takes half, and DDP averages the two half-batch
    gradients where one process averages over the whole batch: the same gradient up to float summation order,
    so not bit-equal. Adam's step normalisation turns the rounding of a near-cancelling gradient element into a
    visible fraction of that element's step (up to the learning rate): how many elements that touches and by how
    much depends on the CPU's summation order. Asserted: the per-step losses agree to 1e-5 relative; at least 95%
    of the parameters (and EMA weights) agree to 1e-7 and 99.9% to 1e-6; the largest difference is under 5% of the
    largest change training made. Measured: on an AMD EPYC VM with AVX-512, 1.6% of the 58545 weights off by more
    than 1e-7, 12 by more than 1e-6, the largest by 4.5e-5 against a largest change of 4.0e-3; on an earlier VM
    the largest was ~2.5e-6."""
    args = ["train", *TINY_ARGS, "--device", "cpu", "--steps", "4", "--log-every", "1", "--samples", "0"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    assert "batch 4 over 2 process(es)" in _torchrun([*args, "--out", str(tmp_path / "two")], tmp_path)
    _assert_match(tmp_path / "one", tmp_path / "two", 4, ("loss",))


@GLOO
def test_two_gloo_processes_distill_as_one(tmp_path):
    """The same for `pydpm distill --mode spectral`: DDP over the distiller (frozen teacher, forward hooks,
    alignment convs); its loss terms are per-sample means, so the shards' average is the batch's."""
    assert main(["train", *TINY_ARGS, "--device", "cpu", "--steps", "2", "--samples", "0",
                 "--out", str(tmp_path / "teacher")]) == 0
    args = ["distill", "--teacher", str(tmp_path / "teacher"), *TINY_ARGS, "--device", "cpu", "--steps", "3",
            "--log-every", "1", "--samples", "0"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    assert "distilling (spectral)" in _torchrun([*args, "--out", str(tmp_path / "two")], tmp_path)
    _assert_match(tmp_path / "one", tmp_path / "two", 3, ("loss", "ddpm", "spatial", "freq"))
