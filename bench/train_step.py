"""Training step of a small decoder language model with three LM-head losses.

The LM head is where the logits live: (tokens x vocabulary) is usually the largest tensor
of a training step. This measures what that costs end to end, with one model and three
ways of computing its loss from the last hidden states ``h`` (tokens, hidden) and the
head's weight ``W`` (vocabulary, hidden):

* ``torch``      ``F.cross_entropy(F.linear(h, W), target)``: logits materialised;
* ``ce``         ``fused_softmax.cross_entropy(F.linear(h, W), target)``: logits
  materialised, loss and logit gradient in one fused kernel;
* ``linear_ce``  ``fused_softmax.linear_cross_entropy(h, W, target)``: logits never
  materialised (chunks of rows; ``--chunk-sizes`` adds one variant per chunk size).

A step is forward, backward and an AdamW update. Reported per variant: median step time
(CUDA events, after warm-up), peak memory during the step, and that peak minus the memory
held before the step (parameters and optimizer state: the step's own activations, logits
and gradients), and the first step's loss.

CUDA (default): hidden 2048, 4 layers, 16 heads, vocabulary 128256, batch 4 x sequence
2048 = 8192 tokens, bf16 parameters (a decoder without positional encoding: the timing
does not care). Writes JSON with ``--json``::

    python bench/train_step.py --json bench/results/train-step-<device>-<date>.json
    python bench/train_step.py --hidden 4096 --chunk-sizes 1024,4096 --compile

CPU: a tiny configuration in fp32 for a few steps, through Triton's interpreter (set
before import), from the same initial weights and data: prints the three loss curves and
exits non-zero unless they agree (the updates use each variant's gradients, so later
steps also check the gradients).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the real kernels, on CPU

import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fused_softmax.cross_entropy import cross_entropy  # noqa: E402
from fused_softmax.linear_cross_entropy import linear_cross_entropy  # noqa: E402


class Block(nn.Module):
    """Pre-norm decoder block: causal self-attention and a SwiGLU MLP."""

    def __init__(self, hidden: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.RMSNorm(hidden), nn.RMSNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.proj = nn.Linear(hidden, hidden, bias=False)
        self.up = nn.Linear(hidden, 2 * ffn, bias=False)
        self.down = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.heads, D // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, D))
        gate, value = self.up(self.norm2(x)).chunk(2, -1)
        return x + self.down(F.silu(gate) * value)


class DecoderLM(nn.Module):
    def __init__(self, vocab: int, hidden: int, layers: int, heads: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(Block(hidden, heads, 8 * hidden // 3 // 64 * 64 or hidden)
                                    for _ in range(layers))
        self.norm = nn.RMSNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, tokens: torch.Tensor, target: torch.Tensor, loss: str, chunk_size=None):
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h)
        h = self.norm(h)
        if loss == "linear_ce":
            return linear_cross_entropy(h, self.head.weight, target, chunk_size=chunk_size)
        logits = self.head(h).flatten(0, 1)
        fn = cross_entropy if loss == "ce" else F.cross_entropy
        return fn(logits, target.flatten())


def run_variant(model0, tokens, target, loss, chunk_size, steps, warmup, compile_):
    """Fresh copy of the model and optimizer; ``warmup + steps`` steps. Returns the losses,
    per-step milliseconds (CUDA) and peak memory figures (CUDA)."""
    cuda = tokens.device.type == "cuda"
    model = copy.deepcopy(model0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=cuda)
    forward = torch.compile(model) if compile_ else model
    losses, times, peaks = [], [], []
    for i in range(warmup + steps):
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
            held = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        value = forward(tokens, target, loss, chunk_size)
        value.backward()
        opt.step()
        if cuda:
            end.record()
            torch.cuda.synchronize()
            if i >= warmup:
                times.append(start.elapsed_time(end))
                peaks.append((torch.cuda.max_memory_allocated(), torch.cuda.max_memory_allocated() - held))
        losses.append(value.item())
    del model, opt, forward
    if cuda:
        torch.cuda.empty_cache()
    return losses, times, peaks


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=2048 if cuda else 32)
    p.add_argument("--layers", type=int, default=4 if cuda else 2)
    p.add_argument("--heads", type=int, default=16 if cuda else 4)
    p.add_argument("--vocab", type=int, default=128256 if cuda else 1000)
    p.add_argument("--batch", type=int, default=4 if cuda else 2)
    p.add_argument("--seq", type=int, default=2048 if cuda else 16)
    p.add_argument("--steps", type=int, default=10 if cuda else 3)
    p.add_argument("--warmup", type=int, default=3 if cuda else 0)
    p.add_argument("--chunk-sizes", default="" if cuda else "8",
                   help="comma-separated chunk sizes for extra linear_ce variants")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for every variant")
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)

    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    model0 = DecoderLM(a.vocab, a.hidden, a.layers, a.heads).to(device=device, dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(1)
    tokens = torch.randint(0, a.vocab, (a.batch, a.seq), device=device, generator=gen)
    target = torch.randint(0, a.vocab, (a.batch, a.seq), device=device, generator=gen)
    variants = [("torch", "torch", None), ("ce", "ce", None), ("linear_ce", "linear_ce", None)]
    variants += [(f"linear_ce[chunk={c}]", "linear_ce", int(c)) for c in a.chunk_sizes.split(",") if c]

    params = sum(t.numel() for t in model0.parameters())
    print(f"{device}: {params / 1e6:.1f} M parameters ({dtype}), {a.batch}x{a.seq} tokens, vocabulary "
          f"{a.vocab}, hidden {a.hidden}, {a.layers} layers{', compiled' if a.compile else ''}", flush=True)
    results = dict(device=torch.cuda.get_device_name() if cuda else "cpu", date=datetime.date.today().isoformat(),
                   torch=torch.__version__, config=vars(a), params=params, variants={})
    t0 = time.time()
    for name, loss, chunk in variants:
        losses, times, peaks = run_variant(model0, tokens, target, loss, chunk, a.steps, a.warmup, a.compile)
        r = dict(losses=losses)
        if cuda:
            r.update(step_ms=statistics.median(times), peak_gb=max(pk for pk, _ in peaks) / 1e9,
                     step_peak_gb=max(st for _, st in peaks) / 1e9)
            print(f"{name:>24}: {r['step_ms']:8.2f} ms/step   peak {r['peak_gb']:6.2f} GB   "
                  f"step peak {r['step_peak_gb']:6.2f} GB   first loss {losses[0]:.4f}", flush=True)
        else:
            print(f"{name:>24}: losses {' '.join(f'{v:.6f}' for v in losses)}", flush=True)
        results["variants"][name] = r
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)

    # The three losses agree: every step on CPU (fp32); the first step on CUDA (bf16 logits).
    base = results["variants"]["torch"]["losses"]
    rtol = 1e-4 if not cuda else 2e-2
    ok = True
    for name, r in results["variants"].items():
        steps = r["losses"] if not cuda else r["losses"][:1]
        worst = max(abs(v - b) / abs(b) for v, b in zip(steps, base))
        ok &= worst <= rtol
        print(f"{name:>24}: max relative difference from torch {worst:.2e} ({'ok' if worst <= rtol else 'DIFFERS'})")
    print(f"{time.time() - t0:.1f} s", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
