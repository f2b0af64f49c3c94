"""``python -m fused_softmax bench``: time the kernels against torch and the other fused
libraries on a CUDA GPU.

For every case of :mod:`fused_softmax.cases` and every provider — ``fused_softmax``,
torch eager, ``torch.compile`` of the eager function, Liger-Kernel and quack when they are
importable — it records:

* ``ms``: the median time of :func:`triton.testing.do_bench`, which flushes L2 before
  every repetition;
* ``GB/s``: the bytes a perfect kernel must move (``Case.bytes_moved``) over that time,
  and that as a percentage of the device-to-device copy bandwidth measured in the same run
  (``TFLOP/s`` instead for linear_cross_entropy, which matmuls bound: ``Case.flops``);
* ``peak MB``: ``torch.cuda.max_memory_allocated`` during one call, beyond what was
  allocated before it (the inputs): outputs, saved tensors and temporaries;
* ``max|Δ| vs ours``: the largest absolute difference between the provider's outputs
  (forward output and, for ``fwd+bwd``, the input gradient) and ours, so a fast wrong
  result shows.

A provider that is missing or cannot run a case is reported as ``n/a`` with the reason,
one that raises as ``error``; neither stops the run.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import torch
import torch.nn.functional as F

from . import cases as _cases
from .cases import Case

PROVIDERS = ("fused_softmax", "torch", "torch.compile", "liger", "quack")

NEEDS_GPU = (
    "fused_softmax bench needs a CUDA GPU: torch.cuda.is_available() is False here "
    "(torch {torch}, CUDA build: {cuda}). The numerics report runs anywhere: "
    "python -m fused_softmax check"
)
NO_INTERPRETER = (
    "fused_softmax bench times the compiled kernels, but TRITON_INTERPRET=1 is set, which "
    "would run them in Triton's CPU interpreter; unset it and run again"
)


class Unavailable(Exception):
    """A provider cannot run a case (not installed, or the case is outside what it does)."""


# --------------------------------------------------------------------------- providers
def _torch_linear_cross_entropy(x, weight, target):
    return F.cross_entropy(F.linear(x, weight), target)


_TORCH_FNS = dict(softmax=torch.softmax, log_softmax=torch.log_softmax,
                  logsumexp=torch.logsumexp, cross_entropy=F.cross_entropy,
                  linear_cross_entropy=_torch_linear_cross_entropy)


def _forward(case: Case, fns: dict) -> Callable:
    """The case's forward, built from one library's functions (torch's or ours)."""
    if case.op == "cross_entropy":
        ce = fns["cross_entropy"]
        return lambda x, target: ce(x, target)
    if case.op == "linear_cross_entropy":
        lce = fns["linear_cross_entropy"]
        return lambda x, weight, target: lce(x, weight, target)
    fn, dim = fns[case.op], case.dim
    return lambda x: fn(x, dim)


def _torch_forward(case: Case) -> Callable:
    return _forward(case, _TORCH_FNS)


def _ours_forward(case: Case) -> Callable:
    import fused_softmax

    return _forward(case, {name: getattr(fused_softmax, name) for name in _TORCH_FNS})


def _compiled_forward(case: Case) -> Callable:
    # A fresh compilation per case: without the reset, Dynamo would recompile the same
    # code object for each new shape until its recompile limit, then silently run eager.
    torch._dynamo.reset()
    return torch.compile(_torch_forward(case), dynamic=False)


def _last_dim_2d(case: Case, who: str) -> None:
    if len(case.shape) != 2 or case.dim not in (-1, 1):
        raise Unavailable(f"{who} reduces the last dim of 2-d inputs only")


def _liger_forward(case: Case) -> Callable:
    try:
        if case.op == "softmax":
            from liger_kernel.ops.softmax import LigerSoftmaxFunction
        elif case.op == "cross_entropy":
            from liger_kernel.ops.cross_entropy import LigerCrossEntropyFunction
        elif case.op == "linear_cross_entropy":
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        else:
            raise Unavailable(f"Liger-Kernel has no {case.op} op")
    except ImportError as e:
        raise Unavailable(f"liger_kernel not importable ({e})") from None
    if case.op == "linear_cross_entropy":
        loss_fn = LigerFusedLinearCrossEntropyLoss()  # its own defaults: bf16 grad_W accumulation
        return lambda x, weight, target: loss_fn(weight, x, target)
    if case.op == "softmax":
        _last_dim_2d(case, "Liger-Kernel softmax")
        return LigerSoftmaxFunction.apply
    # Function.apply takes positional arguments only, and the signature has grown
    # between Liger releases: fill it by parameter name.
    known = {"weight": None, "ignore_index": -100,
             "lse_square_scale": 0.0, "label_smoothing": 0.0, "reduction": "mean",
             "softcap": None}
    params = list(inspect.signature(LigerCrossEntropyFunction.forward).parameters.values())[1:]
    defaults = []
    for p in params[2:]:
        if p.name in known:
            defaults.append(known[p.name])
        elif p.default is not inspect.Parameter.empty:
            defaults.append(p.default)
        else:
            raise Unavailable(f"unknown LigerCrossEntropyFunction argument {p.name!r}")

    def liger_ce(x, target):
        out = LigerCrossEntropyFunction.apply(x, target, *defaults)
        return out[0] if isinstance(out, tuple) else out

    return liger_ce


def _quack_forward(case: Case) -> Callable:
    try:
        if case.op == "softmax":
            from quack.softmax import softmax as quack_softmax
        elif case.op == "cross_entropy":
            from quack.cross_entropy import cross_entropy as quack_ce
        else:
            raise Unavailable(f"quack has no {case.op} op")
    except Unavailable:
        raise
    except Exception as e:  # quack needs the CUTLASS DSL and a Hopper-class GPU
        raise Unavailable(f"quack not importable ({type(e).__name__}: {e})") from None
    _last_dim_2d(case, f"quack {case.op}")
    if case.op == "softmax":
        return quack_softmax
    if "reduction" in inspect.signature(quack_ce).parameters:
        return lambda x, target: quack_ce(x, target, reduction="mean")
    return lambda x, target: quack_ce(x, target).mean()  # older quack: per-row losses


_FORWARDS = {
    "fused_softmax": _ours_forward,
    "torch": _torch_forward,
    "torch.compile": _compiled_forward,
    "liger": _liger_forward,
    "quack": _quack_forward,
}


def build(case: Case, provider: str, inputs: Dict[str, torch.Tensor]) -> Callable[[], tuple]:
    """A no-argument step running ``case`` with ``provider`` on ``inputs``.

    The step returns the forward output, and for ``fwd+bwd`` also the gradient with
    respect to the logits (by :func:`torch.autograd.grad`, so nothing accumulates in
    ``.grad`` between calls). Raises :class:`Unavailable` when the provider cannot run
    the case.
    """
    if provider not in _FORWARDS:
        raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")
    forward = _FORWARDS[provider](case)
    x = inputs["x"]
    args = (inputs["target"],) if case.op == "cross_entropy" else ()
    if case.op == "linear_cross_entropy":
        w, t = inputs["weight"], inputs["target"]
        if case.mode == "fwd":
            return lambda: (forward(x, w, t),)
        x_leaf, w_leaf = x.detach().requires_grad_(), w.detach().requires_grad_()

        def lce_step():
            out = forward(x_leaf, w_leaf, t)
            dx, dw = torch.autograd.grad(out, (x_leaf, w_leaf))
            return out.detach(), dx, dw

        return lce_step
    if case.mode == "fwd":
        return lambda: (forward(x, *args),)
    if provider == "liger" and case.op == "cross_entropy":
        x = x.clone()  # Liger writes the gradient into the logits during the forward
    leaf = x.detach().requires_grad_()
    dy = inputs.get("dy")

    def step():
        out = forward(leaf, *args)
        (dx,) = torch.autograd.grad(out, leaf, dy)
        return out.detach(), dx

    return step


# --------------------------------------------------------------------------- measuring
def max_abs_diff(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """Largest ``|a - b|`` over matching tensors, in fp32 chunks (the tensors may be GBs)."""
    worst = None
    for ta, tb in zip(a, b):
        if ta.shape != tb.shape:
            raise ValueError(f"output shape {tuple(ta.shape)} differs from ours {tuple(tb.shape)}")
        fa, fb = ta.reshape(-1), tb.reshape(-1)
        chunk = 1 << 26
        for i in range(0, fa.numel(), chunk):
            d = (fa[i:i + chunk].float() - fb[i:i + chunk].float()).abs().max()
            worst = d if worst is None else torch.maximum(worst, d)
    return 0.0 if worst is None else float(worst)


def copy_bandwidth_gbps(warmup: float, rep: float, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written, 1 GB = 1e9 B)."""
    from triton.testing import do_bench

    src = torch.ones(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=warmup, rep=rep, return_mode="median")
    return 2 * nbytes / (ms * 1e-3) / 1e9


def _short_error(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]


def _peak_extra_bytes(step: Callable) -> int:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak


def bench_case(case: Case, providers: Sequence[str], copy_gbps: float,
               warmup: float, rep: float, progress: "Progress") -> List[dict]:
    """Run ``case`` with each provider; one result row per provider, errors included."""
    from triton.testing import do_bench

    inputs = case.make_inputs("cuda")
    nbytes = case.bytes_moved()
    reference = None
    rows = []
    for provider in providers:
        progress.step(f"{case.name} · {provider}")
        row = {"case": case.name, "op": case.op, "mode": case.mode, "dtype": case.dtype,
               "shape": list(case.shape), "dim": case.dim, "provider": provider,
               "bytes": nbytes, "flops": case.flops(), "tflops": None,
               "status": "ok", "ms": None, "gbps": None,
               "pct_of_copy": None, "peak_extra_mb": None, "max_abs_diff_vs_ours": None,
               "note": ""}
        if provider == "liger" and case.op == "cross_entropy" and case.mode == "fwd+bwd":
            row["note"] = "writes the gradient into (a copy of) the logits during the forward"
        try:
            step = build(case, provider, inputs)
            outs = step()  # compiles, warms up, and gives the outputs to compare
            if provider == "fused_softmax":
                reference = outs
            elif reference is not None:
                row["max_abs_diff_vs_ours"] = max_abs_diff(outs, reference)
            del outs
            row["peak_extra_mb"] = _peak_extra_bytes(step) / 2**20
            ms = do_bench(step, warmup=warmup, rep=rep, return_mode="median")
            row.update(ms=ms, gbps=nbytes / (ms * 1e-3) / 1e9)
            if row["flops"]:
                row["tflops"] = row["flops"] / (ms * 1e-3) / 1e12
            row["pct_of_copy"] = 100.0 * row["gbps"] / copy_gbps
        except Unavailable as e:
            row.update(status="n/a", note=str(e))
        except Exception as e:  # one failing provider must not end the run
            row.update(status="error", note=_short_error(e))
        finally:
            step = None
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- reporting
class Progress:
    """A one-line progress bar on stderr (a line per step when stderr is not a terminal)."""

    def __init__(self, total: int, stream=None):
        self.total, self.done, self.start = total, 0, time.monotonic()
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()

    def step(self, label: str) -> None:
        self.done += 1
        width = 30
        filled = width * (self.done - 1) // max(self.total, 1)
        elapsed = time.monotonic() - self.start
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                f"{elapsed:5.0f}s  {label}")
        if self.tty:
            self.stream.write("\r\033[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
        self.stream.write(f"done: {self.total} runs in {time.monotonic() - self.start:.0f}s\n")
        self.stream.flush()


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_case(rows: List[dict]) -> str:
    """The table of one case: a line per provider."""
    first = rows[0]
    if first.get("flops"):  # matmul-bound: TFLOP/s, not bandwidth
        lines = [f"{first['case']}  ({first['flops'] / 1e12:.1f} TFLOP of matmuls)",
                 f"  {'provider':<15}{'ms':>9}{'TFLOP/s':>8}{'':>8}{'peak MB':>10}  max|Δ| vs ours"]
    else:
        lines = [f"{first['case']}  ({first['bytes'] / 1e9:.2f} GB to move)",
                 f"  {'provider':<15}{'ms':>9}{'GB/s':>8}{'%copy':>8}{'peak MB':>10}  max|Δ| vs ours"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"  {r['provider']:<15}{r['status']}: {r['note']}")
            continue
        rate = (_fmt(r.get("tflops"), "8.0f") + " " * 8) if r.get("flops") else (
            _fmt(r["gbps"], "8.0f") + _fmt(r["pct_of_copy"], "7.1f") + "%")
        lines.append(
            f"  {r['provider']:<15}{_fmt(r['ms'], '9.3f')}{rate}"
            f"{_fmt(r['peak_extra_mb'], '10.0f')}  "
            f"{_fmt(r['max_abs_diff_vs_ours'], '.2e')}{'  (' + r['note'] + ')' if r['note'] else ''}")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Bar charts of GB/s per provider (TFLOP/s for linear_cross_entropy), one panel per
    (op, mode, dtype), copy bandwidth as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: Dict[tuple, List[dict]] = {}
    for r in result["rows"]:
        groups.setdefault((r["op"], r["mode"], r["dtype"]), []).append(r)
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in result["rows"])]
    ncols = min(3, len(groups))
    nrows = -(-len(groups) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 3.6 * nrows), squeeze=False)
    for ax, ((op, mode, dtype), rows) in zip(axes.flat, groups.items()):
        labels = list(dict.fromkeys(r["case"] for r in rows))
        rate = "tflops" if rows[0].get("flops") else "gbps"  # matmul-bound cases: TFLOP/s
        width = 0.8 / len(providers)
        for k, p in enumerate(providers):
            ys = []
            for label in labels:
                hit = [r for r in rows if r["case"] == label and r["provider"] == p]
                ys.append((hit[0][rate] or 0.0) if hit else 0.0)
            ax.bar([i + k * width for i in range(len(labels))], ys, width, label=p)
        if rate == "gbps":
            ax.axhline(result["copy_gbps"], color="black", linestyle="--", linewidth=1)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))])
        ax.set_xticklabels([lbl.split(" ", 3)[3] for lbl in labels], rotation=30,
                           ha="right", fontsize=7)
        ax.set_title(f"{op} {mode} {dtype}", fontsize=10)
        ax.set_ylabel("TFLOP/s" if rate == "tflops" else "effective GB/s")
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(providers), fontsize=9)
    fig.suptitle(f"{result['device']} — dashed: device copy {result['copy_gbps']:.0f} GB/s",
                 y=0.995, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- command
DESCRIPTION = """\
GPU benchmark: median time (triton.testing.do_bench, L2 flushed), effective GB/s, % of the
device-copy bandwidth, peak extra memory and max |difference| from ours, for fused_softmax,
torch eager, torch.compile, Liger-Kernel and quack (the last two when importable), over
the shared case table (fused_softmax.cases)."""

EXAMPLES = """\
examples:
  python -m fused_softmax bench --quick
      the headline cases (bf16), every available provider
  python -m fused_softmax bench --op softmax --dtype bf16 --json bench/results/softmax-bf16.json --plot bench/results/softmax-bf16.png
  python -m fused_softmax bench --op cross_entropy --providers fused_softmax,torch.compile,liger
  python -m fused_softmax bench --op linear_cross_entropy --mode fwd+bwd
      the LM-head loss (8192 tokens, hidden 4096, V = 128256 / 256000): TFLOP/s and memory
  python -m fused_softmax bench --mode fwd+bwd --rep 200

Needs a CUDA GPU; on a machine without one it exits with status 1.
"""


def _csv(choices):
    def parse(text):
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in choices]
        if bad or not values:
            raise argparse.ArgumentTypeError(
                f"invalid choice {','.join(bad) or repr(text)}; choose from {','.join(choices)}")
        return values
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bench`` sub-command's options."""
    parser.add_argument("--op", type=_csv(_cases.OPS), action="extend",
                        help=f"ops to time, comma-separated (default: all of {','.join(_cases.OPS)})")
    parser.add_argument("--dtype", type=_csv(tuple(_cases.DTYPES)), action="extend",
                        help="dtypes, comma-separated (default: bf16,fp16,fp32)")
    parser.add_argument("--mode", type=_csv(_cases.MODES), action="extend",
                        help="fwd and/or fwd+bwd (default: both)")
    parser.add_argument("--quick", action="store_true",
                        help="only the headline cases (bf16 softmax and cross-entropy)")
    parser.add_argument("--providers", type=_csv(PROVIDERS), default=list(PROVIDERS),
                        help=f"comma-separated subset of {','.join(PROVIDERS)} (default: all)")
    parser.add_argument("--warmup", type=float, default=25.0, help="do_bench warm-up, ms (default 25)")
    parser.add_argument("--rep", type=float, default=100.0, help="do_bench repetition time, ms (default 100)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="where to write the results (default: bench_out/bench-<date>.json)")
    parser.add_argument("--plot", type=Path, nargs="?", const=Path("bench_out/bench.png"),
                        default=None, metavar="PATH",
                        help="also write a PNG of GB/s per case (needs matplotlib; "
                             "default path bench_out/bench.png)")


def run(args: argparse.Namespace) -> int:
    """Run the ``bench`` sub-command; returns the process exit status."""
    from .check import refuse_outputs
    if refuse_outputs("bench", args.json, args.plot):
        return 2
    if not (args.warmup >= 0 and args.rep > 0):
        print("fused_softmax bench: --warmup must be >= 0 and --rep > 0 (ms)", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print(NEEDS_GPU.format(torch=torch.__version__, cuda=torch.version.cuda or "none"),
              file=sys.stderr)
        return 1
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print(NO_INTERPRETER, file=sys.stderr)
        return 1
    import triton

    selected = _cases.select(args.op, args.dtype, args.mode, quick=args.quick)
    if not selected:
        print("no benchmark case matches the filters", file=sys.stderr)
        return 2
    providers = [p for p in PROVIDERS if p in args.providers]
    now = datetime.datetime.now().astimezone()
    result = {
        "device": torch.cuda.get_device_name(),
        "date": now.isoformat(timespec="seconds"),
        "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(),
        "command": sys.argv, "providers": providers,
        "do_bench": {"warmup_ms": args.warmup, "rep_ms": args.rep, "return_mode": "median"},
    }
    print(f"device: {result['device']}; torch {result['torch']}, triton {result['triton']}; "
          f"{len(selected)} cases × {len(providers)} providers")
    result["copy_gbps"] = copy_bandwidth_gbps(args.warmup, args.rep)
    print(f"device-to-device copy: {result['copy_gbps']:.0f} GB/s (read + write)\n")
    progress = Progress(len(selected) * len(providers))
    rows, tables = [], []
    for case in selected:
        case_rows = bench_case(case, providers, result["copy_gbps"], args.warmup, args.rep, progress)
        rows.extend(case_rows)
        tables.append(format_case(case_rows))
    progress.close()
    result["rows"] = rows
    print("\n\n".join(tables))
    path = args.json or Path("bench_out") / f"bench-{now.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {path}")
    if args.plot is not None:  # (matplotlib: checked before the run)
        plot(result, args.plot)
        print(f"wrote {args.plot}")
    failed = [r for r in rows if r["provider"] == "fused_softmax" and r["status"] == "error"]
    return 1 if failed else 0
