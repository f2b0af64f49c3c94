"""Fused online softmax, log-softmax and log-sum-exp over one dimension, and their backward.

Shape model. Any input is viewed as ``(M, N, K)`` with strides ``(sm, sn, sk)``, where ``N``
is the reduced dimension: a last-dim softmax is ``K = 1, sn = 1``; a softmax over a middle
dimension of a contiguous tensor is ``sk = 1, sn = K``. The ``M * K`` independent
"positions" are cut into tiles of ``BLOCK_R`` positions, and a tile is a
``[BLOCK_R, BLOCK_N]`` block of registers. Whichever axis has unit stride is the one the
compiler vectorises, so one kernel reads contiguous memory for both layouts: no transpose
copy for ``dim != -1``. Offsets of positions are int64; offsets along the reduced
dimension are int32 unless ``WIDE`` (a stride times ``N`` reaching 2^31).

HBM passes. Softmax is memory bound: the floor is one read of the input and one write of
the output. When the whole reduced extent fits in a tile (``SINGLE_PASS``), that is
exactly what happens. Longer rows make two passes: the first keeps a running max and a
per-lane sum of ``exp(x - max)`` rescaled whenever the max grows (the online softmax,
one ``exp`` per element), the second re-reads the row and writes the result. The grid is
persistent (a few programs per SM, each looping over tiles) and the first read asks to
stay in L2 (``evict_last``), so the second read hits L2 rather than HBM.

Numerics. Accumulation in fp32 (fp64 for fp64 input). The shift is torch's: a max of
``+-inf`` is replaced by 0, so a row of all ``-inf`` has log-sum-exp ``-inf`` (and softmax
NaN, as torch), a ``+inf`` gives log-sum-exp ``+inf`` (softmax NaN, as torch), and masked
lanes, loaded as ``-inf``, contribute ``exp(-inf) = 0`` and never a NaN. fp32 results
(``PRECISE``) use CUDA's own ``expf``/``logf`` (libdevice, as torch's kernels) and a
correctly rounded division; Triton's ``tl.exp`` (``ex2.approx`` of ``x * log2(e)``) loses
~|x| * 6e-8 relative and ``1 / s`` one more rounding, which measured ~2.3x torch's fp32
error on an H100. fp16/bf16 results keep the fast forms: their own rounding is 2^-11 or
coarser.
"""

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

SOFTMAX = tl.constexpr(0)
LOG_SOFTMAX = tl.constexpr(1)
LOGSUMEXP = tl.constexpr(2)


#: Triton's interpreter (numpy) runs the kernels.
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")
#: libdevice exists only in compiled kernels; the interpreter evaluates fp32 exp / log in
#: fp64 instead (``exp_``, ``log_``).
LIBDEVICE = tl.constexpr(not INTERPRETED)


@triton.jit
def out_cast(v, PTR):
    """``v`` in ``PTR``'s element type, rounded to nearest even, for a store. Compiled
    kernels cast directly (``cvt.rn``). Triton's interpreter truncates fp32 -> bf16 (half
    of all bf16 results 1 ulp toward zero: twice torch's error) and flushes bf16
    subnormals, so there the fp32 bits are rounded to their upper half, which is the bf16
    value: the same result as the GPU's."""
    if INTERPRETED and PTR.dtype.element_ty == tl.bfloat16:
        return bf16_rn(v)
    return v.to(PTR.dtype.element_ty)


@triton.jit
def cast_rn(v, like):
    """``v`` in ``like``'s dtype, rounded to nearest even (``out_cast`` for a value)."""
    if INTERPRETED and like.dtype == tl.bfloat16:
        return bf16_rn(v)
    return v.to(like.dtype)


@triton.jit
def bf16_rn(v):
    """``v`` rounded to bf16, nearest even, from its fp32 bits (the interpreter's own
    conversion truncates)."""
    b = v.to(tl.float32).to(tl.uint32, bitcast=True)
    nan = (b & 0x7FFFFFFF) > 0x7F800000
    b = tl.where(nan, 0x7FC00000, b + 0x7FFF + ((b >> 16) & 1))  # carries: up to inf
    return (b >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def exp_(x, PRECISE: tl.constexpr):
    """``exp(x)``: CUDA's ``expf`` with ``PRECISE`` (compiled), else ``tl.exp``. Under the
    interpreter an fp32 ``x`` goes through fp64, rounded once: numpy's fp32 ``exp`` is off
    by up to 2.4 ulp (measured; torch's CPU ``exp`` 0.56), which made the interpreted fp32
    softmax less accurate than torch's on the CPU."""
    if PRECISE and LIBDEVICE:
        return libdevice.exp(x)
    elif INTERPRETED and x.dtype == tl.float32:
        return tl.exp(x.to(tl.float64)).to(tl.float32)
    else:
        return tl.exp(x)


@triton.jit
def log_(x, PRECISE: tl.constexpr):
    """``log(x)``: CUDA's ``logf`` with ``PRECISE`` (compiled), else ``tl.log``; under the
    interpreter an fp32 ``x`` through fp64, as ``exp_`` (numpy's fp32 ``log``: 3.4 ulp)."""
    if PRECISE and LIBDEVICE:
        return libdevice.log(x)
    elif INTERPRETED and x.dtype == tl.float32:
        return tl.log(x.to(tl.float64)).to(tl.float32)
    else:
        return tl.log(x)


@triton.jit
def div_(a, b, PRECISE: tl.constexpr):
    """``a / b`` correctly rounded with ``PRECISE``, else ``a * (1 / b)`` (one reciprocal
    per row, then multiplies)."""
    if PRECISE:
        return tl.math.div_rn(a, b)
    else:
        return a * (1.0 / b)


#: ``SCALE`` of the softmax forward: no temperature (``T = 1``: nothing to do), ``x * (1/T)``,
#: or ``x * (1/T)`` rounded to the output's fp16 / bf16 (torch's ``softmax(x / T)``).
SCALE_NONE = tl.constexpr(0)
SCALE_MUL = tl.constexpr(1)
SCALE_ROUND = tl.constexpr(2)


@triton.jit
def temper(x, t, DIVIDE: tl.constexpr):
    """``x / T``: ``x * t`` with ``t = 1 / T`` rounded (torch's CUDA kernels multiply by
    the reciprocal of a scalar divisor), or ``DIVIDE``, ``x / t`` with ``t = T`` (torch's
    CPU kernels divide: the interpreter's runs)."""
    if DIVIDE:
        y = x / t
    else:
        y = x * t
    return y


@triton.jit
def scale(x, inv_temperature, PTR, SCALE: tl.constexpr, DIVIDE: tl.constexpr):
    """``x / T`` (``temper``), keeping ``-inf`` (padding lanes, -inf logits) at
    ``-inf`` when ``1 / T`` rounds to 0 (``T`` near fp32's range): ``-inf * 0`` is NaN.
    ``SCALE_ROUND``: the scaled value is rounded to ``PTR``'s dtype (fp16 / bf16), as
    torch's ``softmax(x / T)`` rounds ``x / T`` (an overflow included) before the softmax,
    so that fp16 / bf16 results equal torch's. ``SCALE_NONE`` (``T = 1``) compiles to
    nothing: the per-element compare and select were the likely cause of a 27 % slower
    bf16 forward at 8192 x 32768 on an H200 (README, Benchmarks)."""
    if SCALE == SCALE_NONE:
        y = x
    else:
        y = tl.where(x == -float("inf"), x, temper(x, inv_temperature, DIVIDE))
        if SCALE == SCALE_ROUND:
            y = out_cast(y, PTR).to(x.dtype)
    return y


@triton.jit
def finite_or_zero(m):
    """torch's shift rule for log-sum-exp: an infinite max is replaced by 0."""
    return tl.where(tl.abs(m) == float("inf"), 0.0, m)


@triton.jit
def float_arg(bits, ACC: tl.constexpr):
    """A float argument passed as the int64 bits of its fp64 value (``float_bits`` on the
    host; Triton would pass a Python float as fp32): exact in an fp64 kernel, rounded once
    (to nearest) in an fp32 one. ``.to(int64)``: the interpreter types small ints as i32."""
    return tl.cast(bits.to(tl.int64), tl.float64, bitcast=True).to(ACC)


@triton.jit
def tile_positions(tile, n_pos, K, BLOCK_R: tl.constexpr):
    """Positions of a tile as int64 (outer index, inner index, in-range mask)."""
    # (zeros + tile) promotes to int64 before the multiply, compiled or interpreted.
    p = (tl.zeros([BLOCK_R], tl.int64) + tile) * BLOCK_R + tl.arange(0, BLOCK_R)
    outer = p // K
    return p, outer, p - outer * K, p < n_pos


@triton.jit
def rescale_factor(m_run, m_new, PRECISE: tl.constexpr = False):
    """``exp(m_run - m_new)``, the online-softmax rescale of a running sum when the max grows,
    under torch's shift rule: 0 while nothing has been summed (``m_run = -inf``), and 1 once
    the max is +inf (the answer is then +inf or NaN; ``exp(old max - 0)`` could overflow and
    turn a lane's 0 into NaN)."""
    return tl.where(m_run == -float("inf"), 0.0,
                    tl.where(m_new == float("inf"), 1.0,
                             exp_(finite_or_zero(m_run) - finite_or_zero(m_new), PRECISE)))


@triton.jit
def online_update(m_run, s_vec, x, PRECISE: tl.constexpr):
    """Fold a ``[R, B]`` block into running per-row max ``m_run`` and per-lane sums ``s_vec``.

    One ``exp`` per element: the rescale factor is per row, not per lane.
    """
    m_new = tl.maximum(m_run, tl.max(x, 1))
    s_vec = (s_vec * rescale_factor(m_run, m_new, PRECISE)[:, None]
             + exp_(x - finite_or_zero(m_new)[:, None], PRECISE))
    return m_new, s_vec


@triton.jit(do_not_specialize=["inv_t_bits"])
def softmax_fwd_kernel(
    X, Y, n_pos, N, K,
    sxm, sxn, sxk, sym, syn, syk,
    inv_t_bits,
    MODE: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_PASS: tl.constexpr, WIDE: tl.constexpr,
    SCALE: tl.constexpr, DIVIDE: tl.constexpr,
):
    """``MODE`` SOFTMAX / LOG_SOFTMAX write ``Y`` shaped like ``X``; LOGSUMEXP writes one
    value per position into ``Y`` (``n_pos`` contiguous, in ``Y``'s dtype).
    ``SCALE``: how ``x / T`` is formed (``scale``): not at all for ``T = 1``, rounded to
    ``Y``'s dtype for fp16 / bf16 output, as torch's ``softmax(x / T)``; ``inv_t_bits``
    holds ``1 / T``, or ``T`` with ``DIVIDE`` (``temper``)."""
    inv_temperature = float_arg(inv_t_bits, ACC)
    # libdevice exp / log for fp32 results, and for every log-sum-exp computed in fp32
    PRECISE: tl.constexpr = (Y.dtype.element_ty == tl.float32) or (
        MODE == LOGSUMEXP and ACC == tl.float32)
    n_tiles = tl.cdiv(n_pos, BLOCK_R)
    cols = tl.arange(0, BLOCK_N)
    if WIDE:  # (N - 1) * stride along the reduced dim reaches 2^31: 64-bit column offsets
        cols = cols.to(tl.int64)
    for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        p, outer, inner, pmask = tile_positions(tile, n_pos, K, BLOCK_R)
        xrow = X + (outer * sxm + inner * sxk)[:, None]
        yrow = Y + (outer * sym + inner * syk)[:, None]
        if SINGLE_PASS:
            mask = pmask[:, None] & (cols < N)[None, :]
            x = tl.load(xrow + cols[None, :] * sxn, mask=mask, other=-float("inf"))
            x = scale(x.to(ACC), inv_temperature, Y, SCALE, DIVIDE)
            m = tl.max(x, 1)
            shift = finite_or_zero(m)
            e = exp_(x - shift[:, None], PRECISE)
            s = tl.sum(e, 1)
        else:
            m = tl.full([BLOCK_R], -float("inf"), ACC)
            s_vec = tl.zeros([BLOCK_R, BLOCK_N], ACC)
            for start in range(0, N, BLOCK_N):
                c = start + cols
                mask = pmask[:, None] & (c < N)[None, :]
                x = tl.load(xrow + c[None, :] * sxn, mask=mask, other=-float("inf"),
                            eviction_policy="evict_last")
                m, s_vec = online_update(m, s_vec, scale(x.to(ACC), inv_temperature, Y, SCALE, DIVIDE), PRECISE)
            shift = finite_or_zero(m)
            s = tl.sum(s_vec, 1)

        if MODE == LOGSUMEXP:
            tl.store(Y + p, out_cast(shift + log_(s, PRECISE), Y), mask=pmask)
        else:
            # torch: a +inf in the row makes the whole softmax row NaN (inf - inf).
            s = tl.where(m == float("inf"), float("nan"), s)
            if MODE == LOG_SOFTMAX:
                log_s = log_(s, PRECISE)
            if SINGLE_PASS:
                if MODE == SOFTMAX:
                    y = div_(e, s[:, None], PRECISE)
                else:
                    y = (x - shift[:, None]) - log_s[:, None]
                tl.store(yrow + cols[None, :] * syn, out_cast(y, Y), mask=mask)
            else:
                for start in range(0, N, BLOCK_N):
                    c = start + cols
                    mask = pmask[:, None] & (c < N)[None, :]
                    x = tl.load(xrow + c[None, :] * sxn, mask=mask, other=-float("inf"),
                                eviction_policy="evict_first")
                    x = scale(x.to(ACC), inv_temperature, Y, SCALE, DIVIDE)
                    if MODE == SOFTMAX:
                        y = div_(exp_(x - shift[:, None], PRECISE), s[:, None], PRECISE)
                    else:
                        y = (x - shift[:, None]) - log_s[:, None]
                    tl.store(yrow + c[None, :] * syn, out_cast(y, Y), mask=mask,
                             eviction_policy="evict_first")


@triton.jit(do_not_specialize=["inv_t_bits"])
def softmax_bwd_kernel(
    S, DY, DX, LSE, n_pos, N, K,
    ssm, ssn, ssk, sdm, sdn, sdk, sgm, sgn, sgk,
    inv_t_bits,
    MODE: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_PASS: tl.constexpr, WIDE: tl.constexpr,
    DIVIDE: tl.constexpr,
):
    """Backward, with ``t = inv_temperature`` (times ``t``: divided by ``T`` with
    ``DIVIDE``, as the forward: ``temper``) and ``S`` the saved tensor:

    * SOFTMAX (``S`` = y):      ``dx = t * y * (dy - sum(dy * y))``
    * LOG_SOFTMAX (``S`` = y):  ``dx = t * (dy - exp(y) * sum(dy))``
    * LOGSUMEXP (``S`` = x):    ``dx = t * dy * exp(t * x - lse)``, ``dy`` and ``lse`` one
      value per position (``n_pos`` contiguous).
    """
    inv_temperature = float_arg(inv_t_bits, ACC)
    PRECISE: tl.constexpr = DX.dtype.element_ty == tl.float32
    n_tiles = tl.cdiv(n_pos, BLOCK_R)
    cols = tl.arange(0, BLOCK_N)
    if WIDE:  # (N - 1) * stride along the reduced dim reaches 2^31: 64-bit column offsets
        cols = cols.to(tl.int64)
    for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        p, outer, inner, pmask = tile_positions(tile, n_pos, K, BLOCK_R)
        srow = S + (outer * ssm + inner * ssk)[:, None]
        dyrow = DY + (outer * sdm + inner * sdk)[:, None]
        dxrow = DX + (outer * sgm + inner * sgk)[:, None]
        if MODE == LOGSUMEXP:
            dy = tl.load(DY + p, mask=pmask, other=0.0).to(ACC)
            lse = tl.load(LSE + p, mask=pmask, other=0.0).to(ACC)
            for start in range(0, N, BLOCK_N):
                c = start + cols
                mask = pmask[:, None] & (c < N)[None, :]
                x = tl.load(srow + c[None, :] * ssn, mask=mask, other=0.0).to(ACC)
                dx = temper(dy, inv_temperature, DIVIDE)[:, None] * exp_(
                    temper(x, inv_temperature, DIVIDE) - lse[:, None], PRECISE)
                tl.store(dxrow + c[None, :] * sgn, out_cast(dx, DX), mask=mask)
        else:
            if SINGLE_PASS:
                mask = pmask[:, None] & (cols < N)[None, :]
                y = tl.load(srow + cols[None, :] * ssn, mask=mask, other=0.0).to(ACC)
                dy = tl.load(dyrow + cols[None, :] * sdn, mask=mask, other=0.0).to(ACC)
                if MODE == SOFTMAX:
                    dot = tl.sum(dy * y, 1)
                    dx = y * (dy - dot[:, None])
                else:
                    dx = dy - exp_(y, PRECISE) * tl.sum(dy, 1)[:, None]
                dx = temper(dx, inv_temperature, DIVIDE)
                tl.store(dxrow + cols[None, :] * sgn, out_cast(dx, DX), mask=mask)
            else:
                acc = tl.zeros([BLOCK_R, BLOCK_N], ACC)
                for start in range(0, N, BLOCK_N):
                    c = start + cols
                    mask = pmask[:, None] & (c < N)[None, :]
                    dy = tl.load(dyrow + c[None, :] * sdn, mask=mask, other=0.0,
                                 eviction_policy="evict_last").to(ACC)
                    if MODE == SOFTMAX:
                        y = tl.load(srow + c[None, :] * ssn, mask=mask, other=0.0,
                                    eviction_policy="evict_last").to(ACC)
                        acc += dy * y
                    else:
                        acc += dy
                red = tl.sum(acc, 1)
                for start in range(0, N, BLOCK_N):
                    c = start + cols
                    mask = pmask[:, None] & (c < N)[None, :]
                    y = tl.load(srow + c[None, :] * ssn, mask=mask, other=0.0,
                                eviction_policy="evict_first").to(ACC)
                    dy = tl.load(dyrow + c[None, :] * sdn, mask=mask, other=0.0,
                                 eviction_policy="evict_first").to(ACC)
                    if MODE == SOFTMAX:
                        dx = y * (dy - red[:, None])
                    else:
                        dx = dy - exp_(y, PRECISE) * red[:, None]
                    dx = temper(dx, inv_temperature, DIVIDE)
                    tl.store(dxrow + c[None, :] * sgn, out_cast(dx, DX), mask=mask,
                             eviction_policy="evict_first")
