"""Where a softmax training step's time goes (CUDA only): one forward + backward of bf16
rows of 4096 (2^28 elements), ours, torch eager and Liger-Kernel (when importable), timed
with ``triton.testing.do_bench`` (median) through ``.backward()`` and ``autograd.grad``,
then each CUDA kernel of one step from ``torch.profiler``; last, the forward kernel's
``num_warps`` for one-program-per-tile rows of 2048, 4096 and 8192.

    python bench/profile_softmax.py            # prints; nothing is written
"""

import _cuda_script  # bench/: --help, and a message without a CUDA GPU
_cuda_script.start(__doc__)

import importlib

import torch
import triton
from torch.profiler import ProfilerActivity, profile

import fused_softmax as fs

smod = importlib.import_module("fused_softmax.softmax")  # the module, not the function
try:
    from liger_kernel.ops.softmax import LigerSoftmaxFunction
except ImportError:
    LigerSoftmaxFunction = None


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def main():
    N = 4096
    x = torch.randn((1 << 28) // N, N, device="cuda", dtype=torch.bfloat16)
    xg, dy = x.clone().requires_grad_(), torch.randn_like(x)

    def step(f):
        def go():
            xg.grad = None
            f(xg).backward(dy)
        return go

    def grad_only(f):
        return lambda: torch.autograd.grad(f(xg), xg, dy)

    variants = {"ours": lambda t: fs.softmax(t, -1), "eager": lambda t: torch.softmax(t, -1)}
    if LigerSoftmaxFunction is not None:
        variants["liger"] = LigerSoftmaxFunction.apply
    for name, f in variants.items():
        for kind, make in (("backward()", step), ("autograd.grad", grad_only)):
            print(f"{name:6s} {kind:14s} {bench(make(f)):.3f} ms")
        go = step(f)
        go()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            go()
            torch.cuda.synchronize()
        for e in prof.key_averages():
            if e.device_time_total > 0:
                print(f"   {e.key[:70]:70s} {e.device_time_total / 1e3:.3f} ms x{e.count}")

    for n in (2048, 4096, 8192):
        x = torch.randn((1 << 28) // n, n, device="cuda", dtype=torch.bfloat16)
        xv, shape, sx = smod.view3d(x, 1)
        cfg, grid = smod.launch_config(xv, shape, sx, (sx[1], sx[1]))
        times = {w: bench(lambda c=dict(cfg, num_warps=w): smod._launch_fwd(x, 1, 0, 1.0, config=(c, grid)))
                 for w in (4, 8, 16)}
        print(f"N={n} default {cfg} " + " ".join(f"w{w}={ms:.4f}" for w, ms in times.items()))


if __name__ == "__main__":
    main()
