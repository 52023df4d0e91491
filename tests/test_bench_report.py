"""The benchmark report (pydpm.bench): results folders, the missing-peer classification, captured warnings, the
legend, --compare and --plot, on a toy op family and synthetic results (CPU, a few seconds)."""
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
from pydpm.bench import compare, harness, plot
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
