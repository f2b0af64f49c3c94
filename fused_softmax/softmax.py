"""softmax, log_softmax and logsumexp: public functions, autograd, custom ops, launchers.

Device code: ``kernels/softmax.py``. One forward kernel serves the three ops through a
constexpr ``MODE``; one backward kernel serves their gradients.
"""

from __future__ import annotations

import functools
import math
import operator
import warnings
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch.overrides import handle_torch_function

from . import _backend
from ._backend import (FLOAT_DTYPES, LOW_FLOATS, acc_dtype, autocast_to_fp32, check_float,
                       float_bits, is_finite, needs_torch_ops, torch_function_dispatch,
                       use_triton, wrap_dim)

if _backend.HAS_TRITON:
    import triton

    from .kernels import softmax as _k

SOFTMAX, LOG_SOFTMAX, LOGSUMEXP = 0, 1, 2
_NAMES = {SOFTMAX: "softmax", LOG_SOFTMAX: "log_softmax", LOGSUMEXP: "logsumexp"}


# --------------------------------------------------------------------------- launchers
def merged(sizes, strides):
    """Consecutive dims ``(sizes, strides)`` collapsed into one ``(size, stride)`` as a view
    would; None if they do not collapse."""
    dims = [(s, st) for s, st in zip(sizes, strides) if s != 1]
    if not dims:
        return 1, 0
    for (s0, st0), (s1, st1) in zip(dims, dims[1:]):
        if st0 != st1 * s1:
            return None
    return math.prod(sizes), dims[-1][1]


def view3d(t: torch.Tensor, dim: int):
    """View ``t`` as ``(M, N, K)`` around ``dim`` without copying when its strides allow.

    Returns ``(t, (M, N, K), (sm, sn, sk))``; ``t`` is made contiguous only when the
    dimensions before or after ``dim`` cannot be merged into one strided dimension.
    """

    for attempt in range(2):
        sizes, strides = t.shape, t.stride()
        outer = merged(sizes[:dim], strides[:dim])
        inner = merged(sizes[dim + 1:], strides[dim + 1:])
        if outer is not None and inner is not None:
            return t, (outer[0], sizes[dim], inner[0]), (outer[1], strides[dim], inner[1])
        t = t.contiguous()
    raise AssertionError("a contiguous tensor always collapses")


def launch_config(t: torch.Tensor, shape, strides, strides_n=None):
    """Tile shape, pass count, warps and persistent grid for a ``(M, N, K)`` reduction.

    Tiles hold at most ``max_tile`` elements in registers (by element size). Rows along a
    unit-stride dimension get ``BLOCK_N`` = the padded row (several rows per tile when
    rows are short); a strided reduction gets ``BLOCK_R`` contiguous positions per tile so
    every load is a coalesced run.
    """
    cfg, grid = _launch_config(tuple(shape), tuple(strides), tuple(strides_n or (strides[1],)),
                               t.element_size(), t.device.type == "cuda",
                               _backend.num_programs_per_wave(t.device))
    return dict(cfg), grid  # a copy: the cached one stays as computed


@functools.lru_cache(maxsize=4096)  # pure in its arguments; a few microseconds a call saved
def _launch_config(shape, strides, strides_n, elem, on_cuda, per_wave):
    M, N, K = shape
    n_pos = M * K
    max_tile = {2: 32768, 4: 16384}.get(elem, 8192)
    n_pad = triton.next_power_of_2(max(N, 1))
    pos_pad = triton.next_power_of_2(max(n_pos, 1))
    if strides[1] == 1 or K == 1:  # reduce along rows
        if n_pad <= max_tile:
            block_n, single = n_pad, True
            block_r = min(max(1, 4096 // n_pad), pos_pad)
        else:
            block_n, single, block_r = max_tile // 2, False, 1
    else:  # reduce across rows; positions are the contiguous axis
        block_r = min(64, pos_pad)
        single = block_r * n_pad <= max_tile // 2
        block_n = n_pad if single else max(1, (max_tile // 4) // block_r)
    tile = block_r * block_n
    wide = (N - 1) * max(abs(st) for st in strides_n) >= 2**31
    n_tiles = triton.cdiv(n_pos, block_r)
    if single and (strides[1] == 1 or K == 1) and tile <= 8192 and on_cuda:
        # Short rows: one program per tile; 32 elements per thread where a tile holds
        # several rows, 16 where it holds one (at most 8 warps: 16 is untimed). H200
        # sweeps (bench/results/tune-h200-2026-11-26*.json, bf16, 2^28 elements):
        # N = 1024 (4 rows, 4 warps) 0.262 ms against 0.319 ms for 8 warps in a persistent
        # grid; N = 4096 (one row) 0.263 ms with 8 warps against 0.309 with 4 (0.264 and
        # 0.262 in the first run) and 0.289 persistent.
        warps = block_n // 512 if block_r == 1 else tile // 1024
        return dict(BLOCK_R=block_r, BLOCK_N=block_n, SINGLE_PASS=single, WIDE=wide,
                    num_warps=max(4, min(8, warps))), n_tiles
    num_warps = min(32, max(4, tile // 512))
    waves = 8 if single else 2
    grid = min(n_tiles, per_wave * waves)
    return dict(BLOCK_R=block_r, BLOCK_N=block_n, SINGLE_PASS=single, WIDE=wide,
                num_warps=num_warps), grid


def _tl_acc(dtype: torch.dtype):
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


def _launch_fwd(x: torch.Tensor, dim: int, mode: int, t: float, config=None,
                out_dtype=None, divide: bool = False) -> torch.Tensor:
    if mode == LOGSUMEXP:  # out_dtype: the result's, else the accumulator's
        out_shape = x.shape[:dim] + x.shape[dim + 1:]
        y = torch.empty(out_shape, dtype=out_dtype or acc_dtype(x.dtype), device=x.device)
    else:  # out_dtype: a wider dtype (fp16 -> fp32, ...), read narrow, computed and written wide
        y = torch.empty(x.shape, dtype=out_dtype or x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    if x.shape[dim] == 0:  # log-sum-exp of nothing
        return y.fill_(-math.inf)
    xv, shape, sx = view3d(x, dim)
    _, _, sy = view3d(y, dim) if mode != LOGSUMEXP else (None, None, (0, 0, 0))
    cfg, grid = config or launch_config(xv, shape, sx, (sx[1], sy[1]))
    M, N, K = shape
    _backend.launch(
        _k.softmax_fwd_kernel, grid,
        xv, y, M * K, N, K, *sx, *sy, float_bits(t),
        MODE=mode, ACC=_tl_acc(x.dtype if mode == LOGSUMEXP else y.dtype), **cfg,
        SCALE=_scale_kind(t, mode, y.dtype), DIVIDE=divide,
    )
    return y


def _scale_kind(t: float, mode: int, y_dtype: torch.dtype) -> int:
    """The forward's ``SCALE``: nothing at ``T = 1``; else ``x / T``, rounded to an
    fp16 / bf16 output as torch's ``softmax(x / T)``."""
    if t == 1.0:
        return _k.SCALE_NONE.value
    if mode != LOGSUMEXP and y_dtype in LOW_FLOATS:
        return _k.SCALE_ROUND.value
    return _k.SCALE_MUL.value


def _launch_bwd(saved, grad, lse, dim: int, mode: int, t: float, config=None,
                dx_dtype=None, divide: bool = False) -> torch.Tensor:
    dx = torch.empty(saved.shape, dtype=dx_dtype or saved.dtype, device=saved.device)
    if dx.numel() == 0:
        return dx
    sv, shape, ss = view3d(saved, dim)
    if mode == LOGSUMEXP:
        gv, sg = grad.reshape(-1).to(acc_dtype(saved.dtype)).contiguous(), (0, 0, 0)
        lse = lse.reshape(-1).contiguous()
    else:
        gv, _, sg = view3d(grad, dim)
    _, _, sdx = view3d(dx, dim)
    cfg, grid = config or launch_config(sv, shape, ss, (ss[1], sg[1], sdx[1]))
    M, N, K = shape
    _backend.launch(
        _k.softmax_bwd_kernel, grid,
        sv, gv, dx, lse, M * K, N, K, *ss, *sg, *sdx, float_bits(t),
        MODE=mode, ACC=_tl_acc(saved.dtype), **cfg, DIVIDE=divide,
    )
    return dx


# --------------------------------------------------------------------------- torch path
def _torch_fwd(x, dim, mode, t, divide=False):
    acc = acc_dtype(x.dtype)
    xs = x if t == 1.0 else _scaled(x, t, divide).to(acc)  # x / T rounded to x's dtype
    if mode == SOFTMAX:
        return torch.softmax(xs, dim).to(x.dtype)
    if mode == LOG_SOFTMAX:
        return torch.log_softmax(xs, dim).to(x.dtype)
    return torch.logsumexp(xs.to(acc), dim)  # the caller rounds to out_dtype


def _torch_bwd(saved, grad, lse, dim, mode, t, dx_dtype=None, divide=False):
    acc = acc_dtype(saved.dtype)
    s, g = saved.to(acc), grad.to(acc)
    if mode == SOFTMAX:
        dx = s * (g - (g * s).sum(dim, keepdim=True))
    elif mode == LOG_SOFTMAX:
        dx = g - torch.exp(s) * g.sum(dim, keepdim=True)
    else:
        dx = g.unsqueeze(dim) * torch.exp(_temper(s, t, divide) - lse.unsqueeze(dim))
    return _temper(dx, t, divide).to(dx_dtype or saved.dtype)


# --------------------------------------------------------------------------- custom ops
@_backend.custom_op("fused_softmax::softmax_fwd")
def softmax_fwd(x: torch.Tensor, dim: int, mode: int, inv_temperature: float,
                out_dtype: Optional[torch.dtype] = None, divide: bool = False) -> torch.Tensor:
    """softmax (mode 0), log_softmax (1) or log-sum-exp (2) of ``x * inv_temperature``, or
    with ``divide`` of ``x / inv_temperature`` (which then holds ``T``: torch's CPU
    kernels divide by a scalar, its CUDA kernels multiply by the rounded reciprocal).
    ``out_dtype``, modes 0, 1: a wider float dtype than ``x``'s, as ``x.to(out_dtype)``
    first, without the copy; mode 2: the result's dtype (default: fp32, fp64 for fp64),
    computed in fp32 (fp64) and rounded once. The backward uses that result, as torch's
    does: ``exp(x - result)``."""
    if use_triton(x):
        return _launch_fwd(x, dim, mode, inv_temperature, out_dtype=out_dtype, divide=divide)
    if mode == LOGSUMEXP:
        return _torch_fwd(x, dim, mode, inv_temperature, divide).to(
            out_dtype or acc_dtype(x.dtype))
    return _torch_fwd(x.to(out_dtype) if out_dtype else x, dim, mode, inv_temperature, divide)


@softmax_fwd.register_fake
def _(x, dim, mode, inv_temperature, out_dtype=None, divide=False):
    if mode == LOGSUMEXP:
        return x.new_empty(x.shape[:dim] + x.shape[dim + 1:],
                           dtype=out_dtype or acc_dtype(x.dtype))
    return torch.empty_like(x, dtype=out_dtype or x.dtype, memory_format=torch.contiguous_format)


@_backend.custom_op("fused_softmax::softmax_bwd")
def softmax_bwd(
    saved: torch.Tensor, grad: torch.Tensor, lse: Optional[torch.Tensor],
    dim: int, mode: int, inv_temperature: float, dx_dtype: Optional[torch.dtype] = None,
    divide: bool = False,
) -> torch.Tensor:
    """Gradient of :func:`softmax_fwd`; ``saved`` is its output (modes 0, 1) or input (2).
    ``dx_dtype``: the input's dtype where the forward widened it."""
    if use_triton(saved):
        return _launch_bwd(saved, grad, lse, dim, mode, inv_temperature, dx_dtype=dx_dtype,
                           divide=divide)
    return _torch_bwd(saved, grad, lse, dim, mode, inv_temperature, dx_dtype, divide)


@softmax_bwd.register_fake
def _(saved, grad, lse, dim, mode, inv_temperature, dx_dtype=None, divide=False):
    return torch.empty_like(saved, dtype=dx_dtype or saved.dtype,
                            memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, dim, mode, t, out_dtype, divide = inputs
    ctx.dim, ctx.mode, ctx.t, ctx.divide = dim, mode, t, divide
    ctx.dx_dtype = (x.dtype if mode != LOGSUMEXP and out_dtype is not None
                    and out_dtype != x.dtype else None)
    ctx.save_for_backward(*((x, output) if mode == LOGSUMEXP else (output,)))


def _backward(ctx, grad):
    saved = ctx.saved_tensors
    lse = saved[1] if ctx.mode == LOGSUMEXP else None
    if torch.is_grad_enabled() or needs_torch_ops(grad):
        # create_graph=True: differentiable torch formulas, so double backward is exact
        # (the saved output's own gradient comes back through this op's backward); and a
        # grad_output of a torch.func transform or a forward-AD dual (differentiating the
        # backward with respect to it): the op has no rule for them, torch's ops do.
        dx = _torch_bwd(saved[0], grad, lse, ctx.dim, ctx.mode, ctx.t, ctx.dx_dtype,
                        ctx.divide)
    else:
        dx = _backend.call(softmax_bwd, saved[0], grad, lse, ctx.dim, ctx.mode, ctx.t,
                           ctx.dx_dtype, ctx.divide)
    return dx, None, None, None, None, None


softmax_fwd.register_autograd(_backward, setup_context=_setup_context)


class _SoftmaxFunction(torch.autograd.Function):
    """``softmax_fwd`` with its registered autograd, for eager calls that skip the
    dispatcher (``_backend.dispatch_free``)."""

    @staticmethod
    def forward(ctx, x, dim, mode, t, out_dtype, divide):
        y = softmax_fwd.eager(x, dim, mode, t, out_dtype, divide)
        _setup_context(ctx, (x, dim, mode, t, out_dtype, divide), y)
        return y

    backward = staticmethod(_backward)


def _apply(x, dim, mode, t, out_dtype=None, divide=False):
    if not _backend.dispatch_free((x,)):
        return softmax_fwd(x, dim, mode, t, out_dtype, divide)
    if x.requires_grad and torch.is_grad_enabled():
        return _SoftmaxFunction.apply(x, dim, mode, t, out_dtype, divide)
    return softmax_fwd.eager(x, dim, mode, t, out_dtype, divide)


# fp16/bf16 -> fp64 still casts first: its backward would round fp64 straight to bf16
# (mishandled by the interpreter) and its fp64 tiles, sized by the 2-byte input, spill.
_WIDER = {torch.float32: (torch.float16, torch.bfloat16), torch.float64: (torch.float32,)}


def _widening(src: torch.dtype, dst: torch.dtype) -> bool:
    """``x.to(dst)`` is exact (a wider float): the kernels fold it into their read."""
    return src in _WIDER.get(dst, ())


# --------------------------------------------------------------------------- public API
def _legacy_softmax_dim(name: str, ndim: int, stacklevel: int) -> int:
    if not torch.compiler.is_compiling():  # Dynamo cannot trace warnings.warn: a graph break
        warnings.warn(
            f"Implicit dimension choice for {name} has been deprecated. "
            "Change the call to include dim=X as an argument.",
            stacklevel=stacklevel,
        )
    return 0 if ndim in (0, 1, 3) else 1


def _temper(x: torch.Tensor, t: float, divide: bool) -> torch.Tensor:
    """``x / T`` as the kernels' ``temper``: ``x * t`` (``t = 1 / T``) or ``x / t``."""
    return x / t if divide else x * t


def _scaled(x: torch.Tensor, t: float, divide: bool = False) -> torch.Tensor:
    """``x / T`` (``_temper``) in ``x``'s dtype (computed in fp32 and rounded for fp16 /
    bf16, as torch's ``x / T``), keeping ``-inf`` where ``1 / T`` rounds to 0 (the
    kernels' ``scale``)."""
    return torch.where(x == -math.inf, x, _temper(x, t, divide))


def _temperature_factor(temperature, dtype: torch.dtype, device: torch.device):
    """``(t, divide)``: how torch forms ``x / T`` for a ``dtype`` tensor on ``device``.
    CUDA multiplies by ``t = 1 / T``: in fp32 (``1 / fl32(T)`` rounded to fp32) below
    fp64, in fp64 for fp64. The CPU divides (``divide``) by ``t = T``, rounded to fp32
    below fp64 (and the kernels then divide too: the results equal torch's bit for bit
    before the softmax). ``None`` where ``T`` overflows fp32, or, multiplying (CUDA),
    where ``1 / T`` does (a subnormal ``T``): there ``x * (1 / T)`` is not ``x / T``
    (``0 * inf`` is NaN, ``0 / T`` is 0), and the caller divides with torch's own
    ``x / T``; dividing (CPU), a subnormal ``T`` is ``(T, True)``."""
    bad_type = isinstance(temperature, (str, bytes, bool)) or temperature is None
    try:
        t = temperature if isinstance(temperature, torch.SymFloat) else float(temperature)
    except (TypeError, ValueError):
        bad_type = True
    if bad_type:
        raise TypeError("temperature must be a number or a tensor, not "
                        f"{type(temperature).__name__}")
    if not (t > 0.0 and is_finite(t)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    divide = device.type == "cpu"
    if isinstance(t, torch.SymFloat):
        return (t, True) if divide else (1.0 / t, False)
    if dtype == torch.float64:
        if divide:
            return t, True
        inv = 1.0 / t
        return (inv, False) if is_finite(inv) else None
    # fl32(T) and 1 / fl32(T) in fp32 (an fp64 quotient of fp32 values, rounded once to
    # fp32, is the fp32 quotient); ranges tested first, so that numpy warns of no overflow
    if t >= _FP32_OVERFLOW:
        return None
    t = float(np.float32(t))
    if divide:
        return t, True
    inv = 1.0 / t if t > 0.0 else math.inf
    return (float(np.float32(inv)), False) if inv < _FP32_OVERFLOW else None


#: The smallest fp64 value that rounds to inf in fp32: 2^128 - 2^103.
_FP32_OVERFLOW = 2.0**128 - 2.0**103


_PYTHON_DTYPES = {float: torch.float64, int: torch.int64, bool: torch.bool,
                  complex: torch.complex128}


def _as_dtype(dtype):
    """torch's dtype for a Python type passed as ``dtype=`` (``float``: fp64, ...); anything
    else as it is (a bad one, unhashable too, for torch's own call to refuse)."""
    return _PYTHON_DTYPES.get(dtype, dtype) if isinstance(dtype, type) else dtype


_INTEGRAL = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool)


def _deeper(stacklevel):
    """``stacklevel`` one frame deeper (an int, or anything with ``__index__``: a numpy
    integer, a 0-d integer tensor); anything else as it is, for ``warnings.warn`` to refuse
    with torch's TypeError (and only where torch warns)."""
    try:
        return operator.index(stacklevel) + 1
    except TypeError:
        return stacklevel


def _softmax_like(mode, input, dim, stacklevel, dtype, temperature):
    name = _NAMES[mode]
    if not isinstance(input, torch.Tensor):  # as torch: input.dim(), then input.softmax(...)
        if dim is None:
            dim = _legacy_softmax_dim(name, input.dim(), _deeper(stacklevel))
        method = getattr(input, name)
        return method(dim) if dtype is None else method(dim, dtype=dtype)
    if isinstance(temperature, torch.Tensor):
        # input / T with torch ops, then the softmax: broadcasting and type promotion (the
        # result in dtype= where given; dtype= casts first, as for a number), T's gradient,
        # the legacy dim of the quotient, and no check of T's values (reading them would
        # synchronise with a GPU)
        cast = _as_dtype(dtype)
        x = input.to(cast) if isinstance(cast, torch.dtype) else input
        return _softmax_like(mode, x / temperature, dim, _deeper(stacklevel), dtype, 1.0)
    if dim is None:  # torch warns first, whatever is wrong with the rest
        dim = _legacy_softmax_dim(name, input.dim(), _deeper(stacklevel))
    requested = dtype
    dtype = _as_dtype(dtype)  # torch takes dtype=float (fp64), int, ...
    factor = _temperature_factor(
        temperature, dtype if isinstance(dtype, torch.dtype) else input.dtype, input.device)
    if factor is None or (temperature != 1 and dtype is None and not input.is_floating_point()
                         and not input.is_complex()):
        # softmax(x / T) with torch's x / T: where x * (1 / T) differs from it (T or 1 / T
        # overflows), and for an integer or bool x (x / T promotes it to a float dtype)
        cast = dtype if isinstance(dtype, torch.dtype) else None
        x = input.to(cast) if cast is not None else input
        return _softmax_like(mode, x / temperature, dim, _deeper(stacklevel), requested, 1.0)
    if dtype is None and autocast_to_fp32(name, input):  # torch: dtype=float32 under autocast
        dtype = torch.float32
    try:
        dim = wrap_dim(dim, input.dim())
        ours = dtype is None or isinstance(dtype, torch.dtype)
    except (TypeError, IndexError):
        ours = False
    if not ours or (dtype or input.dtype) not in FLOAT_DTYPES:
        # A bad dim or dtype, or a result the kernels do not make (integer, bool, complex):
        # torch's own call, so its error (type, message, order of checks) or its result
        # (an empty integer tensor, say).
        method = torch.Tensor.softmax if mode == SOFTMAX else torch.Tensor.log_softmax
        return method(input, dim) if requested is None else method(input, dim, dtype=requested)
    # dtype= casts first, as torch; a widening cast (fp16 -> fp32: the usual
    # softmax(scores, dtype=float32), and autocast) is folded into the kernel's read, as
    # torch's half_to_float: no fp32 copy of the input.
    torch_ops = needs_torch_ops(input)  # torch.func transforms, forward-mode AD, DTensor, ...
    out_dtype = None
    if dtype is not None and _widening(input.dtype, dtype) and not torch_ops:
        out_dtype = dtype
    elif dtype is not None:
        input = input.to(dtype)
    if torch_ops:  # torch's own x / T (its value and its derivative, -inf entries too)
        torch_fn = torch.softmax if mode == SOFTMAX else torch.log_softmax
        return torch_fn(input if temperature == 1 else input / temperature, dim)
    t, divide = factor
    if input.dim() == 0:
        return _apply(input.reshape(1), 0, mode, t, out_dtype, divide).reshape(())
    return _apply(input, dim, mode, t, out_dtype, divide)


def softmax(input: torch.Tensor, dim: Optional[int] = None, _stacklevel: int = 3,
            dtype: Optional[torch.dtype] = None, *, temperature: float = 1.0) -> torch.Tensor:
    r"""Softmax along ``dim``: :math:`\mathrm{softmax}(x)_i = \exp(x_i/T) / \sum_j \exp(x_j/T)`.

    Drop-in for :func:`torch.nn.functional.softmax`, computed by one fused Triton kernel
    (a single read of the input and a single write of the output whenever the reduced
    dimension fits on chip), stable at any logit scale: the row max is subtracted in
    registers, so ``exp`` never overflows.

    Args:
        input (Tensor): any shape, float16 / bfloat16 / float32 / float64 (others need
            ``dtype=``). Any strides; a non-last ``dim`` is reduced in place (no transpose).
        dim (int): the dimension to normalise. ``None`` keeps torch's deprecated implicit
            choice (0 for 0-, 1- and 3-d inputs, else 1) and its warning.
        dtype (torch.dtype, optional): cast ``input`` to this dtype first, as torch does;
            a widening cast (fp16/bf16 to fp32, fp32 to fp64) is folded into the
            kernel's read (no copy), and the gradient comes back in ``input``'s dtype.
        temperature (float or Tensor, keyword-only): divide the logits by ``T`` first:
            ``softmax(input / T)``, as torch computes it (``input / T`` rounded to fp16 /
            bf16 for such inputs, after the ``dtype=`` cast; a true division on the CPU,
            times the fp32 reciprocal on CUDA, as torch's kernels), but in registers, with no
            extra pass. A number must be finite and ``> 0``; ``T < 1`` sharpens, ``T > 1``
            flattens. A tensor (one value, or any shape that broadcasts against
            ``input``, e.g. one per row) is applied as ``input / T`` with torch ops before
            the kernel (type promotion decides the result's dtype unless ``dtype=`` is
            given), differentiable with respect to ``T``, its values unchecked.

    Returns:
        Tensor of ``input``'s shape and (cast) dtype; each slice along ``dim`` sums to 1.
        As in torch, a slice that is all ``-inf`` or holds ``+inf`` or NaN gives NaN, and a
        ``-inf`` entry gives probability 0. Accumulation is fp32 (fp64 for fp64 input).

    Example::

        >>> x = torch.tensor([[1000.0, 1001.0, 999.0]])
        >>> fused_softmax.softmax(x, dim=-1)   # exp(1000) overflows; the kernel does not
        tensor([[0.2447, 0.6652, 0.0900]])
    """
    if torch_function_dispatch(input):  # torch.fx tracing, __torch_function__ subclasses
        return handle_torch_function(softmax, (input,), input, dim, _stacklevel, dtype,
                                     temperature=temperature)
    return _softmax_like(SOFTMAX, input, dim, _stacklevel, dtype, temperature)


def log_softmax(input: torch.Tensor, dim: Optional[int] = None, _stacklevel: int = 3,
                dtype: Optional[torch.dtype] = None, *, temperature: float = 1.0) -> torch.Tensor:
    r"""Log-softmax along ``dim``: :math:`x_i/T - \log\sum_j \exp(x_j/T)`.

    Drop-in for :func:`torch.nn.functional.log_softmax`; same arguments, shapes, dtypes and
    NaN/inf rules as :func:`softmax`. Computed as ``(x - max) - log(sum(exp(x - max)))``,
    never as ``log(softmax(x))``, which turns an underflowed probability into ``-inf``.

    Example::

        >>> fused_softmax.log_softmax(torch.tensor([0.0, -200.0]), dim=0)
        tensor([   0., -200.])
    """
    if torch_function_dispatch(input):
        return handle_torch_function(log_softmax, (input,), input, dim, _stacklevel, dtype,
                                     temperature=temperature)
    return _softmax_like(LOG_SOFTMAX, input, dim, _stacklevel, dtype, temperature)


def _logsumexp_out(input, dim, keepdim, out):
    """torch's ``out=`` semantics: its checks, the result computed in ``out``'s (wider)
    float dtype, then resized (with torch's warning for a non-empty ``out``) and copied."""
    ours = (isinstance(out, torch.Tensor) and out.is_floating_point()
            and (input.is_floating_point() or input.dtype in _INTEGRAL)
            and out.device == input.device
            and not (torch.is_grad_enabled() and (input.requires_grad or out.requires_grad)))
    if not ours:  # torch's error for a bad out; complex: torch's own kernel and casts
        return torch.logsumexp(input, dim, keepdim, out=out)
    if not input.is_floating_point():  # integers: torch's default dtype, then as a float
        input = input.to(torch.get_default_dtype())
    if torch.finfo(out.dtype).bits > torch.finfo(input.dtype).bits:
        input = input.to(out.dtype)
    result = logsumexp(input, dim, keepdim)
    if out.shape == result.shape:  # no resize_ (torch.compile(fullgraph=True) has none)
        return out.copy_(result)
    if out.numel():
        warnings.warn(
            f"An output with one or more elements was resized since it had shape "
            f"{list(out.shape)}, which does not match the required output shape "
            f"{list(result.shape)}. This behavior is deprecated, and in a future PyTorch "
            "release outputs will not be resized unless they have zero elements. You can "
            "explicitly reuse an out tensor t by resizing it, inplace, to zero elements with "
            "t.resize_(0).", UserWarning, stacklevel=3)
    out.resize_(result.shape)
    return out.copy_(result)


def _reduced_dims(dim, ndim: int, keepdim: bool):
    """``logsumexp``'s ``dim`` (an int or a sequence) as distinct wrapped dims, every dim for
    ``()``; ``None`` where torch must decide: a bad or repeated dim (its error), a
    one-element tensor (which it takes), and ``()`` without ``keepdim`` (torch 2.13
    reduces everything, then cannot squeeze a non-empty result: its error)."""
    if not hasattr(type(dim), "__index__") and not isinstance(dim, (tuple, list)):
        return None  # a set, a generator, ...: torch's TypeError (a tensor: torch decides)
    try:
        dims = [wrap_dim(dim, ndim)] if hasattr(type(dim), "__index__") else \
            [wrap_dim(d, ndim) for d in dim]
    except (TypeError, IndexError):
        return None
    if len(set(dims)) != len(dims) or (not dims and not keepdim and ndim > 0):
        return None
    return dims or list(range(max(ndim, 1)))


class _MovedCopy(torch.autograd.Function):
    """``x.permute(perm).reshape(shape)`` where that is a copy, saving ``x``, so that
    autograd reports ``x`` changed in place after the forward, as torch's logsumexp (which
    saves its input) does; the copy would hide it."""

    @staticmethod
    def forward(ctx, x, perm, shape):
        ctx.save_for_backward(x)
        ctx.perm, ctx.moved = perm, [x.shape[i] for i in perm]
        return x.permute(perm).reshape(shape)

    @staticmethod
    def backward(ctx, grad):
        ctx.saved_tensors  # noqa: B018 -- autograd's version check, the only use
        inverse = [0] * len(ctx.perm)
        for i, p in enumerate(ctx.perm):
            inverse[p] = i
        return grad.reshape(ctx.moved).permute(inverse), None, None


def _logsumexp_dims(input: torch.Tensor, dims: list, out_dtype: torch.dtype) -> torch.Tensor:
    """Log-sum-exp of ``input`` over ``dims`` (distinct, wrapped; the result without them)
    in one pass over each reduced group, as torch's: the dims, taken in memory order
    (largest stride first), are moved last and merged into one, by a view where their
    strides allow (contiguous dims, in any order), else by a copy (``_MovedCopy``).
    (Reducing one dim at a time instead gives NaN gradients where one slice of a group is
    all ``-inf`` and the group is not.)"""
    if len(dims) == 1:
        return _apply(input, dims[0], LOGSUMEXP, 1.0, out_dtype)
    kept = [i for i in range(input.dim()) if i not in dims]
    order = []  # by stride, largest first (ties as given): an insertion sort, as Dynamo
    for i in dims:  # sorts no symbolic strides
        k = len(order)
        while k > 0 and input.stride(order[k - 1]) < input.stride(i):
            k -= 1
        order.insert(k, i)
    perm = kept + order
    shape = [input.shape[i] for i in kept] + [math.prod([input.shape[i] for i in dims])]
    x = input.permute(perm)
    if merged(x.shape[len(kept):], x.stride()[len(kept):]) is not None:
        x = x.reshape(shape)  # a view: the op saves input itself
    elif input.requires_grad and torch.is_grad_enabled() and _backend.dispatch_free((input,)):
        x = _MovedCopy.apply(input, perm, shape)  # (eager only: strict export drops its grad)
    else:
        x = x.reshape(shape)
    return _apply(x, len(kept), LOGSUMEXP, 1.0, out_dtype)


def _torch_logsumexp(input, dim, keepdim):
    """torch's own call, ``keepdim`` passed only when set: torch's errors list the
    arguments given."""
    if keepdim is False:
        return torch.logsumexp(input, dim)
    return torch.logsumexp(input, dim, keepdim)


def logsumexp(input: torch.Tensor, dim: Union[int, Sequence[int]], keepdim: bool = False, *,
              out: Optional[torch.Tensor] = None) -> torch.Tensor:
    r"""``log(sum(exp(input)))`` over ``dim``, computed stably: :math:`m + \log\sum_j e^{x_j - m}`.

    Drop-in for :func:`torch.logsumexp`.

    Args:
        input (Tensor): any shape; integer and bool inputs are promoted to the default
            float dtype, as torch does.
        dim (int or tuple of ints): dimension(s) to reduce.
        keepdim (bool): keep the reduced dimensions with size 1.
        out (Tensor, optional, keyword-only): written with the result, as torch's ``out=``.

    Returns:
        Tensor in ``input``'s (float) dtype (complex input and ``torch.func`` transforms
        use ``torch.logsumexp`` itself). An all ``-inf`` slice gives ``-inf``, a
        ``+inf`` gives ``+inf``, an empty slice gives ``-inf``, as torch. The gradient is
        ``softmax(input)`` scaled by the incoming gradient, computed in fp32 (fp64) as
        torch's ``exp(input - result)``, from the result in its dtype.

    Example::

        >>> fused_softmax.logsumexp(torch.tensor([1000.0, 1000.0]), dim=0)
        tensor(1000.6932)
    """
    if torch_function_dispatch(input):
        return handle_torch_function(logsumexp, (input,), input, dim, keepdim, out=out)
    if not isinstance(input, torch.Tensor) or not isinstance(keepdim, bool):
        return _torch_logsumexp(input, dim, keepdim)  # torch's TypeError
    if out is not None:
        return _logsumexp_out(input, dim, keepdim, out)
    ndim = input.dim()
    dims = _reduced_dims(dim, ndim, keepdim)
    if dims is None or input.is_complex() or needs_torch_ops(input):
        # torch's own call: its error for a bad dim, its result where it takes one that we
        # do not (a one-element tensor); complex input and torch.func transforms
        return _torch_logsumexp(input, dim, keepdim)
    if not input.is_floating_point():
        input = input.to(torch.get_default_dtype())
    check_float("logsumexp", input)
    # torch casts to fp32 under autocast; the kernel reads fp16 / bf16 and computes in fp32
    out_dtype = torch.float32 if autocast_to_fp32("logsumexp", input) else input.dtype
    if ndim == 0:
        return _apply(input.reshape(1), 0, LOGSUMEXP, 1.0, out_dtype).reshape(())
    out = _logsumexp_dims(input, dims, out_dtype)
    if keepdim:
        for d in sorted(dims):
            out = out.unsqueeze(d)
    return out
