"""Headline cases against torch eager and Liger-Kernel, in one process (CUDA only).

Produced bench/results/headline-*.json (H100 2026-11-23, H200 2026-11-26). Each provider's first call (compile)
is timed separately, then triton.testing.do_bench (median, L2 flushed). Bytes are what
must move: inputs read once, outputs written once. Writes $OUT/headline.json (or the path
in argv[1]).

    python bench/headline.py bench/results/headline-<device>-<date>.json
"""
import _cuda_script  # bench/: --help, and a message without a CUDA GPU
_cuda_script.start(__doc__)

import datetime
import importlib
import json
import os
import sys
import time

import torch
import triton
from triton.testing import do_bench
t0 = time.time()
def log(*a): print(f"[{time.time()-t0:6.1f}s]", *a, flush=True)
sm = importlib.import_module("fused_softmax.softmax"); ce = importlib.import_module("fused_softmax.cross_entropy")
try:
    from liger_kernel.ops.softmax import LigerSoftmaxFunction
    from liger_kernel.ops.cross_entropy import LigerCrossEntropyFunction
except ImportError as e:  # compared only when importable: its rows record the error
    class _Missing:
        reason = f"Liger-Kernel not importable: {e}"

        @classmethod
        def apply(cls, *args):
            raise ImportError(cls.reason)
    LigerSoftmaxFunction = LigerCrossEntropyFunction = _Missing
    log(_Missing.reason)
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.environ.get("OUT", "."), "headline.json")
R = dict(device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(), torch=torch.__version__, triton=triton.__version__, cases={})
def ms(fn): return do_bench(fn, warmup=25, rep=100, return_mode="median")
a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda"); b = torch.empty_like(a)
R["copy_gbps"] = 2 * a.numel() / ms(lambda: b.copy_(a)) / 1e6; del a, b; log("copy", R["copy_gbps"])
def case(name, nbytes, provs):
    res = {}
    for p, fn in provs.items():
        try:
            t1 = time.time(); fn(); torch.cuda.synchronize(); first = time.time() - t1
            m = ms(fn); res[p] = dict(ms=m, gbps=nbytes / m / 1e6, first_call_s=first)
        except Exception as e:
            res[p] = dict(error=repr(e)[:200])
        log(name, p, res[p])
    R["cases"][name] = dict(bytes=nbytes, **res); json.dump(R, open(OUT, "w"), indent=1)
x = torch.randn(8192, 32768, device="cuda", dtype=torch.bfloat16)
case("softmax_fwd_bf16_8192x32768", 4 * x.numel(), dict(ours=lambda: sm.softmax(x, -1), eager=lambda: torch.softmax(x, -1), liger=lambda: LigerSoftmaxFunction.apply(x)))
xh, xf = x.half(), x.float()  # fp16 and fp32 should be within 5 % of the bf16 bandwidth
case("softmax_fwd_fp16_8192x32768", 4 * x.numel(), dict(ours=lambda: sm.softmax(xh, -1), eager=lambda: torch.softmax(xh, -1)))
# softmax(scores, dtype=float32), as attention code writes it: fp16 read, fp32 written
case("softmax_fwd_fp16_to_fp32_8192x32768", 6 * x.numel(), dict(ours=lambda: sm.softmax(xh, -1, dtype=torch.float32), eager=lambda: torch.softmax(xh, -1, dtype=torch.float32)))
case("softmax_fwd_fp32_8192x32768", 8 * x.numel(), dict(ours=lambda: sm.softmax(xf, -1), eager=lambda: torch.softmax(xf, -1)))
del xh, xf
xg = x.clone().requires_grad_(); dy = torch.randn_like(x)
def sfb(f):
    def go(): xg.grad = None; f(xg).backward(dy)
    return go
case("softmax_fwdbwd_bf16_8192x32768", 10 * x.numel(), dict(ours=sfb(lambda t: sm.softmax(t, -1)), eager=sfb(lambda t: torch.softmax(t, -1)), liger=sfb(LigerSoftmaxFunction.apply)))
del x, xg, dy
for V in (128256, 32000):
    lg = torch.randn(8192, V, device="cuda", dtype=torch.bfloat16); t = torch.randint(0, V, (8192,), device="cuda")
    if V == 128256:
        case(f"ce_fwd_bf16_8192x{V}", 2 * lg.numel(), dict(ours=lambda: ce.cross_entropy(lg, t), eager=lambda: torch.nn.functional.cross_entropy(lg, t), liger=lambda: LigerCrossEntropyFunction.apply(lg, t, None)[0]))
    xg = lg.clone().requires_grad_()
    def fb(f):
        def go(): xg.grad = None; f(xg, t).backward()
        return go
    case(f"ce_fwdbwd_bf16_8192x{V}", 4 * lg.numel(), dict(ours=fb(ce.cross_entropy), eager=fb(torch.nn.functional.cross_entropy), liger=fb(lambda a_, b_: LigerCrossEntropyFunction.apply(a_, b_, None)[0])))
    if V == 128256:  # fp16 AMP: autocast + GradScaler's 2^16; ours forms the gradient in the backward
        xh, s16 = lg.half().requires_grad_(), torch.tensor(65536.0, device="cuda")
        def amp(f):
            def go():
                xh.grad = None
                with torch.autocast("cuda", dtype=torch.float16):
                    loss = f(xh, t)
                loss.backward(s16)
            return go
        case(f"ce_fwdbwd_fp16_amp_8192x{V}", 4 * lg.numel(), dict(ours=amp(ce.cross_entropy), eager=amp(torch.nn.functional.cross_entropy)))
        del xh
    del lg, xg
for N in (131072, 262144):
    x = torch.randn((1 << 28) // N, N, device="cuda", dtype=torch.bfloat16)
    case(f"softmax_fwd_bf16_N{N}", 4 * x.numel(), dict(ours=lambda: sm.softmax(x, -1), eager=lambda: torch.softmax(x, -1)))
x = torch.randn(32768, 8192, device="cuda", dtype=torch.bfloat16)
case("softmax_fwd_bf16_32768x8192_dim0", 4 * x.numel(), dict(ours=lambda: sm.softmax(x, 0), eager=lambda: torch.softmax(x, 0), movedim_copy=lambda: sm.softmax(x.t().contiguous(), -1)))
# The last dim of a transposed matrix (row stride 1, element stride 8192): the default reads
# each row strided; against a contiguous copy first, and tiles of r rows x (8192 / r) columns
# that load along the unit-stride rows (as for dim=0) and store contiguous output rows.
xt = x.t()
def across(r):
    cfg = dict(BLOCK_R=r, BLOCK_N=8192 // r, SINGLE_PASS=False, WIDE=False, num_warps=8)
    return lambda: sm._launch_fwd(xt, 1, sm.SOFTMAX, 1.0, config=(cfg, xt.shape[0] // r))
case("softmax_fwd_bf16_8192x32768_transposed", 4 * x.numel(), dict(ours=lambda: sm.softmax(xt, -1), eager=lambda: torch.softmax(xt, -1), copy_first=lambda: sm.softmax(xt.contiguous(), -1), across_r16=across(16), across_r64=across(64)))
del xt
for N in (4096, 1024):
    x = torch.randn((1 << 28) // N, N, device="cuda", dtype=torch.bfloat16)
    case(f"softmax_fwd_bf16_N{N}", 4 * x.numel(), dict(ours=lambda: sm.softmax(x, -1), eager=lambda: torch.softmax(x, -1), liger=lambda: LigerSoftmaxFunction.apply(x)))
    xg = x.clone().requires_grad_(); dy = torch.randn_like(x)
    case(f"softmax_fwdbwd_bf16_N{N}", 10 * x.numel(), dict(ours=sfb(lambda t: sm.softmax(t, -1)), eager=sfb(lambda t: torch.softmax(t, -1)), liger=sfb(LigerSoftmaxFunction.apply)))
    del xg, dy
