"""Vocab-parallel cross-entropy: the per-rank passes over a shard of the vocabulary.

Each rank holds the logits of classes ``[vocab_start, vocab_start + C)`` of every row
(``C`` = the local shard size). With ``z = logit_scale * x`` (then
``softcap * tanh(z / softcap)`` with ``HAS_SOFTCAP``):

* ``vocab_parallel_stats_kernel`` (forward, one pass over the shard) writes, per row, the
  local max ``m`` and, in one packed row of sums, ``sum(exp(z - shift(m)))``, the target
  logit ``z_t`` where this rank owns the target (0 elsewhere, so a sum over ranks gathers
  it), and ``sum(w * (z - shift(m)))`` over the shard (only with label smoothing). The
  host moves both sums to the global max and combines ranks with two all-reduces of
  O(rows) floats (max, then the sums) into the global log-sum-exp and the loss; the
  logits never leave the rank. ``linear_cross_entropy`` runs the same kernels on chunks
  of the vocabulary in turn.
* ``vocab_parallel_bwd_kernel`` (backward, one pass) writes the gradient of the shard from
  the saved global log-sum-exp and three per-row coefficients that already hold the
  reduction scale, ``grad_output`` and ``logit_scale``::

      dx_j = a * exp(z_j - lse) - b * onehot(t - vocab_start)_j - c * w_j

  (``a = coef``, ``b = (1 - eps) * w_t``, ``c = eps / V``, each times the scales; all 0
  for an ignored row). No communication: the global quantities are already in ``lse``
  and the coefficients.

HBM passes: forward one read of the shard (nothing written but O(rows) floats), backward
one read and one write of the shard — the floor for a loss whose gradient is taken later.
``shift(m)`` is torch's rule (an infinite max becomes 0, ``finite_or_zero``); a ``+inf``
logit makes the row's sum NaN, as torch's log-softmax does.
"""

import triton
import triton.language as tl

from .cross_entropy import linear_sum_update, scaled_logits, sech2, tanh
from .softmax import exp_, finite_or_zero, float_arg, out_cast, rescale_factor


@triton.jit(do_not_specialize=["scale_bits", "softcap_bits"])
def vocab_parallel_stats_kernel(
    X, TARGET, WEIGHT, MAX, SUMS,
    n_rows, C, sx, ss, vocab_start, scale_bits, softcap_bits,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One row per loop iteration of a persistent grid; ``C >= 1`` (the host serves empty
    shards). ``SUMS`` rows (stride ``ss``) get ``[sum of exp, owned z_t, sum(w * (z - m))]``
    with ``m`` the shard's max (``finite_or_zero``; ``linear_sum_update``): the host moves
    the last to the global max as it rescales the sum of exps. ``WEIGHT`` is the local
    slice of the class weight."""
    logit_scale = float_arg(scale_bits, ACC)
    softcap = float_arg(softcap_bits, ACC)
    PRECISE: tl.constexpr = X.dtype.element_ty == tl.float32  # libm exp for fp32 logits
    cols = tl.arange(0, BLOCK_N)
    # an int64 counter: row + num_programs must not wrap when n_rows is near 2^31
    for r in range(tl.cast(tl.program_id(0), tl.int64), n_rows, tl.num_programs(0)):
        xrow = X + r * sx
        t_local = tl.load(TARGET + r).to(tl.int64) - vocab_start
        owned = (t_local >= 0) & (t_local < C)
        z_t = scaled_logits(tl.load(xrow + tl.where(owned, t_local, 0)).to(ACC), logit_scale,
                            softcap, HAS_SOFTCAP)
        z_t = tl.where(owned, z_t, 0.0)

        m = tl.full([], -float("inf"), ACC)
        s_vec = tl.zeros([BLOCK_N], ACC)
        lin_vec = tl.zeros([BLOCK_N], ACC)
        w_vec = tl.zeros([BLOCK_N], ACC)
        for start in range(0, C, BLOCK_N):
            c = start + cols
            mask = c < C
            z = scaled_logits(tl.load(xrow + c, mask=mask, other=0.0).to(ACC), logit_scale,
                              softcap, HAS_SOFTCAP)
            z = tl.where(mask, z, -float("inf"))
            m_new = tl.maximum(m, tl.max(z, 0))
            s_vec = s_vec * rescale_factor(m, m_new, PRECISE) + exp_(z - finite_or_zero(m_new), PRECISE)
            if HAS_SMOOTHING:
                if HAS_WEIGHT:
                    w = tl.load(WEIGHT + c, mask=mask, other=0.0).to(ACC)
                else:
                    w = tl.where(mask, 1.0, 0.0).to(ACC)
                lin_vec, w_vec = linear_sum_update(lin_vec, w_vec, z, w, mask, m, m_new)
            m = m_new
        s = tl.sum(s_vec, 0)
        s = tl.where(m == float("inf"), float("nan"), s)  # torch: +inf in a row -> NaN
        tl.store(MAX + r, m)
        tl.store(SUMS + r * ss, s)
        tl.store(SUMS + r * ss + 1, z_t)
        if HAS_SMOOTHING:
            tl.store(SUMS + r * ss + 2, tl.sum(lin_vec, 0))


@triton.jit(do_not_specialize=["scale_bits", "softcap_bits"])
def vocab_parallel_bwd_kernel(
    X, TARGET, WEIGHT, LSE, COEF, GRAD,
    n_rows, C, sx, sc, sg, vocab_start, scale_bits, softcap_bits,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Gradient of the shard; ``COEF`` rows (stride ``sc``) hold ``[a, b, c]`` (``c`` only
    with label smoothing), times ``logit_scale``; with softcap the result is multiplied by
    ``dz/d(x * logit_scale) = sech**2`` (``sech2``). A row with ``a == 0`` (ignored) gets 0 from the
    first term whatever ``lse`` holds, so a non-finite ``lse`` cannot turn its zero gradient
    into NaN. ``GRAD`` may be ``X`` itself (each element is read before it is written)."""
    logit_scale = float_arg(scale_bits, ACC)
    softcap = float_arg(softcap_bits, ACC)
    PRECISE: tl.constexpr = X.dtype.element_ty == tl.float32
    cols = tl.arange(0, BLOCK_N)
    # an int64 counter: row + num_programs must not wrap when n_rows is near 2^31
    for r in range(tl.cast(tl.program_id(0), tl.int64), n_rows, tl.num_programs(0)):
        xrow = X + r * sx
        t_local = tl.load(TARGET + r).to(tl.int64) - vocab_start
        # the log-sum-exp as (shift, log of the sum): z - shift is exact near the max, so
        # exp((z - shift) - log_s) keeps its precision at large |z| (z - lse would lose
        # |z| * eps to lse's rounding)
        shift = tl.load(LSE + 2 * r).to(ACC)
        log_s = tl.load(LSE + 2 * r + 1).to(ACC)
        a = tl.load(COEF + r * sc).to(ACC)
        b = tl.load(COEF + r * sc + 1).to(ACC)
        if HAS_SMOOTHING:
            c_w = tl.load(COEF + r * sc + 2).to(ACC)
        for start in range(0, C, BLOCK_N):
            c = start + cols
            mask = c < C
            z = tl.load(xrow + c, mask=mask, other=0.0).to(ACC) * logit_scale
            if HAS_SOFTCAP:
                u = z / softcap
                z = softcap * tanh(u)
            dx = tl.where(a == 0.0, 0.0, a * exp_((z - shift) - log_s, PRECISE))
            dx -= tl.where(c == t_local, b, 0.0)
            if HAS_SMOOTHING:
                if HAS_WEIGHT:  # where, not times: an ignored row (c_w = 0) and an inf weight
                    w = tl.load(WEIGHT + c, mask=mask, other=0.0).to(ACC)
                    dx -= tl.where(c_w == 0.0, 0.0, c_w * w)
                else:
                    dx -= c_w
            if HAS_SOFTCAP:  # an ignored row (a == 0) stays 0 even where sech^2 is NaN
                dx = tl.where(a == 0.0, 0.0, dx * sech2(u, PRECISE))
            tl.store(GRAD + r * sg + c, out_cast(dx, GRAD), mask=mask)
