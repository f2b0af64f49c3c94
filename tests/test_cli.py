"""The command line (``check``, ``bench``) and the shared benchmark case table."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fused_softmax import _backend, bench, cases, check
from fused_softmax.cli import main

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- check
def _has_matplotlib():
    return importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(scope="module")
def check_run(tmp_path_factory):
    """One small ``check`` run (4 × 64 logits), in-process; its output directory."""
    out = tmp_path_factory.mktemp("check")
    argv = ["check", "--rows", "4", "--cols", "64", "--json", str(out / "check.json")]
    if _has_matplotlib():
        argv += ["--plot", str(out / "check.png")]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def check_report(check_run):
    return json.loads((check_run / "check.json").read_text())


@pytest.mark.skipif(not _has_matplotlib(), reason="--plot needs matplotlib")
def test_check_plot_is_a_png(check_run):
    assert (check_run / "check.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _num(v):
    return float(v)  # "inf" / "nan" strings stand for non-finite values


def test_check_json_structure(check_report):
    r = check_report
    assert {"date", "torch", "triton", "device", "backend", "kernel_launches", "settings",
            "results", "exp_thresholds", "temperature", "summary", "notes"} <= set(r)
    assert r["settings"]["rows"] == 4 and r["settings"]["cols"] == 64
    keys = {(x["quantity"], x["dtype"], x["scale"], x["method"]) for x in r["results"]}
    expected = {(q, d, s, m) for q in check.QUANTITIES for d in check.DTYPES
                for s in check.SCALES for m in check.METHODS}
    assert keys == expected and len(r["results"]) == len(expected)
    assert set(r["exp_thresholds"]) == set(check.DTYPES)
    assert [t["temperature"] for t in r["temperature"]] == list(check.TEMPERATURES)


def test_check_names_the_backend_that_ran(check_report):
    device = check.pick_device()
    served = _backend.use_triton(torch.empty(0, device=device))
    expected = ("triton-cuda" if device.type == "cuda"
                else "triton-interpreter" if served else "torch")
    assert check_report["backend"] == expected
    assert (check_report["kernel_launches"] > 0) == served


def test_check_ours_finite_and_as_accurate_as_torch(check_report):
    idx = {(x["quantity"], x["dtype"], x["scale"], x["method"]): x for x in check_report["results"]}
    for (q, d, s, m), x in idx.items():
        if m != "ours":
            continue
        assert "error" not in x, (q, d, s, x)
        assert x["nonfinite"] == 0, (q, d, s, x)
        assert math.isfinite(_num(x["max_abs_err"])) and math.isfinite(_num(x["max_rel_err"]))
        # The design's target: as close to fp64 as torch in the same dtype, up to a factor 2
        # and 4 ulps of the largest value (another summation order, exp2-based exp).
        torch_err = _num(idx[(q, d, s, "torch")]["max_abs_err"])
        ulp = torch.finfo(check.DTYPES[d]).eps * x["ref_max_abs"]
        assert _num(x["max_abs_err"]) <= 2 * torch_err + 4 * ulp, (q, d, s, x, torch_err)


def test_check_shows_naive_overflow(check_report):
    idx = {(x["quantity"], x["dtype"], x["scale"], x["method"]): x for x in check_report["results"]}
    # exp(x) / sum(exp(x)) is fine for unit logits and overflows once logits pass ~88.7 (fp32)
    # or ~11.1 (fp16); log(softmax(x)) turns underflowed probabilities into -inf.
    assert idx[("softmax", "fp32", 1.0, "naive")]["nonfinite"] == 0
    assert idx[("softmax", "fp32", 1000.0, "naive")]["nonfinite"] > 0
    assert idx[("softmax", "fp16", 100.0, "naive")]["nonfinite"] > 0
    assert idx[("log_softmax", "fp32", 1000.0, "naive")]["nonfinite"] > 0


def test_check_exp_thresholds(check_report):
    t = check_report["exp_thresholds"]
    log_max32 = math.log(torch.finfo(torch.float32).max)  # 88.7228...
    assert 88.72 < t["fp32"]["last_finite_x"] < log_max32 < t["fp32"]["first_overflow_x"] < 88.73
    assert 11.08 < t["fp16"]["last_finite_x"] < math.log(65504) < t["fp16"]["first_overflow_x"] < 11.1
    assert 88.0 <= t["bf16"]["last_finite_x"] < t["bf16"]["first_overflow_x"] <= 89.5
    for d, v in t.items():
        assert math.isfinite(v["exp_last_finite"]) and v["exp_first_overflow"] == "inf", d
        assert v["exp_underflow"] == 0.0, d
        assert math.isnan(_num(v["naive_softmax_at_overflow"][0])), d
        assert v["ours_softmax_at_overflow"][0] == pytest.approx(1.0), d
        assert v["ours_softmax_at_underflow"] == pytest.approx([0.5, 0.5]), d


def test_check_temperature(check_report):
    rows = check_report["temperature"]
    entropies = [r["entropy"] for r in rows]
    assert entropies == sorted(entropies)  # hotter is flatter
    assert all(0.0 <= e <= math.log(64) + 1e-6 for e in entropies)
    assert [r["max_prob"] for r in rows] == sorted((r["max_prob"] for r in rows), reverse=True)
    assert all(r["ours_max_abs_err"] < 1e-5 for r in rows)


def test_check_rejects_bad_sizes(capsys, tmp_path):
    assert main(["check", "--rows", "0", "--json", str(tmp_path / "check.json")]) == 2
    assert "rows >= 1" in capsys.readouterr().err
    assert not (tmp_path / "check.json").exists()


def test_check_refuses_an_unwritable_path_before_the_run(capsys, tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(check, "build_report", lambda *a: ran.append(a))
    assert main(["check", "--json", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err and not ran
    (tmp_path / "afile").write_text("")  # a folder of the path is a file
    assert main(["check", "--json", str(tmp_path / "afile" / "sub" / "x.json")]) == 2
    assert f"{tmp_path / 'afile'} is not a directory" in capsys.readouterr().err and not ran


def test_check_json_to_stdout(capsys):
    assert main(["check", "--rows", "2", "--cols", "16", "--json", "-"]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)  # stdout holds the JSON alone; the text report is on stderr
    assert report["summary"] and "summary (ours)" in err


def test_check_json_to_stdout_still_writes_the_plot(capsys, tmp_path, monkeypatch):
    """``--json - --plot PATH`` writes the plot too (it returned before the plot code)."""
    drawn = []
    monkeypatch.setattr(check, "plot", lambda report, path: drawn.append(path))
    monkeypatch.setattr(check, "refuse_outputs", lambda *a: False)  # matplotlib or not
    png = tmp_path / "c.png"
    assert main(["check", "--rows", "2", "--cols", "16", "--json", "-", "--plot", str(png)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["summary"] and drawn == [png] and f"wrote {png}" in err


@pytest.mark.parametrize("installed", ["editable hidden", "editable kept"])
def test_a_source_checkout_imports_from_its_root(installed, tmp_path):
    """``import fused_softmax`` from a checkout's root finds the kernels in ``kernels/``
    beside the package (pyproject's package-dir), whatever is installed: a non-editable
    install's copy was hidden by the checkout's package, which has no ``kernels``; an
    editable install of another checkout gave the checkout's code that one's kernels."""
    import shutil
    root = Path(__file__).resolve().parents[1]
    for name in ("fused_softmax", "kernels"):
        shutil.copytree(root / name, tmp_path / name, symlinks=False,
                        ignore=shutil.ignore_patterns("__pycache__", "kernels"))
    code = (
        "import sys\n"
        + ("sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
           if installed == "editable hidden" else "") +
        "import torch, fused_softmax, fused_softmax.kernels as k\n"
        "assert fused_softmax.kernels is k\n"
        "print(k.__file__)\n"
        "print(float(fused_softmax.softmax(torch.tensor([0.0, 0.0]), 0)[0]))\n")
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, text=True,
                         capture_output=True, check=True).stdout.split()
    assert out == [str(tmp_path / "kernels" / "__init__.py"), "0.5"]


# --------------------------------------------------------------------------- bench
def test_bench_without_gpu_says_so_and_fails(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "--quick"]) == 1
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "python -m fused_softmax check" in err


def test_bench_refuses_the_interpreter(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert main(["bench", "--quick"]) == 1
    assert "TRITON_INTERPRET=1" in capsys.readouterr().err


def test_bench_refuses_bad_outputs_and_timings_before_the_run(capsys, tmp_path):
    """As check: an unwritable --json / --plot, or --plot without matplotlib, is refused at
    once (it failed after the whole run); so are a negative warm-up and a zero --rep."""
    assert main(["bench", "--json", str(tmp_path)]) == 2
    assert "--json" in capsys.readouterr().err
    for timing in (["--warmup", "-5"], ["--rep", "0"]):
        assert main(["bench", "--json", str(tmp_path / "b.json"), *timing]) == 2
        assert "--warmup must be >= 0 and --rep > 0" in capsys.readouterr().err
    if not _has_matplotlib():
        assert main(["bench", "--plot", str(tmp_path / "b.png")]) == 2
        assert "--plot needs matplotlib" in capsys.readouterr().err


def test_bench_rejects_unknown_filters(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--op", "softmax,softmin"])
    assert e.value.code == 2
    assert "softmin" in capsys.readouterr().err


@pytest.mark.parametrize("op,mode", [("softmax", "fwd+bwd"), ("logsumexp", "fwd+bwd"),
                                     ("cross_entropy", "fwd+bwd"), ("log_softmax", "fwd"),
                                     ("linear_cross_entropy", "fwd+bwd"),
                                     ("linear_cross_entropy", "fwd")])
def test_bench_steps_agree_with_torch(op, mode, device):
    """The benchmark's step for ours computes what torch's does (forward and gradients)."""
    case = cases.Case(op, mode, "fp32", (4, 16, 64) if op == "linear_cross_entropy" else (4, 64))
    inputs = case.make_inputs(device)
    ours = bench.build(case, "fused_softmax", inputs)()
    ref = bench.build(case, "torch", inputs)()
    n_grads = 2 if op == "linear_cross_entropy" else 1
    assert len(ours) == (1 + n_grads if mode == "fwd+bwd" else 1)
    assert bench.max_abs_diff(ours, ref) < 1e-5


def test_bench_missing_provider_is_unavailable(device):
    case = cases.Case("logsumexp", "fwd", "fp32", (4, 64))
    for provider in ("liger", "quack"):
        with pytest.raises(bench.Unavailable):
            bench.build(case, provider, case.make_inputs(device))


@pytest.mark.parametrize("cmd", ["check", "bench"])
def test_help_has_examples(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"python -m fused_softmax {cmd}" in out


def test_no_command_prints_usage(capsys):
    assert main([]) == 2
    assert "check" in capsys.readouterr().err


# --------------------------------------------------------------------------- cases
def test_case_table_matches_the_standard_cases():
    sweep = [c for c in cases.CASES if c.op == "softmax" and c.mode == "fwd" and c.dim == -1]
    assert sorted({c.shape[1] for c in sweep}) == [2**k for k in range(10, 19)]
    assert all(c.numel == 2**28 for c in sweep)
    assert {c.dtype for c in cases.CASES} == {"bf16", "fp16", "fp32"}
    ce = {(c.shape, c.mode) for c in cases.CASES if c.op == "cross_entropy"}
    assert ce == {((8192, v), m) for v in (32000, 128256, 256000) for m in ("fwd", "fwd+bwd")}
    non_last = {(c.shape, c.dim) for c in cases.CASES if c.dim != -1}
    assert non_last == {((32768, 8192), 0), ((64, 4096, 1024), 1)}
    lce = {(c.shape, c.mode, c.dtype) for c in cases.CASES if c.op == "linear_cross_entropy"}
    assert lce == {((8192, 4096, v), m, "bf16") for v in (128256, 256000) for m in ("fwd", "fwd+bwd")}
    assert len({c.id for c in cases.CASES}) == len(cases.CASES)


def test_quick_cases_are_the_headline_subset():
    quick = cases.select(quick=True)
    assert 0 < len(quick) < len(cases.CASES) / 5
    names = {c.name for c in quick}
    assert {"softmax fwd bf16 8192x32768", "softmax fwd+bwd bf16 8192x32768",
            "cross_entropy fwd bf16 8192x128256", "cross_entropy fwd+bwd bf16 8192x128256",
            "softmax fwd bf16 32768x8192 dim=0"} <= names
    assert cases.select(["cross_entropy"], ["fp32"], ["fwd"]) == tuple(
        c for c in cases.CASES if c.op == "cross_entropy" and c.dtype == "fp32" and c.mode == "fwd")
    with pytest.raises(ValueError, match="softmin"):
        cases.select(ops=["softmin"])


def test_bytes_moved():
    e2 = 2
    assert cases.Case("softmax", "fwd", "bf16", (8192, 32768)).bytes_moved() == 2 * 2**28 * e2
    assert cases.Case("softmax", "fwd+bwd", "bf16", (8192, 32768)).bytes_moved() == 5 * 2**28 * e2
    assert cases.Case("logsumexp", "fwd", "fp32", (8, 16)).bytes_moved() == 8 * 16 * 4 + 8 * 4
    ce = cases.Case("cross_entropy", "fwd+bwd", "bf16", (8192, 128256))
    assert ce.bytes_moved() == 2 * 8192 * 128256 * e2 + 8192 * 8
    assert ce.flops() == 0
    lce = cases.Case("linear_cross_entropy", "fwd+bwd", "bf16", (8192, 4096, 128256))
    assert lce.flops() == 3 * 2 * 8192 * 4096 * 128256
    assert lce.bytes_moved() == 2 * (8192 + 128256) * 4096 * e2 + 8192 * 8
    assert cases.Case("linear_cross_entropy", "fwd", "bf16", (8, 4, 16)).flops() == 2 * 8 * 4 * 16


def test_pytest_benchmark_suite_uses_the_same_table():
    """``bench/`` collects one test per case × provider of the shared table (not a copy)."""
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "bench", "--collect-only", "-q", "-p", "no:cacheprovider",
         "--bench-op", "cross_entropy", "--bench-providers", "fused_softmax,torch"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    collected = {line.split("::", 1)[1] for line in out.stdout.splitlines() if "::" in line}
    expected = {f"test_bench[{c.id}-{p}]" for c in cases.select(["cross_entropy"])
                for p in ("fused_softmax", "torch")}
    assert collected == expected


def test_format_case_reports_tflops_for_matmul_bound_cases():
    row = dict(case="linear_cross_entropy fwd+bwd bf16 8192x4096x128256", provider="fused_softmax",
               status="ok", ms=38.5, gbps=1.0, pct_of_copy=0.1, tflops=671.3, peak_extra_mb=2004.0,
               max_abs_diff_vs_ours=None, note="", bytes=10**9, flops=25.8e12)
    text = bench.format_case([row])
    assert "TFLOP/s" in text and "GB/s" not in text and "671" in text and "25.8 TFLOP" in text
    plain = dict(row, case="softmax fwd bf16 8192x32768", flops=0, tflops=None, gbps=3150.0)
    assert "GB/s" in bench.format_case([plain]) and "3150" in bench.format_case([plain])
