"""``python -m fused_softmax check``: the numerics report.

It measures, it does not assert. For each dtype (fp16, bf16, fp32) and logit scale
(1, 10, 100, 1e3, 1e4) it draws ``rows × cols`` logits ``scale · N(0, 1)``, rounds them to
the dtype, and compares three ways of computing each quantity with an fp64 reference
computed from the same rounded logits:

============  ===============================  ====================  ==================
quantity      naive                            torch                 ours
============  ===============================  ====================  ==================
softmax       ``exp(x) / sum(exp(x))``         ``torch.softmax``     ``fused_softmax``
log_softmax   ``log(softmax(x))``              ``torch.log_softmax`` ``fused_softmax``
CE loss       ``-log(softmax(x))[y]``          ``F.cross_entropy``   ``fused_softmax``
CE gradient   autograd of each loss above      autograd              autograd
============  ===============================  ====================  ==================

Naive and torch run in the input dtype, as a model would run them. Per cell: the max
absolute error, the max relative error (over entries whose reference is a normal number
of the dtype, so that underflow to 0 in a narrow dtype is not counted as a 100 % error) and
the count of inf/NaN outputs, all over the entries whose reference the dtype can hold
(beyond ``finfo.max``, ±inf is the correctly rounded answer; those are counted apart). The
summary compares ours with torch in ulps (max abs error / (eps · max|ref|)). It also finds the overflow and underflow thresholds of
``exp`` in each dtype by evaluating ``torch.exp`` at neighbouring representable values,
and shows what temperature does to a row of logits.

Ours runs on the backend that serves the tensors here: the Triton kernels on CUDA, the
same kernels in Triton's CPU interpreter when ``TRITON_INTERPRET=1`` was set before
Python started, else the library's torch path; the report says which.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

import fused_softmax
from fused_softmax import _backend

DTYPES: Dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16,
                                  "fp32": torch.float32}
SCALES = (1.0, 10.0, 100.0, 1e3, 1e4)
METHODS = ("naive", "torch", "ours")
QUANTITIES = ("softmax", "log_softmax", "ce_loss", "ce_grad")
DESCRIPTIONS = {
    "softmax": {"naive": "exp(x) / sum(exp(x))", "torch": "torch.softmax",
                "ours": "fused_softmax.softmax"},
    "log_softmax": {"naive": "log(softmax(x))", "torch": "torch.log_softmax",
                    "ours": "fused_softmax.log_softmax"},
    "ce_loss": {"naive": "-log(softmax(x))[y]", "torch": "F.cross_entropy",
                "ours": "fused_softmax.cross_entropy"},
    "ce_grad": {"naive": "autograd of -log(softmax(x))[y]", "torch": "autograd of F.cross_entropy",
                "ours": "autograd of fused_softmax.cross_entropy"},
}
TEMPERATURES = (0.1, 0.5, 1.0, 2.0, 10.0)
#: Scale of the logits row in the temperature table: typical classifier/LM logits.
TEMPERATURE_SCALE = 10.0
DEFAULT_ROWS, DEFAULT_COLS = 32, 4096
QUICK_ROWS, QUICK_COLS = 8, 1024


# --------------------------------------------------------------------------- backend
def pick_device() -> torch.device:
    """CUDA when present, unless TRITON_INTERPRET=1 asks for the kernels on the CPU."""
    use_cuda = torch.cuda.is_available() and not _backend.INTERPRET
    return torch.device("cuda" if use_cuda else "cpu")


def describe_backend(device: torch.device) -> Dict[str, str]:
    """Which code serves ``fused_softmax`` calls on ``device``, as a key and a sentence."""
    if device.type == "cuda":
        return {"backend": "triton-cuda",
                "text": f"Triton kernels on CUDA ({torch.cuda.get_device_name(device)})"}
    if _backend.use_triton(torch.empty(0, device=device)):
        return {"backend": "triton-interpreter",
                "text": "Triton kernels in Triton's CPU interpreter (TRITON_INTERPRET=1)"}
    if not _backend.HAS_TRITON:
        return {"backend": "torch",
                "text": "the library's torch path: Triton is not installed on this platform"}
    return {"backend": "torch",
            "text": "the library's torch path: no CUDA device, and TRITON_INTERPRET is not 1 "
                    "(set TRITON_INTERPRET=1 before starting Python to run the Triton kernels "
                    "on the CPU)"}


# --------------------------------------------------------------------------- measuring
def error_stats(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> dict:
    """Errors of ``out`` against the fp64 ``ref``, over the entries whose reference the
    dtype can hold (``|ref| <= finfo(dtype).max``; beyond it ±inf is the correctly rounded
    result, counted as ``out_of_range``): max abs error, max relative error (over entries
    with ``|ref| >= finfo(dtype).tiny``), the count of inf/NaN outputs, and the largest
    ``|ref|`` (the scale of the values, to read the errors in ulps). Non-finite
    outputs make the errors non-finite too: they are reported, not skipped."""
    fi = torch.finfo(dtype)
    o = out.detach().to(torch.float64)
    in_range = ref.abs() <= fi.max
    diff = (o - ref).abs()[in_range]
    r = ref.abs()[in_range]
    normal = r >= fi.tiny
    return {
        "max_abs_err": diff.max().item() if diff.numel() else 0.0,
        "max_rel_err": (diff[normal] / r[normal]).max().item() if bool(normal.any()) else 0.0,
        "nonfinite": int((~torch.isfinite(o[in_range])).sum().item()),
        "out_of_range": int((~in_range).sum().item()),
        "ref_max_abs": r.max().item() if r.numel() else 0.0,
    }


def _naive_softmax(x):
    e = torch.exp(x)
    return e / e.sum(-1, keepdim=True)


def _naive_nll(x, target):
    return -torch.log(torch.softmax(x, -1)).gather(-1, target[:, None])[:, 0]


_FORWARD: Dict[str, Dict[str, Callable]] = {
    "softmax": {"naive": _naive_softmax,
                "torch": lambda x: torch.softmax(x, -1),
                "ours": lambda x: fused_softmax.softmax(x, -1)},
    "log_softmax": {"naive": lambda x: torch.log(torch.softmax(x, -1)),
                    "torch": lambda x: torch.log_softmax(x, -1),
                    "ours": lambda x: fused_softmax.log_softmax(x, -1)},
}
_LOSS: Dict[str, Callable] = {
    "naive": _naive_nll,
    "torch": lambda x, t: F.cross_entropy(x, t, reduction="none"),
    "ours": lambda x, t: fused_softmax.cross_entropy(x, t, reduction="none"),
}


def _references(x64: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
    logp = torch.log_softmax(x64, -1)
    p = torch.softmax(x64, -1)
    return {"softmax": p, "log_softmax": logp,
            "ce_loss": -logp.gather(-1, target[:, None])[:, 0],
            "ce_grad": p - F.one_hot(target, x64.shape[-1]).to(torch.float64)}


def _measure(dtype_name, scale, method, quantity, fn, ref, dtype) -> dict:
    row = {"quantity": quantity, "dtype": dtype_name, "scale": scale, "method": method}
    try:
        row.update(error_stats(fn(), ref, dtype))
    except Exception as e:  # a method that cannot run is reported, not fatal
        first_line = (str(e).strip().splitlines() or [""])[0]
        row["error"] = f"{type(e).__name__}: {first_line}"
    return row


def accuracy_table(rows: int, cols: int, device: torch.device, seed: int) -> List[dict]:
    """Errors of every (quantity, dtype, scale, method) against the fp64 reference."""
    results = []
    for dtype_name, dtype in DTYPES.items():
        for scale in SCALES:
            g = torch.Generator().manual_seed(seed)
            x = (torch.randn(rows, cols, dtype=torch.float64, generator=g) * scale).to(dtype).to(device)
            target = torch.randint(0, cols, (rows,), generator=g).to(device)
            refs = _references(x.to(torch.float64), target)
            for quantity, fns in _FORWARD.items():
                for method in METHODS:
                    results.append(_measure(dtype_name, scale, method, quantity,
                                            lambda f=fns[method]: f(x), refs[quantity], dtype))
            for method in METHODS:
                leaf = x.detach().requires_grad_()
                grads = {}

                def loss(leaf=leaf, method=method, grads=grads):
                    out = _LOSS[method](leaf, target)
                    (grads["dx"],) = torch.autograd.grad(out, leaf, torch.ones_like(out))
                    return out

                results.append(_measure(dtype_name, scale, method, "ce_loss", loss,
                                        refs["ce_loss"], dtype))
                if "dx" in grads:
                    results.append(_measure(dtype_name, scale, method, "ce_grad",
                                            lambda: grads["dx"], refs["ce_grad"], dtype))
                else:
                    results.append({**results[-1], "quantity": "ce_grad"})
    return results


def _step(x: torch.Tensor, k: int) -> torch.Tensor:
    """``x`` moved by ``k`` representable values (positive ``x``: next larger for k > 0)."""
    ints = {2: torch.int16, 4: torch.int32}[x.element_size()]
    return (x.view(ints) + k).view(x.dtype)


def exp_thresholds(dtype: torch.dtype) -> dict:
    """Where ``torch.exp`` in ``dtype`` overflows to inf and underflows to 0, found by
    evaluating it at neighbouring representable values, and what that does to a naive
    softmax (and to ours) of a two-logit row at those points."""

    def finite_exp(v):
        return bool(torch.isfinite(torch.exp(v)))

    # Largest x with exp(x) finite: start at the rounded log(max) and walk one ulp at a time.
    x = torch.tensor([math.log(torch.finfo(dtype).max)], dtype=dtype)
    while not finite_exp(x):
        x = _step(x, -1)
    while finite_exp(_step(x, 1)):
        x = _step(x, 1)
    over = _step(x, 1)
    # Largest (closest to 0) x with exp(x) == 0: walk from log of the smallest subnormal.
    fi = torch.finfo(dtype)
    u = torch.tensor([-math.log(fi.tiny * fi.eps)], dtype=dtype)  # a positive magnitude
    while float(torch.exp(-u)) != 0.0:
        u = _step(u, 1)
    while float(torch.exp(-_step(u, -1))) == 0.0:
        u = _step(u, -1)
    under = -u
    row_over = torch.cat([over, torch.zeros(1, dtype=dtype)])
    row_under = torch.cat([under, under])
    device = pick_device()
    return {
        "max": fi.max, "log_max": math.log(fi.max),
        "last_finite_x": float(x), "exp_last_finite": float(torch.exp(x)),
        "first_overflow_x": float(over), "exp_first_overflow": float(torch.exp(over)),
        "underflow_x": float(under), "exp_underflow": float(torch.exp(under)),
        "naive_softmax_at_overflow": _naive_softmax(row_over).tolist(),
        "ours_softmax_at_overflow": fused_softmax.softmax(row_over.to(device), -1).tolist(),
        "naive_softmax_at_underflow": _naive_softmax(row_under).tolist(),
        "ours_softmax_at_underflow": fused_softmax.softmax(row_under.to(device), -1).tolist(),
    }


def temperature_table(cols: int, device: torch.device, seed: int) -> List[dict]:
    """Entropy and max probability of ``softmax(x / T)`` for one fp32 row of logits of
    scale :data:`TEMPERATURE_SCALE`, from our kernel, with its error and naive's inf/NaN."""
    g = torch.Generator().manual_seed(seed + 1)
    x = (torch.randn(1, cols, dtype=torch.float64, generator=g) * TEMPERATURE_SCALE).float().to(device)
    out = []
    for t in TEMPERATURES:
        ref = torch.softmax(x.double() / t, -1)
        ours = fused_softmax.softmax(x, -1, temperature=t)
        logp = fused_softmax.log_softmax(x, -1, temperature=t).double()
        p = ours.double()
        out.append({
            "temperature": t,
            "entropy": float(-(p * logp).sum()),
            "max_prob": float(p.max()),
            "ours_max_abs_err": float((p - ref).abs().max()),
            "naive_nonfinite": int((~torch.isfinite(_naive_softmax(x / t))).sum()),
        })
    return out


# --------------------------------------------------------------------------- reporting
def _json_safe(v):
    """JSON has no inf/NaN: write them as the strings "inf", "-inf", "nan"."""
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_json_safe(x) for x in v]
    return v


def _cell(r: Optional[dict]) -> str:
    if r is None:
        return "-"
    if "error" in r:
        return "error"
    mark = "*" if r["out_of_range"] else " "
    if r["nonfinite"]:
        return f"{r['nonfinite']} inf/NaN{mark}"
    return f"{r['max_abs_err']:.1e} {r['max_rel_err']:.1e}{mark}"


def format_report(report: dict) -> str:
    """The human-readable report: accuracy blocks, thresholds, temperature, summary."""
    s = report["settings"]
    lines = [
        "fused_softmax numerics report",
        f"ours ran on: {report['backend_text']}",
        f"logits: {s['rows']} rows × {s['cols']} cols of scale·N(0,1), rounded to the dtype; "
        "reference: fp64 on those rounded logits",
        "cell: max abs error, max rel error (a count instead when outputs hold inf/NaN); "
        "*: some reference values lie beyond the dtype's range, where ±inf is the correctly "
        "rounded result: those entries are left out",
    ]
    lines += [f"note: {n}" for n in report["notes"]]
    index = {(r["quantity"], r["dtype"], r["scale"], r["method"]): r for r in report["results"]}
    head = f"{'dtype':<6}{'method':<7}" + "".join(f"{'scale ' + format(sc, 'g'):>19} " for sc in SCALES)
    for q in QUANTITIES:
        lines += ["", f"{q}: naive = {DESCRIPTIONS[q]['naive']}", head]
        for d in DTYPES:
            for m in METHODS:
                cells = "".join(f"{_cell(index.get((q, d, sc, m))):>20}" for sc in SCALES)
                lines.append(f"{d:<6}{m:<7}{cells}")
    lines += ["", "exp() limits, measured with torch.exp at neighbouring representable values:"]
    for d, t in report["exp_thresholds"].items():
        lines.append(
            f"  {d}: exp({t['last_finite_x']:.7g}) = {t['exp_last_finite']:.5g}, "
            f"exp({t['first_overflow_x']:.7g}) = {t['exp_first_overflow']}  "
            f"(log of max {t['max']:.5g} = {t['log_max']:.4f}); "
            f"exp({t['underflow_x']:.7g}) = {t['exp_underflow']}")
        lines.append(
            f"        softmax([{t['first_overflow_x']:.7g}, 0]): naive {_fmt_list(t['naive_softmax_at_overflow'])}"
            f", ours {_fmt_list(t['ours_softmax_at_overflow'])};  "
            f"softmax([{t['underflow_x']:.7g}] × 2): naive {_fmt_list(t['naive_softmax_at_underflow'])}"
            f", ours {_fmt_list(t['ours_softmax_at_underflow'])}")
    lines += ["", f"temperature: softmax(x / T) of one fp32 row of {s['cols']} logits of scale "
              f"{TEMPERATURE_SCALE:g} (uniform entropy = log({s['cols']}) = {math.log(s['cols']):.3f})",
              f"  {'T':>6}{'entropy':>10}{'max prob':>10}{'ours err':>10}  naive exp(x/T)/sum inf/NaN"]
    for t in report["temperature"]:
        lines.append(f"  {t['temperature']:>6g}{t['entropy']:>10.4f}{t['max_prob']:>10.4f}"
                     f"{t['ours_max_abs_err']:>10.1e}  {t['naive_nonfinite']}")
    lines += ["", "summary (ours):"] + [f"  {line}" for line in report["summary"]]
    return "\n".join(lines)


def _fmt_list(values) -> str:
    return "[" + ", ".join(format(v, ".4g") for v in values) + "]"


def summarize(results: List[dict]) -> List[str]:
    """One measured sentence per quantity: how many settings gave ours inf/NaN, and the
    setting where ours trails torch the most, both errors in ulps (the max abs error over
    ``eps(dtype) · max|ref|``), so fp16, bf16 and fp32 read on one scale."""

    def ulps(r):
        unit = torch.finfo(DTYPES[r["dtype"]]).eps * r["ref_max_abs"]
        return r["max_abs_err"] / unit if unit > 0 else 0.0

    lines = []
    for q in QUANTITIES:
        ours = [r for r in results if r["quantity"] == q and r["method"] == "ours"]
        errors = [r for r in ours if "error" in r]
        if errors:
            lines.append(f"{q}: ours failed in {len(errors)} of {len(ours)} settings "
                         f"(first: {errors[0]['error']})")
            continue
        bad = sum(r["nonfinite"] > 0 for r in ours)
        worst = None
        for r in ours:
            t = next(x for x in results if x["quantity"] == q and x["method"] == "torch"
                     and x["dtype"] == r["dtype"] and x["scale"] == r["scale"])
            if "error" in t or t["nonfinite"] or not math.isfinite(r["max_abs_err"]):
                continue
            gap = ulps(r) - ulps(t)
            if worst is None or gap > worst[0]:
                worst = (gap, ulps(r), ulps(t), r["dtype"], r["scale"])
        text = f"{q}: inf/NaN in {bad} of {len(ours)} dtype×scale settings"
        if worst is not None:
            text += (f"; largest gap to torch: {worst[1]:.2f} vs {worst[2]:.2f} ulp "
                     f"({worst[3]}, scale {worst[4]:g})")
        lines.append(text)
    return lines


def plot(report: dict, path: Path) -> None:
    """Error vs logit scale, one panel per quantity; inf/NaN drawn as × markers on the top
    edge. Probabilities (softmax, gradient) show the max relative error; log-domain values
    (log_softmax, loss) the max absolute error, which is the relative error of the
    probability they stand for."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"naive": "tab:red", "torch": "tab:blue", "ours": "tab:green"}
    styles = {"fp16": "-", "bf16": "--", "fp32": ":"}
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    top = 1e4
    for ax, q in zip(axes.flat, QUANTITIES):
        metric = "max_abs_err" if q in ("log_softmax", "ce_loss") else "max_rel_err"
        for d in DTYPES:
            for m in METHODS:
                rs = [r for r in report["results"] if r["quantity"] == q and r["dtype"] == d
                      and r["method"] == m and "error" not in r]
                ok = [(r["scale"], max(r[metric], 1e-12)) for r in rs if r["nonfinite"] == 0]
                nonfinite = [r["scale"] for r in rs if r["nonfinite"] > 0]
                if ok:
                    ax.plot(*zip(*ok), styles[d], color=colors[m], marker="o", markersize=3,
                            label=f"{m} {d}")
                if nonfinite:
                    ax.plot(nonfinite, [top] * len(nonfinite), "x", color=colors[m], markersize=8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylim(1e-9, top * 3)
        ax.set_title(f"{q} (× at top: inf/NaN)", fontsize=10)
        ax.set_xlabel("logit scale")
        ax.set_ylabel(f"{metric.replace('_', ' ')} vs fp64".replace("err", "error"))
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=9, fontsize=7)
    fig.suptitle(f"ours on {report['backend']}", y=0.94, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- command
DESCRIPTION = """\
Numerics report: for fp16, bf16 and fp32 logits at scales 1 ... 1e4, the max abs / rel
error against an fp64 reference and the inf/NaN count of naive exp(x)/sum(exp(x)) and
log(softmax(x)), torch, and fused_softmax, for softmax, log_softmax, cross-entropy loss
and its gradient; the measured overflow thresholds of exp; what temperature does."""

EXAMPLES = f"""\
examples:
  python -m fused_softmax check
      the full report ({DEFAULT_ROWS}×{DEFAULT_COLS} logits per setting), JSON in check_out/check.json
  TRITON_INTERPRET=1 python -m fused_softmax check --quick
      the Triton kernels themselves, on a CPU, in a few seconds ({QUICK_ROWS}×{QUICK_COLS})
  python -m fused_softmax check --rows 256 --cols 32000 --json out/check.json --plot out/check.png

Without a CUDA device ours runs through Triton's CPU interpreter when TRITON_INTERPRET=1 is
set before Python starts, else through the library's torch path; the report says which.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``check`` sub-command's options."""
    parser.add_argument("--rows", type=int, default=None,
                        help=f"rows of logits per setting (default {DEFAULT_ROWS}; {QUICK_ROWS} with --quick)")
    parser.add_argument("--cols", type=int, default=None,
                        help=f"classes per row (default {DEFAULT_COLS}; {QUICK_COLS} with --quick)")
    parser.add_argument("--quick", action="store_true", help="small logits: a few seconds")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--json", type=Path, default=Path("check_out/check.json"), metavar="PATH",
                        help="where to write the JSON report (default check_out/check.json; "
                             "'-': to stdout, the text report then going to stderr)")
    parser.add_argument("--plot", type=Path, nargs="?", const=Path("check_out/check.png"),
                        default=None, metavar="PATH",
                        help="also write a PNG of the errors (needs matplotlib; default path "
                             "check_out/check.png)")


def _triton_version() -> Optional[str]:
    try:
        import triton
    except ImportError:  # macOS / Windows: the torch path serves everything
        return None
    return triton.__version__


def build_report(rows: int, cols: int, seed: int = 0) -> dict:
    """Run every measurement and return the report as a JSON-ready dict (inf/NaN kept as floats)."""
    if rows < 1 or cols < 2:
        raise ValueError(f"need rows >= 1 and cols >= 2, got rows={rows}, cols={cols}")
    device = pick_device()
    backend = describe_backend(device)
    launches_before = sum(_backend.launch_counts.values())
    start = time.monotonic()
    with warnings.catch_warnings():
        # The interpreter's numpy casts warn when a value leaves fp16's range; the report
        # counts those values itself (out_of_range).
        warnings.filterwarnings("ignore", "overflow encountered in cast", RuntimeWarning)
        results = accuracy_table(rows, cols, device, seed)
        thresholds = {name: exp_thresholds(dtype) for name, dtype in DTYPES.items()}
        temperature = temperature_table(cols, device, seed)
    notes = []  # caveats about this run's numbers, printed under the tables
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "fused_softmax": fused_softmax.__version__, "torch": torch.__version__,
        "triton": _triton_version(), "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "backend": backend["backend"], "backend_text": backend["text"],
        "kernel_launches": sum(_backend.launch_counts.values()) - launches_before,
        "seconds": round(time.monotonic() - start, 2),
        "settings": {"rows": rows, "cols": cols, "seed": seed, "scales": list(SCALES),
                     "dtypes": list(DTYPES), "methods": DESCRIPTIONS,
                     "relative_error": "max |out - ref| / |ref| over entries with |ref| >= "
                                       "finfo(dtype).tiny",
                     "json_non_finite": 'inf and NaN are written as "inf", "-inf", "nan"'},
        "results": results,
        "exp_thresholds": thresholds,
        "temperature": temperature,
        "summary": summarize(results),
        "notes": notes,
    }


def _unwritable(path: Path) -> str:
    """Why ``path`` cannot be written as a file (its missing folders would be created), or
    "" if it can."""
    if path.is_dir():
        return "is a directory; give a file path"
    folder = path.absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is not a directory"
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        return "permission denied"
    return ""


def refuse_outputs(command: str, json_path, plot_path) -> bool:
    """Refuse, with a message, output paths that cannot be written (and ``--plot`` without
    matplotlib) before a run, not after it; ``json_path`` None or "-" (stdout) is not
    checked. Used by ``check`` and ``bench``."""
    for flag, path in (("--json", None if str(json_path) == "-" else json_path),
                       ("--plot", plot_path)):
        problem = path is not None and _unwritable(path)
        if problem:
            print(f"fused_softmax {command}: {flag} {path}: {problem}", file=sys.stderr)
            return True
    if plot_path is not None and importlib.util.find_spec("matplotlib") is None:
        print(f"fused_softmax {command}: --plot needs matplotlib (pip install matplotlib)",
              file=sys.stderr)
        return True
    return False


def run(args: argparse.Namespace) -> int:
    """Run the ``check`` sub-command; returns the process exit status."""
    rows = args.rows if args.rows is not None else (QUICK_ROWS if args.quick else DEFAULT_ROWS)
    cols = args.cols if args.cols is not None else (QUICK_COLS if args.quick else DEFAULT_COLS)
    if refuse_outputs("check", args.json, args.plot):
        return 2
    to_stdout = str(args.json) == "-"
    try:
        report = build_report(rows, cols, args.seed)
    except ValueError as e:
        print(f"fused_softmax check: {e}", file=sys.stderr)
        return 2
    text = json.dumps(_json_safe(report), indent=1) + "\n"
    out = sys.stderr if to_stdout else sys.stdout  # "-": the JSON alone on stdout
    print(format_report(report), file=out)
    try:
        if to_stdout:
            sys.stdout.write(text)
        else:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(text)
        if args.plot is not None:
            plot(report, args.plot)
    except OSError as e:
        print(f"fused_softmax check: cannot write {e.filename}: {e.strerror}", file=sys.stderr)
        return 1
    wrote = "" if to_stdout else f"; wrote {args.json}"
    print(f"\n{report['kernel_launches']} kernel launches, {report['seconds']:.1f}s{wrote}",
          file=out)
    if args.plot is not None:
        print(f"wrote {args.plot}", file=out)
    return 0
