"""The bench and demo commands: help, bad options, a tiny CPU bench run, the checks, the CPU
section, a short demo; the workloads."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gradclip.__main__ import main
from gradclip.backends import dispatch
from gradclip.bench.workloads import (
    ALL_WORKLOADS,
    WORKLOADS,
    fill_grads_,
    load_shapes_file,
    make_grads,
    model_workload,
)

# The bench CLI runs the backends tested elsewhere and renders reports: no torch-version surface of its own.
pytestmark = pytest.mark.newest_torch

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def tiny_shapes(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps({"name": "tiny", "shapes": [[256, 64], [64], [1000], [0]] * 3}))
    return path


def test_bench_help_explains_workloads_modes_backends_timing_floors_and_outputs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for words in ("llama-1b", "gpt2", "resnet50", "2000x4096", "--shapes", "--model",
                  "no-clip", "clip", "amp-adamw", "torch", "cuda", "triton", "apex",
                  "CUDA graph", "eager", "median", "L2", "floor", "GB/s", "x torch",
                  "bench.json", "bench.md", "bench.png", "--quick", "amp-step", "adamw-scaled",
                  "host", "odd-sizes", "--check", "--check-only", "oracle", "--cpu-section",
                  "<= 0.6x", "<= 1.1x", "reference", "torch.nn.utils itself"):
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


def test_odd_sizes_workload_has_empty_first_and_last_and_thousands_of_small_tensors():
    shapes = ALL_WORKLOADS["odd-sizes"].shapes
    assert shapes[0] == shapes[-1] == (0,)
    assert len(shapes) > 3000 and {(16383,), (16385,), (1_000_003,)} <= set(shapes)
    assert "odd-sizes" not in WORKLOADS  # not timed by default


def test_cpu_bench_run_says_it_is_cpu_and_writes_its_reports(tmp_path, capsys, tiny_shapes):
    out = tmp_path / "bench"
    code = main(["bench", "--device", "cpu", "--shapes", str(tiny_shapes), "--modes", "no-clip,clip,amp",
                 "--backends", "torch,reference,cuda", "--repeats", "5", "--warmup", "1",
                 "--ceiling-gib", "0.01", "--out", str(out), "--no-progress"])
    assert code == 0
    text = capsys.readouterr().out
    assert "CPU RUN" in text and "not meaningful" in text
    assert "% floor: not given on the CPU" in text
    line = next(line for line in text.splitlines() if line.startswith("no-clip") and "torch" in line)
    assert line.split()[4] == "-"  # the %floor column
    result = json.loads((out / "bench.json").read_text())
    assert result["environment"]["device"] == "cpu"
    assert all("pct_floor" not in r and "floor_us" not in r for r in result["rows"])
    assert result["workloads"][0]["floor_1_read_us"] is None
    timed = {(r["mode"], r["backend"]): r for r in result["rows"]}
    assert set(timed) == {(m, b) for m in ("no-clip", "clip", "amp") for b in ("torch", "reference")}
    for row in timed.values():
        assert row["method"] == "cpu" and row["median_us"] > 0 and row["samples"] >= 5
    assert timed[("clip", "torch")]["speedup"] == 1.0
    assert math.isfinite(timed[("clip", "torch")]["gbs"])
    skipped = {b["name"]: b["skipped"] for b in result["backends"]}
    assert skipped["cuda"]  # listed as skipped, with its reason
    assert "cuda" in text and "skipped" in text
    md = (out / "bench.md").read_text()
    assert md.startswith("# gradclip bench: CPU run") and "% floor: not given on the CPU" in md
    pytest.importorskip("matplotlib")
    assert (out / "bench.png").stat().st_size > 0


@pytest.mark.parametrize("argv, message", [
    (["--repeats", "0"], "argument --repeats: 0 is too small"),
    (["--repeats", "x"], "argument --repeats: 'x' is not an integer"),
    (["--warmup", "-1"], "argument --warmup: -1 is too small"),
    (["--ceiling-gib", "0"], "argument --ceiling-gib: 0 GiB: give at least"),
    (["--ceiling-gib", "-1"], "argument --ceiling-gib: -1 GiB: give at least"),
    (["--ceiling-gib", "inf"], "argument --ceiling-gib: inf GiB"),
    (["--from-json", "missing.json"], "argument --from-json: cannot read missing.json"),
    (["--workloads", ","], "argument --workloads: empty list"),
    (["--modes", "no-clip,fast"], "argument --modes: unknown fast"),
    (["--shapes", "missing.json"], "argument --shapes: --shapes missing.json: cannot read"),
    (["--model", "no_such_module:factory"], "argument --model: --model 'no_such_module:factory'"),
    (["--timing", "graph", "--device", "cpu"], "--timing chooses GPU timing methods"),
    (["--cpu-section", "--modes", "clip"], "--cpu-section times torch against gradclip's auto"),
    (["--cpu-section", "--backends", "torch", "--dtypes", "bf16"], "--dtypes, --backends do not apply"),
    (["--check-only", "--repeats", "3"], "--check-only times nothing; --repeats does not apply"),
    (["--check", "--backends", "torch,apex"], "--check verifies gradclip's backends"),
])
def test_bad_options_are_argparse_errors(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ") and message in err, err


def test_from_json_refuses_other_files_and_options_it_would_ignore(tmp_path, capsys):
    other = tmp_path / "other.json"
    other.write_text('{"a": 1}')
    for argv, message in [(["--from-json", str(other)], "is not a bench.json"),
                          (["--from-json", str(other), "--repeats", "3"], "is not a bench.json")]:
        with pytest.raises(SystemExit) as exit_info:
            main(["bench", *argv])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    good = tmp_path / "bench.json"
    good.write_text(json.dumps({"environment": {}, "rows": []}))
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--from-json", str(good), "--modes", "clip"])
    assert exit_info.value.code == 2
    assert "--from-json redraws a result and times nothing; drop --modes" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_device_cuda_without_cuda_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--device", "cuda"])
    assert exit_info.value.code == 2 and "torch sees no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("only", [True, False])
def test_check_passes_the_reference_backend_on_the_cpu(only, tmp_path, capsys, tiny_shapes):
    out = tmp_path / "check"
    timing = [] if only else ["--modes", "no-clip", "--repeats", "5", "--ceiling-gib", "0.01"]
    assert main(["bench", "--device", "cpu", "--check-only" if only else "--check",
                 "--shapes", str(tiny_shapes), "--backends", "reference", *timing,
                 "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "ok   check file:tiny.json fp32 reference: norm, no-clip, clip, amp, nonfinite" in text
    assert "checks: 5 passed, 0 failed" in text
    result = json.loads((out / "bench.json").read_text())
    assert [r["check"] for r in result["checks"]] == ["norm", "no-clip", "clip", "amp", "nonfinite"]
    assert ("rows" in result) is not only  # --check times afterwards, --check-only does not


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU run skips the fused backends")
def test_check_that_checks_nothing_fails(tmp_path, capsys, tiny_shapes):
    assert main(["bench", "--check-only", "--shapes", str(tiny_shapes), "--backends", "cuda",
                 "--out", "", "--no-progress"]) == 1
    text = capsys.readouterr().out
    assert "check: cuda skipped" in text and "nothing was checked" in text


@pytest.mark.parametrize("fault, failing", [
    ("norm", {"norm", "no-clip", "clip", "amp"}),        # a norm 1% too large
    ("writes", {"no-clip", "clip", "amp", "nonfinite"}),  # every rescale nudges the gradients
])
def test_check_fails_a_wrong_backend_and_exits_1(fault, failing, tmp_path, capsys, monkeypatch, tiny_shapes):
    from gradclip.backends import reference as reference_module
    reference = dispatch.get_backend("reference")
    if fault == "norm":
        total_norm = reference_module._total_norm  # every path of the reference measures here

        def wrong_total_norm(*args, **kwargs):
            return total_norm(*args, **kwargs) * 1.01
        monkeypatch.setattr(reference_module, "_total_norm", wrong_total_norm)
    else:
        clip_grads_, scale_ = reference.clip_grads_, reference.scale_

        def nudging_clip_grads_(grads, *args):
            torch._foreach_add_(grads, 1e-3)
            return clip_grads_(grads, *args)

        def nudging_scale_(tensors, scale, found_inf=None):
            torch._foreach_add_(tensors, 1e-3)
            scale_(tensors, scale, found_inf)
        monkeypatch.setattr(reference, "clip_grads_", nudging_clip_grads_)
        monkeypatch.setattr(reference, "scale_", nudging_scale_)
    out = tmp_path / "check"
    assert main(["bench", "--device", "cpu", "--check-only", "--shapes", str(tiny_shapes),
                 "--backends", "reference", "--out", str(out), "--no-progress"]) == 1
    text = capsys.readouterr().out
    assert "FAIL check file:tiny.json fp32 reference" in text
    result = json.loads((out / "bench.json").read_text())
    assert {r["check"] for r in result["checks"] if not r["ok"]} == failing


def test_cpu_section_times_torch_and_gradclip_side_by_side_on_one_thread(tmp_path, capsys, tiny_shapes):
    threads = torch.get_num_threads()
    out = tmp_path / "cpu"
    assert main(["bench", "--cpu-section", "--shapes", str(tiny_shapes), "--repeats", "3",
                 "--warmup", "0", "--out", str(out), "--no-progress"]) == 0
    assert torch.get_num_threads() == threads
    text = capsys.readouterr().out
    for words in ("torch.nn.utils.clip_grad_norm_", "gradclip.clip_grad_norm_", "1 thread",
                  "backend auto -> 'reference'", "gradclip/torch", "<= 0.6x", "<= 1.1x"):
        assert words in text
    section = json.loads((out / "bench.json").read_text())["cpu_section"]
    assert section["threads"] == 1 and section["backend"] == "reference"
    rows = {r["mode"]: r for r in section["rows"]}
    assert set(rows) == {"no-clip", "clip"}
    for mode, row in rows.items():
        assert row["ratio"] == pytest.approx(row["gradclip_us"] / row["torch_us"])
        assert row["target"] == {"no-clip": 0.6, "clip": 1.1}[mode]
        assert row["met"] == (row["ratio"] <= row["target"])
        assert [len(v) for v in row["samples_us"].values()] == [3, 3]
        assert row["gradclip_norm"] == pytest.approx(row["torch_norm"], rel=1e-5)
        line = next(line for line in text.splitlines() if f" {mode} " in line and "tiny" in line)
        assert f"{row['ratio']:.3f}x" in line and ("missed" in line) != row["met"]
    assert rows["no-clip"]["torch_norm"] == pytest.approx(0.5, rel=1e-4)
    assert rows["clip"]["torch_norm"] == pytest.approx(4.0, rel=1e-4)
    assert "| tiny (12 tensors, 0.05M) | no-clip |" in (out / "bench.md").read_text()
    again = tmp_path / "again"
    assert main(["bench", "--from-json", str(out / "bench.json"), "--out", str(again)]) == 0
    assert (again / "bench.md").read_text() == (out / "bench.md").read_text()


def test_host_timing_queues_calls_without_waiting():
    from gradclip.bench import timing
    calls, resets = [], []
    m = timing._time_host(lambda: calls.append(1), torch.device("cpu"), repeats=5, warmup=2,
                          reset=lambda: resets.append(1), max_seconds=5.0)
    assert m.method == "host" and m.samples == 5 and m.median_us > 0
    assert len(calls) == 2 + 5 * timing.HOST_CALLS and len(resets) == 2 + 5
    with pytest.raises(ValueError, match="needs a CUDA device"):
        timing.time_call(lambda: None, method="host", device=torch.device("cpu"), repeats=5)


def test_amp_and_adamw_baselines_run_on_fp32_and_for_torch_only():
    from gradclip.bench.paths import cases
    run = {(d, m, b) for _, d, m, b, _ in cases([WORKLOADS["gpt2"]], ["fp32", "bf16"],
                                                ["clip", "amp-step", "adamw-scaled"],
                                                ["torch", "cuda"], ["graph", "eager", "host"])}
    assert ("bf16", "clip", "cuda") in run
    assert {m for d, m, _ in run if d == "bf16"} == {"clip"}
    assert {b for _, m, b in run if m == "adamw-scaled"} == {"torch"}
    assert {m for _, m, _ in run} == {"clip", "amp-step", "adamw-scaled"}


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


@gpu
@needs_cuda
def test_gpu_bench_times_every_mode_and_passes_every_check(tmp_path, capsys, tiny_shapes):
    """Every path of every gradclip backend runs on the GPU, with each timing method, and
    agrees with the oracle (the bench's --check)."""
    out = tmp_path / "bench"
    code = main(["bench", "--device", "cuda", "--shapes", str(tiny_shapes), "--check",
                 "--workloads", "odd-sizes", "--dtypes", "fp32,bf16",
                 "--backends", "torch,cuda,triton,reference", "--timing", "graph,eager,host",
                 "--repeats", "5", "--warmup", "1", "--ceiling-gib", "0.25", "--out", str(out),
                 "--no-progress"])
    result = json.loads((out / "bench.json").read_text())
    failed = [r for r in result["checks"] if not r["ok"]]
    assert code == 0 and not failed, failed
    assert {r["backend"] for r in result["checks"]} == {"cuda", "triton", "reference"}
    errors = [r for r in result["rows"] if "error" in r]
    assert not errors, errors
    timed = {(r["mode"], r["backend"], r["method"]) for r in result["rows"]}
    assert ("no-clip", "cuda", "graph") in timed and ("amp-step", "triton", "host") in timed
    assert all(math.isfinite(r["pct_floor"]) for r in result["rows"] if r["method"] == "graph")


def _backends_on_the_cpu() -> list[str]:
    return [name for name in ("reference", "triton")
            if dispatch.get_backend(name).status().available
            and dispatch.get_backend(name).supports(torch.device("cpu"))]


@pytest.mark.parametrize("backend", _backends_on_the_cpu())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_check_passes_each_backend_that_runs_on_the_cpu(backend, dtype):
    """The checks themselves on a fused backend (Triton's interpreter here), odd sizes included."""
    from gradclip.bench import check
    from gradclip.bench.paths import Buffers
    from gradclip.bench.workloads import Workload
    workload = Workload("tiny", "tiny", ((300,), (0,), (7,), (1000,), (0,)))
    rows = check.check_backend(Buffers(workload, dtype, torch.device("cpu")), backend)
    assert [(r["check"], r["ok"], r["detail"]) for r in rows] == [
        (name, True, "") for name in ("norm", "no-clip", "clip", "amp", "nonfinite")]
