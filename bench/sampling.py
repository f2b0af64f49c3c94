"""sample() against torch's softmax + sort + multinomial path (CUDA only).

Batch 1 ... 256 rows x V = 128256, bf16 logits. Per batch: our fused ``sample`` with plain
temperature, top-k = 50, top-p = 0.9 and min-p = 0.05; torch's usual path for the same
(``softmax(x / T)`` then ``multinomial``; for top-k ``topk`` first; for top-p a full
descending sort, cumulative sum, mask and ``multinomial``); and one read of the logits
(``amax`` over the row: the floor a one-pass sampler can reach). top-k with top-p
together (Hugging Face's usual pair) against ``topk`` then the top-p mask on its 50.
A/B rows of the launch choices for few rows (rows are split below 4 x SMs: batch 256
too on a 132-SM H100 / H200): ``*_whole`` does not split rows across programs (one
program walks a row, ``UNROLL`` draw blocks a step: the choice before the split),
``ours_min_p_whole`` neither splits nor unrolls (the choice before both), ``*_rounds8``
runs 8 rejection rounds split instead of ``SPLIT_ROUNDS`` (4).
Decoding loops replay such steps from CUDA graphs, so every callable is timed by graph
replay (``triton.testing.do_bench_cudagraph``); the plain ``do_bench`` time (host launch
cost included) is recorded too.

    python bench/sampling.py bench/results/sampling-<device>-<date>.json
    BATCHES=64,256 python bench/sampling.py ...   # some batches only (about 40 s each)
"""
import _cuda_script  # bench/: --help, and a message without a CUDA GPU
_cuda_script.start(__doc__)

import datetime
import json
import os
import sys
import time

import torch
import triton
from triton.testing import do_bench, do_bench_cudagraph

from fused_softmax import sample

smod = sys.modules["fused_softmax.sampling"]
t0 = time.time()
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.environ.get("OUT", "."), "sampling.json")
V, T, K, P, MINP = 128256, 0.8, 50, 0.9, 0.05
R = dict(device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(),
         torch=torch.__version__, triton=triton.__version__, vocab=V, dtype="bfloat16",
         temperature=T, top_k=K, top_p=P, min_p=MINP, cases={})


def log(*a):
    print(f"[{time.time() - t0:6.1f}s]", *a, flush=True)


def torch_temperature(x):
    return torch.multinomial(torch.softmax(x.float() / T, -1), 1).squeeze(-1)


def torch_top_k(x):
    v, i = torch.topk(x.float() / T, K, dim=-1)
    return i.gather(-1, torch.multinomial(torch.softmax(v, -1), 1)).squeeze(-1)


def torch_top_p(x):
    probs = torch.softmax(x.float() / T, -1)
    p, i = torch.sort(probs, dim=-1, descending=True)
    p = p.masked_fill(p.cumsum(-1) - p > P, 0.0)
    return i.gather(-1, torch.multinomial(p, 1)).squeeze(-1)


def torch_top_k_top_p(x):
    v, i = torch.topk(x.float() / T, K, dim=-1)
    p = torch.softmax(v, -1)  # sorted already
    p = p.masked_fill(p.cumsum(-1) - p > P, 0.0)
    return i.gather(-1, torch.multinomial(p, 1)).squeeze(-1)


def launch_choice(fn, unroll=None, split=True, rounds=None):
    """``fn`` with the sampling launcher's few-rows choices changed while it runs (and
    while a CUDA graph captures it)."""
    def go():
        saved = smod.UNROLL_FEW_ROWS, smod.launch_config, smod.SPLIT_ROUNDS
        if unroll is not None:
            smod.UNROLL_FEW_ROWS = unroll
        if rounds is not None:
            smod.SPLIT_ROUNDS = rounds
        if not split:
            smod.launch_config = lambda n, v, d, split_ok=False: saved[1](n, v, d, False)
        try:
            return fn()
        finally:
            smod.UNROLL_FEW_ROWS, smod.launch_config, smod.SPLIT_ROUNDS = saved
    return go


def torch_min_p(x):
    probs = torch.softmax(x.float() / T, -1)
    probs = probs.masked_fill(probs < MINP * probs.amax(-1, keepdim=True), 0.0)
    return torch.multinomial(probs, 1).squeeze(-1)


for B in [int(b) for b in os.environ.get("BATCHES", "1,16,64,256").split(",")]:
    g = torch.Generator(device="cuda").manual_seed(B)
    x = (torch.randn(B, V, device="cuda", generator=g) * 3).to(torch.bfloat16)
    fns = {
        "one_read_amax": lambda: x.amax(-1),
        "ours_temperature": lambda: sample(x, temperature=T),
        "torch_temperature": lambda: torch_temperature(x),
        "ours_top_k": lambda: sample(x, temperature=T, top_k=K),
        "torch_top_k": lambda: torch_top_k(x),
        "ours_top_p": lambda: sample(x, temperature=T, top_p=P),
        "torch_top_p": lambda: torch_top_p(x),
        "ours_min_p": lambda: sample(x, temperature=T, min_p=MINP),
        "torch_min_p": lambda: torch_min_p(x),
        "ours_top_k_top_p": lambda: sample(x, temperature=T, top_k=K, top_p=P),
        "torch_top_k_top_p": lambda: torch_top_k_top_p(x),
    }
    # rows are split below 4 x SMs rows: batch 256 too on an H100 / H200 (132 SMs)
    fns.update({
        "ours_top_k_whole": launch_choice(lambda: sample(x, temperature=T, top_k=K), split=False),
        "ours_top_p_whole": launch_choice(lambda: sample(x, temperature=T, top_p=P), split=False),
        "ours_top_k_rounds8": launch_choice(lambda: sample(x, temperature=T, top_k=K), rounds=8),
        "ours_top_p_rounds8": launch_choice(lambda: sample(x, temperature=T, top_p=P), rounds=8),
        "ours_min_p_whole": launch_choice(lambda: sample(x, temperature=T, min_p=MINP),
                                          unroll=1, split=False),  # the earlier choice
        "ours_top_k_top_p_whole": launch_choice(  # one program per row: radix select alone
            lambda: sample(x, temperature=T, top_k=K, top_p=P), split=False),
    })
    case = R["cases"][f"B{B}"] = dict(bytes=x.numel() * 2)
    for name, fn in fns.items():
        row = {}
        try:
            fn(); torch.cuda.synchronize()
            row["ms_launch"] = do_bench(fn, warmup=25, rep=100, return_mode="median")
            row["ms_graph"] = do_bench_cudagraph(fn, rep=100, return_mode="median")
        except Exception as e:
            row["error"] = repr(e)[:300]
        case[name] = row
        log(B, name, row)
        json.dump(R, open(OUT, "w"), indent=1)
    for kind in ("temperature", "top_k", "top_p", "min_p", "top_k_top_p"):
        ours, ref = case[f"ours_{kind}"], case[f"torch_{kind}"]
        if "ms_graph" in ours and "ms_graph" in ref:
            case[f"speedup_{kind}"] = ref["ms_graph"] / ours["ms_graph"]
    if "ms_graph" in case["ours_temperature"] and "ms_graph" in case["one_read_amax"]:
        case["temperature_over_one_read"] = case["ours_temperature"]["ms_graph"] / case["one_read_amax"]["ms_graph"]
    json.dump(R, open(OUT, "w"), indent=1)
    log(B, {k: round(v, 2) for k, v in case.items() if k.startswith(("speedup", "temperature_over"))})
