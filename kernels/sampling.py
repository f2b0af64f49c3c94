"""Sampling token ids from logits: temperature, top-k, top-p and min-p without a sort.

What it draws. Row ``r`` with logits ``x`` and temperature ``T > 0`` has scaled logits
``s = x / T`` and probabilities ``softmax(s)``. The kept set ``K`` is the intersection of

* top-k: tokens with ``s >= tau_k``, ``tau_k`` the k-th largest value of ``s``;
* top-p: tokens with ``s >= tau_p``, ``tau_p`` the largest value whose tokens at or above
  it carry probability mass ``>= p`` (the smallest most-probable set with mass ``>= p``),
  the mass measured after top-k (Hugging Face's and vLLM's order): as a fraction of the
  top-k set's, which one bisection for the k-th largest value gives;
* min-p: tokens with ``p_i >= min_p * p_max``, i.e. ``exp(s_i - max s) >= min_p``.

Ties at a threshold are all kept (a tie at the k-th value keeps more than k tokens), so
``K`` is a function of the values alone, never of token order. A token is drawn from
``softmax(s)`` restricted to ``K`` by the Gumbel-max trick: the argmax of ``s_i + G_i``,
``G_i = -log(-log U_i)``, over a set ``S`` is distributed as ``p_i / sum_S p_j`` (drawn in
two levels, blocks then tokens: below). ``T = 0``
draws the argmax of ``x`` (first index on ties, as ``torch.argmax``), which ``K`` contains.

Why no sort: rejection with a rising floor (the pivot scheme of FlashInfer). All three
filters keep upper sets of the values, so ``j`` is in the top-k/top-p part of ``K`` iff
fewer than ``k`` tokens, carrying mass ``< p``, are strictly above ``s_j``: one counting and
summing pass decides it. Draw ``j`` from ``S = {s > floor} & min-p`` (the floor starts at
``-inf``); if ``j`` is in ``K``, it is a draw from ``softmax(s)`` restricted to ``K``
(``K`` is inside ``S``); if not, nothing at or below ``s_j`` is in ``K``, so the floor rises
to ``s_j`` and we draw again with fresh noise. Each rejection removes at least the drawn
token and everything below it, so a row ends after at most ``V`` rounds, and in few on
real logits: a top-p of 0.9 alone accepts the first draw with probability at least 0.9. The
counting pass for a candidate also draws, speculatively, the next candidate above it, so a
round is one pass over the row.

Values are compared through int32 keys with the order of the fp32 values (flip the
magnitude bits of negatives): ties are exact and the floor is an exclusive key.

Two-level draws. One Gumbel variate per token would make the noise generator, not memory,
the cost of a pass (plain temperature sampling measured 3-5x one read of the logits from
batch 64 up on an H200). So a draw first picks a block of ``BLOCK_N`` tokens (the draw
block: 2048, or the whole short row) by Gumbel-max over the blocks' log kept mass, one
variate per block, gathered in the same pass as everything else; then a token inside the
winning block by Gumbel-max over its kept tokens, re-reading that block only. Block ``b``
wins with probability ``M_b / M`` (``M_b`` its kept mass) and token ``i`` in it with
``p_i / M_b``: together ``p_i / M``, the one-level draw exactly. Noise per draw: one
variate per block and one per token of one block, instead of one per token.

HBM passes. Plain temperature sampling: one read of the row, plus the chosen block (the
noise is counter based, Philox of ``(seed, f(draw, row, token // 4))``, and costs no memory
traffic). min-p alone: two (the row max first). top-k / top-p: the max-and-sum pass (top-p,
min-p), the first draw, then one pass per round; top-k with top-p 5 more over a long
row (radix select of the k-th largest value: ``kth_largest_key``, then the top-k set's
mass), 33 over a tile of short ones (bisection). Re-reads of a row of 128k bf16 logits
(256 KB) hit L2 on an H100. Draws depend only on the seed, so equal seeds give equal draws.

Few rows. One program walking a row alone is bound by its own latency, not by HBM, so
when rows are too few to fill the GPU ``split_kernel`` cuts each row into parts, one
program each and one launch per pass: a pass's per-part results (the best draw block, the
count and mass above the candidate, the max and sum, the radix select's byte histograms
and the top-k mass: ``split_stats_kernel``) go to global memory, and the next launch
combines them (the best draw in part order, sums by one fixed-shape reduction). The
first ``SPLIT_ROUNDS`` rejection rounds (host constant) run split; a last launch, one
program per row, finishes the rare rows still undecided.
The noise does not depend on the split, so split and whole rows draw the same tokens
(but where a mass sits within rounding of a top-p cut: the parts add it in another order).

Numerics. Everything in fp32 (fp64 logits are rounded to fp32: sampling needs no more).
The Gumbel noise is never added to ``s`` itself, whose fp32 spacing at ``|s|`` of 1e6
(``T = 1e-5``) is 1/16: a token's noise goes to ``s`` less its block's largest kept value,
and a block's score is kept as an exact two-float sum (``two_sum``), so tied tokens keep
equal chances at any temperature above the greedy threshold.
``-0.0`` is folded into ``+0.0`` before keying. ``-inf`` logits have probability 0 and are
never drawn unless the whole row is ``-inf`` (then token 0, as ``torch.argmax``).
"""

import triton
import triton.language as tl

from .softmax import finite_or_zero, online_update


#: Temperatures below this are greedy: ``1 / T`` would overflow fp32 (and below it any
#: logit gap of 1e-29 or more already decides the draw).
GREEDY_BELOW = tl.constexpr(1e-30)


@triton.jit
def order_key(s):
    """int32 key of fp32 ``s`` with the order of the values (``s`` never ``-0.0`` here)."""
    bits = s.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def scaled_block(X, rows64, rmask, sxm, start, cols, V, inv_t):
    """Scaled logits ``x * inv_t`` of one ``[R, B]`` block (``-inf`` outside the row)."""
    c = start + cols
    mask = rmask[:, None] & (c < V)[None, :]
    x = tl.load(X + rows64[:, None] * sxm + c[None, :], mask=mask, other=-float("inf"))
    # + 0.0 turns -0.0 into +0.0, so equal values get equal keys.
    return x.to(tl.float32) * inv_t[:, None] + 0.0, mask


@triton.jit
def uniform(bits):
    """Uniforms in (0, 1) from random 32-bit words. Triton's ``uint_to_uniform_float`` maps
    two words (0 and 0xFFFFFFFF) to exactly 0, whose Gumbel variate is -inf: a block or token
    that held all the kept mass could then lose to nothing, and the row would return token 0
    (2^-31 per draw). The floor, fp32's smallest normal, keeps every variate finite."""
    return tl.maximum(tl.random.uint_to_uniform_float(bits), 1.1754943508222875e-38)


@triton.jit
def block_uniform(seed, draw, rows, n_rows, V, start, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """Uniforms in (0, 1) for the ``[R, B]`` block at column ``start`` of draw ``draw``.

    One Philox call gives four 32-bit words (``randint4x``), so a call serves four adjacent
    tokens: counter ``(draw * n_rows + row) * ceil(V / 4) + column // 4`` (``start`` is a
    multiple of ``BLOCK_N >= 4``), unique per token and draw. The generator is
    the costly part of a sampling pass, a quarter of it with ``tl.rand`` per token.
    """
    q = tl.arange(0, BLOCK_N // 4)
    ctr = ((draw * n_rows + rows) * tl.cdiv(V, 4) + start // 4)[:, None] + q[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, ctr)
    bits = tl.interleave(tl.interleave(r0, r1), tl.interleave(r2, r3))
    return tl.reshape(uniform(bits), (BLOCK_R, BLOCK_N))


@triton.jit
def kept(s, mask, shift, min_p, floor, HAS_MIN_P: tl.constexpr, HAS_FLOOR: tl.constexpr):
    """The draw's set within a block: in the row (``mask``), min-p against ``shift`` (the
    row max), and keys above ``floor`` (a rejection round's candidate). The block's score
    and the token draw in the chosen block must use this same rule."""
    keep = mask
    if HAS_MIN_P:
        keep = keep & (tl.exp(s - shift[:, None]) >= min_p[:, None])
    if HAS_FLOOR:
        keep = keep & (order_key(s) > floor[:, None])
    return keep


@triton.jit
def byte_histogram(X, rows, rmask, sxm, col_lo, col_hi, cols, V, inv_t, prefix, shift):
    """A step of radix select over columns ``[col_lo, col_hi)`` of one row (``rows`` of
    shape ``[1]``): the 256-bin histogram of the key byte at bit ``shift`` among the keys
    whose bytes above it equal ``prefix`` (the key read as unsigned, ``key + 2^31``)."""
    hist = tl.zeros([256], tl.int32)
    for start in range(col_lo, col_hi, cols.shape[0]):
        s, mask = scaled_block(X, rows, rmask, sxm, start, cols, V, inv_t)
        u = order_key(s).to(tl.int64) + 2147483648  # in [0, 2^32), in key order
        same = mask & ((u >> (shift + 8)) == prefix[:, None])
        digit = ((u >> shift) & 255).to(tl.int32)
        hist += tl.histogram(tl.reshape(digit, (cols.shape[0],)), 256,
                             mask=tl.reshape(same, (cols.shape[0],)))
    return hist


@triton.jit
def radix_byte(hist, k_rem, prefix):
    """The next byte of the k-th largest key from the histogram of that byte
    (``byte_histogram``): the largest byte whose bin and the bins above it hold ``k_rem``
    keys. Returns ``(k_rem, prefix)`` with the keys above that bin counted off and the
    byte appended."""
    bins = tl.arange(0, 256)
    from_top = tl.cumsum(hist, 0, reverse=True)
    byte = tl.max(tl.where(from_top >= k_rem, bins, 0), 0)
    k_rem -= tl.sum(tl.where(bins > byte, hist, 0), 0)
    return k_rem, prefix * 256 + byte


@triton.jit
def kth_largest_key(X, rows, rmask, sxm, cols, V, inv_t, k, BLOCK_R: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    """Each row's k-th largest int32 key, ties counted: the largest key with at least ``k``
    keys at or above it (``k`` at most the row's length). One row per program (long rows):
    radix select on the key's four bytes, high to low, each pass a 256-bin histogram of
    the next byte among the keys that share the bytes chosen so far: 4 passes over the row
    (which stays in L2). Several rows to a tile (short rows; a histogram serves one row):
    bisection of the 2^32 keys, 32 counting passes. (Split rows run the radix passes one
    launch each, the parts' histograms added up: ``split_stats_kernel``.)"""
    if BLOCK_R == 1:
        prefix = tl.zeros([1], tl.int64)  # the bytes chosen so far, as an unsigned number
        k_rem = tl.sum(k, 0)  # keys still to count down from the top
        for level in tl.static_range(4):
            hist = byte_histogram(X, rows, rmask, sxm, 0, V, cols, V, inv_t, prefix,
                                  24 - 8 * level)
            k_rem, prefix = radix_byte(hist, k_rem, prefix)
        key = prefix - 2147483648
    else:
        key = tl.full([BLOCK_R], -2147483648, tl.int64)  # count(key >= lo) = V >= k
        hi = tl.full([BLOCK_R], 2147483647, tl.int64)
        for _ in range(32):
            mid = (key + hi + 1) >> 1
            count = tl.zeros([BLOCK_R], tl.int32)
            for start in range(0, V, BLOCK_N):
                s, mask = scaled_block(X, rows, rmask, sxm, start, cols, V, inv_t)
                at_or_above = mask & (order_key(s).to(tl.int64) >= mid[:, None])
                count += tl.sum(at_or_above.to(tl.int32), 1)
            enough = count >= k
            key = tl.where(enough, mid, key)
            hi = tl.where(enough, hi, mid - 1)
    return key


@triton.jit
def split_kth_key(ROW_HIST, row, k, levels):
    """Split rows: ``(k_rem, prefix)`` of radix select after ``levels`` bytes, from the
    row's byte histograms in ``ROW_HIST`` (``n_rows x 4 x 256``, each the sum of the
    parts' histograms: ``split_stats_kernel``). After 4 levels ``prefix - 2^31`` is the
    k-th largest key, as ``kth_largest_key`` finds it walking the whole row."""
    prefix = tl.zeros([1], tl.int64)
    k_rem = tl.sum(k, 0)
    for level in range(levels):
        hist = tl.load(ROW_HIST + (row * 4 + level) * 256 + tl.arange(0, 256))
        k_rem, prefix = radix_byte(hist, k_rem, prefix)
    return k_rem, prefix


@triton.jit
def top_k_needed(TOPK, st_k, TOPP, st_p, rows, rmask, V, greedy):
    """``(k, needed)``: top-k's ``k`` per row and whether top-p after top-k needs the top-k
    set's mass (``k < V``, ``p < 1``, not greedy): the rows that search the k-th largest."""
    k = tl.load(TOPK + rows * st_k, mask=rmask, other=1).to(tl.int64)
    p = tl.load(TOPP + rows * st_p, mask=rmask, other=1.0).to(tl.float32)
    return k, rmask & (k < V) & (p < 1.0) & ~greedy


@triton.jit
def top_mass(X, rows, rmask, sxm, col_lo, col_hi, cols, V, inv_t, shift, kth):
    """``sum(exp(s - shift))`` over the columns ``[col_lo, col_hi)`` whose key is at least
    ``kth`` (the top-k set)."""
    top = tl.zeros([rows.shape[0]], tl.float32)
    for start in range(col_lo, col_hi, cols.shape[0]):
        s, mask = scaled_block(X, rows, rmask, sxm, start, cols, V, inv_t)
        inside = mask & (order_key(s).to(tl.int64) >= kth[:, None])
        top += tl.sum(tl.where(inside, tl.exp(s - shift[:, None]), 0.0), 1)
    return top


@triton.jit
def top_k_mass(X, rows, rmask, sxm, cols, V, inv_t, shift, k, z, needed,
               BLOCK_R: tl.constexpr, SELECT_STEP: tl.constexpr):
    """``sum(exp(s - shift))`` over the top-k set (every token tied with the k-th largest
    value included), against which top-p after top-k measures its ``p``; ``z`` (the whole
    row's) where it is not ``needed`` (``k >= V``, ``p >= 1``, greedy). The k-th largest
    key (``kth_largest_key``: 4 passes over a long row, 32 over a tile of short ones, in
    steps of ``SELECT_STEP`` columns: wider ones spill at 8 warps), then one summing pass
    in steps of ``cols``; skipped, on the device, by a tile with no row that needs it."""
    mass = z
    if tl.max(needed.to(tl.int32), 0) > 0:
        kth = kth_largest_key(X, rows, rmask, sxm, tl.arange(0, SELECT_STEP), V, inv_t,
                              tl.minimum(k, V), BLOCK_R, SELECT_STEP)
        mass = tl.where(needed, top_mass(X, rows, rmask, sxm, 0, V, cols, V, inv_t, shift, kth),
                        z)
    return mass


@triton.jit
def two_sum(a, b):
    """``(hi, lo)`` with ``hi = fl(a + b)`` and ``hi + lo = a + b`` exactly (Knuth's
    TwoSum; ``lo`` is 0 where ``hi`` is not finite)."""
    hi = a + b
    bb = hi - a
    lo = (a - (hi - bb)) + (b - bb)
    return hi, tl.where(tl.abs(hi) < float("inf"), lo, 0.0)


@triton.jit
def better_score(hi, lo, best_hi, best_lo):
    """``(hi, lo) > (best_hi, best_lo)``, the scores as unevaluated sums (``two_sum``):
    strict, so the earlier of two equal scores wins."""
    return (hi > best_hi) | ((hi == best_hi) & (lo > best_lo))


@triton.jit
def block_scores(sk, ctr_start, rows, n_rows, V, greedy, seed, draw):
    """The score of each draw block, one per row of ``sk`` (the block's kept ``s``, ``-inf``
    elsewhere), as the exact sum ``(hi, lo)`` of ``two_sum``: ``m + r``, ``m`` the block's
    largest kept ``s`` and ``r`` the log of its kept sum relative to ``m``, plus the
    block's Gumbel noise (greedy rows: ``m`` alone). One uniform per block, counter
    ``(draw * n_rows + row) * ceil(V / 4) + ctr_start // 4`` (the first of the block's
    token counters). A block with nothing kept scores ``-inf``."""
    m = tl.max(sk, 1)
    shift = finite_or_zero(m)
    r = tl.log(tl.sum(tl.exp(sk - shift[:, None]), 1))  # -inf: none kept
    ctr = (draw * n_rows + rows) * tl.cdiv(V, 4) + ctr_start // 4
    u = uniform(tl.randint(seed, ctr))
    return two_sum(shift, tl.where(greedy, m - shift, r - tl.log(-tl.log(u))))


@triton.jit
def first_best(hi, lo, BLOCK: tl.constexpr):
    """The largest pair ``(hi, lo)`` of ``BLOCK`` scores (``better_score``'s order) and its
    first index: the winner of folding them one by one in order."""
    idx = tl.arange(0, BLOCK)
    top = tl.max(hi, 0)
    top_lo = tl.max(tl.where(hi == top, lo, -float("inf")), 0)
    return top, top_lo, tl.min(tl.where((hi == top) & (lo == top_lo), idx, BLOCK), 0)


@triton.jit
def block_choice(best, best_lo, best_start, s, keep, start, rows, n_rows, V, greedy, seed,
                 draw):
    """Fold one ``[R, B]`` block (a draw block) into the running Gumbel-max over draw
    blocks: it scores ``log(sum of exp(s) over its kept tokens) + G`` (greedy rows: the
    largest kept ``s``; ``block_scores``), so the winner is drawn with probability
    proportional to the block's kept mass. A block with nothing kept costs no noise;
    nothing kept anywhere leaves ``best = -inf``.

    The score, ``m + r`` plus the noise (a few tens at most), is held as the exact sum
    ``(best, best_lo)``: at ``|s|`` of 1e6 (``T = 1e-5``, logits of 10) an fp32 sum would
    round the noise to 1/16, and blocks of nearly equal mass would tie, the first winning."""
    if tl.max(tl.max(keep.to(tl.int32), 1), 0) > 0:
        hi, lo = block_scores(tl.where(keep, s, -float("inf")), start, rows, n_rows, V, greedy,
                              seed, draw)
        better = better_score(hi, lo, best, best_lo)
        best = tl.where(better, hi, best)
        best_lo = tl.where(better, lo, best_lo)
        best_start = tl.where(better, start, best_start)
    return best, best_lo, best_start


@triton.jit
def block_choice_wide(best, best_lo, best_start, s, keep, start, rows, n_rows, V, greedy,
                      seed, draw, BLOCK_N: tl.constexpr, UNROLL: tl.constexpr):
    """``block_choice`` over ``UNROLL`` consecutive draw blocks of one row at once (``s``
    and ``keep`` of shape ``[1, UNROLL * BLOCK_N]``): the same per-block scores and noise,
    and the same winner as folding the blocks one by one (the best score, the first block
    on ties, and only if strictly better than ``best``). Lets a program that walks a row
    alone keep ``UNROLL`` blocks of loads in flight: one block per step left it waiting
    on memory (a pass over a 128k row took ~60 us on an H200)."""
    if UNROLL == 1:
        best, best_lo, best_start = block_choice(best, best_lo, best_start, s, keep, start,
                                                 rows, n_rows, V, greedy, seed, draw)
    elif tl.max(tl.max(keep.to(tl.int32), 1), 0) > 0:
        sk = tl.reshape(tl.where(keep, s, -float("inf")), (UNROLL, BLOCK_N))
        starts = start + tl.arange(0, UNROLL) * BLOCK_N
        hi, lo = block_scores(sk, starts, rows, n_rows, V, greedy, seed, draw)  # [UNROLL]
        # a NaN score never wins (block_choice's strict comparison): as -inf here
        hi = tl.where(hi == hi, hi, -float("inf"))
        lo = tl.where(hi > -float("inf"), lo, 0.0)
        top, top_lo, first = first_best(hi, lo, UNROLL)
        top_v = tl.zeros_like(best) + top
        top_lo_v = tl.zeros_like(best_lo) + top_lo
        better = better_score(top_v, top_lo_v, best, best_lo)
        best = tl.where(better, top_v, best)
        best_lo = tl.where(better, top_lo_v, best_lo)
        best_start = tl.where(better, start + first * BLOCK_N, best_start)
    return best, best_lo, best_start


@triton.jit
def draw_in_block(X, rows, rmask, sxm, blk_start, V, inv_t, greedy, seed, draw, n_rows,
                  shift, min_p, floor, HAS_MIN_P: tl.constexpr, HAS_FLOOR: tl.constexpr,
                  BLOCK_R: tl.constexpr, DRAW_BLOCK: tl.constexpr):
    """The token of each row's chosen draw block (``blk_start``, per row): Gumbel-max over
    its kept tokens (the same rule as the block's score: the mask, min-p against
    ``shift``, and keys above ``floor``), with the noise of ``draw``. Given the block, a
    token is drawn with probability ``p_i / (kept mass of the block)``; with the block's
    own probability that makes ``p_i / (all kept mass)``: exactly the one-level draw."""
    cols = tl.arange(0, DRAW_BLOCK)
    c = blk_start[:, None] + cols[None, :]
    mask = rmask[:, None] & (c < V)
    x = tl.load(X + rows[:, None] * sxm + c, mask=mask, other=-float("inf"))
    s = x.to(tl.float32) * inv_t[:, None] + 0.0
    keep = kept(s, mask, shift, min_p, floor, HAS_MIN_P, HAS_FLOOR)
    sk = tl.where(keep, s, -float("inf"))
    u = block_uniform(seed, draw, rows, n_rows, V, blk_start, BLOCK_R, DRAW_BLOCK)
    # the noise is added to s less the block's largest kept value (exact near it), so it
    # keeps its precision at large |s|; u > 0: finite noise
    rel = sk - finite_or_zero(tl.max(sk, 1))[:, None]
    score = tl.where(greedy[:, None], sk, rel - tl.log(-tl.log(u)))
    # first index on ties (greedy rows: torch.argmax's rule); a row with nothing kept (all
    # -inf: no block was chosen, blk_start 0) gets token 0
    return tl.argmax(score, 1).to(tl.int64) + blk_start


@triton.jit
def inverse_temperature(TEMP, rows, rmask, st_t):
    """``(1 / T, greedy)`` per row: greedy rows (``T`` below ``GREEDY_BELOW``) keep the
    logits as they are (``1 / T`` read as 1)."""
    t = tl.load(TEMP + rows * st_t, mask=rmask, other=1.0).to(tl.float32)
    greedy = t < GREEDY_BELOW  # 0, or so small that x / T would overflow fp32
    return tl.where(greedy, 1.0, 1.0 / tl.where(greedy, 1.0, t)), greedy


@triton.jit
def filter_targets(TOPK, st_k, TOPP, st_p, rows, rmask, V, z_p,
                   HAS_TOP_K: tl.constexpr, HAS_TOP_P: tl.constexpr):
    """``(k_target, mass_target)``: a candidate is kept iff fewer than ``k_target`` tokens,
    of mass ``< mass_target`` (``p`` times ``z_p``, the top-k set's mass, or the row's),
    lie above it; a switched-off filter (``k >= V``, ``p >= 1``) accepts everything."""
    k_target = tl.full([1], V + 1, tl.int64)  # unused without top-k
    mass_target = tl.full([1], float("inf"), tl.float32)  # unused without top-p
    if HAS_TOP_K:
        k = tl.load(TOPK + rows * st_k, mask=rmask, other=1).to(tl.int64)
        k_target = tl.where(k >= V, V + 1, k)
    if HAS_TOP_P:
        p = tl.load(TOPP + rows * st_p, mask=rmask, other=1.0).to(tl.float32)
        mass_target = tl.where(p >= 1.0, float("inf"), p * z_p)
    return k_target, mass_target


@triton.jit
def max_and_sum(X, rows, rmask, sxm, col_lo, col_hi, cols, V, inv_t, WITH_SUM: tl.constexpr):
    """Over columns ``[col_lo, col_hi)`` of the rows: the max ``m`` of ``s = x / T`` and,
    ``WITH_SUM``, ``sum(exp(s - finite_or_zero(m)))`` (online, one ``exp`` per element;
    else 0)."""
    m = tl.full([rows.shape[0]], -float("inf"), tl.float32)
    s_vec = tl.zeros([rows.shape[0], cols.shape[0]], tl.float32)
    for start in range(col_lo, col_hi, cols.shape[0]):
        s, mask = scaled_block(X, rows, rmask, sxm, start, cols, V, inv_t)
        if WITH_SUM:
            m, s_vec = online_update(m, s_vec, s, False)
        else:
            m = tl.maximum(m, tl.max(s, 1))
    return m, tl.sum(s_vec, 1)


@triton.jit
def store_part_stats(PART_MZ, rows, rmask, n_split, part, m, z):
    """One part's ``(max, sum)`` into ``PART_MZ`` (``n_rows x 2 x n_split``)."""
    tl.store(PART_MZ + rows * (2 * n_split) + part, m, mask=rmask)
    tl.store(PART_MZ + rows * (2 * n_split) + n_split + part, z, mask=rmask)


@triton.jit
def round_pass(X, rows, rmask, sxm, col_lo, col_hi, cols, V, inv_t, greedy, seed, noise,
               n_rows, shift, min_p, floor, HAS_TOP_K: tl.constexpr, HAS_TOP_P: tl.constexpr,
               HAS_MIN_P: tl.constexpr, HAS_FLOOR: tl.constexpr, BLOCK_N: tl.constexpr,
               UNROLL: tl.constexpr):
    """One pass over columns ``[col_lo, col_hi)`` of the rows: the draw block (score and
    first column) of a Gumbel-max draw, with noise ``noise``, from the tokens kept by min-p
    and, with ``HAS_FLOOR``, above ``floor``; and, for the candidate at ``floor``, the
    count (top-k) and mass (top-p) of the tokens above it. Returns ``(count, mass, best,
    best_lo, blk)``."""
    BLOCK_R: tl.constexpr = rows.shape[0]
    count = tl.zeros([BLOCK_R], tl.int64)
    mass = tl.zeros([BLOCK_R], tl.float32)
    best = tl.full([BLOCK_R], -float("inf"), tl.float32)
    best_lo = tl.zeros([BLOCK_R], tl.float32)
    blk = tl.zeros([BLOCK_R], tl.int64)
    for start in range(col_lo, col_hi, BLOCK_N * UNROLL):
        s, mask = scaled_block(X, rows, rmask, sxm, start, cols, V, inv_t)
        keep = kept(s, mask, shift, min_p, floor, HAS_MIN_P, HAS_FLOOR)
        if HAS_FLOOR:
            above = mask & (order_key(s) > floor[:, None])
            if HAS_TOP_K:
                count += tl.sum(above.to(tl.int64), 1)
            if HAS_TOP_P:
                mass += tl.sum(tl.where(above, tl.exp(s - shift[:, None]), 0.0), 1)
        best, best_lo, blk = block_choice_wide(best, best_lo, blk, s, keep, start, rows, n_rows,
                                               V, greedy, seed, noise, BLOCK_N, UNROLL)
    return count, mass, best, best_lo, blk


@triton.jit
def candidate_key(X, rows, rmask, sxm, cand, inv_t):
    """The order key of each row's candidate token (its scaled logit): the floor of a
    rejection round."""
    s_cand = tl.load(X + rows * sxm + cand, mask=rmask, other=0.0)
    return order_key(s_cand.to(tl.float32) * inv_t + 0.0)


@triton.jit
def advance(X, rows, rmask, sxm, V, inv_t, greedy, seed, draw, n_rows, shift, min_p, floor,
            cand, active, count, mass, nxt_best, nxt_blk, k_target, mass_target,
            HAS_TOP_K: tl.constexpr, HAS_TOP_P: tl.constexpr, HAS_MIN_P: tl.constexpr,
            DRAW_BLOCK: tl.constexpr):
    """The end of rejection round ``draw``: keep the candidate ``cand`` (key ``floor``) if
    the tokens above it number fewer than ``k_target`` and weigh less than
    ``mass_target``, else replace it by the token drawn (noise ``2 * draw + 1``) in the
    round's draw block above it, ``nxt_blk``. Returns ``(cand, active)``."""
    accepted = rmask
    if HAS_TOP_K:
        accepted = accepted & (count < k_target)
    if HAS_TOP_P:
        accepted = accepted & (mass < mass_target)
    rejected = active & ~accepted
    nxt = draw_in_block(X, rows, rmask, sxm, nxt_blk, V, inv_t, greedy, seed, 2 * draw + 1,
                        n_rows, shift, min_p, floor, HAS_MIN_P, True, rows.shape[0], DRAW_BLOCK)
    # A rejected candidate has tokens above it, the row's max among them, which every
    # filter keeps: nxt_best is finite. The check only guards the loop.
    return tl.where(rejected, nxt, cand), rejected & (nxt_best > -float("inf"))


@triton.jit
def reject_rounds(X, rows, rmask, sxm, cols, V, inv_t, greedy, seed, draw, n_rows, shift,
                  min_p, cand, active, k_target, mass_target, HAS_TOP_K: tl.constexpr,
                  HAS_TOP_P: tl.constexpr, HAS_MIN_P: tl.constexpr, BLOCK_N: tl.constexpr,
                  UNROLL: tl.constexpr):
    """Rejection rounds ``draw, draw + 1, ...`` over whole rows until every active row's
    candidate is accepted. Round ``r``: one pass counts / weighs the tokens above the
    candidate and, in case it is rejected, draws the next candidate above it (noise
    ``2r`` for the block, ``2r + 1`` for the token)."""
    draw = tl.zeros([], tl.int64) + draw
    while tl.max(active.to(tl.int32), 0) > 0:
        floor = candidate_key(X, rows, rmask, sxm, cand, inv_t)
        count, mass, nxt_best, _, nxt_blk = round_pass(
            X, rows, rmask, sxm, 0, V, cols, V, inv_t, greedy, seed, 2 * draw, n_rows, shift,
            min_p, floor, HAS_TOP_K, HAS_TOP_P, HAS_MIN_P, True, BLOCK_N, UNROLL)
        cand, active = advance(X, rows, rmask, sxm, V, inv_t, greedy, seed, draw, n_rows, shift,
                               min_p, floor, cand, active, count, mass, nxt_best, nxt_blk,
                               k_target, mass_target, HAS_TOP_K, HAS_TOP_P, HAS_MIN_P, BLOCK_N)
        draw += 1
    return cand


@triton.jit
def sample_kernel(
    X, OUT, SEED, TEMP, st_t, TOPK, st_k, TOPP, st_p, MINP, st_m, n_rows, V, sxm,
    HAS_TOP_K: tl.constexpr, HAS_TOP_P: tl.constexpr, HAS_MIN_P: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, UNROLL: tl.constexpr,
):
    """One int64 token id per row of ``X`` (``n_rows x V``, unit stride along ``V``) into
    ``OUT``, each tile of ``BLOCK_R`` rows walked whole by one program.

    ``TEMP``/``TOPK``/``TOPP``/``MINP`` are per-row parameters read with row strides
    ``st_*`` (0 broadcasts one value); ``SEED`` points to one int64 seed for the noise.

    ``UNROLL`` (one row per program, ``BLOCK_R = 1``): each step of a pass over the row
    reads ``UNROLL`` draw blocks (``block_choice_wide``), so that more loads are in flight;
    the draws are those of ``UNROLL = 1`` (sums may round differently; rows holding NaN,
    whose token is unspecified, may differ under the interpreter, whose ``tl.maximum``
    keeps NaN where ``tl.max`` drops it).
    """
    tl.static_assert(UNROLL == 1 or BLOCK_R == 1, "UNROLL > 1 walks one row per program")
    seed = tl.load(SEED)
    STEP: tl.constexpr = BLOCK_N * UNROLL  # columns per step of a pass
    cols = tl.arange(0, STEP)
    for tile in range(tl.program_id(0), tl.cdiv(n_rows, BLOCK_R), tl.num_programs(0)):
        # (zeros + tile) promotes to int64 before the multiply, compiled or interpreted.
        rows = (tl.zeros([BLOCK_R], tl.int64) + tile) * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < n_rows
        inv_t, greedy = inverse_temperature(TEMP, rows, rmask, st_t)
        shift, min_p, z = inv_t, inv_t, inv_t  # unused unless set below
        # Row max and softmax sum: the reference point of top-p's mass and of min-p.
        if HAS_TOP_P or HAS_MIN_P:
            m, z = max_and_sum(X, rows, rmask, sxm, 0, V, cols, V, inv_t, True)
            shift = finite_or_zero(m)
        if HAS_MIN_P:
            min_p = tl.load(MINP + rows * st_m, mask=rmask, other=0.0).to(tl.float32)

        # First draw, from softmax(s) restricted to min-p: a draw block (noise 0), then a
        # token in it (noise 1).
        _, _, best, _, blk = round_pass(
            X, rows, rmask, sxm, 0, V, cols, V, inv_t, greedy, seed, 0, n_rows, shift, min_p,
            blk_placeholder(rows), False, False, HAS_MIN_P, False, BLOCK_N, UNROLL)
        cand = draw_in_block(X, rows, rmask, sxm, blk, V, inv_t, greedy, seed, 1, n_rows,
                             shift, min_p, blk, HAS_MIN_P, False, BLOCK_R, BLOCK_N)
        if HAS_TOP_K or HAS_TOP_P:
            z_p = z
            if HAS_TOP_K and HAS_TOP_P:  # top-p after top-k: the top-k set's mass
                k, needed = top_k_needed(TOPK, st_k, TOPP, st_p, rows, rmask, V, greedy)
                z_p = top_k_mass(X, rows, rmask, sxm, cols, V, inv_t, shift, k, z, needed,
                                 BLOCK_R, BLOCK_N)
            k_target, mass_target = filter_targets(TOPK, st_k, TOPP, st_p, rows, rmask, V, z_p,
                                                   HAS_TOP_K, HAS_TOP_P)
            active = rmask & (best > -float("inf"))  # a row of -inf has no candidate
            cand = reject_rounds(X, rows, rmask, sxm, cols, V, inv_t, greedy, seed, 1, n_rows,
                                 shift, min_p, cand, active, k_target, mass_target, HAS_TOP_K,
                                 HAS_TOP_P, HAS_MIN_P, BLOCK_N, UNROLL)
        tl.store(OUT + rows, cand, mask=rmask)


@triton.jit
def blk_placeholder(rows):
    """An int32 key vector for a ``floor`` argument that ``HAS_FLOOR = False`` ignores."""
    return tl.zeros_like(rows).to(tl.int32)


# --------------------------------------------------------------------------- split rows
@triton.jit
def split_stats_kernel(X, TEMP, st_t, TOPK, st_k, TOPP, st_p, PART_MZ, ROW_HIST, n_rows, V,
                       sxm, n_split, split_cols, level, STATS: tl.constexpr,
                       WITH_SUM: tl.constexpr, SELECT: tl.constexpr, BLOCK_N: tl.constexpr):
    """What the draws over split rows (``split_kernel``) need to know of the whole row
    first, one program per part of each row:

    * ``STATS``: the max of ``s = x / T`` over the part and (``WITH_SUM``) the sum of
      ``exp(s - that max)``, into ``PART_MZ`` (``n_rows x 2 x n_split``): min-p's
      reference point and top-p's total mass;
    * ``SELECT`` (top-k with top-p): byte ``level`` (0 the highest) of radix select for
      the k-th largest key (``kth_largest_key``), one launch per byte: the histogram of
      that byte among the part's keys that share the bytes already chosen (from the
      histograms of the earlier launches), added into the row's ``ROW_HIST[row, level]``
      (``n_rows x 4 x 256`` int32, zeroed by the host; integer atomics, so the sums do not
      depend on the order of the parts). Only rows that need the top-k set's mass
      (``top_k_needed``) take part; ``split_kernel``'s first stage sums it.
    """
    cols = tl.arange(0, BLOCK_N)
    for work in range(tl.program_id(0), n_rows * n_split, tl.num_programs(0)):
        part = work % n_split
        row = work // n_split
        rows = tl.zeros([1], tl.int64) + row
        rmask = rows < n_rows
        inv_t, greedy = inverse_temperature(TEMP, rows, rmask, st_t)
        col_lo = part * split_cols
        col_hi = tl.minimum(col_lo + split_cols, V)
        if STATS:
            m, z = max_and_sum(X, rows, rmask, sxm, col_lo, col_hi, cols, V, inv_t, WITH_SUM)
            store_part_stats(PART_MZ, rows, rmask, n_split, part, m, z)
        if SELECT:
            k, needed = top_k_needed(TOPK, st_k, TOPP, st_p, rows, rmask, V, greedy)
            if tl.max(needed.to(tl.int32), 0) > 0:
                _, prefix = split_kth_key(ROW_HIST, row, k, level)
                hist = byte_histogram(X, rows, rmask, sxm, col_lo, col_hi, cols, V, inv_t,
                                      prefix, 24 - 8 * level)
                tl.atomic_add(ROW_HIST + (row * 4 + level) * 256 + tl.arange(0, 256), hist,
                              sem="relaxed")


@triton.jit
def row_stats(PART_MZ, rows, rmask, n_split, BLOCK_S: tl.constexpr):
    """``(shift, z)`` of each row from its parts' ``(max, sum)`` (``PART_MZ``): the row's
    max of ``s`` (0 if infinite) and ``sum(exp(s - shift))``."""
    parts = tl.arange(0, BLOCK_S)
    pmask = rmask[:, None] & (parts < n_split)[None, :]
    at = PART_MZ + rows[:, None] * (2 * n_split) + parts[None, :]
    pm = tl.load(at, mask=pmask, other=-float("inf"))
    pz = tl.load(at + n_split, mask=pmask, other=0.0)
    shift = finite_or_zero(tl.max(pm, 1))
    # a part with nothing (sum 0) adds nothing, even where exp(its shift - shift) overflows
    rel = tl.where(pz > 0.0, tl.exp(finite_or_zero(pm) - shift[:, None]), 0.0)
    return shift, tl.sum(pz * rel, 1)


@triton.jit
def split_kernel(
    X, OUT, SEED, TEMP, st_t, TOPK, st_k, TOPP, st_p, MINP, st_m,
    PART_MZ, PART_BEST, PART_IDX, PART_CNT, PART_MASS, ROW_CAND, ROW_ACTIVE, ROW_HIST,
    PART_TOP, n_rows, V, sxm, n_split, split_cols, rnd,
    HAS_TOP_K: tl.constexpr, HAS_TOP_P: tl.constexpr, HAS_MIN_P: tl.constexpr,
    STAGE: tl.constexpr, STATS_FIRST: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """``sample_kernel``'s draws with each row cut into ``n_split`` parts of ``split_cols``
    columns (a multiple of ``BLOCK_N``, the draw block), one program per part and one
    launch per pass, so that a few rows still fill the GPU: a program walking a 128k row
    alone is bound by its own latency (a pass took ~60 us on an H200), not by HBM.

    Launch ``rnd`` writes its parts' results to buffer ``rnd % 2`` of ``PART_*`` (each
    ``2 x n_rows x n_split``; ``PART_BEST`` holds the pair ``hi, lo`` of a draw block's
    score: ``2 x 2 x n_rows x n_split``) and the row's state to ``ROW_CAND`` /
    ``ROW_ACTIVE`` (``2 x n_rows``); launch ``rnd + 1`` combines them, every program of the
    row alike, in part order (so the first part wins ties, as the first column does in a
    whole row).

    * ``STAGE 0`` (``rnd = 0``): the first draw's block scores (noise 0), min-p applied
      against the row max of ``PART_MZ`` (``split_stats_kernel``); ``STATS_FIRST``
      computes the parts' ``(max, sum)`` here instead (top-p without min-p). Top-k with
      top-p: also the part's share of the top-k set's mass into ``PART_TOP``
      (``n_rows x n_split``), the k-th largest key from ``ROW_HIST``
      (``split_stats_kernel``'s radix select); later stages add up the shares (one
      ``tl.sum``: the same order in every program of the row) as top-p's reference mass.
    * ``STAGE 1`` (``rnd >= 1``): the candidate (the first draw's token, noise 1, for
      ``rnd = 1``; else the end of round ``rnd - 1``, ``advance``), then round ``rnd``'s
      pass over the part (``round_pass``).
    * ``STAGE 2``, one program per row: the candidate as in ``STAGE 1``, then the
      remaining rounds over the whole row (``reject_rounds``), and the token to ``OUT``.

    The noise depends on row, column and draw only, so the draws equal
    ``sample_kernel``'s, split or not, whatever the number of ``STAGE 1`` launches (up to
    the order in which the sums are added: a mass within rounding of a top-p cut may
    decide otherwise).
    """
    seed = tl.load(SEED)
    cols = tl.arange(0, BLOCK_N)
    ROUNDS: tl.constexpr = HAS_TOP_K or HAS_TOP_P
    n_work = n_rows if STAGE == 2 else n_rows * n_split
    cur, prev = rnd % 2, (rnd + 1) % 2
    NS = n_rows * n_split  # one buffer of PART_IDX / PART_CNT / PART_MASS
    for work in range(tl.program_id(0), n_work, tl.num_programs(0)):
        part = 0 if STAGE == 2 else work % n_split
        row = work if STAGE == 2 else work // n_split
        rows = tl.zeros([1], tl.int64) + row
        rmask = rows < n_rows
        inv_t, greedy = inverse_temperature(TEMP, rows, rmask, st_t)
        shift, min_p, z = inv_t, inv_t, inv_t  # unused unless set below
        if (HAS_TOP_P and (STAGE > 0 or not STATS_FIRST)) or HAS_MIN_P:
            shift, z = row_stats(PART_MZ, rows, rmask, n_split, BLOCK_S)
        if HAS_MIN_P:
            min_p = tl.load(MINP + rows * st_m, mask=rmask, other=0.0).to(tl.float32)
        if HAS_TOP_K and HAS_TOP_P:
            k, needed = top_k_needed(TOPK, st_k, TOPP, st_p, rows, rmask, V, greedy)
            if STAGE > 0:  # top-p after top-k: the top-k set's mass, from the parts'
                parts = tl.arange(0, BLOCK_S)
                shares = tl.load(PART_TOP + row * n_split + parts, mask=parts < n_split,
                                 other=0.0)
                z = tl.where(needed, tl.sum(shares, 0), z)
        k_target, mass_target = filter_targets(TOPK, st_k, TOPP, st_p, rows, rmask, V, z,
                                               HAS_TOP_K, HAS_TOP_P)
        pos = rows * n_split + part  # this part's slot in a buffer
        col_lo = part * split_cols
        col_hi = tl.minimum(col_lo + split_cols, V)
        cand = tl.zeros([1], tl.int64)
        active = rows < 0
        if STAGE > 0:
            # the previous launch's parts: the best draw block, first part on ties
            parts = tl.arange(0, BLOCK_S)
            pmask = parts < n_split
            at_parts = prev * NS + row * n_split + parts
            hi = tl.load(PART_BEST + prev * NS + at_parts, mask=pmask, other=-float("inf"))
            lo = tl.load(PART_BEST + (prev + 1) * NS + at_parts, mask=pmask, other=0.0)
            best, _, first = first_best(hi, lo, BLOCK_S)
            blk = tl.zeros([1], tl.int64) + tl.load(PART_IDX + prev * NS + row * n_split + first)
            best = tl.zeros([1], tl.float32) + best
            if rnd == 1:  # the first draw's token
                cand = draw_in_block(X, rows, rmask, sxm, blk, V, inv_t, greedy, seed, 1,
                                     n_rows, shift, min_p, blk, HAS_MIN_P, False, 1, BLOCK_N)
                active = rmask & (best > -float("inf"))
                if not ROUNDS:
                    active = rows < 0
            else:  # the end of round rnd - 1
                at_row = prev * n_rows + rows
                cand = tl.load(ROW_CAND + at_row)
                active = tl.load(ROW_ACTIVE + at_row) != 0
                floor = candidate_key(X, rows, rmask, sxm, cand, inv_t)
                count = tl.sum(tl.load(PART_CNT + at_parts, mask=pmask, other=0), 0)
                mass = tl.sum(tl.load(PART_MASS + at_parts, mask=pmask, other=0.0), 0)
                cand, active = advance(X, rows, rmask, sxm, V, inv_t, greedy, seed, rnd - 1,
                                       n_rows, shift, min_p, floor, cand, active,
                                       tl.zeros([1], tl.int64) + count,
                                       tl.zeros([1], tl.float32) + mass, best, blk, k_target,
                                       mass_target, HAS_TOP_K, HAS_TOP_P, HAS_MIN_P, BLOCK_N)
        if STAGE == 2:
            if ROUNDS:
                cand = reject_rounds(X, rows, rmask, sxm, cols, V, inv_t, greedy, seed, rnd,
                                     n_rows, shift, min_p, cand, active, k_target, mass_target,
                                     HAS_TOP_K, HAS_TOP_P, HAS_MIN_P, BLOCK_N, 1)
            tl.store(OUT + rows, cand, mask=rmask)
        else:
            count = tl.zeros([1], tl.int64)
            mass = tl.zeros([1], tl.float32)
            best = tl.full([1], -float("inf"), tl.float32)
            best_lo = tl.zeros([1], tl.float32)
            blk = tl.zeros([1], tl.int64)
            if STAGE == 0:
                if STATS_FIRST:  # the parts' max and sum, in this launch, before its draw
                    m, z = max_and_sum(X, rows, rmask, sxm, col_lo, col_hi, cols, V, inv_t, True)
                    store_part_stats(PART_MZ, rows, rmask, n_split, part, m, z)
                if HAS_TOP_K and HAS_TOP_P:  # this part's share of the top-k set's mass
                    if tl.max(needed.to(tl.int32), 0) > 0:
                        _, prefix = split_kth_key(ROW_HIST, row, k, 4)
                        top = top_mass(X, rows, rmask, sxm, col_lo, col_hi, cols, V, inv_t,
                                       shift, prefix - 2147483648)
                        tl.store(PART_TOP + pos, top, mask=rmask)
                _, _, best, best_lo, blk = round_pass(
                    X, rows, rmask, sxm, col_lo, col_hi, cols, V, inv_t, greedy, seed, 0,
                    n_rows, shift, min_p, blk_placeholder(rows), False, False, HAS_MIN_P,
                    False, BLOCK_N, 1)
            elif tl.max(active.to(tl.int32), 0) > 0:
                floor = candidate_key(X, rows, rmask, sxm, cand, inv_t)
                count, mass, best, best_lo, blk = round_pass(
                    X, rows, rmask, sxm, col_lo, col_hi, cols, V, inv_t, greedy, seed,
                    2 * rnd, n_rows, shift, min_p, floor, HAS_TOP_K, HAS_TOP_P, HAS_MIN_P,
                    True, BLOCK_N, 1)
            # an inactive row's parts are written too: the next launch reads them
            at = cur * NS + pos
            tl.store(PART_BEST + cur * NS + at, best, mask=rmask)
            tl.store(PART_BEST + (cur + 1) * NS + at, best_lo, mask=rmask)
            tl.store(PART_IDX + at, blk, mask=rmask)
            if ROUNDS:
                tl.store(PART_CNT + at, count, mask=rmask)
                tl.store(PART_MASS + at, mass, mask=rmask)
                if part == 0:
                    tl.store(ROW_CAND + cur * n_rows + rows, cand, mask=rmask)
                    tl.store(ROW_ACTIVE + cur * n_rows + rows, active.to(tl.int32), mask=rmask)
