"""linear_cross_entropy: ``cross_entropy(linear(input, W, b), target)`` without the logits.

In language-model training the last projection, ``hidden (M, H) @ W (V, H).T``, makes an
``(M, V)`` logits tensor (8192 x 128256 in bf16 is 2 GB; torch's fp32 upcast makes it
4-12 GB), usually the largest tensor of the step. Here the logits only ever exist one chunk
at a time, in one reused buffer. Two ways to cut them:

**Chunks of rows** (``chunk_size`` rows, whole vocabulary rows; every target kind):

1. ``logits = input_chunk @ W.T (+ b)`` by cuBLAS, into the buffer;
2. the fused cross-entropy kernel (``kernels/cross_entropy.py``) writes the per-row loss
   and log-sum-exp and, over the logits, their gradient ``G = d loss / d logits``, already
   scaled by ``1 / denominator`` for ``'mean'`` (computed once, on the device, before the
   loop);
3. ``grad_input_chunk = G @ W``, ``grad_W += G.T @ input_chunk`` (accumulated in fp32 for
   fp16/bf16 weights: rounding a bf16 running sum once per chunk is the Liger-Kernel
   accuracy bug), ``grad_b += G.sum(0)`` (fp32).

So the gradients are ready when the forward returns (it computes them only for the
tensors that require grad; a pure forward computes the loss alone), and the backward only
rescales them by ``grad_output`` in place, on the device, skipping a scale of exactly 1.
``reduction='none'``: ``grad_output`` is then one value per row, known only in backward,
so the forward computes the loss only and the backward runs the chunk loop again with the
per-row scale folded into ``G`` (one more logits matmul), as does a second backward
through the same graph (``retain_graph=True``).

Three matmuls of 2 * M * V * H flops each, whatever the chunk; but per chunk of ``n`` rows
the ``grad_W`` update reads and writes its fp32 accumulator (8 * V * H bytes for
2 * n * V * H flops), so small chunks are bandwidth-bound, and the accumulator itself is
4 * V * H bytes (2 GB at V = 128256, H = 4096). One chunk needs no accumulator: it is the
fastest, and holds all the logits.

**Chunks of the vocabulary** (``vocab_chunk_size`` classes, all rows at once; class-index
targets and a 2-D weight): the vocabulary-parallel algorithm (``distributed.py``,
``kernels/vocab_parallel.py``) with the chunks taking turns instead of ranks:

1. forward, per chunk: ``logits = input @ W[chunk].T (+ b)``, then per-row statistics (max,
   sum of exp, target logit, smoothing sum); after the loop they combine into the loss and
   the log-sum-exp. One matmul; O(rows) values kept for the backward;
2. backward, per chunk: the logits recomputed, turned into their gradient in place from the
   saved log-sum-exp, then ``grad_W[chunk] = G.T @ input`` (one matmul over all rows:
   written once, no accumulator), ``grad_b[chunk] = G.sum(0)``, and
   ``grad_input += G @ W[chunk]`` (accumulated in fp32 for fp16/bf16 input: 4 * M * H bytes).

Four matmuls instead of three (the logits are computed twice), but the memory is the chunk
buffer plus the fp32 ``grad_input`` accumulator, and the gradients exist only during the
backward. The gradients are formed in the backward here (not in the forward, as the rows
path does): the second pass must recompute the logits either way, and the forward's
memory stays O(rows).

**The default** (``default_plan``): one chunk of rows when all the logits fit in 64 MiB;
otherwise the chunking that needs less memory beyond inputs, outputs and gradients —
at M = 8192, H = 4096, V = 128256 bf16 the vocabulary: 64 MiB of logits + 128 MiB of
fp32 ``grad_input`` accumulator, against 2 GB for rows. ``chunk_size=M`` (one chunk of
rows) buys speed with memory.

Measured on an H200 (M = 8192, H = 4096, V = 128256, bf16, forward + backward; rows path;
bench/results/linear-ce-h200-2026-11-26*): one chunk of rows 38.5 ms, and 40.1 ms timed
again in the same run as ``chunk_size=8192``, with 2.0 GB beyond inputs and gradients;
4096-row chunks 41.6 ms / 3.0 GB; 1024 rows 44.3 ms / 2.3 GB; 256 rows (64 MiB) 78 ms /
2.1 GB; torch.compile 39.2 ms / 2.0 GB; eager 41.1 ms / 4.9 GB; Liger-Kernel 54.3 ms /
63 MB (it accumulates ``grad_W`` in bf16). The vocabulary path has not been timed on a GPU
yet (``bench/linear_ce.py`` runs it as ``ours``).

fp16: on the rows path the gradients are formed in the backward, with ``grad_output``
(``GradScaler``'s 2^16) folded into each logit gradient before it is rounded to fp16, as
torch orders it (formed in the forward, entries below fp16's 6e-8 flushed to 0); this
costs the logits matmul again.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from typing import Optional

import torch
from torch.overrides import handle_torch_function

from . import _backend
from . import distributed as _vp
from ._backend import (LOW_FLOATS, acc_dtype, check_float, differentiated, exporting,
                       fp32_if_low, needs_torch_ops, torch_function_dispatch, use_triton)
from .cross_entropy import (CHECK_ERRORS, _check_args, _kernel_operands, _loss_rows,
                            _prob_target_grads, _reduction_scalars, check_extras,
                            check_ignore_index, check_smoothing_type, check_targets_on_cpu,
                            check_version, check_versions, cross_entropy, cross_entropy_fwd,
                            cross_entropy_fwd_inplace, grads_of_rows, loss_dtype,
                            mutation_allowed, raise_torchs_error, reduced, reduction_name,
                            rescale_, smoothing_value, track_versions, watched_by_torch,
                            widen_int32_target)

__all__ = ["linear_cross_entropy", "LinearCrossEntropyLoss"]

#: Bytes of the reused logits buffer that the default chunk size aims for.
CHUNK_BYTES = 64 << 20


def default_chunk_rows(n_rows: int, row_bytes: int, acc_bytes: int = 0) -> int:
    """Rows per chunk, at most ``n_rows``: a power of two (suits the GEMM tiles) whose
    logits fit in ``max(CHUNK_BYTES, acc_bytes)``, or all rows when they fit.

    ``acc_bytes`` is the fp32 ``grad_W`` accumulator that several chunks need (0 when there
    is none: no weight gradient, or an fp32/fp64 weight, which accumulates in its own
    gradient). Every chunk reads and writes that accumulator once, which dominates small
    chunks (78 ms against 38.5 ms for one chunk at M = 8192, H = 4096, V = 128256 bf16 on
    an H200), so the buffer may grow to the accumulator's size: at most twice the memory
    the accumulator alone takes; and when all the logits fit in it, one chunk needs no
    accumulator at all (``grad_W`` is one matmul, rounded once).
    """
    rows = max(1, max(CHUNK_BYTES, acc_bytes) // max(row_bytes, 1))
    if rows >= n_rows:
        return max(1, n_rows)
    return 1 << (rows.bit_length() - 1)


# --------------------------------------------------------------------------- fp32 accumulation
@functools.lru_cache(maxsize=None)
def _cuda_addmm_accumulates_fp32(device: torch.device) -> bool:
    """Whether cuBLAS ``addmm(out_dtype=float32)`` takes an fp32 ``self`` with bf16 factors
    (newer torch); older versions want ``self`` in the factors' dtype."""
    a = torch.zeros(2, 2, device=device, dtype=torch.bfloat16)
    acc = torch.zeros(2, 2, device=device, dtype=torch.float32)
    try:
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError):
        return False
    return True


def _addmm_into(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """``acc (+)= a @ b`` with ``acc`` possibly wider than ``a`` and ``b`` (fp32 for bf16):
    the product is accumulated inside the matmul in fp32 and rounded into ``acc`` once.
    ``first`` overwrites ``acc`` (left uninitialised: beta=0 ignores its contents)."""
    beta = 0 if first else 1
    if acc.dtype == a.dtype:
        acc.addmm_(a, b, beta=beta)
    elif acc.device.type == "cuda" and _cuda_addmm_accumulates_fp32(acc.device):
        torch.addmm(acc, a, b, beta=beta, out_dtype=acc.dtype, out=acc)
    elif acc.device.type == "cuda":
        # Older torch: fp32 products of row blocks of ``acc``, at most CHUNK_BYTES each.
        step = max(1, CHUNK_BYTES // max(4 * acc.shape[1], 1))
        for v in range(0, acc.shape[0], step):
            part = torch.mm(a[v:v + step], b, out_dtype=acc.dtype)
            acc[v:v + step].copy_(part) if first else acc[v:v + step].add_(part)
    else:  # CPU: no mixed-dtype matmul; fp32 copies of the chunk's factors
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype), beta=beta)


def _grad_acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- custom op
@_backend.custom_op("fused_softmax::linear_cross_entropy_fwd")
def linear_cross_entropy_fwd(
    x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], target: torch.Tensor,
    weight: Optional[torch.Tensor], scalars: torch.Tensor, row_scale: Optional[torch.Tensor],
    ignore_index: int, label_smoothing: float, logit_scale: float, softcap: float,
    z_loss: float, prob_target: bool, num_classes: int, chunk_size: int,
    grad_input: bool, grad_weight: bool, grad_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row loss and lse of ``linear(x, w, b)`` (``x`` (M, H), ``w`` (D*C, H): D rows of
    ``num_classes`` logits per input row), and the gradients of ``sum(loss * s)`` for
    x / w / b where asked (empty tensors otherwise), ``s`` = ``scalars[0]`` times
    ``row_scale`` (one value per logits row) when given.

    ``chunk_size`` input rows at a time through one ``(chunk_size, D*C)`` logits buffer.
    """
    M, H = x.shape
    V = w.shape[0]
    D = V // num_classes if num_classes else 1
    acc = _loss_acc(x, target, weight, prob_target)
    loss = torch.empty(M * D, dtype=acc, device=x.device)
    lse = torch.empty(M * D, dtype=acc, device=x.device)
    compute_grad = grad_input or grad_weight or grad_bias
    gx = torch.empty((M, H) if grad_input else (0,), dtype=x.dtype, device=x.device)
    # One chunk: grad_W is one matmul, accumulated in fp32 inside cuBLAS and rounded once,
    # straight into the weight's dtype. Several: an fp32 accumulator across the chunks.
    gw_dtype = w.dtype if M <= chunk_size else _grad_acc_dtype(w.dtype)
    gw = torch.empty((V, H) if grad_weight else (0,), dtype=gw_dtype, device=x.device)
    gb = torch.empty((V,) if grad_bias else (0,), dtype=acc, device=x.device)
    if M == 0:
        gw.zero_()
        gb.zero_()
    buf = torch.empty((min(chunk_size, M), V), dtype=x.dtype, device=x.device)
    ce_args = (ignore_index, label_smoothing, logit_scale, softcap, z_loss, prob_target)
    upcast = acc != acc_dtype(x.dtype)
    for start in range(0, M, chunk_size):
        end = min(start + chunk_size, M)
        xc, logits, rows = x[start:end], buf[:end - start], slice(start * D, end * D)
        if b is None:
            torch.mm(xc, w.t(), out=logits)
        else:
            torch.addmm(b, xc, w.t(), out=logits)
        z = logits.view(-1, num_classes)
        if upcast:  # fp64 targets: the loss of these logits in fp64
            z = z.to(acc)
        if compute_grad:
            loss_c, lse_c = _backend.call(
                cross_entropy_fwd_inplace, z, target[rows], weight, scalars, *ce_args,
                row_scale[rows] if row_scale is not None else None)
            if upcast:
                logits.view(-1, num_classes).copy_(z)  # the gradient, in the logits' dtype
            if grad_input:
                torch.mm(logits, w, out=gx[start:end])
            if grad_weight:
                _addmm_into(gw, logits.t(), xc, first=start == 0)
            if grad_bias:
                col_sum = logits.sum(0, dtype=acc)
                gb.copy_(col_sum) if start == 0 else gb.add_(col_sum)
        else:
            loss_c, lse_c, _ = _backend.call(
                cross_entropy_fwd, z, target[rows], weight, scalars, *ce_args, False)
        loss[rows] = loss_c
        lse[rows] = lse_c
    return loss, lse, gx, gw.to(w.dtype), gb.to(w.dtype)


@linear_cross_entropy_fwd.register_fake
def _(x, w, b, target, weight, scalars, row_scale, ignore_index, label_smoothing,
      logit_scale, softcap, z_loss, prob_target, num_classes, chunk_size,
      grad_input, grad_weight, grad_bias):
    acc = _loss_acc(x, target, weight, prob_target)
    rows = x.shape[0] * (w.shape[0] // num_classes if num_classes else 1)
    return (x.new_empty(rows, dtype=acc), x.new_empty(rows, dtype=acc),
            x.new_empty(x.shape if grad_input else (0,)),
            w.new_empty(w.shape if grad_weight else (0,)),
            w.new_empty((w.shape[0],) if grad_bias else (0,)))


def _op_setup_context(ctx, inputs, output):
    ctx.args = inputs[7:14]
    ctx.save_for_backward(*inputs[:5])
    ctx.mark_non_differentiable(*output[1:])  # lse and the forward's gradients


def _op_backward(ctx, dloss, dlse, dgx, dgw, dgb):
    """The gradients of the per-row loss for a program that calls ``linear_cross_entropy_fwd``
    itself (an exported program: export keeps the ops, not the ``autograd.Function``
    around them), from the saved inputs with torch ops (``_differentiable_backward``, the
    logits materialised). The other outputs are not differentiable."""
    if dloss is None:
        return (None,) * 18
    return _differentiable_backward(ctx, ctx.saved_tensors, dloss, 1.0)


linear_cross_entropy_fwd.register_autograd(_op_backward, setup_context=_op_setup_context)


def _loss_acc(x, target, weight, prob_target: bool) -> torch.dtype:
    """The dtype a chunk's loss is computed in: the accumulation dtype of the loss's dtype
    (fp64 for an fp64 probability target or class weight: torch's products and sums are
    fp64 there; ``cross_entropy`` does the same)."""
    return acc_dtype(loss_dtype(x.dtype, target, weight, prob_target))


# --------------------------------------------------------------------------- vocabulary chunks
def default_vocab_chunk(n_rows: int, n_classes: int, elem_bytes: int) -> int:
    """Classes per chunk of the vocabulary-chunked path: a multiple of 128 (at least 128,
    at most ``n_classes``) whose ``(n_rows, chunk)`` logits fit in ``CHUNK_BYTES``."""
    cols = CHUNK_BYTES // max(n_rows * elem_bytes, 1)
    return max(1, min(n_classes, max(128, cols // 128 * 128)))


def default_plan(n_rows: int, n_classes: int, d: int, hidden: int, elem_bytes: int, *,
                 vocab_chunks_possible: bool, grad_input: bool, grad_weight: bool):
    """``(chunk_size, vocab_chunk_size)`` (one of them None): the chunking that needs the
    least memory beyond inputs, outputs and gradients.

    * All the logits fit in ``CHUNK_BYTES``: one chunk of rows (three matmuls, nothing to
      accumulate).
    * Chunks of rows (``default_chunk_rows``): the logits buffer, plus the fp32 accumulator
      of the weight's gradient (4 bytes per weight element) when there are several chunks
      and the weight is fp16/bf16 (``grad_weight``).
    * Chunks of the vocabulary (``default_vocab_chunk``; class-index targets and a 2-D
      weight only): a ``CHUNK_BYTES`` buffer, plus the fp32 accumulator of the input's
      gradient (4 bytes per input element, ``grad_input``), at the price of a fourth
      matmul: the backward recomputes the logits.

    At M = 8192, H = 4096, V = 128256 bf16 (both gradients): rows 2.0 GB (one chunk),
    vocabulary 64 MiB + 128 MiB, so the vocabulary."""
    row_bytes = d * n_classes * elem_bytes
    if n_rows * row_bytes <= CHUNK_BYTES:
        return max(1, n_rows), None
    w_acc = 4 * d * n_classes * hidden if grad_weight else 0
    rows = default_chunk_rows(n_rows, row_bytes, w_acc)
    rows_bytes = rows * row_bytes + (w_acc if rows < n_rows else 0)
    if vocab_chunks_possible:
        cols = default_vocab_chunk(n_rows, n_classes, elem_bytes)
        if n_rows * cols * elem_bytes + (4 * n_rows * hidden if grad_input else 0) <= rows_bytes:
            return None, cols
    return rows, None


def _needs_fp32_grad(t: torch.Tensor) -> bool:
    """Whether ``t`` gets a gradient that is accumulated across chunks in fp32 (fp16/bf16)."""
    return torch.is_grad_enabled() and t.requires_grad and _grad_acc_dtype(t.dtype) != t.dtype


def _vocab_chunks(x, w, b, vocab_chunk):
    """``(v0, logits)`` per chunk of ``vocab_chunk`` classes: ``x @ w[v0:v1].T (+ b)`` by
    cuBLAS into one reused contiguous buffer."""
    M, V = x.shape[0], w.shape[0]
    buf = torch.empty(M * min(vocab_chunk, V), dtype=x.dtype, device=x.device)
    for v0 in range(0, V, vocab_chunk):
        v1 = min(v0 + vocab_chunk, V)
        logits = buf[:M * (v1 - v0)].view(M, v1 - v0)
        if b is None:
            torch.mm(x, w[v0:v1].t(), out=logits)
        else:
            torch.addmm(b[v0:v1], x, w[v0:v1].t(), out=logits)
        yield v0, logits


def _slice(weight, v0, n):
    return None if weight is None else weight[v0:v0 + n]


@_backend.custom_op("fused_softmax::linear_cross_entropy_stats")
def linear_cross_entropy_stats(
    x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], target: torch.Tensor,
    weight: Optional[torch.Tensor], ignore_index: int, logit_scale: float, softcap: float,
    smoothing: bool, vocab_chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row statistics of ``z`` = the scaled / capped ``x @ w.T + b`` over all ``V``
    classes, ``vocab_chunk`` classes at a time (``vocab_parallel_stats_kernel`` on each
    chunk, the chunks then combined as the vocab-parallel ranks are).

    Returns ``shift`` ``(M,)`` (the row max, 0 where infinite) and ``sums`` ``(M, k)``:
    ``[sum(exp(z - shift)), z_t, sum(w * (z - shift))]`` (the last only with ``smoothing``)."""
    M, V = x.shape[0], w.shape[0]
    check_targets_on_cpu(target, ignore_index, V)
    acc = acc_dtype(x.dtype)
    n_chunks, k = -(-V // vocab_chunk), 3 if smoothing else 2
    row_max = torch.empty(n_chunks, M, dtype=acc, device=x.device)
    sums = torch.empty(n_chunks, M, k, dtype=acc, device=x.device)
    stats = _vp._launch_stats if use_triton(x) else _vp._torch_stats
    for i, (v0, logits) in enumerate(_vocab_chunks(x, w, b, vocab_chunk)):
        stats(logits, target, _slice(weight, v0, logits.shape[1]), v0, logit_scale,
              row_max[i], sums[i], softcap)
    # The log-sum-exp rule across chunks: every chunk moved to the row's max, then summed.
    shift = _vp._finite_or_zero(row_max.amax(0))
    # each chunk's total class weight (its size without a weight), padded to whole chunks
    w_chunks = torch.zeros(n_chunks * vocab_chunk, dtype=acc, device=x.device)
    w_chunks[:V] = weight if weight is not None else 1.0
    _vp.to_global_max(sums, row_max, shift, w_chunks.view(n_chunks, vocab_chunk).sum(1)[:, None])
    return shift, sums.sum(0)


@linear_cross_entropy_stats.register_fake
def _(x, w, b, target, weight, ignore_index, logit_scale, softcap, smoothing, vocab_chunk):
    acc = acc_dtype(x.dtype)
    M = x.shape[0]
    return x.new_empty(M, dtype=acc), x.new_empty((M, 3 if smoothing else 2), dtype=acc)


@_backend.custom_op("fused_softmax::linear_cross_entropy_vocab_bwd")
def linear_cross_entropy_vocab_bwd(
    x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], target: torch.Tensor,
    weight: Optional[torch.Tensor], lse: torch.Tensor, coef: torch.Tensor, logit_scale: float,
    softcap: float, vocab_chunk: int, grad_input: bool, grad_weight: bool, grad_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of x / w / b (empty tensors where not asked), ``vocab_chunk`` classes at a
    time: the chunk's logits recomputed, turned into their gradient in place
    (``vocab_parallel_bwd_kernel``, per-row coefficients ``coef`` from
    ``distributed.sharded_loss``), then ``grad_w[chunk] = G.T @ x`` (one matmul over all
    rows, rounded once), ``grad_b[chunk] = G.sum(0)`` and ``grad_x += G @ w[chunk]``
    (accumulated in fp32 for fp16/bf16)."""
    M, H = x.shape
    V = w.shape[0]
    acc = acc_dtype(x.dtype)
    gx = torch.empty((M, H) if grad_input else (0,), dtype=_grad_acc_dtype(x.dtype),
                     device=x.device)
    gw = torch.empty((V, H) if grad_weight else (0,), dtype=w.dtype, device=x.device)
    gb = torch.empty((V,) if grad_bias else (0,), dtype=acc, device=x.device)
    if M == 0:
        for g in (gx, gw, gb):
            g.zero_()
    bwd = _vp._launch_bwd if use_triton(x) else _vp._torch_bwd
    for v0, logits in _vocab_chunks(x, w, b, vocab_chunk) if M else ():
        v1 = v0 + logits.shape[1]
        bwd(logits, target, _slice(weight, v0, v1 - v0), lse, coef, v0, logit_scale, logits,
            softcap)
        if grad_input:
            _addmm_into(gx, logits, w[v0:v1], first=v0 == 0)
        if grad_weight:
            torch.mm(logits.t(), x, out=gw[v0:v1])
        if grad_bias:
            torch.sum(logits, 0, dtype=acc, out=gb[v0:v1])
    return gx.to(x.dtype), gw, gb.to(w.dtype)


@linear_cross_entropy_vocab_bwd.register_fake
def _(x, w, b, target, weight, lse, coef, logit_scale, softcap, vocab_chunk,
      grad_input, grad_weight, grad_bias):
    return (x.new_empty(x.shape if grad_input else (0,)),
            w.new_empty(w.shape if grad_weight else (0,)),
            w.new_empty((w.shape[0],) if grad_bias else (0,)))


# --------------------------------------------------------------------------- autograd
def _logits_chunks(x, w, b, num_classes, chunk_size):
    """``(rows, logits)`` per chunk as ``(chunk rows * D, C)``, with torch ops."""
    D = w.shape[0] // num_classes
    for start in range(0, x.shape[0], chunk_size):
        end = min(start + chunk_size, x.shape[0])
        logits = torch.nn.functional.linear(x[start:end], w, b)
        yield slice(start * D, end * D), logits.view(-1, num_classes)


def _soft_target_grads(x, w, b, target, weight, scalars, lse, dscale, args, chunk_size):
    """Gradients for probability targets and their class weight, chunk by chunk from the
    recomputed logits (``cross_entropy``'s formulas; off the fused path)."""
    C = args[-1]
    parts, grad_weight = [], None  # (out of place: a batched dscale, is_grads_batched's
    # vmap, cannot be written into an unbatched tensor)
    for rows, z in _logits_chunks(x, w, b, C, chunk_size):
        ds = dscale[rows] if dscale.dim() else dscale
        gt, gw = _prob_target_grads(z, target[rows], weight, scalars, lse[rows], ds, args[:-1])
        parts.append(gt.to(target.dtype))
        if gw is not None:
            grad_weight = gw if grad_weight is None else grad_weight + gw
    grad_target = torch.cat(parts) if parts else torch.zeros_like(target)
    if weight is not None and grad_weight is None:  # no rows
        grad_weight = torch.zeros_like(weight)
    return grad_target, grad_weight


def _differentiable_backward(ctx, inputs, dloss, scale):
    """``create_graph=True`` (double backward, Hessians, gradient penalties), a
    ``grad_output`` a transform differentiates (``_backend.differentiated``), or an
    exported program's backward: the loss formed again from the saved ``inputs``
    ``(x, w, b, target, weight)`` with torch ops, the logits materialised (as torch's
    ``linear_cross_entropy`` does), and differentiated with a graph, so that the gradients
    are themselves differentiable. ``scale``: the reduction's factor of the summed rows
    (``1 / denominator`` for a mean, else 1). One result per input of ``ctx``'s op or
    Function (None past the five). Ignored rows get 0 whatever ``dloss`` holds there, as
    torch's ops form them."""
    args, acc = ctx.args, acc_dtype(inputs[0].dtype)

    def rows_of(x, w, b, target, weight):
        z = torch.nn.functional.linear(x, w, b).reshape(-1, args[6]).to(acc)
        # (a probability target smoothed in its dtype, as torch)
        weight = None if weight is None else weight.to(torch.promote_types(acc, weight.dtype))
        return _loss_rows(z, target, weight, args[:6])
    dscale = dloss.reshape(-1) if dloss.dim() else dloss
    return grads_of_rows(ctx, rows_of, inputs, (dscale * scale).to(acc))


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Chunked linear + fused cross-entropy; gradients from the forward, rescaled in backward."""

    @staticmethod
    def forward(ctx, x, w, b, target, weight, scalars, denom, reduction, args, chunk_size,
                grad_enabled):
        # needs_input_grad ignores no_grad / inference_mode: gate it on the caller's mode.
        need_x, need_w, need_b, need_t, need_cw = (n and grad_enabled for n in ctx.needs_input_grad[:5])
        # 'none' needs grad_output per row; fp16 needs it folded in before the logits'
        # gradient is rounded (see CrossEntropyFunction): both form the gradients in backward.
        fused = reduction != "none" and x.dtype != torch.float16
        loss, lse, gx, gw, gb = _backend.call(
            linear_cross_entropy_fwd, x, w, b, target, weight, scalars, None, *args, chunk_size,
            fused and need_x, fused and need_w, fused and need_b)
        loss = reduced(loss, denom, reduction, args[1])
        if need_x or need_w or need_b or need_t or need_cw:
            ctx.args, ctx.chunk_size = args, chunk_size
            # The bias outside save_for_backward in eager: torch's addmm saves none, so it
            # may change in place after the forward; the fused first backward does not read
            # it (the others, autograd's error where they read it: see saved_bias). The
            # caller's target and class weight are watched too (track_versions).
            compiled = torch.compiler.is_compiling()
            ctx.bias, ctx.versions = None if compiled else _watched_bias(b), ()
            # The gradients are held (keep): the first backward rescales them in place and
            # hands them on; a later backward (retain_graph) recomputes them.
            saved = (x, w, target, weight, scalars, lse, *((b,) if compiled else ()))
            _backend.keep(ctx, saved, (gx, gw, gb) if fused and (need_x or need_w or need_b)
                          else (None,) * 3)
        return loss

    @staticmethod
    def backward(ctx, dloss):
        need_x, need_w, need_b, need_t, need_cw = ctx.needs_input_grad[:5]
        x, w, target, weight, scalars, lse, *b = _backend.saved(ctx)
        check_versions(ctx)
        fused = _backend.take(ctx)
        if torch.is_grad_enabled() or differentiated(dloss):
            return _differentiable_backward(ctx, (x, w, saved_bias(ctx, b), target, weight),
                                            dloss, scalars[0])
        gx = gw = gb = gt = gcw = None
        if need_x or need_w or need_b:
            if fused[0] is not None:
                gx, gw, gb = fused
                dx, dw = _infinite_grad_output_scales(dloss, target, ctx.args, x.shape[0])
                gx = rescale_(gx, dx) if gx.numel() else gx
                gw = rescale_(gw, dw) if gw.numel() else gw
                # the bias: V values, out of place (the in-place op on a view of it broke
                # Inductor's decomposition under dynamic shapes)
                gb = gb * dloss
            else:
                row_scale = dloss.reshape(-1) if dloss.dim() else dloss.expand(target.shape[0])
                if not ctx.args[5]:  # an ignored row's gradient is 0 whatever its grad_output
                    row_scale = row_scale.masked_fill(target == ctx.args[0], 0.0)
                _, _, gx, gw, gb = _backend.call(
                    linear_cross_entropy_fwd, x, w, saved_bias(ctx, b), target, weight, scalars,
                    row_scale, *ctx.args, ctx.chunk_size, need_x, need_w, need_b)
        if need_t or need_cw:
            dscale = dloss.reshape(-1) if dloss.dim() else dloss
            gt, gcw = _soft_target_grads(x, w, saved_bias(ctx, b), target, weight, scalars, lse,
                                         dscale, ctx.args, ctx.chunk_size)
        return (gx if need_x else None, gw if need_w else None, gb if need_b else None,
                gt if need_t else None, gcw.to(weight.dtype) if need_cw else None,
                None, None, None, None, None, None)


def _watched_bias(b):
    """``(b, its version)`` for ``saved_bias`` (no version for an inference tensor; inside
    ``allow_mutation_on_saved_tensors()`` a copy, unwatched, as torch's saved tensors are
    copied there before they change)."""
    if b is None or b.is_inference():
        return b, None
    if mutation_allowed():
        return b.clone(), None
    return b, b._version


def saved_bias(ctx, saved):
    """The bias kept by the forward (outside save_for_backward), with autograd's error, in
    its words, where it has changed in place since and this backward reads it; under
    torch.compile the one saved with the others (``saved``: it, or nothing)."""
    if ctx.bias is None:
        return saved[0]
    b, version = ctx.bias
    if version is not None:
        check_version(b, version)
    return b


def _infinite_grad_output_scales(dloss, target, args, n_rows):
    """The scales of the fused input and weight gradients for a one-value ``grad_output``:
    ``dloss`` itself, but torch's NaN where it is inf or NaN. torch multiplies each kept
    row's logit gradients (of both signs) by it and the matmuls sum them: NaN rows of
    ``grad_input`` (an ignored row's stays 0) and a NaN ``grad_weight`` (0 when every row
    is ignored). The bias keeps ``dloss`` times its column sums: torch's result where a
    column's terms share a sign. Device values only: no host synchronisation."""
    nan_if_inf = torch.where(dloss.isfinite(), dloss, math.nan)
    if args[5]:  # probability targets: every row is kept
        return nan_if_inf, nan_if_inf
    per_row = target.numel() // n_rows if n_rows else 1  # targets per input row (K-dim out)
    kept = (target != args[0]).reshape(n_rows, per_row).any(1)
    zero_if_inf = torch.where(dloss.isfinite(), dloss, 0.0)
    return (torch.where(kept, nan_if_inf, zero_if_inf),
            torch.where(kept.any(), nan_if_inf, zero_if_inf))


class VocabChunkedLinearCrossEntropyFunction(torch.autograd.Function):
    """The vocabulary-chunked path (index targets): the forward gathers per-row statistics
    chunk by chunk (one logits matmul) and keeps O(rows) values; the backward recomputes
    each chunk's logits and forms the three gradients from them (three matmuls)."""

    @staticmethod
    def forward(ctx, x, w, b, target, weight, reduction, args, vocab_chunk, grad_enabled):
        ignore_index, eps, logit_scale, softcap, z_loss, _, C = args
        # On CPU the op raises torch's IndexError for a target outside [0, C); on CUDA
        # that row's loss and gradient are NaN.
        shift, sums = _backend.call(
            linear_cross_entropy_stats, x, w, b, target, weight, ignore_index, logit_scale,
            softcap, eps > 0, vocab_chunk)
        valid, in_range = _vp._valid_rows(target, ignore_index, C)
        need = [n and grad_enabled for n in ctx.needs_input_grad[:3]]
        loss, lse, coef = _vp.sharded_loss(
            shift, sums, torch.full((), C, dtype=sums.dtype, device=x.device), target, weight,
            valid, in_range, reduction, eps, z_loss, any(need))
        if any(need):
            ctx.save_for_backward(x, w, b, target, weight, lse, coef, valid)
            ctx.logit_scale, ctx.softcap, ctx.vocab_chunk = logit_scale, softcap, vocab_chunk
            ctx.args, ctx.reduction, ctx.versions = args, reduction, ()
        return loss

    @staticmethod
    def backward(ctx, dloss):
        x, w, b, target, weight, lse, coef, valid = ctx.saved_tensors
        check_versions(ctx)
        if torch.is_grad_enabled() or differentiated(dloss):
            ignore_index, eps, *_, C = ctx.args
            _, scalars = _reduction_scalars(target, weight, ignore_index, ctx.reduction, False, C,
                                            acc_dtype(x.dtype), eps)
            return _differentiable_backward(ctx, (x, w, b, target, weight), dloss, scalars[0])
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        coef = _vp.scale_coefficients(coef, dloss, ctx.logit_scale, valid)
        gx, gw, gb = _backend.call(
            linear_cross_entropy_vocab_bwd, x, w, b, target, weight, lse, coef, ctx.logit_scale,
            ctx.softcap, ctx.vocab_chunk,
            need_x, need_w, need_b)
        return (gx if need_x else None, gw if need_w else None, gb if need_b else None,
                None, None, None, None, None, None)


def _composed(input, w, target, b, weight, reduction, ignore_index, label_smoothing,
              logit_scale, softcap, z_loss, lead, C, out, prob_target):
    """``cross_entropy(linear(input, w, b), target, ...)`` with the logits materialised."""
    H = input.shape[-1]
    logits = torch.nn.functional.linear(input, w.reshape(-1, H), None if b is None else b.reshape(-1))
    logits = logits.reshape(*lead, C, *out)  # (N, C, d...): torch's layout for K-dim losses
    if len(lead) > 1:  # our extension: (..., H) input; torch's layout is (N, C, d...)
        n = math.prod(lead)
        logits = logits.reshape(n, C, *out)
        target = target.reshape(n, C, *out) if prob_target else target.reshape(n, *out)
    loss = cross_entropy(logits, target, weight, ignore_index=ignore_index,
                         reduction=reduction, label_smoothing=label_smoothing,
                         logit_scale=logit_scale, softcap=softcap, z_loss=z_loss)
    if reduction == "none" and len(lead) > 1:
        loss = loss.reshape(*lead, *out)
    return loss


# --------------------------------------------------------------------------- public API
def _autocast_on(device_type: str) -> bool:
    """``torch.is_autocast_enabled`` for devices it knows (it raises for ``meta``)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def _check_linear_args(input, linear_weight, target, linear_bias):
    """torch's checks of ``linear_cross_entropy``'s own arguments (the cross-entropy ones
    are ``cross_entropy``'s). Returns ``(lead, C, out_features, prob_target)``."""
    for name, t in (("input", input), ("linear_weight", linear_weight), ("target", target)):
        if not isinstance(t, torch.Tensor):  # torch reads input.dim(): an AttributeError
            raise AttributeError(f"'{type(t).__name__}' object has no attribute 'dim' "
                                 f"(linear_cross_entropy(): {name} must be a Tensor)")
    if input.dtype != linear_weight.dtype and not _autocast_on(input.device.type):
        raise RuntimeError(  # torch's matmul error, which comes before any dtype support check
            f"expected m1 and m2 to have the same dtype, but got: {_c10_name(input.dtype)} != "
            f"{_c10_name(linear_weight.dtype)}")
    check_float("linear_cross_entropy", input)
    if input.dim() < 1:
        raise RuntimeError(f"expected input with dimensionality at least 1, got {input.dim()}")
    if linear_weight.dim() < 2:
        raise RuntimeError(
            f"expected linear_weight with dimensionality at least 2, got {linear_weight.dim()}")
    lead, H = tuple(input.shape[:-1]), input.shape[-1]
    if H != linear_weight.shape[-1]:
        raise RuntimeError(
            "expected equal input and linear_weight last dimensions (in_features), "
            f"got {H} and {linear_weight.shape[-1]}, respectively")
    C, out = linear_weight.shape[0], tuple(linear_weight.shape[1:-1])
    if linear_bias is not None and tuple(linear_bias.shape) != (C, *out):
        raise RuntimeError(f"expected linear_bias shape {(C, *out)}, got {tuple(linear_bias.shape)}")
    if out and not lead:
        raise RuntimeError(
            f"K-dimensional loss defined by linear_weight shape {tuple(linear_weight.shape)} requires"
            f" batched input, (N, {H}), got unbatched input with shape {tuple(input.shape)}")
    for name, t in (("linear_weight", linear_weight), ("linear_bias", linear_bias)):
        if t is None:
            continue
        if t.device != input.device:
            raise RuntimeError(
                f"Expected all tensors to be on the same device, but found {name} on {t.device} "
                f"and input on {input.device}")
        if t.dtype != input.dtype and not _autocast_on(input.device.type):
            raise RuntimeError(
                f"linear_cross_entropy: expected input and {name} to have the same dtype, but "
                f"got {input.dtype} and {t.dtype}")
    prob_target = tuple(target.shape) == (*lead, C, *out)
    index_shapes = [(*lead, *out)] + ([(1,)] if not lead else [])  # (1,) as torch for 1-D input
    if not prob_target and tuple(target.shape) not in index_shapes and len(lead) <= 1:
        # torch's own error for these logits and this target (ValueError for a batch size
        # that does not match, ...): cross_entropy's checks on a stand-in of the logits.
        logits_like = torch.empty((), dtype=input.dtype, device=input.device).expand(
            (*lead, C, *out))
        _check_args(logits_like, target, None, -100, "mean", 0.0)
    if not prob_target and tuple(target.shape) not in index_shapes:
        raise RuntimeError(
            f"Expected target size {list(index_shapes[0])} (class indices) or "
            f"{[*lead, C, *out]} (class probabilities), got {list(target.shape)}")
    return lead, C, out, prob_target


_AUTOCAST_CASTS = (torch.float32, torch.float16, torch.bfloat16)

#: What the checks that mirror torch's raise (AttributeError: a non-tensor, as torch).
_CHECK_ERRORS = (*CHECK_ERRORS, AttributeError)

#: torch's linear_cross_entropy may form all the logits before it refuses a call (a bad
#: reduction, say): the error path asks it only up to 16M logits (64 MB in fp32).
_ERROR_PATH_LOGITS = 2**24


def _logits_numel(input, linear_weight) -> int:
    """The number of logits ``linear(input, linear_weight)`` would make (0 if unknown)."""
    if not (isinstance(input, torch.Tensor) and isinstance(linear_weight, torch.Tensor)
            and input.dim() >= 1 and linear_weight.dim() >= 1):
        return 0
    rows = input.numel() // max(input.shape[-1], 1)
    return rows * (linear_weight.numel() // max(linear_weight.shape[-1], 1))


def _torch_refuses_too(ours: Exception, call: dict):
    """A call the checks refuse: torch's own error, word for word, from torch's own
    ``linear_cross_entropy`` (torch 2.13; ``raise_torchs_error``), for calls of at most
    ``_ERROR_PATH_LOGITS`` logits. Ours where torch lacks the function, takes the call, or
    is not asked; input of more than 2 dims is ours to take (torch would refuse it for
    that alone)."""
    torch_fn = getattr(torch.nn.functional, "linear_cross_entropy", None)
    input = call["input"]
    if torch_fn is not None and not (isinstance(input, torch.Tensor) and input.dim() > 2) \
            and _logits_numel(input, call["linear_weight"]) <= _ERROR_PATH_LOGITS:
        raise_torchs_error(ours, torch_fn, **call)
    raise ours from None


def _c10_name(dtype: torch.dtype) -> str:
    """A dtype as torch's C++ errors print it (``double``, ``c10::BFloat16``)."""
    return {torch.float64: "double", torch.float32: "float", torch.float16: "c10::Half",
            torch.bfloat16: "c10::BFloat16"}.get(dtype, str(dtype))


def _check_options(options, input, lead, C, out, target, reduction, label_smoothing,
                   linear_bias) -> None:
    """torch 2.13's handling of ``options`` (which tune its own chunked path; ours are
    ``chunk_size`` / ``vocab_chunk_size``): its warning where that path cannot take the call,
    else its validation (``_adjust``: conflicting chunk settings are its ValueError, a value
    that is no options object its AttributeError). Nothing else reads them, so compiled code
    skips both: Dynamo traces no ``warnings.warn``, and ``_adjust`` would specialise the graph
    on the batch size."""
    if torch.compiler.is_compiling():
        return
    tracing = torch.jit.is_tracing()
    if (out or reduction not in ("mean", "sum", "none") or label_smoothing != 0.0
            or target.dtype != torch.int64 or tracing):
        warnings.warn(  # torch's words; stacklevel: the caller's line
            "linear_cross_entropy: ``options`` ignored; chunked path needs "
            "reduction in {'mean','sum','none'}, label_smoothing == 0, target.dtype"
            " == int64, out_features == (). Got "
            f"reduction={reduction!r}, label_smoothing={label_smoothing}, "
            f"target.dtype={target.dtype}, out_features={tuple(out)}"
            f", tracing={tracing}, linear_bias.shape="
            f"{tuple(linear_bias.shape) if linear_bias is not None else None}.",
            stacklevel=3)
        return
    adjusted = options._adjust(num_batches=math.prod(lead), in_features=input.shape[-1],
                               num_classes=C, dtype=input.dtype, device=input.device)
    # then its chunked op's checks: the schema's bool (pybind11's: None or anything with
    # __bool__; not a str or a list), and the accumulation dtypes it implements
    flag = options.allow_retain_graph
    if reduction != "none" and flag is not None and not hasattr(type(flag), "__bool__"):
        raise RuntimeError(
            "torch_nn::_linear_cross_entropy_batch_chunked() Expected a value of type 'bool' "
            f"for argument 'allow_retain_graph' but instead found type '{type(flag).__name__}'.")
    acc = adjusted.acc_dtype
    if acc != input.dtype and not (input.dtype in LOW_FLOATS and acc == torch.float32):
        raise RuntimeError(
            "linear_cross_entropy supports float32 acc_dtype with float16/bfloat16 inputs, "
            f"but got {acc} acc_dtype and {input.dtype} inputs.")


def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    ignore_index: Optional[int] = None,
    label_smoothing: float = 0.0,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    z_loss: float = 0.0,
    chunk_size: Optional[int] = None,
    vocab_chunk_size: Optional[int] = None,
    options=None,
) -> torch.Tensor:
    r"""Cross-entropy of a linear projection, ``cross_entropy(linear(input, linear_weight,
    linear_bias), target, ...)``, computed chunk by chunk without holding the logits.

    Drop-in for :func:`torch.nn.functional.linear_cross_entropy` (torch 2.13; the same
    names, defaults and meaning, also on torch versions that lack it), with the extras of
    :func:`fused_softmax.cross_entropy`. The logits exist one chunk at a time, made by a
    cuBLAS matmul into one reused buffer and turned into loss and gradient by our kernels;
    more matmuls make the gradients of ``input``, ``linear_weight`` and ``linear_bias``,
    accumulated in fp32 (fp64 for fp64) where several chunks add up and cast once. Chunks
    are ``chunk_size`` rows (all classes; gradients formed in the forward, so the backward
    only rescales them) or ``vocab_chunk_size`` classes (all rows; the forward keeps only
    per-row statistics and the backward recomputes the logits): see the module docstring.

    Args:
        input (Tensor): ``(*, H)``, any number of leading dims (torch: ``(H,)`` or
            ``(N, H)``); float16, bfloat16, float32 or float64.
        linear_weight (Tensor): ``(C, H)``, or ``(C, d1, ..., dK, H)`` for a K-dimensional
            loss (``input`` must then have leading dims); ``input``'s dtype.
        target (Tensor): class indices (int64; uint8 and int32 also accepted) of shape
            ``(*)`` (the leading dims of ``input``) or ``(*, d1, ..., dK)``; or class
            probabilities (floating point) of the logits' shape ``(*, C, d1, ..., dK)``.
        linear_bias (Tensor, optional): ``(C,)`` or ``(C, d1, ..., dK)``.
        weight (Tensor, optional): per-class weights ``(C,)``.
        reduction (str): ``'none'`` | ``'mean'`` | ``'sum'``; ``'mean'`` divides by the sum
            of the target weights of non-ignored rows (all ignored gives NaN).
        ignore_index (int, optional): target value that contributes neither loss nor
            gradient; ``None`` means -100 for class indices, and must be ``None`` for class
            probabilities (as torch).
        label_smoothing (float): in ``[0, 1]``, torch's formula.
        logit_scale, softcap, z_loss (keyword-only): as in
            :func:`fused_softmax.cross_entropy` (applied to the logits).
        chunk_size (int, optional): chunks of this many rows of ``input`` (whole rows of
            logits). ``chunk_size >= M``: one chunk, the fastest, holding all the logits.
        vocab_chunk_size (int, optional): chunks of this many classes (all rows at once);
            class-index targets and a 2-D ``linear_weight`` only. At most one of the two
            may be given. Default (neither): one chunk of rows when all the logits fit in
            64 MiB, else whichever chunking needs less memory (``default_plan``): at
            M = 8192, H = 4096, C = 128256 bf16, 4096 classes per chunk (64 MiB).
        options: accepted for torch's signature (its ``LinearCrossEntropyOptions`` tune
            torch's own chunked path): checked and warned about as torch does, otherwise
            ignored: the chunk sizes above decide here.

    Returns:
        The loss: a scalar, or of the target's index shape for ``reduction='none'``; in
        ``input``'s dtype (float32 under autocast for fp32 / fp16 / bf16 operands, where
        the projection runs in the autocast dtype, as torch; fp64 stays fp64).

    Gradients: of ``input``, ``linear_weight`` and ``linear_bias`` for those that require
    grad — with chunks of rows computed during the forward (held from forward to backward;
    under ``reduction='none'`` the backward recomputes the logits instead, one more matmul),
    with chunks of the vocabulary during the backward; of a probability target and of
    ``weight`` with probability targets, computed in backward from recomputed logits.
    Double backward (``create_graph=True``) forms the gradients again with torch ops,
    the logits materialised, as torch's composition.

    Memory beyond inputs, outputs and gradients: the chunk's logits, vectors of one value
    per row, and the fp32 accumulator of one gradient when it is fp16/bf16 and several
    chunks add up: ``linear_weight``'s (4 bytes per element, during the forward) for chunks
    of rows, ``input``'s (4 bytes per element, during the backward) for chunks of the
    vocabulary. At M = 8192, H = 4096, C = 128256 bf16 the default takes 64 MiB + 128 MiB
    (one chunk of rows: 2.0 GB, as torch.compile).

    Example::

        >>> hidden = torch.randn(8, 64, requires_grad=True)
        >>> head = torch.randn(1000, 64, requires_grad=True)
        >>> target = torch.randint(0, 1000, (8,))
        >>> loss = fused_softmax.linear_cross_entropy(hidden, head, target, label_smoothing=0.1)
        >>> loss.backward()
    """
    tensors = (input, linear_weight, target, linear_bias, weight)
    if torch_function_dispatch(*tensors):  # torch.fx, __torch_function__ subclasses
        return handle_torch_function(
            linear_cross_entropy, tensors, input, linear_weight, target,
            linear_bias=linear_bias, weight=weight, reduction=reduction,
            ignore_index=ignore_index, label_smoothing=label_smoothing,
            logit_scale=logit_scale, softcap=softcap, z_loss=z_loss, chunk_size=chunk_size,
            vocab_chunk_size=vocab_chunk_size, options=options)
    call = dict(input=input, linear_weight=linear_weight, target=target,
                linear_bias=linear_bias, weight=weight, reduction=reduction,
                ignore_index=ignore_index, label_smoothing=label_smoothing)
    check_extras(logit_scale, softcap, z_loss, "linear_cross_entropy")
    try:
        lead, C, out, prob_target = _check_linear_args(input, linear_weight, target, linear_bias)
        reduction = reduction_name(reduction)
        if prob_target and ignore_index is not None:
            raise RuntimeError("ignore_index cannot be specified when target contains probabilities")
        ignore_index = -100 if ignore_index is None else check_ignore_index(ignore_index)
        label_smoothing = check_smoothing_type(label_smoothing)
    except _CHECK_ERRORS as ours:
        _torch_refuses_too(ours, call)
    if options is not None:
        _check_options(options, input, lead, C, out, target, call["reduction"],
                       call["label_smoothing"], linear_bias)
    label_smoothing_applied = smoothing_value(label_smoothing)
    target = widen_int32_target(target, ignore_index)
    if C == 0 or needs_torch_ops(input, linear_weight, target, linear_bias, weight):
        # No logits to fuse (torch's zeros, NaN or IndexError), or torch.func transforms /
        # forward-mode AD, which the custom op has no rules for: torch's composition.
        return _composed(input, linear_weight, target, linear_bias, weight, reduction,
                         ignore_index, label_smoothing_applied, logit_scale, softcap, z_loss,
                         lead, C, out, prob_target)
    device_type = input.device.type
    autocast = _autocast_on(device_type)
    if autocast:  # torch: linear runs in the autocast dtype, cross_entropy in fp32
        low = torch.get_autocast_dtype(device_type)
        # autocast casts fp32 / fp16 / bf16 operands, never fp64 ones
        input, linear_weight, linear_bias = (
            t.to(low) if t is not None and t.dtype in _AUTOCAST_CASTS else t
            for t in (input, linear_weight, linear_bias))
        if input.dtype != linear_weight.dtype:
            _torch_refuses_too(RuntimeError(
                "expected m1 and m2 to have the same dtype, but got: "
                f"{_c10_name(input.dtype)} != {_c10_name(linear_weight.dtype)}"), call)
        # and cross_entropy casts its fp16 / bf16 class weight and probabilities to fp32
        weight, target = fp32_if_low(weight), fp32_if_low(target)
    watched = watched_by_torch(len(lead) + 1 + len(out), target, weight, prob_target,
                               label_smoothing_applied)
    ce_dtype = torch.float32 if autocast and input.dtype != torch.float64 else input.dtype

    # cross_entropy's own checks, on (rows, C, d...)-shaped stand-ins of the logits/target.
    M, D = math.prod(lead), math.prod(out)
    if len(lead) <= 1:
        logits_like_shape, target_like = (*lead, C, *out), target
    else:
        logits_like_shape = (M, C, *out)
        target_like = target.new_empty(()).expand(logits_like_shape if prob_target else (M, *out))
    logits_like = torch.empty((), dtype=ce_dtype, device=input.device).expand(logits_like_shape)
    try:
        _check_args(logits_like, target_like, weight, ignore_index, reduction, label_smoothing)
    except _CHECK_ERRORS as ours:
        _torch_refuses_too(ours, call)
    for name, value in (("chunk_size", chunk_size), ("vocab_chunk_size", vocab_chunk_size)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    if chunk_size is not None and vocab_chunk_size is not None:
        raise ValueError("linear_cross_entropy: give chunk_size (rows per chunk) or "
                         "vocab_chunk_size (classes per chunk), not both")
    if vocab_chunk_size is not None and (prob_target or out):
        raise ValueError("linear_cross_entropy: vocab_chunk_size needs class-index targets and "
                         "a 2-D linear_weight (C, H); use chunk_size here")
    out_dtype = loss_dtype(ce_dtype, target, weight, prob_target)

    # Rows of C logits: input (M, H); the K-dim weight (C, d..., H) as (D * C, H) so that each
    # input row's logits are D contiguous rows of C (a copy of the weight when D > 1).
    H = input.shape[-1]
    x = input.reshape(M, H)
    w = linear_weight if not out else linear_weight.movedim(0, -2).reshape(D * C, H)
    b = linear_bias if not out or linear_bias is None else linear_bias.movedim(0, -1).reshape(D * C)
    if prob_target:
        t = target.movedim(len(lead), -1).reshape(-1, C).contiguous()
    else:
        t = target.reshape(-1).contiguous()
    t, weight = _kernel_operands(t, weight, prob_target)
    acc = acc_dtype(input.dtype)
    denom, scalars = _reduction_scalars(t, weight, ignore_index, reduction, prob_target, C, acc,
                                        label_smoothing_applied)
    if chunk_size is None and vocab_chunk_size is None:
        chunk_size, vocab_chunk_size = default_plan(
            M, C, D, H, x.element_size(), vocab_chunks_possible=not prob_target and D == 1,
            grad_input=_needs_fp32_grad(x), grad_weight=_needs_fp32_grad(w))
    args = (ignore_index, label_smoothing_applied, float(logit_scale),
            float(softcap) if softcap is not None else 0.0, float(z_loss), prob_target, C)
    with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
        if vocab_chunk_size is not None:
            loss = VocabChunkedLinearCrossEntropyFunction.apply(
                x, w, b, t, weight, reduction, args, min(vocab_chunk_size, C),
                torch.is_grad_enabled())
        elif exporting():
            # torch.export keeps the custom ops, not the autograd.Function: the op alone, no
            # gradients formed in the forward; its registered autograd forms them if the
            # exported program is trained
            loss = linear_cross_entropy_fwd(x, w, b, t, weight, scalars, None, *args,
                                            max(1, min(chunk_size, M)), False, False, False)[0]
            loss = reduced(loss, denom, reduction, args[1])
        else:
            loss = LinearCrossEntropyFunction.apply(
                x, w, b, t, weight, scalars, denom, reduction, args, max(1, min(chunk_size, M)),
                torch.is_grad_enabled())
    track_versions(loss, *watched)
    loss = loss.to(out_dtype)
    if reduction == "none":
        loss = loss.reshape((*lead, *out))
    return loss


class LinearCrossEntropyLoss(torch.nn.modules.loss._WeightedLoss):
    """Drop-in for torch 2.13's :class:`torch.nn.LinearCrossEntropyLoss`, backed by
    :func:`fused_softmax.linear_cross_entropy`.

    Owns the projection as ``self.linear`` (an :class:`torch.nn.Linear` with
    ``num_classes * prod(out_features)`` outputs, flat as torch stores it) and the class
    ``weight`` as a buffer, so its ``state_dict`` loads into torch's module and back. Same
    constructor as torch's (``options`` is kept and ignored: the chunking is always on
    here; size it with ``chunk_size`` or ``vocab_chunk_size``), plus the keyword-only
    extras ``logit_scale``, ``softcap``, ``z_loss``, ``chunk_size`` and ``vocab_chunk_size``.
    Like :func:`fused_softmax.linear_cross_entropy` it also takes ``input`` with several
    leading dims (``(B, S, H)``), which torch's refuses (dimensionality 1 or 2 only).

    Example::

        >>> head = fused_softmax.nn.LinearCrossEntropyLoss(64, 1000, bias=True)
        >>> loss = head(torch.randn(4, 16, 64), torch.randint(0, 1000, (4, 16)))
        >>> loss.backward()
    """

    __constants__ = ["num_classes", "out_features", "reduction", "ignore_index", "label_smoothing"]

    def __init__(self, in_features: int, num_classes: int, *, out_features: tuple = (),
                 bias: bool = False, device=None, dtype=None, reduction: str = "mean",
                 weight: Optional[torch.Tensor] = None, ignore_index: Optional[int] = None,
                 label_smoothing: float = 0.0, logit_scale: float = 1.0,
                 softcap: Optional[float] = None, z_loss: float = 0.0,
                 chunk_size: Optional[int] = None, vocab_chunk_size: Optional[int] = None,
                 options=None) -> None:
        if weight is not None and weight.shape != (num_classes,):
            raise RuntimeError(
                f"expected weight shape to be {(num_classes,)}, got {tuple(weight.shape)}")
        if label_smoothing < 0 or label_smoothing > 1.0:
            raise RuntimeError(
                f"expected label_smoothing to be in range [0, 1], got {label_smoothing}")
        super().__init__(weight, None, None, reduction)  # the `weight` buffer, as torch's
        self.num_classes = num_classes
        self.out_features = out_features  # as given (torch keeps a list a list)
        self.options = options
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.logit_scale = logit_scale
        self.softcap = softcap
        self.z_loss = z_loss
        self.chunk_size = chunk_size
        self.vocab_chunk_size = vocab_chunk_size
        self.linear = torch.nn.Linear(in_features, math.prod(out_features, start=num_classes),
                                      bias=bias, device=device, dtype=dtype)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self._fused(input, target)

    @torch.jit.ignore
    def _fused(self, input, target):  # left to Python by torch.jit.script, as the other modules
        shape = (self.num_classes, *self.out_features)
        bias = self.linear.bias.reshape(shape) if self.linear.bias is not None else None
        return linear_cross_entropy(
            input, self.linear.weight.reshape(*shape, self.linear.in_features), target,
            linear_bias=bias, weight=self.weight, reduction=self.reduction,
            ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
            logit_scale=self.logit_scale, softcap=self.softcap, z_loss=self.z_loss,
            chunk_size=self.chunk_size, vocab_chunk_size=self.vocab_chunk_size,
            options=self.options)

    def extra_repr(self) -> str:
        extras = _backend.extras_repr(self, (
            ("logit_scale", 1.0), ("softcap", None), ("z_loss", 0.0), ("chunk_size", None),
            ("vocab_chunk_size", None)))
        return (f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
                f"out_features={self.out_features}, bias={self.linear.bias is not None}, "
                f"reduction={self.reduction}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}, options={self.options}{extras}")
