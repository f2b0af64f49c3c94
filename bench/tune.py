"""Launch-configuration sweep through the real launchers (CUDA only), bounded by a deadline.

Each row: a case, a configuration ([BLOCK_R, BLOCK_N, SINGLE_PASS, num_warps, waves] for
softmax; [BLOCK_N, num_warps, waves] for cross-entropy; waves = programs per SM of the
persistent grid, 2**20 meaning one program per tile), median ms and GB/s. The JSON is
rewritten after every row, so a run cut short keeps what it measured.

    python bench/tune.py bench/results/tune-<device>-<date>.json
"""
import _cuda_script  # bench/: --help, and a message without a CUDA GPU
_cuda_script.start(__doc__)

import importlib
import json
import os
import sys
import time

import torch
import triton
from triton.testing import do_bench
t0 = time.time(); DEADLINE = float(os.environ.get("DEADLINE", 200))
def log(*a): print(f"[{time.time()-t0:5.1f}s]", *a, flush=True)
sm = importlib.import_module("fused_softmax.softmax"); ce = importlib.import_module("fused_softmax.cross_entropy")
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.environ.get("OUT", "."), "tune.json"); R = dict(device=torch.cuda.get_device_name(), rows=[])
def ms(fn): return do_bench(fn, warmup=10, rep=40, return_mode="median")
SMS = torch.cuda.get_device_properties(0).multi_processor_count
def sweep_sm(N, cfgs, bwd=False):
    """Softmax forward (or, with ``bwd``, backward) at rows of N over launch configs."""
    x = torch.randn((1 << 28) // N, N, device="cuda", dtype=torch.bfloat16)
    if bwd:
        y, dy = torch.softmax(x, -1), torch.randn_like(x); nb = 6 * x.numel()
        ref = y.float() * (dy.float() - (dy.float() * y.float()).sum(-1, keepdim=True))
        run, case = (lambda c: sm._launch_bwd(y, dy, None, 1, 0, 1.0, config=c)), f"sm bwd N{N}"
    else:
        nb, ref = 4 * x.numel(), torch.softmax(x.float(), -1)
        run, case = (lambda c: sm._launch_fwd(x, 1, 0, 1.0, config=c)), f"sm N{N}"
    for br, bn, single, w, waves in cfgs:
        if time.time() - t0 > DEADLINE: return
        n_tiles = triton.cdiv(x.shape[0], br); grid = min(n_tiles, SMS * waves)
        c = (dict(BLOCK_R=br, BLOCK_N=bn, SINGLE_PASS=single, WIDE=False, num_warps=w), grid)
        try:
            err = (run(c).float() - ref).abs().max().item()
            m = ms(lambda: run(c)); row = dict(case=case, cfg=[br, bn, single, w, waves], ms=m, gbps=nb / m / 1e6, err=err)
        except Exception as e: row = dict(case=case, cfg=[br, bn, single, w, waves], error=repr(e)[:120])
        R["rows"].append(row); log(row); json.dump(R, open(OUT, "w"))
def sweep_ce(V, grad, cfgs):
    x = torch.randn(8192, V, device="cuda", dtype=torch.bfloat16); t = torch.randint(0, V, (8192,), device="cuda")
    sc = torch.tensor([1 / 8192, float(V)], device="cuda"); g = torch.empty_like(x) if grad else None; nb = x.numel() * 2 * (2 if grad else 1)
    for bn, w, waves in cfgs:
        if time.time() - t0 > DEADLINE: return
        c = (bn, w, min(8192, SMS * waves))
        m = ms(lambda: ce._launch_fwd(x, t, None, sc, g, -100, 0.0, 1.0, 0.0, 0.0, False, config=c))
        row = dict(case=f"ce V{V} grad{grad}", cfg=[bn, w, waves], ms=m, gbps=nb / m / 1e6); R["rows"].append(row); log(row); json.dump(R, open(OUT, "w"))
B = 1 << 20
if os.environ.get("ONLY") == "sm_bwd":
    sweep_sm(32768, bwd=True, cfgs=[(1, 32768, True, 32, 8), (1, 32768, True, 32, 2), (1, 32768, True, 32, B), (1, 32768, True, 16, 8), (1, 16384, False, 32, 4)])
    sweep_sm(4096, bwd=True, cfgs=[(1, 4096, True, 8, 8), (1, 4096, True, 4, B), (2, 4096, True, 8, B), (1, 4096, True, 8, B)])
    sweep_sm(1024, bwd=True, cfgs=[(4, 1024, True, 8, 8), (4, 1024, True, 4, B), (2, 1024, True, 4, B), (8, 1024, True, 8, B)])
    sys.exit(0)
sweep_ce(128256, False, [(16384, 32, 2), (16384, 32, B), (8192, 16, B), (4096, 8, B), (8192, 16, 8), (4096, 8, 16), (16384, 16, B)])
sweep_ce(128256, True, [(16384, 32, 2), (16384, 32, 1), (8192, 16, 2), (8192, 16, 4), (4096, 8, 4), (4096, 8, 8), (8192, 32, 2)])
sweep_ce(32000, True, [(16384, 32, 2), (8192, 16, 4), (4096, 8, 8), (4096, 8, 16), (8192, 16, 8), (32768, 32, 2)])
sweep_sm(4096, [(1, 4096, True, 8, 8), (1, 4096, True, 8, B), (1, 4096, True, 4, B), (2, 4096, True, 8, B), (2, 4096, True, 16, 4), (1, 4096, True, 4, 16), (4, 4096, True, 16, B)])
sweep_sm(1024, [(4, 1024, True, 8, 8), (4, 1024, True, 8, B), (1, 1024, True, 4, B), (2, 1024, True, 4, B), (8, 1024, True, 8, B), (4, 1024, True, 4, B), (16, 1024, True, 16, B)])
sweep_sm(32768, [(1, 32768, True, 32, 8), (1, 32768, True, 32, B), (1, 32768, True, 16, B), (1, 32768, True, 16, 8), (1, 32768, True, 32, 2)])
sweep_sm(131072, [(1, 16384, False, 32, 2), (1, 16384, False, 32, 1), (1, 8192, False, 16, 2), (1, 8192, False, 16, 4), (1, 32768, False, 32, 1), (1, 8192, False, 32, 2)])
