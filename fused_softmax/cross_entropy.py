"""cross_entropy: public function, autograd, custom ops, launchers.

Device code: ``kernels/cross_entropy.py``. The forward kernel writes the per-row loss,
the log-sum-exp and (when the logits need a gradient) the gradient, in one launch; the
backward rescales that gradient by ``grad_output`` in place, skipping rows whose scale is
exactly 1 on the device.
"""

from __future__ import annotations

import functools
import math
import numbers
import re
import weakref
from typing import Optional

import numpy as np
import torch
from torch.overrides import handle_torch_function

from . import _backend
from ._backend import (LOW_FLOATS, acc_dtype, as_symint, autocast_fp32_active, check_float,
                       differentiated, exporting, float_bits, fp32_if_low, is_finite,
                       needs_torch_ops, torch_function_dispatch, use_triton)

if _backend.HAS_TRITON:
    import triton

    from .kernels import cross_entropy as _k
    from .softmax import _tl_acc

_REDUCTIONS = ("none", "mean", "sum")
_INDEX_DTYPES = (torch.int64, torch.uint8, torch.int32)


# --------------------------------------------------------------------------- launchers
def _block_and_grid(x: torch.Tensor, C: int, n_rows: int, grad: bool = True):
    """``(BLOCK_N, num_warps, grid)`` for rows of ``C`` classes (``bench/tune.py``; bf16,
    8192 rows, H200, bench/results/tune-h200-2026-11-26.json):

    * one pass over the row (loss without gradient; the backward's rescaling): 4096-wide
      blocks, 8 warps, one program per row. Forward at V = 128256: 0.66 ms in the sweep,
      0.685 ms end to end, against 0.95-0.98 ms for 16384-wide blocks in a persistent grid;
    * loss and gradient in one launch: 16384-wide blocks and few rows in flight per SM, so
      the gradient pass re-reads each row from L2 (1.88 ms at V = 128256; 4096-wide blocks
      2.1 ms). At V = 32000 the sweep preferred 4096-wide blocks with 16 programs per SM
      (0.45 ms against 0.54 ms), but the end-to-end run with that setting measured 1.13 ms
      (0.585 ms before it; Liger-Kernel also moved, 0.90 to 1.11 ms), so it is not used
      until a rerun settles it.

    Under the interpreter a few long programs are cheapest: there the grid stays small.
    """
    return _launch_params(x.element_size(), x.device.type == "cuda",
                          _backend.num_programs_per_wave(x.device), C, n_rows, grad)


@functools.lru_cache(maxsize=4096)  # pure in its arguments; a few microseconds a call saved
def _launch_params(elem, on_cuda, per_wave, C, n_rows, grad):
    max_block = {2: 16384, 4: 8192}.get(elem, 4096)
    if not grad:
        block_n = min(triton.next_power_of_2(max(C, 1)), 4096)
        # one program per row on CUDA (up to 2^24 programs: the launcher's grid is an int32,
        # and the kernels loop over the rest); a persistent grid under the interpreter
        grid = min(n_rows, 1 << 24) if on_cuda else min(n_rows, per_wave * 2)
    else:
        block_n = min(triton.next_power_of_2(max(C, 1)), max_block)
        waves = max(2, min(32, 32768 // block_n))
        grid = min(n_rows, per_wave * waves)
    return block_n, min(32, max(4, block_n // 512)), grid


def _launch_fwd(x, target, weight, scalars, grad, ignore_index, label_smoothing,
                logit_scale, softcap, z_loss, prob_target, config=None, dscale=None):
    n_rows, C = x.shape
    acc = acc_dtype(x.dtype)
    loss = torch.empty(n_rows, dtype=acc, device=x.device)
    lse = torch.empty(n_rows, dtype=acc, device=x.device)
    if n_rows == 0:
        return loss, lse
    block_n, num_warps, grid = config or _block_and_grid(x, C, n_rows, grad is not None)
    _backend.launch(
        _k.cross_entropy_fwd_kernel, grid,
        x, target, weight if weight is not None else scalars, scalars, loss, lse,
        grad if grad is not None else x,
        n_rows, C, x.stride(0), target.stride(0) if prob_target else 0,
        grad.stride(0) if grad is not None else 0,
        dscale if dscale is not None else scalars,
        dscale.stride(0) if dscale is not None and dscale.dim() else 0,
        ignore_index, float_bits(1.0 - label_smoothing), float_bits(label_smoothing / max(C, 1)),
        float_bits(logit_scale),
        float_bits(softcap), float_bits(z_loss),
        PROB_TARGET=prob_target, HAS_WEIGHT=weight is not None,
        HAS_SMOOTHING=label_smoothing > 0, HAS_SOFTCAP=softcap > 0, HAS_Z_LOSS=z_loss != 0,
        COMPUTE_GRAD=grad is not None, HAS_DSCALE=dscale is not None,
        ACC=_tl_acc(x.dtype), BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return loss, lse


def _launch_bwd(grad: torch.Tensor, dloss: torch.Tensor, target=None,
                nonfinite_row: bool = False, ignore_index=None) -> None:
    n_rows, C = grad.shape
    if grad.numel() == 0:
        return
    block_n, num_warps, grid = _block_and_grid(grad, C, n_rows, grad=False)
    _backend.launch(
        _k.cross_entropy_bwd_kernel, grid,
        grad, dloss, target if target is not None else dloss,
        n_rows, C, grad.stride(0), dloss.stride(0) if dloss.dim() else 0,
        ignore_index if ignore_index is not None else 0,
        NONFINITE_ROW=nonfinite_row, HAS_TARGET=target is not None,
        SKIP_IGNORED=ignore_index is not None and target is not None,
        ACC=_tl_acc(grad.dtype), BLOCK_N=block_n, num_warps=num_warps,
    )


# --------------------------------------------------------------------------- torch path
def _torch_fwd(x, target, weight, scalars, grad, ignore_index, label_smoothing,
               logit_scale, softcap, z_loss, prob_target, dscale=None):
    """The kernel's math with torch ops (CPU without the interpreter, or no Triton)."""
    n_rows, C = x.shape
    acc = acc_dtype(x.dtype)
    z, dzdx = _scaled_logits(x, logit_scale, softcap)
    logp = torch.log_softmax(z, -1)  # torch's NaN rules for +-inf rows
    lse = torch.logsumexp(z, -1)  # +inf for a row holding +inf, as the kernel stores it
    p = logp.exp()
    w = weight.to(acc) if weight is not None else torch.ones(C, dtype=acc, device=x.device)
    grad_scale, w_sum = scalars[0], scalars[1]
    if dscale is not None:  # per row (n_rows,) or one () for all, as the kernel's DSCALE
        grad_scale = grad_scale * dscale.to(acc)
    gs_col = grad_scale[:, None] if grad_scale.dim() else grad_scale
    eps = label_smoothing
    if prob_target:
        wq = w * smoothed_target(target, eps, C).to(acc)
        coef = wq.sum(-1)
        loss = -(wq * logp).sum(-1)
    else:
        t = target.long()
        ignored = t == ignore_index
        t_safe = torch.where(ignored, 0, t)
        w_t = w[t_safe]
        logp_t = logp.gather(1, t_safe[:, None]).squeeze(1)
        loss = -(1 - eps) * w_t * logp_t
        if eps > 0:  # as the kernel's HAS_SMOOTHING: 0 * (-inf logit or inf weight) is NaN
            loss = loss - (eps / C) * (w * logp).sum(-1)
    if z_loss:
        loss = loss + z_loss * lse * lse
    # The kernel's order and products: with grad_scale = 1/0 (a mean over zero total
    # weight) the target entry is inf - inf = NaN and the others +-inf, as torch's; with
    # one class the gradient is exactly 0, as torch's.
    if prob_target:
        if z_loss:
            coef = coef + 2 * z_loss * lse
        dz = (coef * grad_scale)[:, None] * p - gs_col * wq
    else:
        a_t = grad_scale * (1 - eps) * w_t
        g_coef = a_t
        share = torch.where(torch.arange(C, device=x.device) == t_safe[:, None], a_t[:, None], 0.0)
        if eps > 0:
            e_c = grad_scale * (eps / C)
            g_coef = g_coef + e_c * w_sum
            share = share + (e_c[:, None] if e_c.dim() else e_c) * w
        if z_loss:
            g_coef = g_coef + grad_scale * (2 * z_loss * lse)
        dz = g_coef[:, None] * p - share
    dz = dz * dzdx
    if dscale is not None:  # a non-finite grad_output: torch's NaN, as _rescale's
        whole_row = prob_target or eps > 0
        dz = _nan_for_nonfinite(dz, dscale[:, None] if dscale.dim() else dscale,
                                None if whole_row else t_safe)
    if not prob_target:
        # After the scaling, as in the kernel: all rows ignored makes grad_scale 1/0.
        loss = torch.where(ignored, 0.0, loss)
        dz = torch.where(ignored[:, None], 0.0, dz)
    if grad is not None:
        grad.copy_(dz)
    return loss, lse


def loss_dtype(dtype: torch.dtype, target, weight, prob_target: bool) -> torch.dtype:
    """The loss's dtype for logits computed in ``dtype``: that dtype for class indices;
    for probability targets torch computes ``-(log_softmax(input) * target * weight)``,
    promoted with the target's and the weight's dtypes."""
    if prob_target:
        dtype = torch.promote_types(dtype, target.dtype)
        if weight is not None:
            dtype = torch.promote_types(dtype, weight.dtype)
    return dtype


def smoothed_target(target: torch.Tensor, eps: float, C: int) -> torch.Tensor:
    """A probability target with label smoothing ``eps`` as torch forms it, in the
    target's own dtype: ``target * (1 - eps) + eps / C`` (the kernel's ``smoothed_target``)."""
    return target * (1 - eps) + eps / C if eps > 0 else target


def check_targets_on_cpu(target: torch.Tensor, ignore_index: int, n_classes: int) -> None:
    """torch's CPU error for a class index outside ``[0, C)`` that is not ``ignore_index``;
    called inside the opaque custom ops, so that compiled graphs keep it. On CUDA the
    kernels mark the row NaN instead: no host synchronisation."""
    if target.device.type == "cpu":
        bad = target[(target != ignore_index) & ((target < 0) | (target >= n_classes))]
        if bad.numel():
            raise IndexError(f"Target {bad[0].item()} is out of bounds.")


def _run_fwd(x, target, weight, scalars, grad, ignore_index, *args, dscale=None):
    if not args[-1]:  # class-index targets
        check_targets_on_cpu(target, ignore_index, x.shape[1])
    args = (ignore_index, *args)
    if use_triton(x):
        return _launch_fwd(x, target, weight, scalars, grad, *args, dscale=dscale)
    return _torch_fwd(x, target, weight, scalars, grad, *args, dscale=dscale)


# --------------------------------------------------------------------------- custom ops
@_backend.custom_op("fused_softmax::cross_entropy_fwd")
def cross_entropy_fwd(
    x: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor], scalars: torch.Tensor,
    ignore_index: int, label_smoothing: float, logit_scale: float, softcap: float,
    z_loss: float, prob_target: bool, compute_grad: bool, dscale: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row loss and log-sum-exp of ``(rows, C)`` logits, and their gradient when
    ``compute_grad`` (scaled by ``scalars[0]`` and by ``dscale``, a ``grad_output`` per row
    or one for all, if given; an empty tensor otherwise)."""
    grad = torch.empty_like(x, memory_format=torch.contiguous_format) if compute_grad else x.new_empty(0)
    loss, lse = _run_fwd(x, target, weight, scalars, grad if compute_grad else None,
                         ignore_index, label_smoothing, logit_scale, softcap, z_loss, prob_target,
                         dscale=dscale)
    return loss, lse, grad


@cross_entropy_fwd.register_fake
def _(x, target, weight, scalars, ignore_index, label_smoothing, logit_scale, softcap,
      z_loss, prob_target, compute_grad, dscale=None):
    acc = acc_dtype(x.dtype)
    grad = torch.empty_like(x, memory_format=torch.contiguous_format) if compute_grad else x.new_empty(0)
    return x.new_empty(x.shape[0], dtype=acc), x.new_empty(x.shape[0], dtype=acc), grad


def _op_setup_context(ctx, inputs, output):
    x, target, weight = inputs[:3]
    ctx.args = inputs[4:10]
    ctx.save_for_backward(x, target, weight)
    ctx.mark_non_differentiable(*output[1:])  # lse and the forward's gradient


def _op_backward(ctx, dloss, dlse, dgrad):
    """The gradient of the per-row loss for a program that calls ``cross_entropy_fwd``
    itself (an exported program: export keeps the ops, not the ``autograd.Function``
    around them), formed from the saved inputs with torch ops. The op's ``lse`` and
    ``grad`` outputs are not differentiable."""
    if dloss is None:
        return (None,) * 12
    inputs = ctx.saved_tensors
    return _differentiable_backward(ctx, _ignored_rows_zeroed(ctx, dloss, inputs[1]), inputs, 1.0)


cross_entropy_fwd.register_autograd(_op_backward, setup_context=_op_setup_context)


@_backend.custom_op("fused_softmax::cross_entropy_fwd_inplace", mutates_args=("x",))
def cross_entropy_fwd_inplace(
    x: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor], scalars: torch.Tensor,
    ignore_index: int, label_smoothing: float, logit_scale: float, softcap: float,
    z_loss: float, prob_target: bool, dscale: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`cross_entropy_fwd`, writing the gradient over the logits ``x``."""
    return _run_fwd(x, target, weight, scalars, x, ignore_index, label_smoothing,
                    logit_scale, softcap, z_loss, prob_target, dscale=dscale)


@cross_entropy_fwd_inplace.register_fake
def _(x, target, weight, scalars, ignore_index, label_smoothing, logit_scale, softcap,
      z_loss, prob_target, dscale=None):
    acc = acc_dtype(x.dtype)
    return x.new_empty(x.shape[0], dtype=acc), x.new_empty(x.shape[0], dtype=acc)


@_backend.custom_op("fused_softmax::cross_entropy_bwd_", mutates_args=("grad",))
def cross_entropy_bwd_(grad: torch.Tensor, dloss: torch.Tensor, target: Optional[torch.Tensor] = None,
                       nonfinite_row: bool = False, ignore_index: Optional[int] = None) -> None:
    """``grad *= dloss`` row-wise in place (``dloss`` a scalar or one value per row). Where
    ``dloss`` is inf or NaN, torch's NaN: across the row if ``nonfinite_row`` (label
    smoothing, probability targets), else at ``target[row]`` (class indices) if given.
    ``ignore_index`` (with ``target``): rows of that target are left as they are (an
    ignored row's gradient, 0 whatever ``dloss`` holds, as torch's)."""
    if use_triton(grad):
        _launch_bwd(grad, dloss, target, nonfinite_row, ignore_index)
        return
    grad.copy_(_rescaled(grad, dloss, target, nonfinite_row, ignore_index))


def _rescaled(grad, dloss, target=None, nonfinite_row=False, ignore_index=None):
    """``cross_entropy_bwd_``'s result with torch ops, out of place (in ``grad``'s dtype
    once copied back: computed in fp32, as the kernel, for a grad_output of 65536,
    GradScaler's, is inf in fp16)."""
    scale = (dloss[:, None] if dloss.dim() else dloss).to(acc_dtype(grad.dtype))
    scaled = grad.to(scale.dtype) * scale
    if nonfinite_row or target is not None:
        scaled = _nan_for_nonfinite(scaled, scale, None if nonfinite_row else target)
    if ignore_index is not None and target is not None:
        scaled = torch.where((target == ignore_index)[:, None], grad.to(scaled.dtype), scaled)
    return scaled


def rescale_(grad, dloss, target=None, nonfinite_row=False, ignore_index=None):
    """``cross_entropy_bwd_(grad, ...)``, returning ``grad``; where ``dloss`` is batched
    (``autograd.grad(..., is_grads_batched=True)``, a vectorized jacobian: vmap over the
    backward, which an op mutating an unbatched ``grad`` cannot take) the same result out
    of place with torch ops; so too in a backward compiled autograd traces, which would
    not replay the backward's handing on of ``grad`` (taken once from the context): a
    second backward of a retained graph rescaled the rescaled gradient again."""
    if needs_torch_ops(dloss) or _backend.in_compiled_autograd():
        return _rescaled(grad, dloss, target, nonfinite_row, ignore_index).to(grad.dtype)
    _backend.call(cross_entropy_bwd_, grad, dloss, target, nonfinite_row, ignore_index)
    return grad


def _nan_for_nonfinite(grad: torch.Tensor, scale: torch.Tensor, target=None) -> torch.Tensor:
    """``grad`` (rows, C) scaled by a non-finite ``scale`` (a ``grad_output``, ``(rows, 1)``
    or one value) holds torch's NaN where its backward through ``log_softmax`` forms
    ``inf - inf``: at ``target[row]`` for class indices, across the row without a target
    (label smoothing, probability targets)."""
    nan_at = ~torch.isfinite(scale).expand(grad.shape)
    if target is not None:
        cols = torch.arange(grad.shape[1], device=grad.device)
        nan_at = nan_at & (cols == target.reshape(-1, 1))
    return grad.masked_fill(nan_at, math.nan)


@cross_entropy_bwd_.register_fake
def _(grad, dloss, target=None, nonfinite_row=False, ignore_index=None):
    return None


def _scaled_logits(x, logit_scale, softcap):
    """``z`` and ``dz/dx`` of the kernel's logit transform, with torch ops."""
    z = x.to(acc_dtype(x.dtype)) * logit_scale
    if softcap > 0:
        u = z / softcap
        # 1 / cosh^2, not 1 - tanh^2, which cancels where tanh saturates (inf -> 0: no NaN)
        return softcap * torch.tanh(u), logit_scale / torch.cosh(u) ** 2
    return z, logit_scale


def _prob_target_grads(x, target, weight, scalars, lse, dscale, args):
    """Gradients of the loss for probability targets with respect to the target,
    ``-(1 - eps) * w * log_softmax(z)``, and to the class weight, ``-sum_rows q' * log_softmax(z)``
    (each scaled by the reduction and grad_output). Only users who differentiate through
    soft labels or class weights pay for it (torch ops, off the fused path)."""
    _, eps, logit_scale, softcap = args[:4]
    C = x.shape[1]
    z, _ = _scaled_logits(x, logit_scale, softcap)
    row_scale = scalars[0] * (dscale[:, None] if dscale.dim() else dscale)
    # log_softmax itself, not z - lse: at logits of 1e4, lse's rounding (1e-3 in fp32) is
    # all of a small log-probability's error
    dlogp = -torch.log_softmax(z, 1) * row_scale  # d loss / d (w * q'), per element
    w = weight.to(z.dtype) if weight is not None else None
    grad_target = (1 - eps) * dlogp * (w if w is not None else 1.0)
    grad_weight = None
    if weight is not None:
        grad_weight = (dlogp * smoothed_target(target, eps, C).to(z.dtype)).sum(0)
    return grad_target, grad_weight


def torch_cross_entropy(input, target, weight, ignore_index: int, reduction: str,
                        label_smoothing: float) -> torch.Tensor:
    """torch's own cross-entropy (the ATen op behind ``F.cross_entropy``), called directly so
    that ``fused_softmax.patch()`` can never route it back here. int32 class indices,
    which ours take and torch's op does not, reach it as int64."""
    if isinstance(target, torch.Tensor) and target.dtype == torch.int32:  # else torch's error
        target = target.long()
    return torch._C._nn.cross_entropy_loss(input, target, weight,
                                           torch.nn._reduction.get_enum(reduction),
                                           ignore_index, label_smoothing)


def _capped_logits(x, logit_scale, softcap):
    """The extras' logit transform in ``x``'s dtype, differentiable: ``x * logit_scale``,
    then ``softcap * tanh(z / softcap)`` (``softcap`` None or 0 for none)."""
    z = x * logit_scale if logit_scale != 1.0 else x
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    return z


def _kernel_operands(target, weight, prob_target):
    """Target and class weight as the kernels read them: uint8 indices widened (compared
    with ignore_index, -100, as integers, not bytes), the weight flat and contiguous (read
    as ``weight[c]`` at unit stride)."""
    if not prob_target and target.dtype == torch.uint8:
        target = target.long()
    if weight is not None:
        weight = weight.reshape(-1).contiguous()
    return target, weight


def _loss_rows(x, target, weight, args):
    """Per-row losses of ``(rows, C)`` logits with differentiable torch ops: the forward's
    formula (torch's cross-entropy of the scaled / capped logits, plus the z-loss)."""
    ignore_index, eps, logit_scale, softcap, z_loss, prob_target = args
    z = _capped_logits(x, logit_scale, softcap)
    rows = torch_cross_entropy(z, target, weight, ignore_index, "none", eps)
    if z_loss:
        lse = torch.logsumexp(z, -1)
        if not prob_target:
            lse = torch.where(target == ignore_index, 0.0, lse)
        rows = rows + z_loss * lse * lse
    return rows


def grads_of_rows(ctx, rows_of, inputs, scale):
    """The vector-Jacobian products of ``rows_of(*inputs)`` with ``scale`` (the rows'
    ``grad_output``), one per input of ``ctx``'s op or Function: for each of ``inputs``
    that ``ctx.needs_input_grad`` (zeros where unused), in its dtype, None elsewhere.
    Formed with torch ops with a graph (a backward's ``create_graph=True``),
    differentiable in the inputs and in ``scale``. A ``scale`` that a transform
    differentiates (``_backend.differentiated``: a forward-AD dual, a ``torch.func``
    level's grad_output) goes through ``torch.func.vjp``, which keeps its levels;
    ``autograd.grad`` of a sum holding it gave a zero derivative."""
    wanted = [i for i in range(len(inputs)) if ctx.needs_input_grad[i]]

    def rows_from(*chosen):
        args = list(inputs)
        for i, t in zip(wanted, chosen):
            args[i] = t
        return rows_of(*args)

    primals = [inputs[i] for i in wanted]
    if differentiated(scale):
        rows, vjp = torch.func.vjp(rows_from, *primals)
        grads = vjp(scale.expand_as(rows).to(rows.dtype))
    else:
        with torch.enable_grad():
            # Partial derivatives, each input on its own: through an alias of it, so that
            # autograd does not also follow one input into another computed from it (a
            # soft target or class weight formed from the logits, an input row taken from
            # a tied head); the caller's graph carries those paths. scale as grad_outputs,
            # not a factor of the sum: it is often a function of the same inputs (grad of
            # loss**2: 2 * loss). Either way autograd differentiated twice.
            aliases = [p.view_as(p) for p in primals]
            rows = rows_from(*aliases)
            grads = torch.autograd.grad(rows, aliases, scale.expand_as(rows).to(rows.dtype),
                                        create_graph=True, allow_unused=True)
    out = [None] * len(ctx.needs_input_grad)
    for i, p, g in zip(wanted, primals, grads):
        out[i] = (torch.zeros_like(p) if g is None else g).to(p.dtype)
    return tuple(out)


def _differentiable_backward(ctx, dscale, inputs, scale):
    """The gradients of ``scale`` times the per-row losses (``grad_output`` ``dscale``) for
    ``inputs`` ``(x, target, weight)``, recomputed from them with torch ops, so that they
    are themselves differentiable: ``create_graph=True`` (double backward, gradient
    penalties, Hessians), a ``grad_output`` a transform differentiates, an exported
    program's backward. One per input of ``ctx``'s op or Function (None past the three)."""
    # In the accumulation dtype, as the kernels: grad_output (GradScaler's 2^16) is inf in
    # fp16, and fp16 formulas lose accuracy; the casts carry the gradients back.
    acc = acc_dtype(inputs[0].dtype)

    def rows_of(x, target, weight):  # (a probability target smoothed in its dtype, as torch)
        return _loss_rows(x.to(acc), target, weight.to(acc) if weight is not None else None,
                          ctx.args)
    return grads_of_rows(ctx, rows_of, inputs, (dscale * scale).to(acc))


class _ClassesLast(torch.autograd.Function):
    """``(N, C, d1, ...) -> (N * d1 * ..., C)``: rows of classes. Where that takes a copy
    (the classes are not innermost in memory: a contiguous input), the backward hands back
    a contiguous gradient, as torch's (autograd's own backward of ``movedim(1,
    -1).reshape`` gave it classes-last: ``.view`` failed on the gradient a hook or
    ``autograd.grad`` saw, and a leaf's ``.grad`` took a copy anyway). Where it is a view
    (channels_last, a transposed ``(B, T, C)`` tensor), the gradient keeps the input's
    layout, with no copy: torch's is contiguous there, at the cost of a copy of it."""

    @staticmethod
    def forward(ctx, x):
        moved = x.movedim(1, -1)
        rows = moved.reshape(math.prod(moved.shape[:-1]), x.shape[1])
        ctx.moved, ctx.copied = moved.shape, not _rows_view(x)
        # (a contiguous (1, C, d...) reshapes to a view with strided classes: the kernels'
        # copy is made here)
        return rows.contiguous() if ctx.copied else rows

    @staticmethod
    def backward(ctx, grad):
        grad = grad.reshape(ctx.moved).movedim(-1, 1)
        return grad.contiguous() if ctx.copied else grad


def _rows_view(t: torch.Tensor) -> bool:
    """Whether ``classes_last(t)``'s rows of classes view ``t``'s memory (the classes
    innermost already: channels_last, a transposed ``(B, T, C)`` tensor) rather than copy
    it; from the strides (eager code only: False while compiling, which has no layouts
    to keep)."""
    if torch.compiler.is_compiling():
        return False
    moved = t.movedim(1, -1)
    dims = [(n, st) for n, st in zip(moved.shape[:-1], moved.stride()[:-1]) if n != 1]
    return ((moved.shape[-1] <= 1 or moved.stride(-1) == 1)
            and all(a == b * n for (_, a), (n, b) in zip(dims, dims[1:])))


def classes_last(t: torch.Tensor, grad_layout: bool = True) -> torch.Tensor:
    """``(N, C, d1, ...) -> (N * d1 * ..., C)``, with ``_ClassesLast``'s gradient layout in
    eager code (strict export drops an autograd.Function's gradient; compiled code lays out
    its own strides, classes-last as before); without ``grad_layout`` autograd's own."""
    if (grad_layout and t.requires_grad and torch.is_grad_enabled()
            and _backend.dispatch_free((t,))):
        return _ClassesLast.apply(t)
    moved = t.movedim(1, -1)
    return moved.reshape(math.prod(moved.shape[:-1]), t.shape[1])  # (no -1: C may be 0)


def mutation_allowed() -> bool:
    """Inside ``torch.autograd.graph.allow_mutation_on_saved_tensors()``: torch copies a
    saved tensor before it is changed in place, so its backward sees the old values and
    raises nothing. The versions are then not watched, and a tensor the backward reads
    outside the saved ones is copied in the forward."""
    return getattr(torch.autograd.graph, "_allow_mutation_on_saved_tensors_enabled", False)


def track_versions(output: torch.Tensor, *tensors) -> None:
    """Note the versions of ``tensors`` (the caller's, not the kernels' copies; those not
    None) on ``output``'s autograd node (an ``autograd.Function``'s ``grad_fn`` is its
    ctx) for ``check_versions``: a backward that reads no saved tensor still raises
    autograd's error where torch's (whose backward saves them) would. Eager only (Dynamo
    traces no ``grad_fn``; nothing changes in place within a compiled graph)."""
    if torch.compiler.is_compiling() or output.grad_fn is None or mutation_allowed():
        return
    # weak references: the caller's tensors live as long as the caller keeps them, not as
    # long as the graph (torch frees its saved tensors once its backward has run); one
    # nobody holds any more cannot be changed in place
    output.grad_fn.versions = tuple((weakref.ref(t), t._version) for t in tensors
                                    if t is not None and not t.is_inference())


def watched_by_torch(ndim: int, target, weight, prob_target, smoothing):
    """The caller's tensors that torch's backward saves, so that changing them in place
    after the forward is autograd's error (``ndim``: the logits'): the class weight, and
    the target, but not a smoothed probability target (torch saves its smoothed copy) nor
    a non-contiguous class-index target of 3-d or over 4-d logits (``nll_loss_nd`` saves
    a contiguous copy)."""
    if prob_target and smoothing > 0:
        return (weight,)
    if not prob_target and (ndim == 3 or ndim > 4) and not target.is_contiguous():
        return (weight,)
    return (target, weight)


def check_versions(ctx) -> None:
    """autograd's error where a tensor noted by ``track_versions`` has changed in place
    since the forward."""
    for ref, version in ctx.versions:
        t = ref()
        if t is not None:
            check_version(t, version)


def check_version(t: torch.Tensor, version: int) -> None:
    """autograd's error, in its words, where ``t`` is no longer at ``version``. Not in a
    backward that Dynamo traces (compiled autograd), which reads no version counter (the
    comparison failed there: "at version 1; expected version 1 instead")."""
    if not torch.compiler.is_compiling() and t._version != version:
        raise RuntimeError(
            "one of the variables needed for gradient computation has been modified by an "
            f"inplace operation: [{t.type()} {list(t.shape)}] is at version {t._version}; "
            f"expected version {version} instead. Hint: enable anomaly detection to find the "
            "operation that failed to compute its gradient, with "
            "torch.autograd.set_detect_anomaly(True, check_nan=False).")


def _rescale(ctx, grad_x, dscale, target):
    """The forward's gradient times ``grad_output``, with torch's NaN for a non-finite one
    (at the target, or across the row), ignored rows left at 0 (on the device: no mask
    formed on the host). ``target``: the class-index target (ignored for probability
    targets)."""
    check_versions(ctx)
    if ctx.args[-1]:  # probability targets
        target = None
    return rescale_(grad_x, dscale, target, ctx.nonfinite_row,
                    None if target is None else ctx.args[0])


def _ignored_rows_zeroed(ctx, dscale, target):
    """``dscale`` per row, 0 on ignored rows (class-index targets): an ignored row's
    gradient is 0 whatever ``grad_output`` holds (NaN, inf), as torch's. For the backward
    paths other than the fused rescale (which skips those rows on the device). ``target``:
    the saved one (``ctx.saved_tensors`` is unpacked once per backward: non-reentrant
    checkpointing allows no second unpack)."""
    if ctx.args[-1]:  # probability targets: no row is ignored
        return dscale
    return dscale.expand(target.shape).masked_fill(target == ctx.args[0], 0.0)


class CrossEntropyFunction(torch.autograd.Function):
    """Fused forward (loss + gradient), backward = in-place rescale of that gradient; for
    fp16 logits the backward forms the gradient instead (see ``deferred``)."""

    @staticmethod
    def forward(ctx, x, target, weight, scalars, denom, reduction, inplace, args, grad_mode):
        # needs_input_grad ignores torch.no_grad(): without grad_mode an inference call
        # would still write a logits-sized gradient.
        compute_grad = grad_mode and ctx.needs_input_grad[0]
        target_grad = grad_mode and (ctx.needs_input_grad[1] or ctx.needs_input_grad[2])
        # The target gradient needs the logits: never overwrite them then.
        inplace = inplace and compute_grad and not target_grad
        # fp16's range: a gradient formed here (scaled by 1/N, rounded to fp16) loses every
        # entry below 6e-8 before grad_output (GradScaler's 2^16) reaches it. For fp16 the
        # backward forms it from the saved logits with grad_output folded in, in fp32 before
        # the one rounding, as torch orders it: one more read of the logits.
        deferred = compute_grad and x.dtype == torch.float16
        if inplace and not deferred:
            loss, lse = _backend.call(
                cross_entropy_fwd_inplace, x, target, weight, scalars, *args)
            grad = x
        else:
            loss, lse, grad = _backend.call(
                cross_entropy_fwd, x, target, weight, scalars, *args, compute_grad and not deferred)
        loss = reduced(loss, denom, reduction, args[1])
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)  # no zeros for lse's gradient (one op less)
        if compute_grad or target_grad:
            # The gradient is held outside save_for_backward (_backend.keep): the first
            # backward rescales it in place and hands it on; a later backward through the
            # same graph (retain_graph, gradcheck) recomputes it from the saved logits.
            ctx.deferred, ctx.args = deferred, args
            ctx.nonfinite_row = args[-1] or args[1] > 0
            ctx.inplace, ctx.inplace_later = inplace and not deferred, inplace and deferred
            # (the target too when the logits were overwritten: a non-finite grad_output's NaN)
            saved = ((None, target, weight, None, None) if ctx.inplace
                     else (x, target, weight, scalars, lse))
            # The target for the rescale is held too, not saved: the first backward only
            # rescales the fused gradient, and unpacking the saved logits would fail it where
            # the caller has changed them in place since (torch's backward, which saves
            # log_softmax's output, allows that)
            _backend.keep(ctx, saved, (
                grad if compute_grad and not deferred else None,
                None if args[-1] else (target.clone() if mutation_allowed() else target)))
            ctx.versions = ()  # ... but the caller's target and class weight are watched
            # (``track_versions``: changed in place, autograd's error there too, as torch's)
        return loss, lse

    @staticmethod
    def backward(ctx, dloss, dlse):
        if dloss is None:  # not materialised (set_materialize_grads): nothing flows back
            return (None,) * 9
        dscale = dloss.reshape(-1) if dloss.dim() else dloss
        if torch.is_grad_enabled() or differentiated(dscale):
            if ctx.inplace:
                raise RuntimeError(
                    "fused_softmax.cross_entropy(inplace_backward=True): the logits were "
                    "overwritten by the gradient, so no gradient of the gradient can be formed")
            _backend.take(ctx)  # (not read here: dropped, as torch frees what it has used)
            x, target, weight, scalars, _ = _backend.saved(ctx)
            return _differentiable_backward(ctx, _ignored_rows_zeroed(ctx, dscale, target),
                                            (x, target, weight), scalars[0])
        # taken once: torch frees what its backward reads once it has run (a later
        # backward, retain_graph, recomputes the gradient and reads the saved target)
        fused_grad, rescale_target = _backend.take(ctx)
        grad_x = grad_target = None
        saved = None  # ctx.saved_tensors, unpacked at most once (non-reentrant checkpointing)
        if ctx.needs_input_grad[0]:
            grad_x = fused_grad
            if grad_x is None:
                if ctx.inplace:
                    raise RuntimeError(
                        "fused_softmax.cross_entropy(inplace_backward=True): the logits were "
                        "overwritten by the gradient, so the graph can be backpropagated only once")
                saved = _backend.saved(ctx)
                x, target, weight, scalars, _ = saved
                if ctx.deferred:  # fp16: one pass from the saved logits, grad_output folded in
                    dscale = _ignored_rows_zeroed(ctx, dscale, target)
                    if ctx.inplace_later and not needs_torch_ops(dscale):
                        _backend.call(
                            cross_entropy_fwd_inplace, x, target, weight, scalars, *ctx.args,
                            dscale)
                        grad_x, ctx.inplace = x, True
                    else:
                        grad_x = _backend.call(
                            cross_entropy_fwd, x, target, weight, scalars, *ctx.args, True,
                            dscale)[2]
                else:  # a later backward (retain_graph, gradcheck): as the first, bit for bit
                    grad_x = _backend.call(
                        cross_entropy_fwd, x, target, weight, scalars, *ctx.args, True)[2]
                    grad_x = _rescale(ctx, grad_x, dscale, target)
            else:
                grad_x = _rescale(ctx, grad_x, dscale, rescale_target)
        grad_weight = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            x, target, weight, scalars, lse = saved if saved is not None else _backend.saved(ctx)
            grad_target, grad_weight = _prob_target_grads(x, target, weight, scalars, lse, dscale, ctx.args)
            grad_target = grad_target.to(target.dtype) if ctx.needs_input_grad[1] else None
            grad_weight = grad_weight.to(weight.dtype) if ctx.needs_input_grad[2] else None
        return grad_x, grad_target, grad_weight, None, None, None, None, None, None


# --------------------------------------------------------------------------- public API
def _over_denominator(num, denom: torch.Tensor, smoothing: float) -> torch.Tensor:
    """``num / denom`` as torch forms a mean when ``denom`` is 0. Without label smoothing
    that is the plain quotient: 0 / 0 = NaN for a batch with every target ignored or of
    weight 0, +-inf when mixed-sign class weights cancel. With smoothing torch divides the
    target and smoothing sums separately; with non-negative weights the target sum is then
    0 (NaN), so the mean is NaN although the smoothing made the sum non-zero, and so is
    its gradient everywhere."""
    q = num / denom
    return torch.where(denom == 0, math.nan, q) if smoothing > 0 else q


def mean_of(loss: torch.Tensor, denom: torch.Tensor, smoothing: float) -> torch.Tensor:
    """The mean reduction: ``sum(loss) / denom`` (see ``_over_denominator``)."""
    return _over_denominator(loss.sum(), denom, smoothing)


def reduced(loss: torch.Tensor, denom: torch.Tensor, reduction: str, smoothing: float):
    """Per-row losses reduced: as they are, their sum, or their mean (``mean_of``)."""
    if reduction == "sum":
        return loss.sum()
    return mean_of(loss, denom, smoothing) if reduction == "mean" else loss


def grad_scale_of(denom: torch.Tensor, reduction: str, smoothing: float) -> torch.Tensor:
    """The gradient's scale: ``1 / denom`` for a mean (see ``_over_denominator``), else 1."""
    if reduction != "mean":
        return torch.ones((), dtype=denom.dtype, device=denom.device)
    return _over_denominator(1.0, denom, smoothing) if smoothing > 0 else denom.reciprocal()


def _reduction_scalars(t, weight, ignore_index, reduction, prob_target, C, acc, smoothing):
    """The mean's denominator and ``scalars = [grad_scale, sum(weight)]`` as device values, so
    nothing downstream needs the host: the gradient scale is 1/denominator for a mean."""
    device = t.device
    if prob_target:
        denom = torch.full((), t.shape[0], dtype=acc, device=device)  # (symbolic under export)
    else:
        valid = t != ignore_index
        if weight is not None:
            # where, not times: an inf (or NaN) weight of the ignored class is left out
            w_t = weight.to(acc)[t.long().clamp(0, max(C - 1, 0))]
            denom = torch.where(valid, w_t, 0.0).sum()
        else:
            denom = valid.sum(dtype=acc)
    w_sum = weight.to(acc).sum() if weight is not None else torch.full((), C, dtype=acc, device=device)
    # Constants for autograd: the ops' backward forms every gradient (a class weight that
    # requires grad is torch's error where the denominator holds it); an input path that
    # returned no gradient made compiled autograd add None.
    return denom.detach(), torch.stack([grad_scale_of(denom, reduction, smoothing), w_sum]).detach()


def _target_dtype_error(input: torch.Tensor, target: torch.Tensor) -> RuntimeError:
    """torch's error for an index target of the wrong dtype: a RuntimeError on the CPU, a
    NotImplementedError (its subclass) from the CUDA kernel's dtype dispatch."""
    kind = NotImplementedError if input.device.type == "cuda" else RuntimeError
    return kind(f"expected target dtype to be Long or Byte, but got {_type_name(target.dtype)}")


def widen_int32_target(target, ignore_index: int):
    """An int32 class-index target as int64 where ``ignore_index`` lies outside int32's
    range: compared with an int32 tensor, torch wraps the Python int (``2**32 + 1`` would
    ignore class 1), and an int64 target ignores nothing there."""
    if (isinstance(target, torch.Tensor) and target.dtype == torch.int32
            and not -2**31 <= ignore_index < 2**31):
        return target.long()
    return target


def check_ignore_index(ignore_index, fn: str = "cross_entropy") -> int:
    """torch's argument parser: an int (anything with ``__index__``, not a bool)."""
    index = as_symint(ignore_index)
    if index is None:
        raise TypeError(f"{fn}(): argument 'ignore_index' must be int, not "
                        f"{type(ignore_index).__name__}")
    if not -2**63 <= index < 2**63:
        raise ValueError("Overflow when unpacking long long")
    return index


def reduction_name(reduction):
    """torch's deprecated alias ``'elementwise_mean'`` as ``'mean'``, with torch's warning;
    any other value as it is (checked later, in torch's order)."""
    if reduction == "elementwise_mean":
        return _REDUCTIONS[torch.nn._reduction.get_enum(reduction)]
    return reduction


def smoothing_value(label_smoothing) -> float:
    """The smoothing applied: torch applies it only when ``> 0`` (a negative value or NaN
    is no smoothing)."""
    return float(label_smoothing) if label_smoothing > 0 else 0.0


def check_smoothing_range(label_smoothing) -> None:
    """torch's error for ``label_smoothing > 1`` (a negative value or NaN is no smoothing),
    the value printed as C++ prints a double (``%g``: ``2.0`` as ``2``)."""
    if label_smoothing > 1.0:
        raise RuntimeError("label_smoothing must be between 0.0 and 1.0. "
                           f"Got: {float(label_smoothing):g}")


def check_smoothing_type(label_smoothing):
    """torch's argument parser for the float ``label_smoothing``: a Python int, float or
    bool, a numpy scalar (bool and complex included: the real part, with numpy's
    ``ComplexWarning``), or a 0-d tensor without autograd history (complex only with a
    zero imaginary part); anything else (a string, None, a ``Fraction``, a Python complex,
    a 1-element tensor, a numpy array) is its TypeError. Returns the value, real."""
    if isinstance(label_smoothing, torch.Tensor):
        ok = label_smoothing.dim() == 0 and not label_smoothing.requires_grad
        if ok and label_smoothing.is_complex():
            if label_smoothing.imag != 0:
                raise RuntimeError("value cannot be converted to type double without overflow")
            label_smoothing = label_smoothing.real
    else:
        ok = isinstance(label_smoothing, (np.number, np.bool_)) or (
            isinstance(label_smoothing, (int, float)) and not isinstance(label_smoothing, complex))
        if isinstance(label_smoothing, np.complexfloating):
            label_smoothing = np.float64(label_smoothing)  # numpy's warning, as torch's
    if not ok:
        kind = type(label_smoothing)
        name = kind.__name__ if kind.__module__ == "builtins" else \
            f"{kind.__module__.split('.')[0]}.{kind.__name__}"
        if isinstance(label_smoothing, torch.Tensor):
            name = "Tensor"
        raise TypeError("cross_entropy_loss(): argument 'label_smoothing' (position 6) must "
                        f"be float, not {name}")
    return label_smoothing


def _check_args(input, target, weight, ignore_index, reduction, label_smoothing,
                input_dtype=None):
    """torch's checks, torch's error types and messages, in torch's order (the extras'
    are ``check_extras``). ``input_dtype``: the dtype torch computes ``input`` in (fp32 for
    fp16 / bf16 under autocast). Returns ``(C, prob_target, label_smoothing)``, the last
    as ``check_smoothing_type`` parses it."""
    if not all(isinstance(a, torch.Tensor) for a in (input, target)) or not (
            weight is None or isinstance(weight, torch.Tensor)):
        raise TypeError("cross_entropy(): input, target and weight must be Tensors")
    ignore_index = check_ignore_index(ignore_index)
    if reduction not in _REDUCTIONS:  # torch parses the reduction before the dtype
        raise ValueError(f"{reduction} is not a valid value for reduction")
    label_smoothing = check_smoothing_type(label_smoothing)
    check_float("cross_entropy", input)
    check_smoothing_range(label_smoothing)
    if input.dim() == 0:
        if target.dim() == 0 and target.is_floating_point():  # torch: a probability target
            raise IndexError("Dimension specified as 1 but tensor has no dimensions")
        if target.dim() == 0:
            raise RuntimeError("Expected floating point type for target with class "
                               f"probabilities, got {_type_name(target.dtype)}")
        raise RuntimeError("cross_entropy: input must have at least 1 dimension (the classes)")
    C = input.shape[0 if input.dim() == 1 else 1]
    prob_target = target.shape == input.shape
    if prob_target:
        if not target.is_floating_point():
            raise RuntimeError(
                f"Expected floating point type for target with class probabilities, got {_type_name(target.dtype)}")
        if ignore_index >= 0:
            raise RuntimeError("ignore_index is not supported for floating point target")
    else:
        check_index_target(input, target, reduction)
    if weight is not None:
        # torch's nll_loss takes any weight of C elements for (N, C, d...) inputs
        if weight.numel() != C or (weight.dim() != 1 and (input.dim() <= 2 or prob_target)):
            raise RuntimeError(
                f"weight tensor should be defined either for all {C} classes or no classes "
                f"but got weight tensor of shape: {list(weight.shape)}")
        if weight.requires_grad and torch.is_grad_enabled() and not prob_target:
            raise RuntimeError(  # torch's error: nll_loss has no gradient for its weight
                "the derivative for 'weight' is not implemented: cross_entropy with class-index "
                "targets is not differentiable with respect to argument 'weight'")
        input_dtype = input_dtype or input.dtype
        if weight.dtype != input_dtype and not prob_target:
            raise RuntimeError(
                f"expected scalar type {_type_name(input_dtype)} but found {_type_name(weight.dtype)}")
    for name, t in (("target", target), ("weight", weight)):
        if t is not None and t.device != input.device:
            raise RuntimeError(
                f"Expected all tensors to be on the same device, but found {name} on {t.device} "
                f"and input on {input.device}")
    if not prob_target:
        check_uint8_smoothed_mean(target, weight, label_smoothing, reduction, ignore_index)
    return C, prob_target, label_smoothing


def check_uint8_smoothed_mean(target, weight, label_smoothing, reduction, ignore_index) -> None:
    """torch's error for a uint8 class-index target with a class weight, label smoothing
    and a mean: its smoothing term gathers the kept targets' weights with the bytes as
    indices (no error where no target is kept: an empty batch, or every target ignored)."""
    if not (target.dtype == torch.uint8 and weight is not None and label_smoothing > 0
            and reduction == "mean" and target.numel()):
        return
    if 0 <= ignore_index < 256:  # some targets may be ignored: ask the values (a host
        # synchronisation, on this rare combination only; a compiled graph, or one being
        # captured for CUDA graphs, goes on)
        if (torch.compiler.is_compiling()
                or (target.is_cuda and torch.cuda.is_current_stream_capturing())
                or not bool((target != ignore_index).any())):
            return
    raise RuntimeError("gather(): Expected dtype int32/int64 for index")


def check_index_target(input, target, reduction) -> None:
    """torch's checks of a class-index ``target`` against ``input`` (at least 1-D): its
    error types and messages, in its order."""
    if input.dim() >= 2 and target.dim() == 0:  # torch checks the batch size first
        raise ValueError(f"Expected input batch_size ({input.shape[0]}) to match "
                         "target batch_size (0).")
    if input.dim() >= 2 and target.shape[0] != input.shape[0]:
        raise ValueError(f"Expected input batch_size ({input.shape[0]}) to match "
                         f"target batch_size ({target.shape[0]}).")
    if target.dtype not in _INDEX_DTYPES:
        raise _target_dtype_error(input, target)
    if input.dim() == 1:
        if target.dim() > 1:
            raise RuntimeError("0D or 1D target tensor expected, multi-target not supported")
        if target.dim() == 1 and target.shape[0] != 1:
            raise ValueError(
                f"For 1D input, 1D target must have size 1, but got target size: {target.shape[0]}")
        return
    if input.dim() == 2 and target.dim() != 1:
        raise RuntimeError("0D or 1D target tensor expected, multi-target not supported")
    expected = [input.shape[0]] + list(input.shape[2:])
    if input.dim() > 2 and list(target.shape) != expected:
        raise RuntimeError(f"Expected target size {expected}, got {list(target.shape)}")
    if input.dim() > 2 and target.dtype == torch.uint8 and (target.numel() or (
            reduction == "none" and input.device.type == "cpu")):
        # torch takes an empty one to reduce, and on CUDA any empty one
        raise RuntimeError("expected scalar type Long but found Byte")


def _check_real(fn: str, name: str, value) -> None:
    """torch's argument parser's rule for a float argument: a real number (a bool or a numpy
    scalar too; a symbolic one under ``torch.compile``), or a 0-d tensor that does not
    require grad. The extras are not differentiable: a tensor that requires grad would lose
    its gradient without a word, so it is refused."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 and not value.requires_grad and not value.is_complex():
            return
        why = ("requires grad (the extras are constants, not differentiable)"
               if value.requires_grad else f"has shape {tuple(value.shape)}, dtype {value.dtype}")
        raise TypeError(f"fused_softmax.{fn}: {name} must be a real number or a 0-d tensor "
                        f"that does not require grad, but got a tensor that {why}")
    if not isinstance(value, (numbers.Real, torch.SymInt, torch.SymFloat)):
        raise TypeError(f"fused_softmax.{fn}: {name} must be a real number, not "
                        f"{type(value).__name__}")


def check_flag(fn: str, name: str, value) -> None:
    """A yes / no extra: a bool (or a numpy bool), as torch's parser takes for its bools."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"fused_softmax.{fn}: {name} must be a bool, not {type(value).__name__}")


def check_extras(logit_scale, softcap, z_loss, fn: str = "cross_entropy") -> None:
    """The extras' own checks (torch has no such arguments): numbers as torch takes a float,
    ``logit_scale`` finite, ``softcap`` finite and > 0 or None, ``z_loss`` finite and >= 0."""
    _check_real(fn, "logit_scale", logit_scale)
    if not is_finite(logit_scale):
        raise ValueError(f"logit_scale must be finite, got {logit_scale}")
    if softcap is not None:
        _check_real(fn, "softcap", softcap)
        if not (softcap > 0 and is_finite(softcap)):
            raise ValueError(f"softcap must be a finite number > 0 or None, got {softcap}")
    _check_real(fn, "z_loss", z_loss)
    if not (z_loss >= 0 and is_finite(z_loss)):
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss}")


#: What the checks that mirror torch's raise.
CHECK_ERRORS = (TypeError, ValueError, RuntimeError, IndexError, NotImplementedError)


def raise_torchs_error(ours: Exception, torch_fn, **call):
    """The checks refused a call: raise torch's own error for it, word for word and in
    torch's order of checks, by making torch's call (``torch_fn(**call)``); ours where
    torch takes it. The extras are checked before (torch would compute a whole loss where
    only they are wrong), and int32 targets, which torch refuses and we take, reach torch
    as int64, so that its error is about what is really wrong."""
    target = call.get("target")
    if isinstance(target, torch.Tensor) and target.dtype == torch.int32:
        call["target"] = target.long()
    try:
        torch_fn(**call)
    except Exception as theirs:  # noqa: BLE001 - whatever torch raises is the contract
        if type(theirs) is type(ours) and _TARGET_DISPATCH_ERROR.fullmatch(str(theirs)):
            raise ours from None  # torch's words name its CUDA kernel, not the target
        raise theirs.with_traceback(None) from None
    raise ours


#: The CUDA nll_loss kernels' dtype dispatch refusing a target: '"nll_loss_..._index" not
#: implemented for 'Float''. (Other dispatch errors, such as log_softmax's for an integer
#: input, name the input's dtype and are torch's words.)
_TARGET_DISPATCH_ERROR = re.compile(r"\"nll_loss\w*_index\" not implemented for '\w+'")


#: Devices whose kernels mark a row with an out-of-range class index NaN, with no host
#: synchronisation (elsewhere torch's own rule: the CPU's IndexError).
NAN_ROW_DEVICES = ("cuda",)


def _no_classes_loss(input, target, weight, ignore_index, reduction, label_smoothing,
                     prob_target):
    """The loss over zero classes, where every class index is out of range: torch's on
    the CPU (zeros, NaN where all rows are ignored, or its IndexError) and on devices the
    kernels do not serve. On CUDA each non-ignored row is NaN, as in the kernels (torch's
    CUDA loss would hit a device-side assert, which ends the process's CUDA context)."""
    if prob_target or input.device.type not in NAN_ROW_DEVICES:
        return torch_cross_entropy(input, target, weight, ignore_index, reduction,
                                   label_smoothing)
    ignored = torch.full(target.shape, ignore_index, dtype=torch.long, device=target.device)
    loss = torch_cross_entropy(input, ignored, weight, ignore_index, reduction, label_smoothing)
    if reduction == "mean":  # 0 / 0 already: NaN
        return loss
    nan = torch.where(target.long() != ignore_index, math.nan, 0.0).to(loss.dtype)
    return loss + (nan if reduction == "none" else nan.sum())


def _type_name(dtype: torch.dtype) -> str:
    return torch.empty(0, dtype=dtype).type().split(".")[-1].replace("Tensor", "")


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    size_average: Optional[bool] = None,
    ignore_index: int = -100,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    z_loss: float = 0.0,
    return_lse: bool = False,
    inplace_backward: bool = False,
):
    r"""Cross-entropy between logits and targets, fused: loss and gradient in one pass.

    Drop-in for :func:`torch.nn.functional.cross_entropy` (the first eight arguments mean
    exactly what they mean there). The log-softmax is never materialised: one Triton kernel
    reads each row of logits, computes ``lse = log(sum(exp(z)))`` online, the loss, and —
    when ``input`` requires grad — the gradient ``softmax(z) - target`` (with weights and
    smoothing), so the backward pass only rescales it by ``grad_output``.

    Args:
        input (Tensor): logits, ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)``; float16,
            bfloat16, float32 or float64. Accumulation is fp32 (fp64 for fp64).
        target (Tensor): class indices (int64 or uint8 as torch; int32 also accepted) of
            shape ``()``, ``(N,)`` or ``(N, d1, ..., dk)``, or class probabilities of
            ``input``'s shape (floating point; the loss takes torch's promoted dtype, and
            an fp64 target or weight with narrower logits is computed in fp64, as torch's
            fp64 products and sums).
        weight (Tensor, optional): per-class weights ``(C,)``, ``input``'s dtype.
        size_average, reduce: deprecated, as in torch.
        ignore_index (int): target value that contributes neither loss nor gradient (any
            value, also one in ``[0, C)``); index targets only. An ignored row's gradient is
            0 whatever its logits, the class weights or ``grad_output`` hold (torch gives
            NaN for an ignored row holding +inf or NaN logits, for an all ``-inf`` row, and,
            with label smoothing, for an inf or NaN class weight).
        reduction (str): ``'none'`` | ``'mean'`` | ``'sum'``. ``'mean'`` divides by the sum of
            the target weights of non-ignored elements (by their count without ``weight``;
            by the number of rows for probability targets); all ignored gives NaN.
        label_smoothing (float): in ``[0, 1]``; torch's formula, with or without weights.
        logit_scale (float, keyword-only): multiply the logits first (``1 / temperature``).
            It, ``softcap`` and ``z_loss`` take what torch takes for a float (a Python or
            numpy number, a 0-d tensor without grad) and are constants: a tensor that
            requires grad is refused, as its gradient would be lost.
        softcap (float, keyword-only): ``z = softcap * tanh(z / softcap)`` after scaling
            (Gemma-2); the gradient goes through it.
        z_loss (float, keyword-only): add ``z_loss * lse**2`` (``z_loss`` finite, >= 0) to
            each non-ignored row's loss (PaLM), reduced with it: ``'mean'`` divides the
            rows' sum, z-loss included, by the same denominator (the target weights' sum
            with ``weight``).
        return_lse (bool, keyword-only): also return the per-row log-sum-exp of the
            (scaled, capped) logits, shaped like ``target`` (without the class dim for
            probability targets), in the accumulation dtype (fp32, fp64 for fp64 input);
            not differentiable. As :func:`torch.logsumexp`: ``+inf`` for a row holding
            ``+inf``, ``-inf`` for an all ``-inf`` row.
        inplace_backward (bool, keyword-only): write the gradient over ``input``'s storage
            instead of a new buffer (saves one logits-sized allocation). ``input`` is
            overwritten: use only when nothing else reads the logits afterwards. Off by
            default; when off, ``input`` is never modified. (Where the rows are a copy,
            the copy takes the gradient and ``input`` is left as it is: computed in fp64
            for an fp64 probability target or weight, or ``(N, C, d1, ...)`` logits whose
            classes are not innermost in memory, moved to rows of classes.)

    Returns:
        The loss in ``input``'s dtype: a scalar, or ``target``'s shape for
        ``reduction='none'``; ``(loss, lse)`` when ``return_lse``. Under autocast (CPU or
        CUDA) fp16 / bf16 logits give an fp32 loss computed from fp32 log-probabilities,
        torch's CPU-autocast result; torch's CUDA autocast rounds its log-probabilities to
        the logits' dtype first (README, Limitations).

    Gradients come from the fused kernel; with ``create_graph=True`` (double backward) they
    are recomputed with torch ops from the saved logits, so second derivatives are exact.

    Out-of-range targets: on CPU an ``IndexError`` naming the value, as torch. On CUDA the
    kernel never uses such a target as an address; that row's loss and gradient are NaN
    (so a mean loss is NaN), with no host synchronisation to find out.

    Example::

        >>> logits = torch.randn(8, 32000, requires_grad=True)
        >>> target = torch.randint(0, 32000, (8,))
        >>> loss = fused_softmax.cross_entropy(logits, target, label_smoothing=0.1)
        >>> loss.backward()
    """
    if torch_function_dispatch(input, target, weight):  # torch.fx, __torch_function__
        return handle_torch_function(
            cross_entropy, (input, target, weight), input, target, weight=weight,
            size_average=size_average, ignore_index=ignore_index, reduce=reduce,
            reduction=reduction, label_smoothing=label_smoothing, logit_scale=logit_scale,
            softcap=softcap, z_loss=z_loss, return_lse=return_lse,
            inplace_backward=inplace_backward)
    if size_average is not None or reduce is not None:
        if torch.compiler.is_compiling():  # torch's mapping, without its warning: Dynamo
            # traces neither warnings.warn nor torch's helper (it returns no tensor)
            keep_size_average = size_average is None or bool(size_average)
            keep_reduce = reduce is None or bool(reduce)
            reduction = "mean" if keep_size_average and keep_reduce else (
                "sum" if keep_reduce else "none")
        else:
            reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    reduction = reduction_name(reduction)
    input_dtype = None
    if isinstance(input, torch.Tensor) and autocast_fp32_active("cross_entropy", input.device.type):
        # torch casts fp16 / bf16 operands to fp32 under autocast; the kernel computes in fp32
        # already, so the logits are not copied: only the loss comes back in fp32.
        weight, target = fp32_if_low(weight), fp32_if_low(target)
        input_dtype = torch.float32 if input.dtype in LOW_FLOATS else None
    check_extras(logit_scale, softcap, z_loss)
    check_flag("cross_entropy", "return_lse", return_lse)
    check_flag("cross_entropy", "inplace_backward", inplace_backward)
    try:
        C, prob_target, label_smoothing = _check_args(
            input, target, weight, ignore_index, reduction, label_smoothing, input_dtype)
    except CHECK_ERRORS as ours:
        raise_torchs_error(ours, torch_cross_entropy, input=input, target=target, weight=weight,
                           ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
    ignore_index = as_symint(ignore_index)
    label_smoothing = smoothing_value(label_smoothing)
    watched = watched_by_torch(input.dim(), target, weight, prob_target, label_smoothing)
    target = widen_int32_target(target, ignore_index)
    if C == 0:  # nothing to fuse: torch's own answers (zeros, NaN, or its IndexError)
        loss = _no_classes_loss(input, target, weight, ignore_index, reduction,
                                label_smoothing, prob_target)
        if return_lse:
            lead = (input.shape[:1] + input.shape[2:]) if prob_target else target.shape
            return loss, torch.full(lead, -math.inf, dtype=acc_dtype(input.dtype),
                                    device=input.device)
        return loss
    if needs_torch_ops(input, target, weight):  # torch.func, forward-mode AD, DTensor, ...
        if z_loss != 0 or return_lse:
            raise NotImplementedError(
                "fused_softmax.cross_entropy: z_loss and return_lse are not supported under "
                "torch.func transforms or forward-mode AD, nor for tensor subclasses")
        return torch_cross_entropy(_capped_logits(input, logit_scale, softcap), target, weight,
                                   ignore_index, reduction, label_smoothing)
    target, weight = _kernel_operands(target, weight, prob_target)
    out_dtype = loss_dtype(input_dtype or input.dtype, target, weight, prob_target)
    lse_dtype = acc = acc_dtype(input.dtype)
    if acc_dtype(out_dtype) != acc:
        # fp32 (or narrower) logits with an fp64 probability target or weight: torch's
        # products and sums are fp64, and so are ours (fp32 sums lost ~3x torch's accuracy)
        input, acc = input.to(torch.float64), torch.float64

    # Rows of C contiguous logits: (C,) -> (1, C); (N, C, d...) -> (N * d..., C).
    if input.dim() == 1:
        x = input.unsqueeze(0)
        t = target.reshape(1, C) if prob_target else target.reshape(1)
    elif input.dim() == 2:
        x, t = input, target
    else:
        # (with inplace_backward over rows that view the logits, the gradient stays where
        # the kernel wrote it; over a copy of them, _ClassesLast hands it back contiguous,
        # as without inplace_backward)
        x = classes_last(input, grad_layout=not inplace_backward or not _rows_view(input))
        t = classes_last(target) if prob_target else target.reshape(-1)
    if x.stride(-1) != 1:
        x = x.contiguous()
    t = t.contiguous()
    if inplace_backward and x.shape[0] > 1 and x.stride(0) < C:
        # rows sharing memory (an expanded row): no place to write (from the strides, which
        # torch.compile can trace; unit stride along the classes is ensured above)
        inplace_backward = False

    denom, scalars = _reduction_scalars(t, weight, ignore_index, reduction, prob_target, C, acc,
                                        label_smoothing)

    args = (ignore_index, float(label_smoothing), float(logit_scale),
            float(softcap) if softcap is not None else 0.0, float(z_loss), prob_target)
    if exporting():
        # torch.export keeps the custom ops, not the autograd.Function: the op alone, with
        # no gradient formed in the forward (an exported program is mostly run for
        # inference); its registered autograd forms one if the program is trained
        loss, lse, _ = cross_entropy_fwd(x, t, weight, scalars, *args, False)
        loss, lse = reduced(loss, denom, reduction, args[1]), lse.detach()
    else:
        loss, lse = CrossEntropyFunction.apply(x, t, weight, scalars, denom, reduction,
                                               inplace_backward, args, torch.is_grad_enabled())
    track_versions(loss, *watched)
    loss = loss.to(out_dtype)
    if input.dim() == 1:
        lead = ()
    else:
        lead = (input.shape[:1] + input.shape[2:]) if prob_target else target.shape
    if reduction == "none":
        loss = loss.reshape(lead)
    if return_lse:
        return loss, lse.to(lse_dtype).reshape(lead)
    return loss
