"""The bench and demo commands: help, a tiny CPU bench run, a short demo; the workloads."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gradclip.__main__ import main
from gradclip.bench.workloads import WORKLOADS, fill_grads_, load_shapes_file, make_grads, model_workload


def test_bench_help_explains_workloads_modes_backends_timing_floors_and_outputs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for words in ("llama-1b", "gpt2", "resnet50", "2000x4096", "--shapes", "--model",
                  "no-clip", "clip", "amp-adamw", "torch", "cuda", "triton", "apex",
                  "CUDA graph", "eager", "median", "L2", "floor", "GB/s", "x torch",
                  "bench.json", "bench.md", "bench.png", "--quick"):
        assert words in text, f"bench --help does not mention {words!r}"


@pytest.mark.parametrize("key, tensors, params", [
    ("llama-1b", 147, 953_223_168), ("gpt2", 148, 124_439_808),
    ("resnet50", 161, 25_557_032), ("2000x4096", 2000, 8_192_000)])
def test_workloads_have_the_tensor_and_parameter_counts_of_performance_md(key, tensors, params):
    w = WORKLOADS[key]
    assert (w.n_tensors, w.numel) == (tensors, params)


def test_model_resnet50_matches_the_builtin_shapes():
    # torchvision when importable, the built-in list otherwise: the same shapes either way.
    assert model_workload("resnet50").shapes == WORKLOADS["resnet50"].shapes


def test_shapes_file_accepts_a_list_or_a_named_object(tmp_path):
    plain = tmp_path / "plain.json"
    plain.write_text("[[3, 4], 5, [2, 2, 2]]")
    assert load_shapes_file(plain).shapes == ((3, 4), (5,), (2, 2, 2))
    named = tmp_path / "named.json"
    named.write_text(json.dumps({"name": "tiny", "shapes": [[7]]}))
    assert load_shapes_file(named).title == "tiny"
    bad = tmp_path / "bad.json"
    bad.write_text('[["x"]]')
    with pytest.raises(ValueError, match="shape"):
        load_shapes_file(bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bench_gradients_have_the_requested_norm_and_aligned_views(dtype):
    flat, views = make_grads(WORKLOADS["resnet50"], dtype, "cpu")
    fill_grads_(flat, views, 4.0, seed=3)
    norm = torch.linalg.vector_norm(torch.stack([v.float().norm() for v in views]))
    assert norm.item() == pytest.approx(4.0, rel=2e-2)
    base = flat.data_ptr()
    assert all((v.data_ptr() - base) % 512 == 0 for v in views)
    assert all(v.abs().sum() > 0 for v in views)


def test_cpu_bench_run_says_it_is_cpu_and_writes_its_reports(tmp_path, capsys):
    shapes = tmp_path / "tiny.json"
    shapes.write_text(json.dumps({"name": "tiny", "shapes": [[256, 64], [64], [1000]] * 4}))
    out = tmp_path / "bench"
    code = main(["bench", "--device", "cpu", "--shapes", str(shapes), "--modes", "no-clip,clip,amp",
                 "--backends", "torch,reference,cuda", "--repeats", "5", "--warmup", "1",
                 "--ceiling-gib", "0.01", "--out", str(out), "--no-progress"])
    assert code == 0
    text = capsys.readouterr().out
    assert "CPU RUN" in text and "not meaningful" in text
    result = json.loads((out / "bench.json").read_text())
    assert result["environment"]["device"] == "cpu"
    timed = {(r["mode"], r["backend"]): r for r in result["rows"]}
    assert set(timed) == {(m, b) for m in ("no-clip", "clip", "amp") for b in ("torch", "reference")}
    for row in timed.values():
        assert row["method"] == "cpu" and row["median_us"] > 0 and row["samples"] >= 5
        assert math.isfinite(row["pct_floor"]) and row["pct_floor"] > 0
    assert timed[("clip", "torch")]["speedup"] == 1.0
    skipped = {b["name"]: b["skipped"] for b in result["backends"]}
    assert skipped["cuda"]  # listed as skipped, with its reason
    assert "cuda" in text and "skipped" in text
    assert (out / "bench.md").read_text().startswith("# gradclip bench: CPU run")
    pytest.importorskip("matplotlib")
    assert (out / "bench.png").stat().st_size > 0


def test_bench_redraws_its_reports_from_json(tmp_path, capsys):
    shapes = tmp_path / "tiny.json"
    shapes.write_text("[[512], [512]]")
    first = tmp_path / "first"
    assert main(["bench", "--device", "cpu", "--shapes", str(shapes), "--modes", "no-clip",
                 "--repeats", "5", "--warmup", "1", "--ceiling-gib", "0.01", "--out", str(first),
                 "--no-progress"]) == 0
    again = tmp_path / "again"
    assert main(["bench", "--from-json", str(first / "bench.json"), "--out", str(again)]) == 0
    assert (again / "bench.md").read_text() == (first / "bench.md").read_text()


def test_demo_with_few_steps_writes_its_plot_and_summary(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--steps", "6", "--out", str(out), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    for column in ("final loss", "max pre-clip norm", "clip rate", "non-finite steps"):
        assert column in text
    assert "without clipping" in (out / "summary.txt").read_text()
    runs = json.loads((out / "summary.json").read_text())["runs"]
    assert [len(r["loss"]) for r in runs.values()] == [6, 6]
    assert all(r["steps"] == 6 for r in runs.values())
    pytest.importorskip("matplotlib")
    assert (out / "demo.png").stat().st_size > 0


def test_a_failing_path_is_reported_in_its_row_and_the_run_goes_on(tmp_path, capsys, monkeypatch):
    import gradclip.bench.paths as paths

    def broken(name):
        def path(buffers, mode):
            def call():
                raise RuntimeError("kernel exploded\nsecond line")
            return call
        return path
    monkeypatch.setattr(paths, "_gradclip_path", broken)
    shapes = tmp_path / "tiny.json"
    shapes.write_text("[[512], [512]]")
    out = tmp_path / "bench"
    assert main(["bench", "--device", "cpu", "--shapes", str(shapes), "--modes", "no-clip,clip",
                 "--backends", "torch,reference", "--repeats", "5", "--warmup", "1",
                 "--ceiling-gib", "0.01", "--out", str(out), "--no-progress"]) == 0
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert [r["error"] for r in rows if r["backend"] == "reference"] == ["RuntimeError: kernel exploded"] * 2
    assert all("median_us" in r for r in rows if r["backend"] == "torch")
    assert "kernel exploded" in capsys.readouterr().out


def _gpu_shaped_result() -> dict:
    """A result as a GPU run makes it (graph and eager, eager-only modes, a failed row),
    built by hand: the CPU run never shows these layouts."""
    from gradclip.bench import report
    from gradclip.bench.paths import MODES
    from gradclip.bench.timing import Ceilings
    ceilings = Ceilings(4 << 30, 3110.0, 3006.0, 2439.0)
    w = WORKLOADS["gpt2"]
    rows = []
    for mode, backend, method, us in [
            ("clip", "torch", "graph", 599.0), ("clip", "torch", "eager", 698.0),
            ("clip", "cuda", "graph", 520.0), ("clip", "cuda", "eager", 530.0),
            ("no-clip", "torch", "graph", 599.0), ("no-clip", "torch", "eager", 650.0),
            ("no-clip", "cuda", "graph", 170.0), ("no-clip", "cuda", "eager", None),
            ("amp-adamw", "torch", "eager", 2400.0), ("amp-adamw", "cuda", "eager", 1550.0),
            ("adamw", "torch", "eager", 1372.0)]:
        row = {"workload": w.key, "title": w.title, "dtype": "fp32", "mode": mode,
               "backend": backend, "method": method}
        if us is None:
            row["error"] = "RuntimeError: CUDA error: an illegal memory access"
        else:
            row.update(median_us=us, min_us=us, p10_us=us, p90_us=us, samples=30)
        passes = {"torch": (1, 1), "cuda": (1, 0)}[backend] if mode != "adamw" else (1, 3)
        report.derive(row, passes, MODES[mode].floor_passes, w.nbytes(torch.float32), ceilings)
        rows.append(row)
    report.add_speedups(rows)
    return {
        "environment": {"date": "2026-11-23T00:00:00+00:00", "command": "python -m gradclip bench",
                        "device": "cuda", "gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0",
                        "cuda": "13.0", "triton": "3.6.0", "seconds": 200.0},
        "ceilings": ceilings.__dict__,
        "workloads": [report.workload_entry(w, "fp32", w.nbytes(torch.float32), ceilings)],
        "backends": [{"name": "torch", "skipped": None, "note": "torch.nn.utils"},
                     {"name": "cuda", "skipped": None, "note": "gradclip"},
                     {"name": "apex", "skipped": "not importable: No module named 'amp_C'", "note": ""}],
        "settings": {"methods": ["graph", "eager"], "workloads": ["gpt2"]},
        "rows": rows,
    }


def test_gpu_shaped_results_render_graph_and_eager_columns(tmp_path):
    from gradclip.bench import report
    result = _gpu_shaped_result()
    table = report.terminal_table(result)
    lines = {tuple(line.split()[:2]): line for line in table.splitlines() if line.split()}
    assert "graph us" in table and "eager us" in table
    assert lines[("no-clip", "cuda")].split()[2:7] == ["170.0", "2928", "94.1", "3.52", "n/a"]
    assert "illegal memory access" in lines[("no-clip", "cuda")]
    assert "(eager)" in lines[("amp-adamw", "cuda")] and "1.55" in lines[("amp-adamw", "cuda")]
    assert "apex (not importable" in table
    md = report.markdown(result)
    assert "| GPT-2 124M | fp32 | no-clip | cuda | 170.0 | 2928 | 94.1 | 3.52 | – |" in md
    baseline = next(line for line in md.splitlines() if line.startswith("| GPT-2 124M fp32 |"))
    assert baseline.split("|")[6:13] == [" 599 ", " 599 ", " – ", " 698 ", " – ", " – ", " 1372 "]
    pytest.importorskip("matplotlib")
    assert [p.name for p in report.plots(result, tmp_path)] == ["bench.png", "bench-eager.png"]
