"""Fused cross-entropy over logits: loss, log-sum-exp and the logit gradient in one launch.

Per row of ``C`` logits ``x``, with ``z = softcap * tanh(logit_scale * x / softcap)`` (or
``logit_scale * x`` without softcap), ``lse = log(sum(exp(z)))`` and ``p = exp(z - lse)``:

* class-index target ``t``, class weights ``w`` (ones if absent), ``eps`` = label smoothing::

      loss = (1 - eps) * w_t * (lse - z_t) + eps / C * (sum(w) * lse - sum(w * z))
      dz   = ((1 - eps) * w_t + eps / C * sum(w)) * p - ((1 - eps) * w_t * onehot(t) + eps / C * w)

* class-probability target ``q``, smoothed ``q' = (1 - eps) * q + eps / C``::

      loss = sum(w * q') * lse - sum(w * q' * z)
      dz   = sum(w * q') * p - w * q'

  plus ``z_loss * lse**2`` (gradient ``2 * z_loss * lse * p``). These are torch's
  formulas (``label_smoothing`` included) rewritten so that one pass over the row
  gathers every sum they need.

HBM passes. When the gradient is wanted, it is written in the same launch (the backward
only rescales it by ``grad_output``, and skips even that on the device when the scale is
1). The first pass over a row is online (running max, rescaled sum of exp, one ``exp``
per element); the second re-reads the row and writes the gradient. The persistent grid
keeps only a few rows per SM in flight, so the re-read hits L1/L2, not HBM: one HBM read
of the logits and one write of the gradient, whatever the vocabulary size.

Ignored rows give loss 0 and gradient 0 whatever their logits hold. A target outside
``[0, C)`` that is not ``ignore_index`` is never used as an address: its row's loss and
gradient are NaN, so the failure is loud without a host synchronisation.
"""

import triton
import triton.language as tl

from .softmax import (LIBDEVICE, cast_rn, div_, exp_, finite_or_zero, float_arg, log_, out_cast,
                      rescale_factor)


@triton.jit
def tanh(u):
    """tanh(u) to about an fp32 ulp. |u| < 0.55: its odd Taylor series to u^15 (truncation
    below 5e-8 relative); beyond: 1 - 2 / (exp(2u) + 1), whose absolute error of an ulp of
    1 is small against |tanh| > 0.5 there, with exact limits +-1 at +-inf and never NaN.
    (The closed form alone lost ~1000x torch's accuracy for small |u|: softcap of small
    logits.) fp64: ``expm1(2|u|) / (expm1(2|u|) + 2)`` with Kahan's ``expm1``, a few ulp
    relative for every ``u`` (the closed form's absolute 1e-16 is all of ``tanh`` for tiny
    ``u``, a softcap far above the logits)."""
    if u.dtype == tl.float64:
        a = tl.abs(u)
        e = tl.exp(2.0 * a)
        em1 = tl.where(e == 1.0, 2.0 * a, (e - 1.0) * (2.0 * a) / tl.log(e))
        t = tl.where(a > 20.0, 1.0, em1 / (em1 + 2.0))  # tanh(20) = 1 - 8e-18; inf / inf
        return tl.where(u < 0, -t, t)
    closed = 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)
    u2 = u * u
    p = -929569.0 / 638512875.0
    p = p * u2 + 21844.0 / 6081075.0
    p = p * u2 - 1382.0 / 155925.0
    p = p * u2 + 62.0 / 2835.0
    p = p * u2 - 17.0 / 315.0
    p = p * u2 + 2.0 / 15.0
    p = p * u2 - 1.0 / 3.0
    series = u + u * u2 * p
    return tl.where(tl.abs(u) < 0.55, series, closed)


@triton.jit
def sech2(u, PRECISE: tl.constexpr):
    """``1 - tanh(u)**2`` as ``4 e / (1 + e)**2``, ``e = exp(-2|u|)``: accurate to a few ulp
    also where tanh saturates (``1 - tanh**2`` cancels there), 0 at +-inf, never NaN."""
    e = exp_(-2.0 * tl.abs(u), PRECISE)
    return 4.0 * e / ((1.0 + e) * (1.0 + e))


@triton.jit
def scaled_logits(x, logit_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """``z`` from raw logits (one return: compiled Triton needs one return type)."""
    z = x * logit_scale
    if HAS_SOFTCAP:
        z = softcap * tanh(z / softcap)
    return z


@triton.jit
def linear_sum_update(lin_vec, w_vec, z, w, mask, m_run, m_new):
    """Fold a block into per-lane ``sum(w * (z - m))`` and ``sum(w)``, with ``m`` the running
    max (``finite_or_zero``), rescaled as the max grows: ``+= sum(w) * (m_old - m_new)``.

    The loss needs ``sum(w) * lse - sum(w * z)``; taken relative to the max, both terms stay
    small, so neither logits far from 0 (1e4 + noise) nor one logit far from the rest (a
    -1e4 class of weight 0) make them cancel. ``w = 0`` lanes add 0, except ``0 * -inf``
    = NaN, as torch's ``w * log_softmax``. Lanes at the max add exactly 0, also with an
    infinite ``w`` (an inf weight or target entry at the row's largest logit): torch's
    ``w * log_softmax`` is ``inf * (z - lse)``, infinite, not ``inf * 0``; such a lane's
    share comes back through ``sum(w) * (lse - m)``, as every lane's does."""
    ref_old = finite_or_zero(m_run)
    ref_new = finite_or_zero(m_new)
    moved = tl.where(ref_old == ref_new, 0.0, w_vec * (ref_old - ref_new))
    d = z - ref_new
    return lin_vec + moved + tl.where(mask & (d != 0.0), w * d, 0.0), w_vec + w


@triton.jit
def mul_rn(a, b):
    """``a * b`` (fp32 or fp64), rounded once: compiled, a ``mul.rn`` that the compiler
    cannot fuse into a later add (``libdevice.mul_rn`` would flush fp32 subnormals)."""
    if LIBDEVICE:
        if a.dtype == tl.float64:
            return tl.inline_asm_elementwise("mul.rn.f64 $0, $1, $2;", "=d,d,d", [a, b],
                                             dtype=tl.float64, is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [a, b],
                                             dtype=tl.float32, is_pure=True, pack=1)
    else:
        return a * b


@triton.jit
def smoothed_target(q, keep, eps_c, HAS_SMOOTHING: tl.constexpr, ACC: tl.constexpr):
    """A probability target as the loss weighs it: ``q`` as loaded, or with label smoothing
    torch's ``q * (1 - eps) + eps / C`` formed as torch forms it, in ``q``'s own dtype
    (an fp32 target of fp64 logits is smoothed in fp32), returned in ``ACC``. For fp32,
    fp16 and bf16 targets torch rounds to the target's dtype after the product (taken in
    fp32 with ``1 - eps`` in fp32) and after the sum (``eps / C`` first rounded to the
    target's dtype: torch's CPU kernels); no fused multiply-add."""
    if not HAS_SMOOTHING:
        return q.to(ACC)
    elif q.dtype == tl.float64:
        qa = q.to(ACC)
        return mul_rn(qa, keep + tl.zeros_like(qa)) + eps_c
    else:
        q32 = q.to(tl.float32)
        e = cast_rn(eps_c.to(tl.float32), q).to(tl.float32)
        a = cast_rn(mul_rn(q32, keep.to(tl.float32) + tl.zeros_like(q32)), q)
        return cast_rn(a.to(tl.float32) + e, q).to(ACC)


@triton.jit
def is_nonfinite(g):
    return (tl.abs(g) == float("inf")) | (g != g)


@triton.jit
def nan_for_nonfinite(v, nonfinite, c, t_nan, WHOLE_ROW: tl.constexpr):
    """torch's NaN for a gradient scaled by a non-finite ``grad_output`` (``nonfinite``),
    where its backward through ``log_softmax`` forms ``inf - inf``: across the row
    (``WHOLE_ROW``: label smoothing, probability targets), else at column ``t_nan`` (the
    target where ``nonfinite``, -1 otherwise)."""
    if WHOLE_ROW:
        return tl.where(nonfinite, float("nan"), v)
    else:
        return tl.where(c == t_nan, float("nan"), v)


@triton.jit(do_not_specialize=["keep_bits", "eps_c_bits", "scale_bits", "softcap_bits",
                             "z_loss_bits"])
def cross_entropy_fwd_kernel(
    X, TARGET, WEIGHT, SCALARS, LOSS, LSE, GRAD,
    n_rows, C, sx, st, sg, DSCALE, sd,
    ignore_index, keep_bits, eps_c_bits, scale_bits, softcap_bits, z_loss_bits,
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_Z_LOSS: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    HAS_DSCALE: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One row per loop iteration of a persistent grid.

    ``SCALARS`` = [gradient scale (1/denominator for a mean, else 1), sum(weight)], device
    values computed before the launch so that nothing here needs the host. ``HAS_DSCALE``:
    the gradient is also scaled by ``grad_output`` (``DSCALE``, one value per row or, with
    ``sd = 0``, one for all), in fp32 before the store, as torch orders it (a backward that
    recomputes the gradient).
    """
    # 1 - label_smoothing and label_smoothing / C formed in fp64 on the host, rounded once
    # (as torch's scalars; 1 - an fp32 label_smoothing cancels near 1)
    keep = float_arg(keep_bits, ACC)
    eps_c = float_arg(eps_c_bits, ACC)
    logit_scale = float_arg(scale_bits, ACC)
    softcap = float_arg(softcap_bits, ACC)
    z_loss = float_arg(z_loss_bits, ACC)
    PRECISE: tl.constexpr = X.dtype.element_ty == tl.float32  # libm exp/log for fp32 logits
    cols = tl.arange(0, BLOCK_N)
    grad_scale = tl.load(SCALARS).to(ACC)
    w_sum = tl.load(SCALARS + 1).to(ACC)
    # an int64 counter: row + num_programs must not wrap when n_rows is near 2^31
    for r in range(tl.cast(tl.program_id(0), tl.int64), n_rows, tl.num_programs(0)):
        xrow = X + r * sx
        if not PROB_TARGET:
            t = tl.load(TARGET + r).to(tl.int64)
            ignored = t == ignore_index
            in_range = (t >= 0) & (t < C)
            t_safe = tl.where(in_range, t, 0)
            z_t = scaled_logits(tl.load(xrow + t_safe).to(ACC), logit_scale, softcap, HAS_SOFTCAP)
            w_t = 1.0
            if HAS_WEIGHT:
                w_t = tl.load(WEIGHT + t_safe).to(ACC)

        # ---- pass 1: max, sum of exp, and the linear sums the loss needs
        m = tl.full([], -float("inf"), ACC)
        s_vec = tl.zeros([BLOCK_N], ACC)
        lin_vec = tl.zeros([BLOCK_N], ACC)  # sum(w * (z - m)) or sum(w * q' * (z - m))
        wq_vec = tl.zeros([BLOCK_N], ACC)   # sum(w * q') or sum(w)
        for start in range(0, C, BLOCK_N):
            c = start + cols
            mask = c < C
            x = tl.load(xrow + c, mask=mask, other=0.0, eviction_policy="evict_last").to(ACC)
            z = tl.where(mask, scaled_logits(x, logit_scale, softcap, HAS_SOFTCAP), -float("inf"))
            m_new = tl.maximum(m, tl.max(z, 0))
            s_vec = s_vec * rescale_factor(m, m_new, PRECISE) + exp_(z - finite_or_zero(m_new), PRECISE)
            if PROB_TARGET or HAS_SMOOTHING:
                if HAS_WEIGHT:
                    w = tl.load(WEIGHT + c, mask=mask, other=0.0).to(ACC)
                else:
                    w = tl.where(mask, 1.0, 0.0).to(ACC)
                if PROB_TARGET:
                    q = tl.load(TARGET + r * st + c, mask=mask, other=0.0)
                    w = w * smoothed_target(q, keep, eps_c, HAS_SMOOTHING, ACC)
                lin_vec, wq_vec = linear_sum_update(lin_vec, wq_vec, z, w, mask, m, m_new)
            m = m_new
        shift = finite_or_zero(m)
        s_all = tl.sum(s_vec, 0)  # NaN when the row holds a NaN
        # torch: a +inf logit makes log_softmax NaN (inf - inf), so the loss is NaN too.
        s = tl.where(m == float("inf"), float("nan"), s_all)
        log_s = log_(s, PRECISE)  # lse - shift
        lse = shift + log_s

        if PROB_TARGET:
            coef = tl.sum(wq_vec, 0)
            loss = coef * log_s - tl.sum(lin_vec, 0)
        else:
            loss = keep * w_t * ((shift - z_t) + log_s)
            if HAS_SMOOTHING:
                loss += eps_c * (w_sum * log_s - tl.sum(lin_vec, 0))
        if HAS_Z_LOSS:
            loss += z_loss * lse * lse
            if PROB_TARGET:
                coef += 2.0 * z_loss * lse
        if not PROB_TARGET:
            loss = tl.where(ignored, 0.0, tl.where(in_range, loss, float("nan")))
        tl.store(LOSS + r, loss)
        # torch.logsumexp's +inf, unless the row also holds a NaN: the GPU's max skips NaN
        tl.store(LSE + r, tl.where((m == float("inf")) & (s_all == s_all), float("inf"), lse))

        # ---- pass 2 (L2-resident re-read): gradient of the row's loss
        if COMPUTE_GRAD:
            row_scale = grad_scale
            if HAS_DSCALE:
                d_out = tl.load(DSCALE + r * sd).to(ACC)
                row_scale = grad_scale * d_out
                # a non-finite grad_output: torch's NaN (cross_entropy_bwd_kernel's rule)
                nonfinite = is_nonfinite(d_out)
                t_nan = -1
                if not PROB_TARGET:
                    t_nan = tl.where(nonfinite, t, -1)
            # The gradient is g_coef * p minus the target's share (``row_scale`` times
            # ``keep * w_t`` at the target, ``eps_c * w`` everywhere), formed from the same
            # products as g_coef, as torch's ``dlogp - p * sum(dlogp)``: with one class
            # (p = 1) the two sides are equal and the gradient is exactly 0, as torch's.
            if PROB_TARGET:
                g_coef = coef * row_scale
            else:
                a_t = row_scale * keep * w_t
                e_c = row_scale * eps_c
                g_coef = a_t
                if HAS_SMOOTHING:
                    g_coef += e_c * w_sum
                if HAS_Z_LOSS:
                    g_coef += row_scale * (2.0 * z_loss * lse)
            for start in range(0, C, BLOCK_N):
                c = start + cols
                mask = c < C
                x = tl.load(xrow + c, mask=mask, other=0.0, eviction_policy="evict_first").to(ACC)
                z = x * logit_scale
                if HAS_SOFTCAP:
                    u = z / softcap
                    z = softcap * tanh(u)
                    dzdx = logit_scale * sech2(u, PRECISE)
                else:
                    dzdx = logit_scale
                p = div_(exp_(z - shift, PRECISE), s, PRECISE)
                if HAS_WEIGHT:
                    w = tl.load(WEIGHT + c, mask=mask, other=0.0).to(ACC)
                else:
                    w = 1.0
                if PROB_TARGET:
                    q = tl.load(TARGET + r * st + c, mask=mask, other=0.0)
                    dz = g_coef * p - row_scale * (w * smoothed_target(q, keep, eps_c,
                                                                        HAS_SMOOTHING, ACC))
                elif HAS_SMOOTHING:
                    dz = g_coef * p - (tl.where(c == t, a_t, 0.0) + e_c * w)
                else:
                    dz = g_coef * p - tl.where(c == t, a_t, 0.0)
                dz = dz * dzdx
                if HAS_DSCALE:
                    dz = nan_for_nonfinite(dz, nonfinite, c, t_nan, PROB_TARGET or HAS_SMOOTHING)
                if not PROB_TARGET:  # after dzdx: softcap's sech^2 of a NaN logit is NaN
                    dz = tl.where(ignored, 0.0, tl.where(in_range, dz, float("nan")))
                tl.store(GRAD + r * sg + c, out_cast(dz, GRAD), mask=mask,
                         eviction_policy="evict_first")


@triton.jit
def cross_entropy_bwd_kernel(GRAD, DLOSS, TARGET, n_rows, C, sg, sd, ignore_index,
                             NONFINITE_ROW: tl.constexpr, HAS_TARGET: tl.constexpr,
                             SKIP_IGNORED: tl.constexpr, ACC: tl.constexpr,
                             BLOCK_N: tl.constexpr):
    """Scale each row of the forward's gradient by ``grad_output`` in place.

    ``sd`` is 0 for a scalar ``grad_output`` (mean / sum). A row whose scale is exactly 1
    (``loss.backward()``) is skipped on the device: a launch, not a pass over HBM; so is,
    with ``SKIP_IGNORED``, a row whose target is ``ignore_index`` (its gradient is 0 from
    the forward and stays 0 whatever ``grad_output`` holds, as torch's).

    A non-finite ``grad_output`` (inf, NaN) gives NaN where torch's backward through
    ``log_softmax`` forms ``inf - inf``: across the row (``NONFINITE_ROW``: label
    smoothing, probability targets), else at the row's target (``HAS_TARGET``: class-index
    targets).
    """
    cols = tl.arange(0, BLOCK_N)
    # an int64 counter: row + num_programs must not wrap when n_rows is near 2^31
    for r in range(tl.cast(tl.program_id(0), tl.int64), n_rows, tl.num_programs(0)):
        g = tl.load(DLOSS + r * sd).to(ACC)
        scale_row = g != 1.0
        if SKIP_IGNORED:
            scale_row = scale_row & (tl.load(TARGET + r).to(tl.int64) != ignore_index)
        if scale_row:
            nonfinite = is_nonfinite(g)
            t_nan = -1  # the column made NaN (none: -1)
            if HAS_TARGET and not NONFINITE_ROW:
                t_nan = tl.where(nonfinite, tl.load(TARGET + r).to(tl.int64), -1)
            for start in range(0, C, BLOCK_N):
                c = start + cols
                mask = c < C
                v = tl.load(GRAD + r * sg + c, mask=mask, other=0.0).to(ACC) * g
                if NONFINITE_ROW or HAS_TARGET:
                    v = nan_for_nonfinite(v, nonfinite, c, t_nan, NONFINITE_ROW)
                tl.store(GRAD + r * sg + c, out_cast(v, GRAD), mask=mask)
