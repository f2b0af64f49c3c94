"""Vocab-parallel cross-entropy over ``torch.distributed``: public function, autograd,
custom ops, launchers.

Device code: ``kernels/vocab_parallel.py``. When the vocabulary is split across
tensor-parallel ranks (Megatron-style), rank ``r`` holds the logits of classes
``[vocab_start, vocab_start + V_r)`` for every row, and no rank may gather a whole row.
The loss needs only a few numbers per row from each shard, so that is all that moves:

1. one pass over the local shard (``vocab_parallel_stats``): per row the local max, the sum
   of ``exp(z - max)``, the target logit where this rank owns the target, and ``sum(w * z)``
   (label smoothing only);
2. ``all_reduce(MAX)`` of the row maxima (``N`` floats); each rank rescales its sum of exps
   to the global max; ``all_reduce(SUM)`` of ``[sum of exp, z_t, sum(w * z)]`` per row plus
   one float holding ``V_r`` (``2N + 1`` floats, ``3N + 1`` with smoothing), which gives the
   global log-sum-exp, the target logit and the global ``V = sum(V_r)`` — on the device, so
   ``eps / V`` needs no host synchronisation and unequal shards need no extra collective —
   and every rank's ``(vocab_start, V_r)`` (``2 * world`` floats), so that a layout that
   does not tile ``[0, V)`` is refused (CPU) or gives NaN (CUDA), never a wrong loss;
3. loss and the per-row gradient coefficients, O(N) elementwise on every rank (every rank
   gets the same loss).

The backward recomputes the shard's probabilities from the saved global log-sum-exp in one
pass (``vocab_parallel_bwd``) and communicates nothing: the gradient is taken with respect
to the local shard only, and every rank backpropagates the same (replicated) loss.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from . import _backend
from ._backend import (LOW_FLOATS, acc_dtype, as_symint, autocast_fp32_active, check_float,
                       differentiated, float_bits, fp32_if_low, needs_torch_ops, use_triton)
from .cross_entropy import (_REDUCTIONS, _scaled_logits, _type_name, check_ignore_index,
                            check_extras, check_index_target, check_smoothing_range,
                            check_uint8_smoothed_mean, classes_last, cross_entropy,
                            grad_scale_of, mean_of, reduction_name, smoothing_value,
                            widen_int32_target)

if _backend.HAS_TRITON:
    from .cross_entropy import _block_and_grid
    from .kernels import vocab_parallel as _k
    from .softmax import _tl_acc


# --------------------------------------------------------------------------- launchers
def _launch_stats(x, target, weight, vocab_start, logit_scale, row_max, sums, softcap=0.0):
    n_rows, C = x.shape
    block_n, num_warps, grid = _block_and_grid(x, C, n_rows, grad=False)  # one pass over the row
    _backend.launch(
        _k.vocab_parallel_stats_kernel, grid,
        x, target, weight if weight is not None else x, row_max, sums,
        n_rows, C, x.stride(0), sums.stride(0), vocab_start, float_bits(logit_scale),
        float_bits(softcap),
        HAS_WEIGHT=weight is not None, HAS_SMOOTHING=sums.shape[1] == 3,
        HAS_SOFTCAP=softcap > 0, ACC=_tl_acc(x.dtype), BLOCK_N=block_n, num_warps=num_warps,
    )


def _launch_bwd(x, target, weight, lse, coef, vocab_start, logit_scale, grad, softcap=0.0):
    n_rows, C = x.shape
    block_n, num_warps, grid = _block_and_grid(x, C, n_rows, grad=False)  # one pass over the row
    _backend.launch(
        _k.vocab_parallel_bwd_kernel, grid,
        x, target, weight if weight is not None else x, lse, coef, grad,
        n_rows, C, x.stride(0), coef.stride(0), grad.stride(0), vocab_start,
        float_bits(logit_scale), float_bits(softcap),
        HAS_WEIGHT=weight is not None, HAS_SMOOTHING=coef.shape[1] == 3,
        HAS_SOFTCAP=softcap > 0, ACC=_tl_acc(x.dtype), BLOCK_N=block_n, num_warps=num_warps,
    )


# --------------------------------------------------------------------------- torch path
def _finite_or_zero(m: torch.Tensor) -> torch.Tensor:
    """torch's shift rule for log-sum-exp: an infinite max is replaced by 0."""
    return torch.where(m.isinf(), 0.0, m)


def _torch_stats(x, target, weight, vocab_start, logit_scale, row_max, sums, softcap=0.0):
    """The stats kernel's math with torch ops (also serves an empty shard)."""
    n_rows, C = x.shape
    if C == 0:  # a rank that holds no classes contributes nothing
        row_max.fill_(-math.inf)
        sums.zero_()
        return
    z, _ = _scaled_logits(x.to(row_max.dtype), logit_scale, softcap)
    m = z.amax(-1)
    s = torch.exp(z - _finite_or_zero(m)[:, None]).sum(-1)
    sums[:, 0] = torch.where(m == math.inf, math.nan, s)
    t_local = target.long() - vocab_start
    owned = (t_local >= 0) & (t_local < C)
    z_t = z.gather(1, torch.where(owned, t_local, 0)[:, None]).squeeze(1)
    sums[:, 1] = torch.where(owned, z_t, 0.0)
    if sums.shape[1] == 3:  # relative to the shard's max, as the kernel's
        zr = z - _finite_or_zero(m)[:, None]
        if weight is not None:  # 0 at the max, also for an inf weight (the kernel's rule)
            zr = torch.where(zr == 0, 0.0, zr * weight.to(z.dtype))
        sums[:, 2] = zr.sum(-1)
    row_max.copy_(m)


def _torch_bwd(x, target, weight, lse, coef, vocab_start, logit_scale, grad, softcap=0.0):
    """The backward kernel's math with torch ops, into ``grad``."""
    grad.copy_(shard_grad(x, target, weight, lse, coef, vocab_start, logit_scale, softcap))


def shard_grad(x, target, weight, lse, coef, vocab_start, logit_scale, softcap=0.0):
    """The backward kernel's math with torch ops, out of place (in ``coef``'s dtype)."""
    z, _ = _scaled_logits(x.to(coef.dtype), logit_scale, softcap)
    a, b = coef[:, 0:1], coef[:, 1:2]
    dx = torch.where(a == 0, 0.0, a * torch.exp((z - lse[:, 0:1]) - lse[:, 1:2]))
    cols = torch.arange(x.shape[1], device=x.device)
    dx = dx - torch.where(cols == (target.long() - vocab_start)[:, None], b, 0.0)
    if coef.shape[1] == 3:
        c_w = coef[:, 2:3]  # where, not times, as the kernel: an ignored row's c_w is 0
        dx = dx - (c_w if weight is None else torch.where(c_w == 0, 0.0, c_w * weight.to(dx.dtype)))
    if softcap > 0:  # dz / d(x * logit_scale) = 1 / cosh^2; logit_scale itself is in coef
        dx = torch.where(a == 0, 0.0, dx / torch.cosh(x.to(coef.dtype) * logit_scale / softcap) ** 2)
    return dx


# --------------------------------------------------------------------------- custom ops
@_backend.custom_op("fused_softmax::vocab_parallel_stats")
def vocab_parallel_stats(
    x: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor], vocab_start: int,
    logit_scale: float, smoothing: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row statistics of a ``(rows, C)`` vocabulary shard, ready for the all-reduces.

    Returns ``row_max`` ``(rows,)`` (max of ``z = logit_scale * x``) and ``packed``
    ``(rows * k + 1,)``: ``k`` values per row — ``sum(exp(z - shift(row_max)))``, the target
    logit if ``target - vocab_start`` falls in the shard (else 0), and with ``smoothing``
    ``sum(weight * z)`` (``weight`` = the shard's slice) — then ``C`` in the last slot, so
    one sum all-reduce also yields the global vocabulary size. fp32 (fp64 for fp64 input).
    """
    n_rows, C = x.shape
    acc = acc_dtype(x.dtype)
    row_max = torch.empty(n_rows, dtype=acc, device=x.device)
    packed = torch.empty(n_rows * (3 if smoothing else 2) + 1, dtype=acc, device=x.device)
    packed[-1:].fill_(C)
    sums = packed[:-1].view(n_rows, -1)
    if n_rows > 0 and C > 0 and use_triton(x):
        _launch_stats(x, target, weight, vocab_start, logit_scale, row_max, sums)
    else:
        _torch_stats(x, target, weight, vocab_start, logit_scale, row_max, sums)
    return row_max, packed


@vocab_parallel_stats.register_fake
def _(x, target, weight, vocab_start, logit_scale, smoothing):
    acc = acc_dtype(x.dtype)
    n_rows = x.shape[0]
    return (x.new_empty(n_rows, dtype=acc),
            x.new_empty(n_rows * (3 if smoothing else 2) + 1, dtype=acc))


@_backend.custom_op("fused_softmax::vocab_parallel_bwd")
def vocab_parallel_bwd(
    x: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor], lse: torch.Tensor,
    coef: torch.Tensor, vocab_start: int, logit_scale: float,
) -> torch.Tensor:
    """Gradient of a ``(rows, C)`` shard: ``a * exp(z - lse) - b * onehot - c * weight`` per
    row, with ``coef`` rows ``[a, b]`` or ``[a, b, c]`` (``c``: label smoothing) and the
    log-sum-exp as ``lse`` rows ``[shift, log(sum of exp(z - shift))]`` (``sharded_loss``)."""
    grad = torch.empty_like(x, memory_format=torch.contiguous_format)
    if grad.numel() == 0:
        return grad
    if use_triton(x):
        _launch_bwd(x, target, weight, lse, coef, vocab_start, logit_scale, grad)
    else:
        _torch_bwd(x, target, weight, lse, coef, vocab_start, logit_scale, grad)
    return grad


@vocab_parallel_bwd.register_fake
def _(x, target, weight, lse, coef, vocab_start, logit_scale):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# --------------------------------------------------------------------------- autograd
def _reduce_sums_and_layout(packed: torch.Tensor, vocab_start: int, C: int, comm):
    """``all_reduce(SUM)`` of ``packed`` in place, with every rank's ``(vocab_start, C)`` in
    the same collective (``2 * world`` more floats); returns whether the shards tile
    ``[0, V)``, as a device bool: the non-empty shards, in order of their starts, must each
    start where the previous ends, from 0 (their sizes add up to ``V`` by definition).
    Unchecked (true) past fp32's exact integers (``V >= 2^24``)."""
    group, world = comm
    ok = torch.ones((), dtype=torch.bool, device=packed.device)
    if world == 1:
        return ok
    rank = dist.get_rank(group)
    layout = packed.new_zeros(2 * world)
    layout[rank], layout[world + rank] = vocab_start, C
    buf = _all_reduce(torch.cat([packed, layout]), "sum", comm)
    packed.copy_(buf[:packed.numel()])
    starts, sizes = buf[packed.numel():].split(world)
    order = torch.where(sizes > 0, starts, math.inf).argsort()
    s, c = starts[order], sizes[order]
    tiles = torch.where(c > 0, s == c.cumsum(0) - c, True).all()
    return tiles | (packed[-1] >= 2**24)


def _all_reduce(t: torch.Tensor, op: str, comm) -> torch.Tensor:
    """In-place all-reduce (``op`` "max" or "sum") over the group; nothing in a world of 1."""
    group, world = comm
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)
    return t


def _valid_rows(target, ignore_index, vocab):
    """Rows that are not ignored, and rows whose target lies in ``[0, vocab)``."""
    t = target.long()
    return t != ignore_index, (t >= 0) & (t < vocab)


def to_global_max(sums, row_max, shift, w_sum_local):
    """Move one shard's statistics from its own max to the row's global ``shift``: the sum
    of exps is rescaled (``exp(m - shift)``, 1 for a shard of ``-inf``), the smoothing sum
    ``sum(w * (z - m))`` shifted by ``sum(w) * (m - shift)`` (``w_sum_local``: the shard's
    total class weight, or its size). In place; ``m`` and ``shift`` are ``finite_or_zero``."""
    m = _finite_or_zero(row_max)
    sums[..., 0] *= torch.where(row_max == -math.inf, 1.0, torch.exp(m - shift))
    if sums.shape[-1] == 3:  # nothing to move at the global max (an inf w_sum: not inf * 0)
        sums[..., 2] += torch.where(m == shift, 0.0, w_sum_local * (m - shift))


def sharded_loss(shift, sums, vocab, target, weight, valid, in_range, reduction, eps, z_loss,
                 coefficients):
    """The loss from per-row statistics gathered over every shard of the vocabulary.

    ``sums`` rows hold ``[sum(exp(z - shift)), z_t, sum(w * (z - shift))]`` (the last with
    label smoothing ``eps > 0`` only) over all ``vocab`` classes (a device value). Returns the
    reduced loss, the per-row log-sum-exp as ``(rows, 2)`` pairs ``[shift, log_s]`` (their
    sum is the log-sum-exp; the backward subtracts them one at a time, exact near the max)
    and, with
    ``coefficients``, the backward's per-row ``[a, b(, c)]`` (``vocab_parallel_bwd_kernel``)
    already holding the reduction's scale: 0 for ignored rows, NaN for out-of-range targets
    (loud, with no host synchronisation), else None.
    """
    acc = sums.dtype
    log_s = torch.log(sums[:, 0])
    lse = shift + log_s
    t = target.long()
    if weight is not None:
        w_acc = weight.to(acc)
        w_t = w_acc[t.clamp(0, weight.numel() - 1)]
        w_sum = w_acc.sum()
    else:
        w_t = torch.ones_like(lse)
        w_sum = vocab
    eps_v = eps / vocab
    loss = (1.0 - eps) * w_t * ((shift - sums[:, 1]) + log_s)  # lse - z_t, no cancellation
    coef = (1.0 - eps) * w_t
    if eps > 0:  # relative to shift: no cancellation of large terms
        loss = loss + eps_v * (w_sum * log_s - sums[:, 2])
        coef = coef + eps_v * w_sum
    if z_loss != 0:
        loss = loss + z_loss * lse * lse
        coef = coef + 2.0 * z_loss * lse
    loss = torch.where(valid, torch.where(in_range, loss, math.nan), 0.0)
    # The same on every rank (target and weight are), so a mean agrees everywhere.
    # where, not times: an inf (or NaN) weight of an ignored row's class is left out
    denom = torch.where(valid, w_t, 0.0).sum() if weight is not None else valid.sum(dtype=acc)
    if reduction == "sum":
        out = loss.sum()
    elif reduction == "mean":
        out = mean_of(loss, denom, eps)
    else:
        out = loss
    lse_parts = torch.stack([shift.expand_as(log_s), log_s], 1)
    if not coefficients:
        return out, lse_parts, None
    n_rows = lse.shape[0]
    grad_scale = grad_scale_of(denom, reduction, eps)
    # Ignored rows: all coefficients 0; out-of-range targets: NaN (loud, no sync); a row
    # whose log-sum-exp is not finite (a +inf or NaN logit, or all -inf) has a NaN
    # softmax: NaN coefficients, so that even a zero grad_output gives NaN, as torch's.
    row_scale = torch.where(valid, torch.where(in_range & lse.isfinite(), grad_scale, math.nan), 0.0)
    cols = [coef, (1.0 - eps) * w_t] + ([eps_v.expand(n_rows)] if eps > 0 else [])
    # (where, not times, for ignored rows: an inf weight of their class times 0 is NaN)
    return out, lse_parts, torch.where(valid[:, None], torch.stack(cols, 1) * row_scale[:, None],
                                       0.0)


def scale_coefficients(coef, dloss, logit_scale, valid):
    """The backward's coefficients times ``grad_output`` (per row or scalar) and
    ``logit_scale``; ignored rows (not ``valid``) keep all-zero coefficients whatever
    ``grad_output`` holds (NaN, inf), so their gradient stays 0, as torch's, while a kept
    row of zero class weight takes torch's ``0 * NaN``."""
    dloss = dloss.to(coef.dtype)
    return torch.where(valid[:, None],
                       coef * ((dloss[:, None] if dloss.dim() else dloss) * logit_scale), 0.0)


class VocabParallelCrossEntropyFunction(torch.autograd.Function):
    """Forward: one pass over the shard + two O(rows) all-reduces. Backward: one pass over
    the shard from the saved global log-sum-exp, no communication."""

    @staticmethod
    def forward(ctx, x, target, weight, comm, vocab_start, ignore_index, reduction,
                label_smoothing, logit_scale, z_loss):
        n_rows, C = x.shape
        eps = label_smoothing
        w_local = None
        if weight is not None:
            w_local = weight[vocab_start:vocab_start + C]
            if w_local.numel() < C:
                # A weight too short for this shard: run the collectives with zeros, so that
                # no rank is left waiting, and raise after them (every rank, on the CPU).
                w_local = torch.cat([w_local, w_local.new_zeros(C - w_local.numel())])
            w_local = w_local.contiguous()
        row_max, packed = _backend.call(
            vocab_parallel_stats, x, target, w_local, vocab_start, logit_scale, eps > 0)
        sums = packed[:-1].view(n_rows, -1)

        # Global max, then every rank's sum of exps rescaled to it: the log-sum-exp rule.
        global_max = _all_reduce(row_max.clone(), "max", comm)
        shift = _finite_or_zero(global_max)
        to_global_max(sums, row_max, shift,
                      w_local.to(sums.dtype).sum() if w_local is not None else float(C))
        layout_ok = _reduce_sums_and_layout(packed, vocab_start, C, comm)
        vocab = packed[-1]  # sum of the shard sizes, on the device
        valid, in_range = _valid_rows(target, ignore_index, vocab)
        if x.device.type == "cpu" and not torch.compiler.is_compiling():
            # torch's CPU errors; after the collectives, so every rank raises together.
            # (Not in a compiled graph, which cannot branch on device values: there, as on
            # CUDA, a bad layout or target makes the rows NaN.)
            if not bool(layout_ok):
                raise ValueError(
                    "vocab_parallel_cross_entropy: the ranks' shards do not tile the "
                    "vocabulary [0, V) (overlapping, out of order with the default starts, or "
                    "past V): give every rank its vocab_start_index (default: rank * V_local, "
                    "for equal shards)")
            _check_after_reduce(target.long(), valid, in_range, vocab, weight)
            check_uint8_smoothed_mean(target, weight, eps, reduction, ignore_index)
        if weight is not None and C > 0 and vocab_start + C > weight.numel():
            raise RuntimeError(  # torch's type for a class weight of the wrong size
                f"vocab_parallel_cross_entropy: this rank's shard [{vocab_start}, "
                f"{vocab_start + C}) ends past the {weight.numel()} classes of weight")
        out, lse, coef = sharded_loss(shift, sums, vocab, target, weight, valid, in_range,
                                      reduction, eps, z_loss, ctx.needs_input_grad[0])
        # a bad layout on CUDA: NaN loss and gradient, loud with no host synchronisation
        out = torch.where(layout_ok, out, math.nan)
        if coef is not None:
            coef = torch.where(layout_ok, coef, math.nan)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(x, target, w_local, lse, coef, valid)
            ctx.vocab_start, ctx.logit_scale = vocab_start, logit_scale
        return out

    @staticmethod
    def backward(ctx, dloss):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "fused_softmax.distributed.vocab_parallel_cross_entropy does not support double "
                "backward (create_graph=True)")
        x, target, w_local, lse, coef, valid = ctx.saved_tensors
        coef = scale_coefficients(coef, dloss, ctx.logit_scale, valid)
        if differentiated(dloss):  # the backward differentiated with respect to grad_output
            # (a forward-AD dual, a torch.func level's tensor): torch's ops carry it, the op
            # has no rule for it
            grad = shard_grad(x, target, w_local, lse, coef, ctx.vocab_start,
                              ctx.logit_scale).to(x.dtype)
        else:
            grad = _backend.call(vocab_parallel_bwd, x, target, w_local, lse, coef,
                                 ctx.vocab_start, ctx.logit_scale)
        return grad, None, None, None, None, None, None, None, None, None


def _check_after_reduce(t, valid, in_range, vocab, weight):
    if weight is not None and int(vocab) != weight.numel():
        raise RuntimeError(  # torch's type for a class weight of the wrong size
            f"vocab_parallel_cross_entropy: the shards hold {int(vocab)} classes in all, but "
            f"weight has {weight.numel()}")
    bad = t[valid & ~in_range]
    if bad.numel():
        raise IndexError(f"Target {bad[0].item()} is out of bounds.")


# --------------------------------------------------------------------------- public API
def _rank_and_world(group):
    """(rank in ``group``, its size); a world of 1 when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank(group)
        if rank < 0:
            raise ValueError("vocab_parallel_cross_entropy: this process is not a member of group")
        return rank, dist.get_world_size(group)
    if group is not None:
        raise ValueError(
            "vocab_parallel_cross_entropy: group was given but torch.distributed is not "
            "initialised (call torch.distributed.init_process_group first)")
    return 0, 1


def _check_args(input, target, weight, vocab_start_index, ignore_index, reduction,
                label_smoothing, logit_scale, z_loss, world, input_dtype=None):
    name = "vocab_parallel_cross_entropy"
    input_dtype = input_dtype or input.dtype
    if not isinstance(input, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError(f"{name}(): local_logits and target must be Tensors")
    ignore_index = check_ignore_index(ignore_index, name)
    check_float(name, input)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    check_smoothing_range(label_smoothing)
    check_extras(logit_scale, None, z_loss, name)
    if input.dim() == 0:
        raise RuntimeError(f"{name}: local_logits must have at least 1 dimension (the classes)")
    if target.is_floating_point():
        raise RuntimeError(
            f"{name}: target must hold class indices (global, in [0, V)); class-probability "
            "targets are not supported")
    check_index_target(input, target, reduction)  # torch's shape and dtype checks
    C = input.shape[0 if input.dim() == 1 else 1]
    if vocab_start_index is not None:
        if isinstance(vocab_start_index, bool) or not isinstance(vocab_start_index, int) \
                or vocab_start_index < 0:
            raise ValueError(f"vocab_start_index must be an int >= 0, got {vocab_start_index!r}")
        if world == 1 and vocab_start_index != 0:
            raise ValueError(
                f"vocab_start_index={vocab_start_index} in a world of 1: the only rank holds "
                "the whole vocabulary, which starts at 0")
    if weight is not None:
        if weight.dim() != 1:
            raise RuntimeError(f"weight must be the 1-D class weight (V,), got shape {list(weight.shape)}")
        if world == 1 and weight.numel() != C:  # torch's words (V is unknown before the
            # forward's all-reduce in a larger world: checked there)
            raise RuntimeError(
                f"weight tensor should be defined either for all {C} classes or no classes "
                f"but got weight tensor of shape: {list(weight.shape)}")
        if weight.dtype != input_dtype:
            raise RuntimeError(
                f"expected scalar type {_type_name(input_dtype)} but found {_type_name(weight.dtype)}")
        if weight.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(
                "the derivative for 'weight' is not implemented: cross_entropy with class-index "
                "targets is not differentiable with respect to argument 'weight'")
    for arg, t in (("target", target), ("weight", weight)):
        if t is not None and t.device != input.device:
            raise RuntimeError(
                f"Expected all tensors to be on the same device, but found {arg} on {t.device} "
                f"and local_logits on {input.device}")
    if input.device.type != "cpu":  # on the CPU after the collectives (the forward), as
        # torch raises it after its class-weight size and out-of-range target errors
        check_uint8_smoothed_mean(target, weight, label_smoothing, reduction, ignore_index)
    return C


def vocab_parallel_cross_entropy(
    local_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    group=None,
    vocab_start_index: Optional[int] = None,
    weight: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    logit_scale: float = 1.0,
    z_loss: float = 0.0,
) -> torch.Tensor:
    r"""Cross-entropy over logits whose vocabulary is split across the ranks of ``group``.

    Equal to :func:`torch.nn.functional.cross_entropy` on the logits concatenated along the
    class dimension in vocabulary order (and to :func:`fused_softmax.cross_entropy` with
    the same extras), without any rank ever holding a whole row: per step the ranks
    exchange two all-reduces of O(rows) floats — ``(k + 1) * rows + 1 + 2 * world`` floats,
    ``k = 2`` (3 with label smoothing), in fp32 (fp64 for fp64 logits) — independent of the
    vocabulary size. The backward communicates nothing.

    Args:
        local_logits (Tensor): this rank's shard, ``(V_local,)``, ``(N, V_local)`` or
            ``(N, V_local, d1, ..., dk)`` (classes on dim 1, as torch); float16, bfloat16,
            float32 or float64. For ``(seq, batch, V_local)`` activations pass
            ``logits.reshape(-1, V_local)`` and ``target.reshape(-1)``.
        target (Tensor): GLOBAL class indices in ``[0, V)`` (int64, int32 or uint8), shaped
            as for torch; the same on every rank.
        group (ProcessGroup, optional): the tensor-parallel group (default: the world). If
            torch.distributed is not initialised and ``group`` is None, the call is a world
            of 1 and needs no process group.
        vocab_start_index (int, optional): first global class of this rank's shard; default
            ``rank * V_local`` (equal shards). Give it for unequal shards; the shards must
            tile ``[0, V)`` exactly, and ``V`` is the sum of the shard sizes (checked in the
            forward's sum all-reduce: a ``ValueError`` on every CPU rank, a NaN loss and
            gradient on CUDA; a batch with no rows makes no collective and is not checked).
        weight (Tensor, optional): the full ``(V,)`` class weight, the same on every rank,
            ``local_logits``' dtype (under autocast, as torch: fp32, or fp16 / bf16 cast).
        ignore_index, reduction, label_smoothing: as torch; ``'mean'`` divides by the sum of
            the target weights of non-ignored rows (their count without ``weight``), the
            same denominator on every rank; all ignored gives NaN.
        logit_scale (float): multiply the logits first (``1 / temperature``).
        z_loss (float): add ``z_loss * lse**2`` per non-ignored row (the global
            log-sum-exp), reduced like the loss.

    Returns:
        The loss in ``local_logits``' dtype (fp32 for fp16 / bf16 under autocast, as
        torch's cross_entropy), identical on every rank: a scalar, or
        ``target``'s shape for ``reduction='none'``. Backpropagate it on every rank with the
        same ``grad_output``; each rank receives the gradient of its own shard.

    Out-of-range targets: on CPU an ``IndexError`` on every rank (raised after the
    collectives, so no rank is left waiting); on CUDA that row's loss and gradient are NaN,
    with no host synchronisation.

    Example (2-way tensor parallelism, each rank holding half of a 32000-class head)::

        V_local = 16000
        local = hidden @ lm_head_shard.T            # (N, V_local) on this rank
        loss = vocab_parallel_cross_entropy(local, target, group=tp_group)
        loss.backward()                              # d loss / d local, no communication
    """
    rank, world = _rank_and_world(group)
    reduction = reduction_name(reduction)
    input_dtype = None
    if isinstance(local_logits, torch.Tensor) and autocast_fp32_active("cross_entropy",
                                                                       local_logits.device.type):
        # as cross_entropy under autocast: fp32 loss, fp16 / bf16 class weight cast to fp32
        weight = fp32_if_low(weight)
        if local_logits.dtype in LOW_FLOATS:
            input_dtype = torch.float32
    C = _check_args(local_logits, target, weight, vocab_start_index, ignore_index, reduction,
                    label_smoothing, logit_scale, z_loss, world, input_dtype)
    start = rank * C if vocab_start_index is None else vocab_start_index
    ignore_index = as_symint(ignore_index)
    target = widen_int32_target(target, ignore_index)
    label_smoothing = smoothing_value(label_smoothing)

    input = local_logits
    if needs_torch_ops(input, target, weight) or (world == 1 and C == 0):
        # torch.func transforms, forward-mode AD, tensor subclasses (no rules for the custom
        # ops), or no classes at all: in a world of 1, cross_entropy's own answers
        if world != 1:
            raise NotImplementedError(
                "vocab_parallel_cross_entropy: torch.func transforms, forward-mode AD and "
                "tensor subclasses are supported in a world of 1 only")
        return cross_entropy(input, target, weight, ignore_index=ignore_index,
                             reduction=reduction, label_smoothing=label_smoothing,
                             logit_scale=logit_scale, z_loss=z_loss)
    if input.dim() > 1 and target.numel() == 0:
        # No rows anywhere (no batch, or an empty extra dim: the target, hence the rows, is
        # the same on every rank): torch's answers (mean NaN, sum 0, none empty),
        # differentiable, with no collective.
        per_row = (input * 0).sum(1)
        if reduction == "none":
            return per_row
        return per_row.sum() / 0.0 if reduction == "mean" else per_row.sum()
    if input.dim() == 1:
        x, t = input.unsqueeze(0), target.reshape(1)
    elif input.dim() == 2:
        x, t = input, target
    else:
        x, t = classes_last(input), target.reshape(-1)  # (gradient contiguous, as torch's)
    if x.stride(-1) != 1:
        x = x.contiguous()
    t = t.contiguous()
    loss = VocabParallelCrossEntropyFunction.apply(
        x, t, weight, (group, world), start, int(ignore_index), reduction, label_smoothing,
        float(logit_scale), float(z_loss))
    loss = loss.to(input_dtype or input.dtype)
    if reduction == "none":
        loss = loss.reshape(() if input.dim() == 1 else target.shape)
    return loss
