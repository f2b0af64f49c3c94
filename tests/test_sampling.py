"""fused_softmax.sample against the exact restricted distribution, computed in fp64.

Many rows of the same logits in one call give many independent draws in one launch (the
noise is per (row, token)), which keeps the interpreter's cost down. Frequencies are
compared with a chi-square test at a fixed seed; supports are compared exactly.
"""

import json
import math
from fractions import Fraction
import os
import subprocess
import sys
import textwrap
import types
import warnings

import pytest
import torch

import fused_softmax
from fused_softmax import _backend
from fused_softmax.sampling import _torch_sample, sample

N_DRAWS = 2000
P_VALUE_FLOOR = 1e-3


def reference_probs(x, temperature=1.0, top_k=None, top_p=None, min_p=None):
    """Exact fp64 distribution of ``softmax(x / T)`` restricted to the kept set of a 1-d row.

    Ties at a threshold are kept, as documented. top-p after top-k (Hugging Face's and
    vLLM's order): its mass is that of the distribution renormalised over the top-k set.
    Also returns the smallest distance of a top-p prefix mass (or min-p ratio) from its
    threshold, so a test can check that its data sit far from fp32 rounding of the boundary.
    """
    s = x.double() / temperature
    p = torch.softmax(s, 0)
    keep = torch.ones_like(p, dtype=torch.bool)
    margin = math.inf
    desc = s.sort(descending=True).values
    in_top_k = torch.ones_like(desc, dtype=torch.bool)
    if top_k is not None:
        kth = desc[min(top_k, len(s)) - 1]
        keep &= s >= kth
        in_top_k = desc >= kth
    if top_p is not None:
        cum = torch.softmax(torch.where(in_top_k, desc, -math.inf), 0).cumsum(0)
        first = int((cum >= top_p).nonzero()[0])
        keep &= s >= desc[first]
        margin = min(margin, float((cum - top_p).abs().min()))
    if min_p is not None:
        ratio = p / p.max()
        keep &= ratio >= min_p
        margin = min(margin, float((ratio - min_p).abs().min()))
    q = torch.where(keep, p, 0.0)
    return q / q.sum(), margin


def chi2_pvalue(counts, probs):
    """Pearson chi-square p-value of ``counts`` against ``probs`` (over the support)."""
    support = probs > 0
    n = counts.sum().double()
    expected = n * probs[support]
    stat = float(((counts[support].double() - expected) ** 2 / expected).sum())
    dof = int(support.sum()) - 1
    if dof == 0:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def check_draws(ids, probs):
    counts = torch.bincount(ids.reshape(-1), minlength=len(probs))
    outside = counts[probs == 0]
    assert int(outside.sum()) == 0, f"drew tokens outside the kept set: {outside.nonzero()}"
    pv = chi2_pvalue(counts, probs)
    assert pv > P_VALUE_FLOOR, f"p-value {pv:.2e}; counts {counts.tolist()}, probs {probs.tolist()}"


def logits_16():
    return torch.randn(16, generator=torch.Generator().manual_seed(0)) * 1.5


def ties_16():
    return torch.tensor([3.0, 2.0, 2.0, 2.0, 1.0, 0.5, 0.0, -1.0,
                         2.0, -2.0, 1.0, 0.0, -3.0, 1.5, 0.3, 0.1])


def randn_64():
    return torch.randn(64, generator=torch.Generator().manual_seed(1))


def flat_64():
    """Nearly flat: a draw rarely lands in a small top set, so rows need many rejection rounds."""
    return torch.linspace(0.0, 0.05, 64)


DISTRIBUTION_CASES = [
    (logits_16, dict()),
    (logits_16, dict(temperature=0.5)),
    (logits_16, dict(temperature=2.0, top_k=3)),
    (logits_16, dict(top_p=0.7)),
    (logits_16, dict(min_p=0.2)),
    (logits_16, dict(temperature=0.7, top_k=6, top_p=0.8, min_p=0.1)),
    (ties_16, dict(top_k=2)),  # the k-th value (2.0) is tied four ways: all four are kept
    (randn_64, dict(top_k=12, temperature=1.5)),
    (flat_64, dict(top_k=3)),
]


@pytest.mark.parametrize("make, kwargs", DISTRIBUTION_CASES,
                         ids=[f"{c[0].__name__}-{c[1]}" for c in DISTRIBUTION_CASES])
def test_distribution_and_support(make, kwargs, device):
    x = make()
    probs, margin = reference_probs(x, **kwargs)
    assert margin > 1e-4, "test data too close to a threshold for an fp32 kernel"
    g = torch.Generator(device=device).manual_seed(1234)
    ids = sample(x.to(device).expand(N_DRAWS, -1), generator=g, **kwargs)
    assert ids.shape == (N_DRAWS,) and ids.dtype == torch.int64
    check_draws(ids.cpu(), probs)


def test_top_p_after_top_k_renormalises(device):
    """Hugging Face's and vLLM's order: top-k keeps (0.4, 0.3), renormalised (0.57, 0.43),
    so top-p 0.5 keeps token 0 alone (measured on the full distribution, 0.4 < 0.5 would
    have kept token 1 too)."""
    x = torch.tensor([0.4, 0.3, 0.2, 0.1]).log().to(device).expand(N_DRAWS, -1)
    gen = torch.Generator(device=device).manual_seed(11)
    ids = sample(x, top_k=2, top_p=0.5, generator=gen)
    assert torch.equal(ids.cpu(), torch.zeros(N_DRAWS, dtype=torch.int64))
    per_row = sample(x, top_k=torch.full((N_DRAWS,), 2, device=device),
                     top_p=torch.full((N_DRAWS,), 0.5, device=device), generator=gen)
    assert torch.equal(per_row.cpu(), torch.zeros(N_DRAWS, dtype=torch.int64))


def test_ties_keep_every_tied_token(device):
    ids = sample(ties_16().to(device).expand(N_DRAWS, -1), top_k=2,
                 generator=torch.Generator(device=device).manual_seed(5))
    assert set(ids.unique().tolist()) == {0, 1, 2, 3, 8}


def test_top_k_one_is_argmax_after_many_rejections(device):
    x = flat_64().to(device).expand(256, -1)
    ids = sample(x, top_k=1, generator=torch.Generator(device=device).manual_seed(6))
    assert (ids == 63).all()
    ids = sample(x, top_p=1e-6, generator=torch.Generator(device=device).manual_seed(6))
    assert (ids == 63).all()


def test_per_row_parameters(device):
    """Two groups of rows with different temperature / top_k / top_p, as per-row tensors."""
    x = logits_16()
    half = N_DRAWS // 2
    temperature = torch.tensor([0.5] * half + [2.0] * half)
    top_k = torch.tensor([4] * half + [16] * half)
    top_p = torch.tensor([1.0] * half + [0.6] * half)
    ids = sample(x.to(device).expand(N_DRAWS, -1), temperature=temperature.to(device),
                 top_k=top_k.to(device), top_p=top_p.to(device),
                 generator=torch.Generator(device=device).manual_seed(7)).cpu()
    check_draws(ids[:half], reference_probs(x, temperature=0.5, top_k=4)[0])
    check_draws(ids[half:], reference_probs(x, temperature=2.0, top_p=0.6)[0])


def test_per_row_parameters_shaped_b_by_1(device):
    """Hugging Face's (B, 1) parameter tensors (as in x / T) are per-row tensors: the same
    draws as the (B,) ones."""
    x = logits_16().to(device).expand(8, -1)
    rows = dict(temperature=torch.linspace(0.5, 2.0, 8), top_k=torch.arange(1, 9),
                top_p=torch.linspace(0.3, 1.0, 8), min_p=torch.linspace(0.0, 0.2, 8))
    flat = sample(x, **{k: v.to(device) for k, v in rows.items()},
                  generator=torch.Generator(device=device).manual_seed(3))
    column = sample(x, **{k: v[:, None].to(device) for k, v in rows.items()},
                    generator=torch.Generator(device=device).manual_seed(3))
    assert column.tolist() == flat.tolist()
    one = sample(x[0], temperature=torch.ones(1, device=device))  # (V,) logits, (1,) T
    assert one.shape == () and 0 <= one.item() < 16
    # (S, 1) with (B, S, V) logits: one value per position, as x / T takes it
    x3 = x.reshape(2, 4, 16)
    t3 = torch.tensor([0.0, 1.0, 0.0, 1.0], device=device)  # greedy at positions 0 and 2
    ids = sample(x3, temperature=t3[:, None], generator=torch.Generator(device=device).manual_seed(1))
    assert ids.shape == (2, 4)
    assert ids[:, ::2].tolist() == [[x[0].argmax().item()] * 2] * 2
    with pytest.raises(ValueError, match="broadcasts neither"):
        sample(x, temperature=torch.ones(8, 2, device=device))


def test_plus_inf_logits_draw_the_first_inf_token(device):
    """torch.multinomial raises for a row holding +inf; ours draws its first +inf token,
    with every filter, as softmax(x / T)'s limit would put the mass on the inf tokens."""
    x = torch.tensor([[0.0, math.inf, math.inf, 1.0], [math.inf] * 4], device=device)
    for kw in ({}, dict(top_k=2), dict(top_p=0.5), dict(min_p=0.1), dict(temperature=0.5),
               dict(top_k=3, top_p=0.9, min_p=0.05)):
        assert sample(x, **kw).tolist() == [1, 0], kw


def test_greedy_is_argmax(device):
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-4, 5, (3, 40, 50), generator=g).float()  # many ties: first index wins
    x[0, 0, -1] = 100.0  # argmax in the last column
    expected = x.argmax(-1)
    x = x.to(device)
    assert torch.equal(sample(x, temperature=0).cpu(), expected)
    assert torch.equal(sample(x, temperature=0.0, top_k=3, top_p=0.5, min_p=0.3).cpu(), expected)
    assert torch.equal(sample(x.to(torch.bfloat16), temperature=0).cpu(), expected)
    # zero entries of a per-row temperature tensor are greedy; the others sample
    flat = torch.zeros(400, 16)
    flat[:, 5] = 1e-3
    t = torch.tensor([0.0, 1.0]).repeat(200)
    ids = sample(flat.to(device), temperature=t.to(device)).cpu()
    assert (ids[t == 0] == 5).all()
    assert len(ids[t == 1].unique()) > 8


def test_min_p_and_top_p_of_one_keep_everything(device):
    x = logits_16()
    probs, _ = reference_probs(x)
    g = torch.Generator(device=device).manual_seed(11)
    ids = sample(x.to(device).expand(N_DRAWS, -1), top_p=torch.ones(N_DRAWS, device=device),
                 min_p=torch.zeros((), device=device), generator=g)
    check_draws(ids.cpu(), probs)


def test_long_rows_cross_blocks(device):
    """V = 9000 spans two 8192-wide blocks: the search and the argmax cross blocks."""
    x = torch.randn(4, 9000, generator=torch.Generator().manual_seed(2))
    x[1, 8500] = 20.0
    x[2, 100] = 20.0
    ids = sample(x.to(device), top_k=3, top_p=0.9).cpu()
    for r in range(4):
        probs, _ = reference_probs(x[r], top_k=3, top_p=0.9)
        assert probs[ids[r]] > 0
    assert ids[1] == 8500 and ids[2] == 100
    assert torch.equal(sample(x.to(device), temperature=0).cpu(), x.argmax(-1))


@pytest.mark.parametrize("kwargs", [dict(temperature=0.8), dict(top_k=5), dict(top_p=0.7),
                                    dict(min_p=0.05, temperature=1.3), dict(top_k=7, top_p=0.9)],
                         ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_distribution_across_draw_blocks(kwargs, device, monkeypatch):
    """A draw picks a block of DRAW_BLOCK tokens by its kept mass, then a token in it: the
    two stages must compose to the exact restricted distribution. Draw blocks of 16 tokens
    here (2048 in use: the kernel is the same, the interpreter much faster), twelve live
    tokens spread over three blocks (the rest -inf), among them a tie across blocks and a
    block whose only live token is its last; the tokens above the rejection floor straddle
    blocks too."""
    monkeypatch.setattr(sys.modules["fused_softmax.sampling"], "DRAW_BLOCK", 16)
    V = 2 * 16 + 4
    live = torch.tensor([3, 7, 15, 16, 17, 20, 25, 31, 32, 33, 35, 11])
    vals = torch.randn(len(live), generator=torch.Generator().manual_seed(5)) * 1.2
    vals[-1] = vals[0]  # a tie across blocks
    x = torch.full((V,), -math.inf)
    x[live] = vals
    probs, _ = reference_probs(x, **kwargs)
    n = N_DRAWS
    g = torch.Generator(device=device).manual_seed(21)
    ids = sample(x.to(device).expand(n, -1), generator=g, **kwargs).cpu()
    check_draws(ids, probs)


@pytest.mark.parametrize("vocab, kwargs", [
    (8, dict()), (8, dict(top_k=2)), (8, dict(top_p=0.9)), (8, dict(min_p=0.5)),
    (2500, dict()), (2500, dict(top_p=0.9)),  # 2500: the tied tokens in two draw blocks
])
def test_tied_tokens_keep_equal_chances_at_tiny_temperature(vocab, kwargs, device):
    """At T = 1e-5 and logits of 1000, x / T is 1e8, where fp32's spacing is 8: noise added
    to x / T itself would round to it, the tied tokens' scores would tie, and the first
    would win ~98 % of the draws (measured before the fix). Each must win half of them."""
    n = 400
    x = torch.full((n, vocab), -5.0, device=device)
    x[:, 1] = x[:, vocab - 2] = 1000.0
    ids = sample(x, temperature=1e-5, generator=torch.Generator(device).manual_seed(3),
                 **kwargs)
    assert bool(((ids == 1) | (ids == vocab - 2)).all())
    first = int((ids == 1).sum())
    assert abs(first - n / 2) < 4 * math.sqrt(n / 4), first  # 4 sigma of Binomial(n, 1/2)


@pytest.mark.skipif(not _backend.HAS_TRITON, reason="needs Triton")
@pytest.mark.parametrize("seed,V,live,kw", [
    (2360573, 2048, [712], {}),                   # the token's uniform is 0
    (2360573, 2048, [712], dict(min_p=0.5)),
    (2001878690, 4096, list(range(2048, 2100)), {}),  # the only live block's uniform is 0
    (2001878690, 4096, [3000], dict(min_p=0.5)),
], ids=["token", "token min_p", "block", "block min_p"])
def test_a_zero_uniform_never_returns_a_token_outside_the_set(seed, V, live, kw, device):
    """Philox words 0 and 0xFFFFFFFF give a uniform of exactly 0 (a -inf Gumbel variate):
    these seeds (found with a C copy of Triton's Philox) hit one at the only kept token or
    block. The draw must still come from the kept set, not fall back to token 0."""
    x = torch.full((1, V), -math.inf)
    x[0, live] = torch.linspace(0.0, 1.0, len(live))
    if "min_p" in kw:
        x = torch.zeros(1, V)
        x[0, live] = 10.0
    x = x.to(device)
    if not _backend.use_triton(x):
        pytest.skip("the Triton kernels do not serve this device here")
    sampling_mod = sys.modules["fused_softmax.sampling"]
    one = torch.ones(1, device=device)
    extra = {k: torch.full((1,), v, device=device) for k, v in kw.items()}
    ids = sampling_mod._launch(x, torch.tensor([seed], device=device), one, None, None,
                               extra.get("min_p"))
    assert int(ids[0]) in live, ids


def test_generator_reproducible_and_fresh(device):
    x = logits_16().to(device).expand(500, -1)
    a = sample(x, top_p=0.9, generator=torch.Generator(device=device).manual_seed(42))
    b = sample(x, top_p=0.9, generator=torch.Generator(device=device).manual_seed(42))
    assert torch.equal(a, b)
    g = torch.Generator(device=device).manual_seed(42)
    first, second = sample(x, generator=g), sample(x, generator=g)
    assert not torch.equal(first, second)
    torch.manual_seed(9)  # no generator: the default one, so torch.manual_seed reproduces
    c = sample(x)
    torch.manual_seed(9)
    assert torch.equal(c, sample(x))


def test_shapes_and_dtypes(device):
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(4)).to(device)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        xd = x.to(dtype)
        ids = sample(xd, top_k=4, generator=torch.Generator(device=device).manual_seed(8))
        assert ids.shape == (3, 5) and ids.dtype == torch.int64
        # rounding to 16 bits can tie the 4th value with the 5th: both are kept then
        fourth = xd.float().topk(4, dim=-1).values[..., -1]
        assert (xd.float().gather(-1, ids[..., None])[..., 0] >= fourth).all()
    assert sample(torch.randn(16, device=device)).shape == ()
    assert sample(torch.randn(0, 16, device=device)).shape == (0,)
    x_t = torch.randn(16, 6, device=device).t()  # vocabulary dimension not contiguous
    ids = sample(x_t, temperature=0)
    assert torch.equal(ids, x_t.argmax(-1))


def test_triton_kernel_ran(device):
    x = torch.randn(4, 16, device=device)
    before = _backend.launch_counts["sample_kernel"]
    fused_softmax.sampling.sample(x, top_k=2)
    launched = _backend.launch_counts["sample_kernel"] - before
    assert launched == (1 if _backend.use_triton(x) else 0)
    if os.environ.get("TRITON_INTERPRET") == "1" and _backend.HAS_TRITON:
        assert _backend.use_triton(x), "the interpreter is on: the Triton kernel must serve CPU"


def _row_params(filters: dict, n_rows: int, device) -> list:
    """(top_k, top_p, min_p) as per-row tensors (None where absent)."""
    return [None if name not in filters else torch.full((n_rows,), filters[name], device=device)
            for name in ("top_k", "top_p", "min_p")]


@pytest.mark.skipif(not _backend.HAS_TRITON, reason="needs Triton")
@pytest.mark.parametrize("n_rows, vocab, filters", [
    (3, 2049, {}), (3, 2049, dict(min_p=0.3)), (3, 2049, dict(top_k=1)),
    (3, 2049, dict(top_k=20)), (3, 2049, dict(top_p=0.05)), (3, 2049, dict(top_p=0.6, min_p=0.1)),
    (3, 2049, dict(top_k=3, min_p=0.2)), (3, 2049, dict(top_k=30, top_p=0.6)),
    (2, 8192, {}), (2, 8192, dict(top_k=1)), (2, 8192, dict(top_p=0.3)),
    (2, 8192, dict(top_k=1, top_p=0.9)), (1, 5000, dict(min_p=0.3)),
    (1, 5000, dict(top_k=2, min_p=0.1)), (1, 5000, dict(top_k=700, top_p=0.5, min_p=0.01))],
    ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()) or "plain" if isinstance(v, dict) else str(v))
def test_split_rows_draw_the_same_tokens(n_rows, vocab, filters, device, monkeypatch):
    """Few rows are cut across programs, one launch per pass (``split_kernel``): the noise
    of a token depends only on its row, column and draw, min-p's row max and top-p's total
    mass come from the parts' (top-p after top-k: the k-th largest value by radix select
    over the parts' byte histograms, then the parts' top-k mass), and the parts of a
    rejection round add up to the whole row's count and mass, so split and whole rows
    draw the same ids, greedy rows and
    first-index ties included, whether the rounds end within the split launches or
    continue one program per row after them (``SPLIT_ROUNDS`` 0, 1 and 4; top-1 of N(0, 1)
    logits takes many rounds)."""
    x = torch.randn(n_rows, vocab, generator=torch.Generator().manual_seed(vocab)).to(device)
    x[0, 7] = x[0, vocab - 1] = x[0].max() + 1  # a greedy tie across parts: the first wins
    if n_rows > 1:
        x[1, 2048:] = -math.inf  # -inf parts
    if n_rows > 2:
        x[2] = -math.inf  # nothing to draw: token 0, as torch.argmax
    if not _backend.use_triton(x):
        pytest.skip("the Triton kernels do not serve this device here")
    temperature = torch.linspace(0.0, 1.5, n_rows, device=device)
    seed = torch.tensor([12345], device=device)
    sampling_mod = sys.modules["fused_softmax.sampling"]
    split = sampling_mod.launch_config(n_rows, vocab, x.device, split_ok=True)
    assert split[0]["SPLIT"] and split[1] > 1
    whole_config = sampling_mod.launch_config(n_rows, vocab, x.device)
    args = _row_params(filters, n_rows, device)
    rounds = "top_k" in filters or "top_p" in filters
    for split_rounds, seed_value in [(4, 12345), (1, 999)] + [(0, 7)] * rounds:
        monkeypatch.setattr(sampling_mod, "SPLIT_ROUNDS", split_rounds)
        seed.fill_(seed_value)
        whole = sampling_mod._launch(x, seed, temperature, *args, config=whole_config)
        parts = sampling_mod._launch(x, seed, temperature, *args, config=split)
        assert torch.equal(whole, parts), (split_rounds, whole, parts)
        assert int(parts[0]) == 7  # temperature 0: argmax, first index
        if n_rows > 2:
            assert int(parts[2]) == 0
        if n_rows > 1:
            assert int(parts[1]) < 2048
        if "min_p" in filters:  # every draw is kept by min-p
            s = x[torch.arange(n_rows), parts] / temperature.clamp_min(1e-30)
            smax = x.amax(1) / temperature.clamp_min(1e-30)
            keep = torch.exp(s - smax) >= filters["min_p"]
            assert bool(keep[(temperature > 0) & x.amax(1).isfinite()].all())
        if filters.get("top_k") == 1:  # the largest scaled logit
            assert torch.equal(parts[:2], x[:2].argmax(1))
    # A tie across parts at x / T = 1e8 (fp32 spacing 8): the parts' scores are compared
    # exactly, so the split picks what the whole row picks, and not always the first.
    tied = torch.full((n_rows, vocab), -5.0, device=device)
    tied[:, 7] = tied[:, vocab - 1] = 1000.0
    cold = torch.full((n_rows,), 1e-5, device=device)
    drawn = set()
    for seed_value in range(8 if not rounds else 4):
        seed.fill_(seed_value)
        whole = sampling_mod._launch(tied, seed, cold, *args, config=whole_config)
        parts = sampling_mod._launch(tied, seed, cold, *args, config=split)
        assert torch.equal(whole, parts), (whole, parts)
        drawn.update(whole.tolist())
    assert drawn == {7, vocab - 1}


@pytest.mark.skipif(not _backend.HAS_TRITON, reason="needs Triton")
@pytest.mark.parametrize("filters", [{}, dict(top_k=20), dict(top_p=0.6), dict(min_p=0.2),
                                     dict(top_k=30, top_p=0.7), dict(top_k=25, top_p=0.8, min_p=0.1)],
                         ids=["plain", "top-k", "top-p", "min-p", "top-k+top-p", "all"])
def test_unrolled_passes_draw_the_same_tokens(filters, device):
    """A program walking a long row alone reads UNROLL draw blocks a step: every pass (the
    max and sum, the first draw, top-k's bisection, the rejection rounds) gives the draws
    of one block a step, for UNROLL 2, 4 and 8 (small draw blocks of 128 here: 8 of them,
    the last partial), greedy ties across blocks, -inf blocks and an all -inf row."""
    block, vocab, n_rows = 128, 1000, 4
    x = torch.randn(n_rows, vocab, generator=torch.Generator().manual_seed(3)).to(device)
    x[0, 100] = x[0, 128 + 7] = x[0, 896 + 3] = x[0].max() + 1  # greedy ties: the first
    x[2, 256:640] = -math.inf  # three -inf blocks
    x[3] = -math.inf  # torch.argmax's answer: 0
    if not _backend.use_triton(x):
        pytest.skip("the Triton kernels do not serve this device here")
    sampling_mod = sys.modules["fused_softmax.sampling"]
    temperature = torch.tensor([0.0, 0.7, 1.3, 1.0], device=device)
    params = {name: torch.full((n_rows,), float(v), device=device) if name != "top_k"
              else torch.full((n_rows,), v, device=device) for name, v in filters.items()}
    args = [params.get(name) for name in ("top_k", "top_p", "min_p")]

    def draws(logits, t, unroll, seed_value):
        config = (dict(BLOCK_R=1, BLOCK_N=block, SPLIT=False, UNROLL=unroll, num_warps=4),
                  1, vocab, 2)
        seed = torch.tensor([seed_value], device=device)
        return sampling_mod._launch(logits, seed, t, *args, config=config)
    bisection = "top_k" in filters and "top_p" in filters  # 32 more passes: slow here
    for seed_value in (1,) if bisection else (1, 2):
        one = draws(x, temperature, 1, seed_value)
        assert int(one[0]) == 100 and int(one[3]) == 0
        assert not (256 <= int(one[2]) < 640)
        for unroll in (8,) if bisection else (2, 4, 8):
            assert torch.equal(one, draws(x, temperature, unroll, seed_value)), (unroll, seed_value)
    if bisection:
        return  # the ties below do not depend on the filters
    # tied tokens at x / T = 1e8 in blocks 0, 1 and 7: within a step and across steps
    tied = torch.full((n_rows, vocab), -5.0, device=device)
    tied[:, 5] = tied[:, 128 + 9] = tied[:, 896 + 1] = 1000.0
    cold = torch.full((n_rows,), 1e-5, device=device)
    drawn = set()
    for seed_value in range(6):
        one = draws(tied, cold, 1, seed_value)
        for unroll in (2, 8):
            assert torch.equal(one, draws(tied, cold, unroll, seed_value)), (unroll, seed_value)
        drawn.update(one.tolist())
    assert drawn == {5, 128 + 9, 896 + 1}


if _backend.HAS_TRITON:
    import triton
    import triton.language as tl

    from fused_softmax.kernels import sampling as _ks

    @triton.jit
    def _kth_kernel(X, K, OUT, n_rows, V, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
        """``kth_largest_key`` of each row of ``X`` (row stride ``V``, T = 1) into ``OUT``."""
        tile = tl.program_id(0)
        rows = (tl.zeros([BLOCK_R], tl.int64) + tile) * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < n_rows
        k = tl.load(K + rows, mask=rmask, other=1)
        one = tl.full([BLOCK_R], 1.0, tl.float32)
        key = _ks.kth_largest_key(X, rows, rmask, V, tl.arange(0, BLOCK_N), V, one, k,
                                  BLOCK_R, BLOCK_N)
        tl.store(OUT + rows, key, mask=rmask)


@pytest.mark.skipif(not _backend.HAS_TRITON, reason="needs Triton")
@pytest.mark.parametrize("block_r", [1, 4], ids=["radix select", "bisection"])
def test_kth_largest_key_is_torchs_kth_value(block_r, device):
    """``kth_largest_key`` (top-k with top-p's reference point): one row per program by
    radix select over the key's bytes, several by bisection; both equal the k-th largest of
    the int32 keys that torch computes from the same fp32 values, ties counted, for k from
    1 to V, -inf entries, a row of ties and negative and positive values across blocks."""
    V, n_rows = 300, 8
    x = torch.randn(n_rows, V, generator=torch.Generator().manual_seed(5)) * 50
    x[1] = torch.randint(-2, 3, (V,), generator=torch.Generator().manual_seed(6)).float()
    x[2, 100:] = -math.inf
    x[3] = 0.0
    x[4, :7] = 1e30
    x = x.to(device)
    if not _backend.use_triton(x):
        pytest.skip("the Triton kernels do not serve this device here")
    bits = x.cpu().view(torch.int32).long()
    keys = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # order_key of x + 0.0 (no -0.0 here)
    for ks_ in ([1] * n_rows, [2, 150, 100, 300, 7, 8, 299, 64], [V] * n_rows, [50] * n_rows):
        k = torch.tensor(ks_, device=device)
        out = torch.empty(n_rows, dtype=torch.int64, device=device)
        with warnings.catch_warnings():  # the interpreter's numpy warnings
            warnings.simplefilter("ignore")
            _kth_kernel[(-(-n_rows // block_r),)](x, k, out, n_rows, V, BLOCK_R=block_r,
                                                  BLOCK_N=128)
        expect = keys.sort(1, descending=True).values.gather(1, (k.cpu() - 1)[:, None])[:, 0]
        assert torch.equal(out.cpu(), expect), (ks_, out, expect)


@pytest.mark.skipif(not _backend.HAS_TRITON, reason="reads the Triton launch configuration")
def test_unroll_only_for_few_long_rows(monkeypatch):
    """On CUDA (132 SMs, faked here): UNROLL for long rows fewer than the SMs with filters
    (plain and min-p sampling split such rows instead), never for short rows or many rows."""
    monkeypatch.setattr(_backend, "num_programs_per_wave", lambda device: 132)
    cfg = sys.modules["fused_softmax.sampling"].launch_config
    cuda = torch.device("cuda")
    assert cfg(4, 128256, cuda)[0]["UNROLL"] == 8
    assert cfg(4, 5000, cuda)[0]["UNROLL"] == 4  # 3 draw blocks: a step of 4
    assert cfg(4, 128256, cuda, split_ok=True)[0]["SPLIT"]
    assert cfg(256, 128256, cuda)[0]["UNROLL"] == 1
    assert cfg(4, 1000, cuda)[0]["UNROLL"] == 1


@pytest.mark.skipif(not _backend.HAS_TRITON, reason="reads the Triton launch configuration")
def test_split_only_where_the_filters_allow():
    """The launcher splits few long rows when told it may (``_split_pays``), never rows of
    one draw block."""
    cfg = sys.modules["fused_softmax.sampling"].launch_config
    assert cfg(2, 128256, torch.device("cpu"), split_ok=True)[0]["SPLIT"]
    assert not cfg(2, 128256, torch.device("cpu"), split_ok=False)[0]["SPLIT"]
    assert not cfg(2, 1000, torch.device("cpu"), split_ok=True)[0]["SPLIT"]  # one block anyway


@pytest.mark.parametrize("filters, pre_launches", [
    (dict(top_p=0.9), 0), (dict(top_k=5, min_p=0.1), 1), (dict(top_k=5, top_p=0.9), 4),
    (dict(top_k=5, top_p=0.9, min_p=0.1), 4)])
def test_few_long_rows_launch_the_split_kernel(filters, pre_launches, device):
    """Few long rows are split for every filter; ``split_stats_kernel`` runs first for
    min-p (the row max) and, one launch per byte of radix select, for top-k with top-p."""
    x = torch.randn(2, 5000, device=device)
    if not _backend.use_triton(x) or x.is_cuda:  # CUDA: split eagerly only for many rows
        pytest.skip("the Triton kernels do not serve this device here, or not split eagerly")
    counts = _backend.launch_counts
    before = [counts[k] for k in ("split_kernel", "split_stats_kernel", "sample_kernel")]
    fused_softmax.sampling.sample(x, **filters)
    after = [counts[k] for k in ("split_kernel", "split_stats_kernel", "sample_kernel")]
    assert after[0] > before[0] and after[2] == before[2]
    assert after[1] - before[1] == pre_launches


@pytest.mark.skipif(not _backend.HAS_TRITON, reason="needs Triton")
def test_split_top_k_top_p_with_per_row_parameters(device):
    """Top-p after top-k over split rows with per-row parameters: only the rows whose
    filters both cut (``k < V``, ``p < 1``, temperature > 0) search the k-th largest value;
    the others measure top-p against the whole row (``k >= V``), keep the top-k set
    (``p = 1``) or take the argmax. Split and whole rows draw the same ids."""
    n_rows, vocab = 5, 3000
    x = torch.randn(n_rows, vocab, generator=torch.Generator().manual_seed(11)).to(device)
    if not _backend.use_triton(x):
        pytest.skip("the Triton kernels do not serve this device here")
    smod = sys.modules["fused_softmax.sampling"]
    split = smod.launch_config(n_rows, vocab, x.device, split_ok=True)
    assert split[0]["SPLIT"] and split[1] > 1
    whole = smod.launch_config(n_rows, vocab, x.device)
    top_k = torch.tensor([40, vocab + 5, 3, 40, 2], device=device)
    top_p = torch.tensor([0.5, 0.3, 1.0, 0.8, 0.99], device=device)
    temperature = torch.tensor([1.0, 0.9, 1.1, 0.0, 0.5], device=device)
    seed = torch.tensor([0], device=device)
    for seed_value in range(3):
        seed.fill_(seed_value)
        a = smod._launch(x, seed, temperature, top_k, top_p, None, config=split)
        b = smod._launch(x, seed, temperature, top_k, top_p, None, config=whole)
        assert torch.equal(a, b), (seed_value, a, b)
        assert int(a[3]) == int(x[3].argmax())
        for r in (0, 2, 4):
            probs, _ = reference_probs(x[r].cpu(), temperature=float(temperature[r]),
                                       top_k=int(top_k[r]), top_p=float(top_p[r]))
            assert probs[int(a[r])] > 0, (r, int(a[r]))


def test_torch_path_support():
    """The torch fallback (CPU without Triton) keeps the same set and samples from it."""
    x = logits_16()
    kwargs = dict(temperature=0.7, top_k=6, top_p=0.8, min_p=0.1)
    probs, _ = reference_probs(x, **kwargs)
    n = N_DRAWS
    ids = _torch_sample(x.expand(n, -1), torch.tensor([123]), torch.full((n,), 0.7),
                        torch.full((n,), 6), torch.full((n,), 0.8), torch.full((n,), 0.1))
    check_draws(ids, probs)


def test_torch_path_top_p_set_when_fp32_prefix_sums_fall_short():
    """One token of mass ~1 and 100k of 2.5e-8 each: fp32 prefix sums never add the small
    ones (each is below half an ulp of 1), so no prefix reaches 0.999 of the total. The
    kept set must still be the exact one (~60k tokens), not the first prefix (one token)."""
    V = 100001
    x = torch.full((V,), -17.5)
    x[1:] -= torch.linspace(0, 0.01, V - 1)
    x[0] = 0.0
    probs, _ = reference_probs(x, top_p=0.999)
    _, keep, _ = sys.modules["fused_softmax.sampling"]._torch_kept(
        x[None], torch.ones(1), None, torch.full((1,), 0.999), None)
    assert abs(int(keep.sum()) - int((probs > 0).sum())) <= 1


BAD_ARGS = [
    (dict(top_k=0), ValueError, "top_k"),
    (dict(top_k=2.5), TypeError, "top_k"),
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(min_p=-0.1), ValueError, "min_p"),
    (dict(min_p=1.1), ValueError, "min_p"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(temperature=math.inf), ValueError, "temperature"),
    (dict(temperature=torch.tensor([1.0, -0.5])), ValueError, "temperature"),
    (dict(top_k=torch.tensor([1, 0])), ValueError, "top_k"),
    (dict(top_k=torch.tensor([1.0, 2.0])), TypeError, "top_k"),
    (dict(top_p=torch.tensor([0.5, 0.5, 0.5])), ValueError, "broadcast"),
    (dict(temperature="hot"), TypeError, "temperature"),
]


BAD_ARGS += [
    (dict(generator="seed"), TypeError, "generator"),
    (dict(temperature=1e39), ValueError, "temperature"),
    # a Fraction is a numbers.Real but no number to torch: our TypeError, naming it (it
    # failed inside torch.full before)
    (dict(top_p=Fraction(1, 2)), TypeError, "top_p must be a number or a tensor"),
    (dict(min_p=Fraction(1, 2)), TypeError, "min_p must be a number or a tensor"),
    (dict(temperature=Fraction(1, 2)), TypeError, "temperature must be a number or a tensor"),
]


# Each case also in a greedy call (T = 0 returns the argmax before any kernel, but after
# every argument is checked), except those that set the temperature themselves.
BAD_ARGS_BOTH = [pytest.param(*case, greedy, id=f"{case[0]}-T={0 if greedy else 1}")
                 for case in BAD_ARGS for greedy in (False, True)
                 if not (greedy and "temperature" in case[0])]


@pytest.mark.parametrize("kwargs, error, word, greedy", BAD_ARGS_BOTH)
def test_bad_arguments(kwargs, error, word, greedy):
    with pytest.raises(error, match=word):
        sample(torch.randn(2, 8), **dict(dict(temperature=0.0) if greedy else {}, **kwargs))


@pytest.mark.parametrize("top_p", [1e-50, torch.tensor(1e-50, dtype=torch.float64)],
                         ids=["number", "fp64 tensor"])
def test_top_p_below_fp32_range_keeps_the_top_token(top_p, device):
    """A valid top_p that rounds to 0 in fp32 still keeps the most probable token (the row's
    first token is -inf: a lost top token would surface as index 0)."""
    x = torch.tensor([[-math.inf, 0.0, 5.0, 1.0]] * 64, device=device)
    top_p = top_p.to(device) if isinstance(top_p, torch.Tensor) else top_p
    assert torch.equal(sample(x, top_p=top_p), torch.full((64,), 2, device=device))


def test_nan_parameters_in_compiled_code_disable_their_filter():
    """Where tensors are clamped rather than checked (CUDA, torch.compile), a NaN entry
    disables its filter (temperature 1) instead of breaking the row: the draws then stay
    on the one token that holds all the mass."""
    f = torch.compile(lambda x, t, p, m: sample(x, temperature=t, top_p=p, min_p=m), fullgraph=True)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    x[:, 6] += 40.0  # p(6) = 1 - 1e-16
    nan, one, half, zero = (torch.full((8,), v) for v in (math.nan, 1.0, 0.5, 0.0))
    for t, p, m in ((nan, half, zero), (one, nan, zero), (one, half, nan)):
        assert torch.equal(f(x, t, p, m), torch.full((8,), 6))
    with pytest.raises(ValueError, match="temperature"):  # eager CPU: checked
        sample(x, temperature=nan)


def test_huge_unsigned_top_k_keeps_every_token(device):
    """A uint64 top_k of 2^63 or more (>= V: no filter) wrapped to a negative int64, then
    clamped to 1: only the argmax was drawn."""
    x = torch.tensor([1.0, 2.0, 3.0, 2.5], device=device).expand(512, 4)
    k = torch.tensor([2 ** 63], dtype=torch.uint64, device=device)
    draws = [sample(x, top_k=top_k, generator=torch.Generator(device).manual_seed(3))
             for top_k in (k, None)]
    assert torch.equal(draws[0], draws[1])
    assert len(torch.unique(draws[0])) == 4


def test_bad_logits():
    with pytest.raises(NotImplementedError, match="dtype"):
        sample(torch.randint(0, 5, (2, 8)))
    with pytest.raises(TypeError, match="Tensor"):
        sample([1.0, 2.0])
    with pytest.raises(ValueError, match="vocabulary"):
        sample(torch.randn(2, 0))


def test_custom_op_registration(device):
    """The op's fake implementation and schema agree with the real one (torch.compile needs it)."""
    n = 8
    rows = logits_16().to(device).expand(n, -1).contiguous()
    full = lambda v: torch.full((n,), v, device=device)  # noqa: E731
    args = (rows, torch.tensor([5], device=device), full(0.7), full(6), full(0.8), full(0.1))
    torch.library.opcheck(torch.ops.fused_softmax.sample.default, args)


def test_minus_inf_logits_are_never_drawn(device):
    x = logits_16()
    x[::3] = -math.inf  # banned tokens, as a logits processor would mark them
    probs, _ = reference_probs(x, top_p=0.95)
    ids = sample(x.to(device).expand(N_DRAWS, -1), top_p=0.95,
                 generator=torch.Generator(device=device).manual_seed(13))
    check_draws(ids.cpu(), probs)
    all_banned = torch.full((2, 16), -math.inf, device=device)
    assert sample(all_banned, top_k=3).tolist() == [0, 0]  # torch.argmax's answer


COMPILE_SCRIPT = textwrap.dedent("""
    import json, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fused_softmax.kernels.sampling import sample_kernel, split_kernel, split_stats_kernel

    PTRS = {"X": "*bf16", "OUT": "*i64", "SEED": "*i64", "TEMP": "*fp32", "TOPK": "*i64",
            "TOPP": "*fp32", "MINP": "*fp32", "PART_MZ": "*fp32", "PART_BEST": "*fp32",
            "PART_IDX": "*i64", "PART_CNT": "*i64", "PART_MASS": "*fp32", "ROW_CAND": "*i64",
            "ROW_ACTIVE": "*i32", "ROW_HIST": "*i32", "PART_TOP": "*fp32"}
    H100 = GPUTarget("cuda", 90, 32)
    out = {}
    def compile_one(name, kernel, const, num_warps):
        sig = {n: "constexpr" if n in const else PTRS.get(n, "i64") for n in kernel.arg_names}
        # 16-byte aligned pointers, V and row stride multiples of 16: the launched variant
        aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
                   if n in PTRS or n in ("V", "sxm")}
        try:
            cc = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=const,
                                          attrs=aligned),
                                target=H100, options=dict(num_warps=num_warps))
            out[name] = "ok" if cc.asm["cubin"] else "no cubin"
        except Exception as e:
            out[name] = f"{type(e).__name__}: {e}"[:2000]
    for flags in json.loads(sys.argv[1]):
        filters = dict(zip(("HAS_TOP_K", "HAS_TOP_P", "HAS_MIN_P"), flags))
        # whole rows several to a tile
        compile_one(f"whole {flags}", sample_kernel,
                    dict(filters, BLOCK_R=4, BLOCK_N=2048, UNROLL=1), 16)
        for stage in (0, 1, 2):  # split rows: every stage
            stats_first = flags[1] and not flags[2] and not flags[0]
            compile_one(f"split {flags} stage {stage}", split_kernel,
                        dict(filters, STAGE=stage, STATS_FIRST=stats_first, BLOCK_N=2048,
                             BLOCK_S=64), 4)
    compile_one("unroll", sample_kernel,  # one row walked 8 draw blocks a step
                dict(HAS_TOP_K=True, HAS_TOP_P=True, HAS_MIN_P=True, BLOCK_R=1,
                     BLOCK_N=2048, UNROLL=8), 8)
    for stats, with_sum, select in [(True, False, False), (True, True, False),
                                    (True, True, True), (False, True, True)]:
        compile_one(f"split stats {stats} {with_sum} {select}", split_stats_kernel,
                    dict(STATS=stats, WITH_SUM=with_sum, SELECT=select, BLOCK_N=2048), 4)
    print(json.dumps(out))
""")


#: (HAS_TOP_K, HAS_TOP_P, HAS_MIN_P): none, each filter alone (each defines a different
#: subset of the kernels' variables), every pair, and all three.
COMPILE_FLAGS = [(False, False, False), (True, False, False), (False, True, False),
                 (False, False, True), (True, False, True), (False, True, True),
                 (True, True, False), (True, True, True)]


def test_kernel_compiles_for_sm90():
    """The interpreter never runs the compiler: compile the constexpr switches for an H100."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT, json.dumps(COMPILE_FLAGS)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "unroll" in results and "split stats False True True" in results
    assert len(results) == 4 * len(COMPILE_FLAGS) + 1 + 4, sorted(results)
    assert all(v == "ok" for v in results.values()), results


def test_split_rows_eagerly_only_where_the_rows_fill_the_sms(monkeypatch):
    """On CUDA (faked here: 132 SMs) few rows are split only while a CUDA graph is captured
    (launches are free there) or when they fill the SMs: eagerly each extra launch costs the
    host more than the split saves; always under the interpreter."""
    smod = sys.modules["fused_softmax.sampling"]
    monkeypatch.setattr(_backend, "num_programs_per_wave", lambda device: 132)
    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])

    def rows(n, device="cuda"):  # what _split_pays reads of the logits
        return types.SimpleNamespace(shape=(n, 128256), device=torch.device(device))

    assert [smod._split_pays(rows(n)) for n in (1, 64, 131, 132, 256)] == \
        [False, False, False, True, True]
    capturing[0] = True
    assert smod._split_pays(rows(1))
    capturing[0] = False
    assert smod._split_pays(rows(1, "cpu"))
