"""linear_cross_entropy against torch eager, torch.compile and Liger-Kernel (CUDA only).

The LM-head loss at M = 8192 tokens, hidden H = 4096, bf16, vocabularies 128256 and
256000: forward + backward (gradients of the hidden states and of the head's weight), the
median time (``triton.testing.do_bench``), the peak memory of one step beyond what was
allocated before it, and that peak minus the two gradients the step must return (the
"extra" memory the issue bounds). Each provider's loss and gradients are compared with
eager's. Our op runs with its default (chunks of 4096 classes here: 64 MiB of logits, the
backward recomputes them), with 8192-class chunks, and with chunks of rows
(``chunk_size=8192`` is one chunk: all the logits, three matmuls).

    python bench/linear_ce.py bench/results/linear-ce-<device>-<date>.json

The JSON is rewritten after every measurement, so a run cut short keeps what it measured.
"""
import _cuda_script  # bench/: --help, and a message without a CUDA GPU
_cuda_script.start(__doc__)

import datetime
import importlib
import importlib.util
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from fused_softmax import linear_cross_entropy

t0 = time.time()
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.environ.get("OUT", "."), "linear-ce.json")
VOCABS = [int(v) for v in os.environ.get("VOCABS", "128256,256000").split(",")]
M, H = 8192, 4096
R = dict(device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(),
         torch=torch.__version__, triton=triton.__version__, M=M, H=H, dtype="bfloat16", cases={})
_lce = importlib.import_module("fused_softmax.linear_cross_entropy")
R["fp32_addmm_fused"] = _lce._cuda_addmm_accumulates_fp32(torch.device("cuda"))


def log(*a):
    print(f"[{time.time() - t0:6.1f}s]", *a, flush=True)


def torch_lce(x, w, t):
    return F.cross_entropy(F.linear(x, w), t)


providers = {
    "ours": lambda x, w, t: linear_cross_entropy(x, w, t),
    "ours_vocab8192": lambda x, w, t: linear_cross_entropy(x, w, t, vocab_chunk_size=8192),
    "ours_chunk4096": lambda x, w, t: linear_cross_entropy(x, w, t, chunk_size=4096),
    "ours_chunk8192": lambda x, w, t: linear_cross_entropy(x, w, t, chunk_size=8192),
    "eager": torch_lce,
    "compile": torch.compile(torch_lce, fullgraph=True, dynamic=False),
}
if importlib.util.find_spec("liger_kernel") is not None:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    _liger = LigerFusedLinearCrossEntropyLoss()
    providers["liger"] = lambda x, w, t: _liger(w, x, t)

for V in VOCABS:
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(M, H, device="cuda", generator=g) * 0.5).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(V, H, device="cuda", generator=g) * 0.02).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, V, (M,), device="cuda", generator=g)
    grad_bytes = (x.numel() + w.numel()) * 2
    case = R["cases"][f"V{V}"] = dict(flops=3 * 2 * M * V * H)
    for name, f in providers.items():
        def step():
            x.grad = w.grad = None
            loss = f(x, w, t)
            loss.backward()
            return loss
        try:
            x.grad = w.grad = None
            torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            t1 = time.time(); loss = step(); torch.cuda.synchronize(); first = time.time() - t1
            peak = torch.cuda.max_memory_allocated() - base
            got = (loss.detach().float(), x.grad.float(), w.grad.float())
            row = dict(first_call_s=first, peak_step_mb=peak / 2**20,
                       peak_extra_mb=(peak - grad_bytes) / 2**20, loss=got[0].item())
            x.grad = w.grad = None
            m = do_bench(step, warmup=100, rep=400, return_mode="median")
            row.update(ms=m, tflops=case["flops"] / m / 1e9)
            row["_got"] = got
        except Exception as e:  # record and go on: one provider failing must not lose the rest
            row = dict(error=repr(e)[:300])
        case[name] = row
        log(V, name, {k: v for k, v in row.items() if k != "_got"})
        json.dump(R, open(OUT, "w"), indent=1, default=lambda o: None)
    # differences against eager, relative to the norm of eager's values
    if "_got" in case.get("eager", {}):
        e = case["eager"]["_got"]
        for name, row in case.items():
            if isinstance(row, dict) and "_got" in row:
                row["rel_diff_vs_eager"] = [((a - b).norm() / b.norm().clamp_min(1e-30)).item()
                                            for a, b in zip(row.pop("_got"), e)]
    for row in case.values():
        if isinstance(row, dict):
            row.pop("_got", None)
    json.dump(R, open(OUT, "w"), indent=1)
    log(V, {k: (round(v["ms"], 2), round(v["peak_extra_mb"]), v.get("rel_diff_vs_eager"))
            for k, v in case.items() if isinstance(v, dict) and "ms" in v})
    del x, w, t
    torch.cuda.empty_cache()
