"""Host-side cost per call (CUDA only): where the CPU time of a call goes when the GPU work
is small. For each case: the GPU time (CUDA graph replay), ``do_bench``'s time with
launches (what an eager caller sees), and the host time per call (a loop of calls with
one synchronisation at the end, on inputs small enough that the GPU never holds the CPU
back), and the host time with every custom op called through the dispatcher
(``*_via_dispatcher``); then a cProfile of the host path and a Triton launch-overhead
probe. Writes $OUT/host-overhead.json (or argv[1]); the profiles go to stdout.

    python bench/host_overhead.py bench/results/host-overhead-<device>-<date>.json
"""
import _cuda_script  # bench/: --help, and a message without a CUDA GPU
_cuda_script.start(__doc__)

import cProfile
import datetime
import io
import json
import os
import pstats
import sys
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.testing import do_bench, do_bench_cudagraph

import fused_softmax as fs
from fused_softmax import _backend

OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.environ.get("OUT", "."), "host-overhead.json")
R = dict(device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(),
         torch=torch.__version__, triton=triton.__version__, cases={})
t0 = time.time()


def log(*a):
    print(f"[{time.time() - t0:6.1f}s]", *a, flush=True)


def host_us(fn, n=200):
    """Wall time per call of ``n`` calls, one synchronisation at the end."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


def profile(fn, n=100, top=18):
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(top)
    return s.getvalue()


def via_dispatcher(fn):
    """``fn`` with every custom op called through the dispatcher (the route before eager
    calls ran the ops' functions directly): the A/B of ``_backend.call``."""
    def go():
        saved = _backend.dispatch_free
        _backend.dispatch_free = lambda args: False
        try:
            return fn()
        finally:
            _backend.dispatch_free = saved
    return go


def measure(name, fn, graph=True, prof=False):
    if not name.startswith(("torch", "triton")):
        R["cases"][name + "_via_dispatcher"] = row = dict(host_us=host_us(via_dispatcher(fn)))
        log(name + "_via_dispatcher", row)
    row = dict(host_us=host_us(fn), launch_ms=do_bench(fn, warmup=10, rep=50, return_mode="median"))
    if graph:
        try:
            row["graph_ms"] = do_bench_cudagraph(fn, rep=50, return_mode="median")
        except Exception as e:  # a backward through autograd does not capture
            row["graph_error"] = repr(e)[:120]
    R["cases"][name] = row
    log(name, {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    if prof:
        print(profile(fn), flush=True)
    json.dump(R, open(OUT, "w"), indent=1)


@triton.jit
def _empty(X, a0, a1, a2, a3, B: tl.constexpr):
    if a0 < 0:
        tl.store(X, a1 + a2 + a3)


@triton.jit
def _empty_many(X, Y, Z, W, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13,
                f0, f1, f2, f3, C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr,
                C3: tl.constexpr, C4: tl.constexpr, C5: tl.constexpr):
    if a0 < 0:
        tl.store(X, a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11 + a12 + a13)


dev = "cuda"
buf = torch.zeros(4, device=dev)
measure("triton_empty_5_args", lambda: _empty[(1,)](buf, 1, 2, 3, 4, B=4), graph=False)
measure("triton_empty_28_args", lambda: _empty_many[(1,)](
    buf, buf, buf, buf, *range(1, 15), 0.5, 0.25, 1.5, 2.5, C0=1, C1=True, C2=False, C3=3,
    C4=tl.float32, C5=8), graph=False)
measure("torch_add_scalar", lambda: buf.add(1), graph=False)

for rows, V in ((8, 32000), (8192, 32000)):
    lg = torch.randn(rows, V, device=dev, dtype=torch.bfloat16)
    t = torch.randint(0, V, (rows,), device=dev)
    xg = lg.clone().requires_grad_()

    def fb(f):
        def go():
            xg.grad = None
            f(xg, t).backward()
        return go
    small = rows == 8
    measure(f"ce_fwdbwd_ours_{rows}x{V}", fb(fs.cross_entropy), graph=False, prof=small)
    measure(f"ce_fwdbwd_torch_{rows}x{V}", fb(F.cross_entropy), graph=False)
    measure(f"ce_fwd_ours_{rows}x{V}", lambda: fs.cross_entropy(lg, t))
    measure(f"softmax_fwd_ours_{rows}x{V}", lambda: fs.softmax(lg, -1), prof=small)
    measure(f"softmax_fwd_torch_{rows}x{V}", lambda: torch.softmax(lg, -1))
    if not small:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as p:
            for _ in range(5):
                fb(fs.cross_entropy)()
            torch.cuda.synchronize()
        print(p.key_averages().table(sort_by="cuda_time_total", row_limit=12), flush=True)
    del lg, xg

x = (torch.randn(1, 128256, device=dev) * 3).to(torch.bfloat16)
for kind, kw in (("temperature", {}), ("top_k", dict(top_k=50)), ("top_p", dict(top_p=0.9)),
                 ("top_k_top_p", dict(top_k=50, top_p=0.9))):
    measure(f"sample_B1_{kind}", lambda: fs.sample(x, temperature=0.8, **kw), prof=kind == "top_p")
measure("torch_multinomial_B1", lambda: torch.multinomial(torch.softmax(x.float(), -1), 1))
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as p:
    for kw in (dict(top_k=50, top_p=0.9), dict(top_p=0.9), dict(top_k=50)):
        for _ in range(5):
            fs.sample(x, temperature=0.8, **kw)
    torch.cuda.synchronize()
print(p.key_averages().table(sort_by="cuda_time_total", row_limit=12), flush=True)
json.dump(R, open(OUT, "w"), indent=1)
log("done")
