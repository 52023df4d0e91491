"""The benchmark report (pydpm.bench): results folders, the missing-peer classification, captured warnings, the
legend, --compare and --plot, on a toy op family and synthetic results; the model benchmark's cases on tiny
configurations of its diffusers models, its footer on synthetic rows and `--models` (CPU, seconds)."""
from __future__ import annotations

import io
import json
import logging
import re
import types
import warnings

import pytest
import torch

from pydpm import bench
from pydpm.bench import compare, harness, models, plot
from pydpm.bench.progress import Progress

CEILINGS = harness.Ceilings(10.0, 0.1, "a fixed copy", "a fixed matmul")


def _missing_diffusers(t):
    raise ModuleNotFoundError("No module named 'diffusers'", name="diffusers")


def _warns(t):
    warnings.warn("a peer's warning", UserWarning, stacklevel=1)
    logging.getLogger("torch._inductor").warning("an inductor message")
    return t["x"] * 2


def toy_family() -> types.ModuleType:
    """An op family of one case: ours, a plain peer, a peer that warns, two needing diffusers (not installed
    here: the import raises), and one that needs CUDA."""
    def cases(device, quick):
        impls = [harness.Impl("pydpm[toy]", lambda: lambda t: t["x"] * 2, ours=True),
                 harness.Impl("eager", lambda: lambda t: t["x"] + t["x"]),
                 harness.Impl("noisy", lambda: _warns),
                 harness.Impl("diffusers A", lambda: _missing_diffusers),
                 harness.Impl("diffusers B", lambda: _missing_diffusers),
                 harness.Impl("cuda peer", lambda: lambda t: t["x"] * 2, needs_cuda=True)]
        return [harness.Case("toy", "double", (256,), torch.float32, device,
                             lambda: {"x": torch.randn(256, device=device)}, lambda t: t["x"].double() * 2, impls,
                             nbytes=2 * 256 * 4)]

    module = types.ModuleType("toy")
    module.cases, module.footer = cases, lambda results: ["toy target: reported"]
    return module


@pytest.fixture
def toy_run(tmp_path, monkeypatch, capsys):
    """Runs the toy family on the CPU in tmp_path (ceilings fixed); returns a function that runs it again
    and gives (the results folder, stdout)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(harness, "measure_ceilings", lambda device, timing: CEILINGS)
    monkeypatch.setattr(plot, "available", lambda: False)  # plotting has its own test

    def run():
        before = set((tmp_path / "bench-results").glob("*"))
        status = harness.run_suite({"toy": toy_family()}, torch.device("cpu"), quick=True, out=None,
                                   arguments={"argv": ["--quick"], "quick": True, "ops": ["toy"]})
        assert status == 0
        (folder,) = set((tmp_path / "bench-results").glob("*")) - before
        return folder, capsys.readouterr().out

    return run


def test_two_runs_write_two_folders(toy_run):
    first, _ = toy_run()
    second, _ = toy_run()
    assert first != second
    for folder in (first, second):
        assert re.fullmatch(r"\d{8}T\d{6}Z-[a-z0-9-]+-quick(-2)?", folder.name), folder.name
        data = json.loads((folder / "results.json").read_text())
        assert data["arguments"]["ops"] == ["toy"] and data["arguments"]["quick"] is True
        assert data["meta"]["git"] and data["meta"]["git_from"] and data["meta"]["date_utc"]
        assert (folder / "results.md").is_file()
    slug = harness.slug(json.loads((first / "results.json").read_text())["meta"]["git"])
    assert f"-{slug}-quick" in first.name


def test_out_holding_results_is_refused(tmp_path):
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        bench.run(["--device", "cpu", "--out", str(tmp_path)])
    assert exit_info.value.code == 2


def test_missing_peers_are_listed_once_each(toy_run):
    folder, out = toy_run()
    data = json.loads((folder / "results.json").read_text())
    missing = data["missing_peers"]
    assert set(missing) == {"diffusers", "cuda peer"}
    assert missing["diffusers"]["reasons"] == ["not installed: pip install diffusers"]
    assert missing["diffusers"]["implementations"] == ["diffusers A", "diffusers B"]
    assert missing["cuda peer"]["reasons"] == ["needs CUDA"]
    assert {r["impl"] for r in data["rows"]} == {"pydpm[toy]", "eager", "noisy"}
    assert out.count("not installed: pip install diffusers") == 1 and "ModuleNotFoundError" not in out


def test_impls_keeps_the_implementations_it_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(harness, "measure_ceilings", lambda device, timing: CEILINGS)
    monkeypatch.setattr(plot, "available", lambda: False)
    family = {"toy": toy_family()}
    assert harness.run_suite(family, torch.device("cpu"), quick=True, out=tmp_path / "a", impls="^eager$|toy") == 0
    data = json.loads((tmp_path / "a" / "results.json").read_text())
    assert [r["impl"] for r in data["rows"]] == ["pydpm[toy]", "eager"]
    assert harness.run_suite(family, torch.device("cpu"), quick=True, out=tmp_path / "b", impls="nothing") == 0
    assert json.loads((tmp_path / "b" / "results.json").read_text())["rows"] == []


@pytest.mark.parametrize("kernel, kind", [
    ("void cudnn::engines_precompiled::nchwToNhwcKernel<__half, __half, float, false, true>", "layout"),
    ("void at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)", "layout"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64", "attention"),
    ("_attention_fwd_kernel", "attention"),
    ("triton_poi_fused_convolution_silu_59", "inductor"),
    ("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x64x64", "conv"),
    ("nvjet_sm90_hsh_168x128_64x5_1x2_h_bz_coopA_bias_TNN", "gemm"),
    ("_group_norm_fwd_kernel", "norm"),
    ("void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<c10::Half>", "norm"),
    ("_geglu_fwd_kernel", "elementwise"),
])
def test_the_device_profile_sorts_kernels_by_kind(kernel, kind):
    from pydpm.bench import device_profile

    assert device_profile.kind(kernel) == kind
    totals = device_profile.by_kind({kernel: 3.0, "void at::native::vectorized_elementwise_kernel<8>": 1.5})
    assert totals[kind] == 3.0 + (1.5 if kind == "elementwise" else 0.0) and sum(totals.values()) == 4.5


def test_not_installed_names_the_distribution():
    def missing(name):
        return ModuleNotFoundError(f"No module named '{name}'", name=name)

    assert harness.not_installed(missing("diffusers.models")) == "diffusers"
    assert harness.not_installed(missing("pywt")) == "PyWavelets"
    assert harness.not_installed(missing("pydpm._C")) is None  # ours: a broken build, not a missing peer
    assert harness.not_installed(RuntimeError("No viable backend")) is None


def test_warnings_are_listed_after_the_table(toy_run):
    folder, out = toy_run()
    data = json.loads((folder / "results.json").read_text())
    texts = list(data["warnings"])
    assert any("UserWarning: a peer's warning" in t for t in texts)
    assert "torch._inductor: an inductor message" in texts
    table, after = out.split("missing peers:")
    assert "a peer's warning" not in table and "inductor message" not in table
    assert after.count("a peer's warning") == 1


def test_legend_covers_every_column(toy_run):
    titles = [title for title, _, _ in harness.COLUMNS]
    assert set(harness.LEGEND) == {*titles, "note"}
    folder, out = toy_run()
    md = (folder / "results.md").read_text()
    for title in harness.LEGEND:
        assert f"- **{title}**: " in md
        assert re.search(rf"^  {re.escape(title)} +\S", out, re.MULTILINE)


def test_rows_above_the_ceiling_say_why(toy_run, monkeypatch):
    monkeypatch.setattr(harness, "measure_ceilings", lambda device, timing: harness.Ceilings(1e-9, 1e-9, "a", "b"))
    folder, out = toy_run()
    rows = json.loads((folder / "results.json").read_text())["rows"]
    assert all(r["of_ceiling"] > 1 and r["ceiling_note"] == harness.ABOVE_CEILING["bytes"] and not r["note"]
               for r in rows)
    assert out.count(f"! pydpm[toy]: {harness.ABOVE_CEILING['bytes']}") == 1
    assert harness.ABOVE_CEILING["bytes"] in (folder / "results.md").read_text()


def _results(rows: list[tuple[str, str, bool, float | None, str]], date="2026-12-02 06:00:00") -> dict:
    """Synthetic results: rows of (case, impl, ours, eager us, note)."""
    return {"meta": {"card": "Test Card", "git": "abc1234", "date_utc": date},
            "rows": [{"op": "toy", "case": case, "shape": "(8,8)", "dtype": "fp32", "impl": impl, "ours": ours,
                      "loop_us": us, "note": note, "of_ceiling": us and 10 / us}
                     for case, impl, ours, us, note in rows]}


OLD = _results([("a", "pydpm", True, 100.0, ""), ("a", "peer", False, 200.0, ""), ("b", "pydpm", True, 50.0, ""),
                ("c", "pydpm", True, 10.0, ""), ("gone", "pydpm", True, 1.0, "")])


def test_compare_flags_regressions_and_sets_the_exit_status(tmp_path, capsys):
    new = _results([("a", "pydpm", True, 115.0, ""), ("a", "peer", False, 150.0, ""), ("b", "pydpm", True, 52.0, ""),
                    ("c", "pydpm", True, None, "FAILED: RuntimeError: boom")])
    lines, regressions = compare.compare(OLD, new, threshold=0.10)
    assert regressions == 2  # a is 15% slower, c fails now
    assert any("REGRESSION (> 10% slower)" in line and " a " in line for line in lines)
    assert any("REGRESSION: now FAILED" in line for line in lines)
    assert any(" faster" in line and "peer" in line for line in lines)
    assert "rows only in OLD: 1, only in NEW: 0" in lines[-1]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "results.json").write_text(json.dumps(OLD))
    (tmp_path / "new.json").write_text(json.dumps(new))
    assert bench.run(["--compare", str(tmp_path / "old"), str(tmp_path / "new.json")]) == 1
    new["rows"][-1] = OLD["rows"][3]
    (tmp_path / "new.json").write_text(json.dumps(new))
    assert bench.run(["--compare", str(tmp_path / "old"), str(tmp_path / "new.json"), "--threshold", "20"]) == 0
    assert "0 regressions" in capsys.readouterr().out


def test_plot_from_a_results_file(tmp_path):
    pytest.importorskip("matplotlib")
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(OLD))
    (folder / "results.md").write_text("# pydpm benchmarks: Test Card\n")
    assert plot.main([folder], None) == 0
    png = folder / "toy.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 150_000
    assert "![toy](toy.png)" in (folder / "results.md").read_text()
    assert plot.main([folder], None) == 0  # plotting again replaces the section
    assert (folder / "results.md").read_text().count(harness.PLOTS_HEADING) == 1
    assert plot.main([folder / "results.json"], tmp_path / "img") == 0
    assert (tmp_path / "img" / "bench-test-card-toy.png").is_file()


def test_plot_panels():
    panels = plot.panels(OLD["rows"])
    assert [(title, log) for title, _, log in panels] == [
        ("pydpm: speed-up over each peer (the peer's eager us / its own)", True),
        ("% of the measured ceiling (device us)", False)]
    assert panels[0][1] == [("a (8,8) fp32", [("peer", 2.0)])]


def test_progress_off_a_terminal_writes_a_line_per_family():
    stream = io.StringIO()
    progress = Progress([2, 3], stream=stream)
    progress.family("one", 1)
    progress.case("a")
    progress.doing("an implementation")
    progress.case_done()
    progress.family("two", 1)
    progress.case("b")
    progress.case_done()
    progress.family("three", 0, "needs CUDA")
    progress.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    assert "one: cases 1-1 of 2" in lines[0] and "two: cases 2-2 of 2" in lines[1] and "left" in lines[1]
    assert "three: no cases (needs CUDA)" in lines[2]


# The model benchmark's four models at toy sizes, with every conditioning input of the published configurations.
_TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
                  norm_num_groups=8)
TINY_MODELS = {
    "unet-sd15": ("UNet2DConditionModel", _TINY_UNET),
    "unet-sdxl": ("UNet2DConditionModel", dict(
        _TINY_UNET, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8)),
    "dit-xl2": ("DiTTransformer2DModel", dict(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=10, norm_type="ada_norm_zero")),
    "pixart-1024": ("PixArtTransformer2DModel", dict(  # the width a multiple of 3: the size conditions split it so
        num_attention_heads=3, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=24, caption_channels=40, sample_size=8, patch_size=2, norm_type="ada_norm_single",
        num_embeds_ada_norm=1000, use_additional_conditions=True, norm_num_groups=4)),
}
COMPILED = set(models.COMPILE_MODES)


@pytest.fixture
def tiny_models(monkeypatch, one_thread):
    """The model benchmark's MODELS at toy sizes; its shared model released afterwards."""
    pytest.importorskip("diffusers")
    monkeypatch.setattr(models, "MODELS", TINY_MODELS)
    yield
    models._SHARED.release()


@pytest.mark.parametrize(("name", "kind"), [("unet-sd15", "forward"), ("unet-sd15", "loop"), ("unet-sd15", "train"),
                                            ("unet-sdxl", "forward"), ("dit-xl2", "forward"),
                                            ("pixart-1024", "forward")])
def test_model_cases_match_their_oracle(tiny_models, name, kind):
    """Each case builds its model and inputs, its float32 oracle counts the flops, and every implementation but
    torch.compile's (minutes of C++ compilation on a CPU) agrees with the oracle; in the loop accelerate swaps
    the pipeline's scheduler for pydpm's drop-in and the diffusers row gets diffusers' back."""
    from diffusers import DPMSolverMultistepScheduler

    from pydpm.integrations import diffusers as integration

    case = models.model_case(name, kind, 2, torch.float32, torch.device("cpu"), quick=False, steps=3)
    expected_impls = {"diffusers", "accelerate[no graph]", "accelerate", "torch.compile"}
    if kind != "train":
        expected_impls.add("torch.compile[max-autotune]")
    assert {impl.name for impl in case.impls} == expected_impls
    assert case.peak_memory and case.shape == ((1 if kind == "loop" else 2), 4, 8, 8)
    inputs = case.inputs()
    expected = case.oracle(inputs)
    assert case.flops > 0
    for impl in case.impls:
        if impl.name in COMPILED:
            continue
        fn = impl.make()
        assert harness.relative_error(harness.first_output(fn(inputs)), expected) < 1e-4, impl.name
        if kind == "loop":
            scheduler = models._SHARED.pipeline.scheduler
            drop_in = impl.name.startswith("accelerate")
            assert isinstance(scheduler, integration.DPMSolverMultistepScheduler) == drop_in
            assert isinstance(scheduler, DPMSolverMultistepScheduler)
    if kind == "loop":
        assert case.name == "unet-sd15-cfg3" and models._kind(case) == "loop"


def test_model_case_rows_carry_error_and_the_footer_lists_them(tiny_models):
    case = models.model_case("dit-xl2", "forward", 2, torch.float32, torch.device("cpu"), quick=True)
    case.impls = [impl for impl in case.impls if impl.name not in COMPILED]
    report = harness.Report()
    rows = harness.run_case(case, CEILINGS, harness.Timing(1, 5, 5), report)
    assert [r.impl for r in rows] == ["diffusers", "accelerate[no graph]", "accelerate"] and not report.failed
    assert all(r.error is not None and r.error < 1e-4 and r.peak_mib is None and r.unit == "TFLOP/s" for r in rows)
    lines = models.footer([(case, rows)])
    assert sum(line.startswith(f"{case.label} ") for line in lines) == 3
    assert any("accelerate:" in line and "x diffusers eager" in line and "error" in line for line in lines)
    assert any(line.startswith("SD1.5 20-step CFG loop") and "not measured in this run" in line for line in lines)


def test_peak_memory_is_the_reserved_peak_of_the_timed_calls(monkeypatch):
    """Graph replays allocate nothing: the peak is read from the memory reserved, counted from a cache emptied
    of what nothing holds."""
    steps = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: steps.append("empty"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: steps.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device: 3 << 20)
    case = harness.Case("toy", "x", (1,), torch.float16, torch.device("cuda"), dict, lambda t: t, [], peak_memory=True)
    row = harness.Row("toy", "x", "(1)", "fp16", "impl", True)
    with harness.peak_memory(case, row):
        steps.append("timed")
    assert steps == ["empty", "reset", "timed"] and row.peak_mib == 3.0
    case.peak_memory, row.peak_mib = False, None
    with harness.peak_memory(case, row):
        pass
    assert row.peak_mib is None and steps == ["empty", "reset", "timed"]


def _model_rows(case_name: str, shape: str, figures: dict[str, tuple[float, float | None, float | None]]):
    """Rows of one synthetic model case: impl -> (eager us, fraction of the matmul peak, peak MiB)."""
    return [harness.Row("models", case_name, shape, "fp16", impl, impl.startswith("accelerate"), median_ms=1.0,
                        throughput=1.0, unit="TFLOP/s", of_ceiling=peak_share, loop_us=us, peak_mib=mib)
            for impl, (us, peak_share, mib) in figures.items()]


def test_model_footer_reads_the_targets_off_the_rows(monkeypatch):
    monkeypatch.setattr(models, "MODELS", TINY_MODELS)
    cpu = torch.device("cpu")

    def case(name, kind):
        return models.model_case(name, kind, 2, torch.float16, cpu, quick=False)

    loop, train, dit = case("unet-sd15", "loop"), case("unet-sd15", "train"), case("dit-xl2", "forward")
    results = [
        (loop, _model_rows(loop.name, "(1,4,8,8)", {
            "diffusers": (3000.0, 0.1, 1000.0), "accelerate": (900.0, 0.4, 1100.0),
            "torch.compile": (1500.0, 0.2, 1000.0), "torch.compile[max-autotune]": (1200.0, 0.3, 1300.0)})),
        (train, _model_rows(train.name, "(2,4,8,8)", {
            "diffusers": (100.0, 0.1, 1000.0), "accelerate[no graph]": (90.0, 0.1, 1200.0),
            "accelerate": (25.0, 0.1, 1100.0)})),
        (dit, _model_rows(dit.name, "(2,4,8,8)", {
            "diffusers": (30.0, 0.1, 1000.0), "accelerate[no graph]": (25.0, 0.2, 1000.0),
            "accelerate": (8.0, 0.5, 1100.0)})),
    ]
    lines = models.footer(results)
    targets = {line.split(":")[0]: line for line in lines[-6:]}
    assert targets["SD1.5 20-step CFG loop"].endswith("3.33x eager, 1.33x its best, torch.compile[max-autotune] (met)")
    assert "dit-xl2 (2,4,8,8) fp16 3.75x (met)" in targets["DiT-XL/2, PixArt-sized and SDXL-sized forward"]
    assert targets["forward at >= 40% of the measured matmul peak (accelerate, device time)"].endswith("50.0% (met)")
    assert targets["training step"].endswith("1.11x (NOT met)")
    assert targets["training step replayed from graphs"].endswith("unet-sd15-train (2,4,8,8) fp16 4.00x (met)")
    memory = targets["peak memory <= diffusers eager + 15% (pydpm's rows)"]
    assert "unet-sd15-train (2,4,8,8) fp16 accelerate[no graph] 1.20x" in memory and memory.endswith("(NOT met)")
    assert any(line.startswith("unet-sd15-cfg20 (1,4,8,8) fp16 accelerate: 0.90 ms per call, 3.33x diffusers eager")
               and "peak memory 1.07 GiB (1.10x diffusers')" in line for line in lines)
    assert models.footer([]) == ["model targets: not measured in this run (they need CUDA and diffusers)"]


def test_models_flag_runs_the_model_family(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "measure_ceilings", lambda device, timing: CEILINGS)
    monkeypatch.setattr(plot, "available", lambda: False)
    assert bench.run(["--models", "--device", "cpu", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["arguments"]["ops"] == ["models"] and not data["rows"]
    assert "needs CUDA: full-size diffusers models" in data["missing_peers"]["the models family"]["reasons"]
    with pytest.raises(SystemExit) as exit_info:
        bench.run(["--models", "--ops", "samplers", "--device", "cpu"])
    assert exit_info.value.code == 2
