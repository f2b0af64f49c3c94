"""fused_softmax.cross_entropy against torch.nn.functional.cross_entropy.

Every test takes the ``device`` fixture (tests/conftest.py): on a machine without CUDA the
real Triton kernels run on CPU through Triton's interpreter, on a GPU the same tests run
the compiled kernels unchanged. The interpreter costs ~10-15 ms per row per launch, so
shapes are small (a handful of rows; one case per dtype with rows long enough for the
multi-block path).

Accuracy contract (shared/DESIGN.md, "Semantics: torch is the contract"): at least as close
to an fp64 reference as torch's own kernel in the same dtype. The reference is torch on the
*same* low-precision values cast to fp64, so it measures only the error of the computation.
See ``error_floor`` and ``assert_accurate`` for the tolerance and why.

torch refuses int32 index targets; the library takes them, so torch is called with the
target cast to int64. uint8 targets with (N, C, d...) inputs are refused, as torch does.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import itertools
import math
import re
import warnings
import zlib

import pytest
import torch
import torch.nn.functional as F

import fused_softmax
from fused_softmax import _backend

ce = fused_softmax.cross_entropy
# ``fused_softmax.cross_entropy`` is the function (the package re-exports it), so reach the
# module through sys.modules to monkeypatch its names.
ce_mod = importlib.import_module("fused_softmax.cross_entropy")

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA-only behaviour")
# Triton's interpreter warns on every launch (numpy deprecations, NaN arithmetic of masked
# lanes); recording thousands of them costs seconds.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
]


# --------------------------------------------------------------------------- helpers
def acc_eps(dtype: torch.dtype) -> float:
    """eps of the accumulation dtype (fp32 for fp16/bf16/fp32, fp64 for fp64)."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def error_floor(dtype: torch.dtype, ref: torch.Tensor, zmax: float) -> float:
    """The error no implementation can avoid, as a fraction of the result's magnitude.

    * Rounding to ``dtype``: the loss is rounded once (eps/2 of a value); the gradient twice
      (the forward stores it in ``dtype``, the backward scales it by grad_output and stores
      it again): at most ~eps of the largest value; 2 eps leaves 2x margin.
    * The computation runs in the accumulation dtype (fp32; fp64 for fp64): ``lse`` carries a
      few roundings of size eps_acc * |lse|, so ``lse - z_t`` and ``z - lse`` (the exponent of
      every p) are off by ~eps_acc * (|z| + |lse|) <= 2 * eps_acc * (1 + max|z|) absolutely,
      which is a relative error of every p; 4 * eps_acc * (1 + max|z|) leaves 2x margin. This
      term matters only for fp32 / fp64 results (for fp16 / bf16 it is < 1e-3 eps).
    Measured on the table: ours <= 1 eps (fp16/bf16), <= 3.3 eps (fp32/fp64) of max|ref|.
    """
    scale = ref.abs().max().item() if ref.numel() else 0.0
    return scale * (2 * torch.finfo(dtype).eps + 4 * acc_eps(dtype) * (1 + zmax))


def finite_max(t: torch.Tensor) -> float:
    t = t.detach().double()
    t = t[torch.isfinite(t)]
    return t.abs().max().item() if t.numel() else 0.0


def assert_accurate(ours, theirs, ref, dtype, zmax, what=""):
    """``ours`` (library, ``dtype``) vs ``theirs`` (torch in the same dtype) vs ``ref``
    (torch in fp64 on the same values): same shape/dtype as torch; the NaN/inf pattern of
    the correctly rounded reference (torch may overflow where the true value fits:
    fp16 sums); and max |ours - ref| <= max(max |torch - ref|, error_floor) on the rest."""
    ours, theirs, ref = ours.detach(), theirs.detach(), ref.detach().double()
    assert ours.shape == theirs.shape, f"{what}: shape {tuple(ours.shape)} vs torch {tuple(theirs.shape)}"
    assert ours.dtype == theirs.dtype, f"{what}: dtype {ours.dtype} vs torch {theirs.dtype}"
    rounded = ref.to(ours.dtype)
    pattern = f"{what}: NaN/inf pattern\nours  {ours}\nref   {rounded}\ntorch {theirs}"
    assert torch.equal(ours.isnan(), rounded.isnan()), pattern
    assert torch.equal(ours.isinf(), rounded.isinf()), pattern
    fin = torch.isfinite(rounded)
    assert torch.equal(ours[~fin].nan_to_num(), rounded[~fin].nan_to_num()), pattern
    err_ours = (ours.double() - ref)[fin].abs()
    err_torch = (theirs.double() - ref)[fin & torch.isfinite(theirs)].abs()
    if err_ours.numel() == 0:
        return
    torch_err = err_torch.max().item() if err_torch.numel() else 0.0
    bound = max(torch_err, error_floor(dtype, ref[fin], zmax))
    worst = err_ours.argmax()
    assert err_ours.max().item() <= bound, (
        f"{what}: max |ours - fp64 ref| = {err_ours.max().item():.3e} > bound {bound:.3e} "
        f"(torch's own error {torch_err:.3e}); at flat index {worst.item()}: "
        f"ours {ours[fin].flatten()[worst].item()!r}, torch {theirs[fin].flatten()[worst].item()!r}, "
        f"ref {ref[fin].flatten()[worst].item()!r}")


def assert_close_to_ref(ours, ref, dtype, zmax, what=""):
    """No torch kernel to compare with (extras): within the error floor of the fp64 ref."""
    ours, ref = ours.detach(), ref.detach().double()
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs ref {tuple(ref.shape)}"
    assert torch.equal(ours.isnan(), ref.isnan()), f"{what}: NaN pattern\nours {ours}\nref  {ref}"
    err = (ours.double() - ref).abs().nan_to_num(0.0)
    bound = error_floor(dtype, ref.nan_to_num(0.0), zmax)
    assert err.max().item() <= bound, (
        f"{what}: max |ours - ref| = {err.max().item():.3e} > {bound:.3e}\nours {ours}\nref  {ref}")


def torch_target(t: torch.Tensor) -> torch.Tensor:
    """torch takes int64 index targets (uint8 only for (C,) and (N, C) inputs; int32 never)."""
    return t.long() if not t.is_floating_point() else t


def loss_and_grad(fn, x, target, upstream=None, **kw):
    """Loss and d(loss)/dx for ``fn`` on a fresh leaf copy of ``x``."""
    xl = x.detach().clone().requires_grad_(True)
    loss = fn(xl, target, **kw)
    loss.backward(upstream if upstream is not None else torch.ones_like(loss))
    return loss.detach(), xl.grad


def class_dim(x):
    return 0 if x.dim() == 1 else 1


# --------------------------------------------------------------------------- the table
KINDS = ("int64", "int32", "uint8", "prob")
SHAPES = ("2d", "1d", "4d")  # (5, C); (C,) with a 0-d target; (2, C, 1, 3)
WEIGHTS = (False, True)
IGNORES = ("default", "inside")  # -100 with some rows ignored; a class index in [0, C)
REDUCTIONS = ("none", "mean", "sum")
SMOOTHINGS = (0.0, 0.1, 1.0)
C_OF = {"2d": 101, "1d": 37, "4d": 19}  # not powers of two: masked tails


@dataclasses.dataclass(frozen=True)
class Case:
    dtype: torch.dtype
    kind: str
    shape: str
    weight: bool
    ignore: str
    reduction: str
    smoothing: float

    def __str__(self):
        return (f"{str(self.dtype)[6:]}-{self.kind}-{self.shape}-{'w' if self.weight else 'now'}-"
                f"ign_{self.ignore}-{self.reduction}-ls{self.smoothing}")

    def values(self):
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))


def _pairs(values):
    """Value pairs a case covers that involve at least one secondary dimension (index >= 3);
    probability targets take no ignore_index in [0, C), so that pair does not exist."""
    out = set()
    for (i, a), (j, b) in itertools.combinations(enumerate(values), 2):
        if j >= 3 and not (values[1] == "prob" and (i, j) != (1, 4) and values[4] == "inside"):
            out.add(((i, a), (j, b)))
    return out


def build_table():
    """Every dtype x target kind x shape (48 cases); weight, ignore_index, reduction and
    label_smoothing chosen greedily so that every value of each appears with every value
    of every other dimension (all-pairs coverage)."""
    covered, cases, used = set(), [], collections.Counter()
    secondaries = list(itertools.product(WEIGHTS, IGNORES, REDUCTIONS, SMOOTHINGS))
    for dtype, kind, shape in itertools.product(DTYPES, KINDS, SHAPES):
        options = [s for s in secondaries if not (kind == "prob" and s[1] == "inside")]

        def score(s):  # new pairs first; then spread the secondary values evenly
            return (len(_pairs((dtype, kind, shape) + s) - covered),
                    -sum(used[(i, v)] for i, v in enumerate(s)), -used[s])

        best = max(options, key=score)
        case = Case(dtype, kind, shape, *best)
        covered |= _pairs(case.values())
        used.update([best, *enumerate(best)])
        cases.append(case)
    return cases


TABLE = build_table()


def test_table_covers_all_pairs():
    dims = (DTYPES, KINDS, SHAPES, WEIGHTS, IGNORES, REDUCTIONS, SMOOTHINGS)
    have = set()
    for case in TABLE:
        have |= {(a, b) for a, b in itertools.combinations(enumerate(case.values()), 2)}
    missing = [
        ((i, a), (j, b))
        for i, j in itertools.combinations(range(len(dims)), 2) if j >= 3
        for a in dims[i] for b in dims[j]
        if ((i, a), (j, b)) not in have and not (i == 1 and a == "prob" and j == 4 and b == "inside")
    ]
    assert not missing
    assert len({(c.dtype, c.kind, c.shape) for c in TABLE}) == 48


def make_inputs(case: Case, device, gen):
    """Logits (scale 3, so p spans several decades), target with some ignored rows,
    weight, ignore_index for a table case."""
    C = C_OF[case.shape]
    if case.shape == "2d":
        lead = (5,)
    elif case.shape == "1d":
        lead = ()
    else:
        lead = (2, 1, 3)
    xshape = (C,) if case.shape == "1d" else (lead[0], C, *lead[1:])
    x = (3 * torch.randn(xshape, generator=gen, dtype=torch.float64)).to(case.dtype).to(device)
    ignore_index = -100 if case.ignore == "default" else C // 2
    if case.kind == "prob":
        q = torch.softmax(2 * torch.randn(xshape, generator=gen, dtype=torch.float64), class_dim(x))
        target = q.to(case.dtype).to(device)
    else:
        tdtype = {"int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8}[case.kind]
        t = torch.randint(0, C, lead, generator=gen)
        if case.shape == "1d":
            t = torch.tensor((ignore_index + 1) % C if ignore_index >= 0 else 3)  # one row, kept
        elif not (case.kind == "uint8" and ignore_index < 0):  # uint8 cannot hold -100
            flat = t.view(-1)
            flat[1] = ignore_index
            flat[-2] = ignore_index
        target = t.to(tdtype).to(device)
    weight = None
    if case.weight:
        weight = (0.5 + torch.rand(C, generator=gen, dtype=torch.float64)).to(case.dtype).to(device)
    return x, target, weight, ignore_index


@pytest.mark.parametrize("case", TABLE, ids=str)
def test_table_loss_and_grad_vs_torch(case, device):
    gen = torch.Generator().manual_seed(zlib.crc32(str(case).encode()))
    x, target, weight, ignore_index = make_inputs(case, device, gen)
    kw = dict(weight=weight, ignore_index=ignore_index, reduction=case.reduction,
              label_smoothing=case.smoothing)
    if case.kind == "uint8" and x.dim() > 2:  # torch: "expected scalar type Long but found Byte"
        for fn in (F.cross_entropy, ce):
            with pytest.raises(RuntimeError, match="Long but found Byte"):
                fn(x, target, **kw)
        return
    if (case.kind == "uint8" and weight is not None and case.smoothing > 0
            and case.reduction == "mean"):  # torch: its smoothing term gathers with the bytes
        for fn in (F.cross_entropy, ce):
            with pytest.raises(RuntimeError, match=r"gather\(\): Expected dtype int32/int64"):
                fn(x, target, **kw)
        return
    # Upstream gradient: random for 'none', a non-1 scalar for 'sum' (the backward kernel
    # scales), exactly 1 for 'mean' (the backward kernel's skip).
    out_dtype = case.dtype
    if case.reduction == "none":
        lead = () if x.dim() == 1 else (x.shape[0], *x.shape[2:])
        up = torch.randn(lead, generator=gen, dtype=torch.float64).to(out_dtype).to(device)
    elif case.reduction == "sum":
        up = torch.tensor(0.75, dtype=out_dtype, device=device)
    else:
        up = None

    loss, grad = loss_and_grad(ce, x, target, up, **kw)
    t_loss, t_grad = loss_and_grad(F.cross_entropy, x, torch_target(target), up, **kw)
    kw64 = dict(kw, weight=weight.double() if weight is not None else None)
    tgt64 = torch_target(target).double() if case.kind == "prob" else torch_target(target)
    r_loss, r_grad = loss_and_grad(F.cross_entropy, x.double(), tgt64,
                                   up.double() if up is not None else None, **kw64)
    zmax = finite_max(x)
    assert_accurate(loss, t_loss, r_loss, case.dtype, zmax, f"{case} loss")
    assert_accurate(grad, t_grad, r_grad, case.dtype, zmax, f"{case} grad")


def test_uint8_target_passed_to_torch_directly(device):
    """Where torch itself takes uint8 targets ((N, C), no smoothing), pass them unchanged."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 30, generator=gen).to(device)
    t = torch.randint(0, 30, (5,), generator=gen).to(torch.uint8).to(device)
    w = (torch.rand(30, generator=gen) + 0.5).to(device)
    for red in REDUCTIONS:
        got, g = loss_and_grad(ce, x, t, None if red != "none" else torch.ones(5, device=device),
                               weight=w, ignore_index=7, reduction=red)
        exp, eg = loss_and_grad(F.cross_entropy, x, t, None if red != "none" else torch.ones(5, device=device),
                                weight=w, ignore_index=7, reduction=red)
        torch.testing.assert_close(got, exp)
        torch.testing.assert_close(g, eg)


@pytest.mark.parametrize("dtype,C", [(torch.bfloat16, 40000), (torch.float32, 20000), (torch.float64, 10000)])
def test_multi_block_rows(dtype, C, device):
    """Rows longer than one block (online max/sum across blocks), the row max in different
    blocks, with weight, smoothing, ignore and a random upstream gradient."""
    gen = torch.Generator().manual_seed(1)
    x = (4 * torch.randn(3, C, generator=gen, dtype=torch.float64))
    x[0, C - 5] = 40.0   # max in the last block: earlier partial sums are rescaled
    x[1, 3] = 40.0       # max in the first block
    x = x.to(dtype).to(device)
    t = torch.tensor([C - 5, 7, -100]).to(device)
    w = (0.5 + torch.rand(C, generator=gen, dtype=torch.float64)).to(dtype).to(device)
    up = torch.randn(3, generator=gen, dtype=torch.float64).to(dtype).to(device)
    kw = dict(weight=w, label_smoothing=0.1, reduction="none")
    loss, grad = loss_and_grad(ce, x, t, up, **kw)
    t_loss, t_grad = loss_and_grad(F.cross_entropy, x, t, up, **kw)
    r_loss, r_grad = loss_and_grad(F.cross_entropy, x.double(), t, up.double(),
                                   **dict(kw, weight=w.double()))
    assert_accurate(loss, t_loss, r_loss, dtype, 40.0, "loss")
    assert_accurate(grad, t_grad, r_grad, dtype, 40.0, "grad")
    # and lse across blocks
    _, lse = ce(x, t, weight=w, label_smoothing=0.1, reduction="none", return_lse=True)
    assert_close_to_ref(lse, torch.logsumexp(x.double(), 1), torch.float32 if dtype != torch.float64 else dtype,
                        40.0, "lse")


# --------------------------------------------------------------------------- layouts, empty
def _layouts(device, gen):
    """(name, contiguous leaf, view making the non-contiguous input, target)."""
    C = 23

    def r(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    def idx(*shape):
        return torch.randint(0, C, shape, generator=gen).to(device)

    yield "transposed", r(C, 5), lambda b: b.t(), idx(5)
    yield "column slice", r(5, C + 9), lambda b: b[:, 4:4 + C], idx(5)
    yield "row slice", r(10, C), lambda b: b[::2], idx(5)
    yield "expanded index target", r(5, C), lambda b: b, torch.tensor([4], device=device).expand(5)
    q = torch.softmax(torch.randn(1, C, generator=gen), 1).to(device)
    yield "expanded prob target", r(5, C), lambda b: b, q.expand(5, C)
    yield "transposed, prob target transposed", r(C, 5), lambda b: b.t(), \
        torch.softmax(torch.randn(C, 5, generator=gen), 0).to(device).t()
    yield "channels-last 4d", r(2, 3, 2, C), lambda b: b.permute(0, 3, 1, 2), idx(2, 3, 2)
    yield "4d transposed + expanded target", r(2, C, 2, 3), lambda b: b.transpose(2, 3), \
        idx(2, 1, 2).expand(2, 3, 2)
    yield "1d strided", r(2 * C), lambda b: b[::2], torch.tensor(5, device=device)


def test_non_contiguous_inputs_and_expanded_targets(device):
    gen = torch.Generator().manual_seed(2)
    for i, (name, base, view, t) in enumerate(_layouts(device, gen)):
        x = view(base)
        assert not x.is_contiguous() or not t.is_contiguous(), name
        kw = dict(reduction=REDUCTIONS[i % 3], label_smoothing=0.05)  # each reduction 3 times
        out = {}
        for who, fn, b in (("ours", ce, base), ("torch", F.cross_entropy, base),
                           ("ref", F.cross_entropy, base.double())):
            leaf = b.clone().requires_grad_(True)
            tt = t.double() if (who == "ref" and t.is_floating_point()) else t
            loss = fn(view(leaf), tt, **kw)
            up = torch.linspace(-1, 2, loss.numel(), device=device).reshape(loss.shape).to(loss.dtype)
            loss.backward(up)
            out[who] = (loss.detach(), leaf.grad)
        zmax = finite_max(x)
        assert_accurate(out["ours"][0], out["torch"][0], out["ref"][0], torch.float32, zmax, f"{name} loss")
        assert_accurate(out["ours"][1], out["torch"][1], out["ref"][1], torch.float32, zmax, f"{name} grad")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["index", "prob", "index-4d"])
def test_empty_batch(reduction, kind, device):
    C = 7
    if kind == "index":
        x, t = torch.randn(0, C, device=device), torch.zeros(0, dtype=torch.long, device=device)
    elif kind == "prob":
        x, t = torch.randn(0, C, device=device), torch.zeros(0, C, device=device)
    else:
        x, t = torch.randn(2, C, 0, 3, device=device), torch.zeros(2, 0, 3, dtype=torch.long, device=device)
    w = torch.rand(C, device=device)
    xl = x.clone().requires_grad_(True)
    got = ce(xl, t, weight=w, reduction=reduction)
    exp = F.cross_entropy(x, t, weight=w, reduction=reduction)
    assert got.shape == exp.shape and got.dtype == exp.dtype
    assert torch.equal(got.isnan(), exp.isnan()) and torch.equal(got.nan_to_num(), exp.nan_to_num())
    if reduction == "mean" and kind != "prob":
        assert got.isnan().item()  # torch: 0 / 0
    if reduction == "sum":
        assert got.item() == 0.0
    got.sum().backward()
    assert xl.grad.shape == x.shape and xl.grad.dtype == x.dtype
    _, lse = ce(x, t, reduction=reduction, return_lse=True)
    assert lse.numel() == 0


# --------------------------------------------------------------------------- edge results
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted,smoothing", [(False, 0.0), (True, 0.2)])
def test_all_targets_ignored(reduction, weighted, smoothing, device):
    C = 11
    x = torch.randn(4, C, device=device)
    t = torch.full((4,), -100, device=device)
    w = torch.rand(C, device=device) + 0.5 if weighted else None
    kw = dict(weight=w, reduction=reduction, label_smoothing=smoothing)
    loss, grad = loss_and_grad(ce, x, t, None, **kw)
    t_loss, t_grad = loss_and_grad(F.cross_entropy, x, t, None, **kw)
    if reduction == "mean":
        assert loss.isnan().item() and t_loss.isnan().item()
    else:
        assert torch.equal(loss, torch.zeros_like(loss)) and torch.equal(loss, t_loss)
    assert torch.equal(grad, torch.zeros_like(x)), grad
    assert torch.equal(t_grad, torch.zeros_like(x))
    # ignore_index inside [0, C), all rows on it
    t2 = torch.full((4,), 3, device=device)
    loss2, grad2 = loss_and_grad(ce, x, t2, None, ignore_index=3, **kw)
    t_loss2 = F.cross_entropy(x, t2, ignore_index=3, **kw)
    assert torch.equal(loss2.isnan(), t_loss2.isnan()) and torch.equal(loss2.nan_to_num(), t_loss2.nan_to_num())
    assert torch.equal(grad2, torch.zeros_like(x))


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("weights", [(1.0, -1.0, 2.0), (0.0, 0.0, 2.0)], ids=["mixed-sign", "zero"])
def test_mean_over_zero_total_weight(weights, smoothing, device):
    """Target weights summing to 0: torch's mean is the plain quotient (+-inf, or NaN for
    0 / 0) without smoothing, NaN with it; its gradient holds NaN at the targets and +-inf
    elsewhere, or NaN everywhere with smoothing. Same NaN/inf pattern here."""
    x = torch.tensor([[0.3, -1.2, 0.5], [1.1, 0.2, -0.4]], dtype=torch.float64, device=device)
    t = torch.tensor([0, 1], device=device)
    w = torch.tensor(weights, dtype=torch.float64, device=device)
    kw = dict(weight=w, label_smoothing=smoothing)
    loss, grad = loss_and_grad(ce, x, t, None, **kw)
    t_loss, t_grad = loss_and_grad(F.cross_entropy, x, t, None, **kw)
    torch.testing.assert_close(loss, t_loss, equal_nan=True)
    torch.testing.assert_close(grad, t_grad, equal_nan=True)
    if weights[1] < 0 and smoothing == 0:
        assert t_loss.item() == -math.inf  # the case is what it claims: not all NaN
        assert t_grad.isinf().sum().item() == 4


@pytest.mark.parametrize("smoothing,weighted", [(0.0, False), (0.1, True)])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_target_logit_minus_inf_gives_inf(smoothing, weighted, reduction, device):
    C = 9
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, C, generator=gen)
    x[1, 2] = -math.inf
    x = x.to(device)
    t = torch.tensor([0, 2, 5], device=device)
    w = (torch.rand(C, generator=gen) + 0.5).to(device) if weighted else None
    kw = dict(weight=w, reduction=reduction, label_smoothing=smoothing)
    loss, grad = loss_and_grad(ce, x, t, None, **kw)
    t_loss, t_grad = loss_and_grad(F.cross_entropy, x, t, None, **kw)
    r_loss, r_grad = loss_and_grad(F.cross_entropy, x.double(), t, None,
                                   **dict(kw, weight=w.double() if w is not None else None))
    if reduction == "none":
        assert loss[1].item() == math.inf
    else:
        assert loss.item() == math.inf
    assert_accurate(loss, t_loss, r_loss, torch.float32, finite_max(x), "loss")
    assert_accurate(grad, t_grad, r_grad, torch.float32, finite_max(x), "grad")


@pytest.mark.parametrize("ignore_index", [-100, 4])
@pytest.mark.parametrize("extras", [{}, {"label_smoothing": 0.1, "z_loss": 1e-2}])
def test_ignored_rows_with_nan_inf_logits(ignore_index, extras, device):
    """Ignored rows: loss 0 and gradient 0 whatever their logits (torch gives NaN gradients
    there; the issue asks for 0). The other rows match torch."""
    C = 10
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(5, C, generator=gen)
    x[1] = math.nan
    x[2, 3] = math.inf
    x[3] = -math.inf
    x[3, 0] = math.inf
    x = x.to(device)
    t = torch.tensor([2, ignore_index, ignore_index, ignore_index, 7], device=device)
    w = (torch.rand(C, generator=gen) + 0.5).to(device)
    keep = torch.tensor([0, 4], device=device)
    for reduction in REDUCTIONS:
        up = torch.randn(5, generator=gen).to(device) if reduction == "none" else None
        loss, grad = loss_and_grad(ce, x, t, up, weight=w, ignore_index=ignore_index,
                                   reduction=reduction, **extras)
        assert torch.isfinite(loss).all(), loss
        assert torch.equal(grad[1:4], torch.zeros_like(grad[1:4])), grad[1:4]
        assert torch.isfinite(grad).all()
        # torch on the kept rows only (the ignored rows contribute nothing, also to the mean)
        exp, egrad = loss_and_grad(composed_ref, x[keep], t[keep], up[keep] if up is not None else None,
                                   weight=w, ignore_index=ignore_index, reduction=reduction, **extras)
        if reduction == "none":
            assert torch.equal(loss[1:4], torch.zeros(3, device=device))
            loss = loss[keep]
        torch.testing.assert_close(loss, exp.float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad[keep], egrad.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype,smoothing", [(torch.float16, 0.0), (torch.bfloat16, 0.1),
                                             (torch.float32, 0.0), (torch.float32, 0.1)])
def test_large_logit_scale_no_overflow(dtype, smoothing, device):
    gen = torch.Generator().manual_seed(6)
    x = (1e4 * torch.randn(6, 50, generator=gen, dtype=torch.float64)).clamp(-6e4, 6e4).to(dtype).to(device)
    t = torch.randint(0, 50, (6,), generator=gen).to(device)
    up = torch.randn(6, generator=gen).to(dtype).to(device)
    for reduction, u in (("none", up), ("mean", None)):
        kw = dict(reduction=reduction, label_smoothing=smoothing)
        loss, grad = loss_and_grad(ce, x, t, u, **kw)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        t_loss, t_grad = loss_and_grad(F.cross_entropy, x, t, u, **kw)
        r_loss, r_grad = loss_and_grad(F.cross_entropy, x.double(), t, u.double() if u is not None else None, **kw)
        # |z| ~ 1e4: the fp32 computation of lse - z_t loses ~1e4 * eps32 absolutely
        assert_accurate(loss, t_loss, r_loss, dtype, finite_max(x), f"{reduction} loss")
        assert_accurate(grad, t_grad, r_grad, dtype, finite_max(x), f"{reduction} grad")


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_inf_rows_nan_pattern_like_torch(smoothing, device):
    C = 8
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(7, C, generator=gen)
    x[0, 3] = math.inf          # +inf at the target
    x[1, 5] = math.inf          # +inf elsewhere
    x[2] = -math.inf            # all -inf
    x[3] = math.inf             # all +inf
    x[4, 6] = -math.inf         # -inf at a non-target class (finite loss without smoothing)
    x[5, 1] = math.nan          # a NaN logit in a kept row
    x = x.to(device)
    t = torch.tensor([3, 2, 1, 0, 2, 4, 6], device=device)
    up = torch.randn(7, generator=gen).to(device)
    kw = dict(reduction="none", label_smoothing=smoothing)
    loss, grad = loss_and_grad(ce, x, t, up, **kw)
    t_loss, t_grad = loss_and_grad(F.cross_entropy, x, t, up, **kw)
    r_loss, r_grad = loss_and_grad(F.cross_entropy, x.double(), t, up.double(), **kw)
    assert_accurate(loss, t_loss, r_loss, torch.float32, finite_max(x), "loss")
    assert_accurate(grad, t_grad, r_grad, torch.float32, finite_max(x), "grad")
    for reduction in ("mean", "sum"):
        got = ce(x, t, reduction=reduction, label_smoothing=smoothing)
        exp = F.cross_entropy(x, t, reduction=reduction, label_smoothing=smoothing)
        assert torch.equal(got.isnan(), exp.isnan()) and torch.equal(got.isinf(), exp.isinf())


def same_nonfinite(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same NaN entries and same signed infinities."""
    return (torch.equal(a.isnan(), b.isnan()) and torch.equal(a == math.inf, b == math.inf)
            and torch.equal(a == -math.inf, b == -math.inf))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["index", "smoothing", "prob", "inplace"])
def test_nonfinite_grad_output_nan_pattern_like_torch(dtype, mode, device):
    """grad_output of inf / -inf / NaN: torch's log_softmax backward forms inf - inf at the
    target (NaN), or across the row with label smoothing or probability targets; ignored
    rows stay 0. The fused gradient (formed in the forward, rescaled in the backward; for
    fp16 formed in the backward) has the same NaN / inf entries."""
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(4, 6, generator=gen) * 3).to(dtype)
    x[0, 1] = -math.inf          # p = 0 off the target: 0 * inf
    x[1, 2] = -200.0             # p underflows at the target
    weight = None
    if mode == "prob":
        t = torch.softmax(torch.randn(4, 6, generator=gen), -1).to(dtype)
        t[0, 3] = 0.0
        t[1, 4] = -0.25  # w * q' of both signs in a row: +-inf terms, torch's NaN anyway
    else:
        t = torch.tensor([0, 2, -100, 5])
    if mode == "smoothing":
        weight = torch.tensor([1.0, -1.0, 1.0, 0.5, 2.0, 1.0], dtype=dtype).to(device)
    smoothing = 0.2 if mode == "smoothing" else 0.0
    x, t = x.to(device), t.to(device)
    for reduction, g in itertools.product(("none", "mean"), (math.inf, -math.inf, math.nan)):
        grads = []
        for fn in (F.cross_entropy, ce):
            leaf = x.clone().requires_grad_()
            kw = dict(inplace_backward=True) if fn is ce and mode == "inplace" else {}
            loss = fn(leaf.clone() if kw else leaf, t, weight, reduction=reduction,
                      label_smoothing=smoothing, **kw)
            loss.backward(torch.full_like(loss, g))
            grads.append(leaf.grad)
        assert same_nonfinite(grads[1], grads[0]), (reduction, g, grads)
        if mode != "prob":
            assert torch.equal(grads[1][2], torch.zeros_like(grads[1][2]))  # ignored row


# --------------------------------------------------------------------------- extras
def composed_ref(x, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                 logit_scale=1.0, softcap=None, z_loss=0.0, return_lse=False):
    """The extras composed from torch ops in fp64: z = softcap*tanh(s*x/softcap) (or s*x),
    torch's cross-entropy of z, plus z_loss * lse**2 per non-ignored row; 'mean' divides by
    the cross-entropy mean's denominator (sum of target weights of non-ignored rows; the
    number of rows for probability targets)."""
    cd = class_dim(x)
    z = x.double() * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    prob = target.is_floating_point()
    tgt = target.double() if prob else target.long()
    w = weight.double() if weight is not None else None
    per = F.cross_entropy(z, tgt, weight=w, ignore_index=ignore_index, reduction="none",
                          label_smoothing=label_smoothing)
    lse = torch.logsumexp(z, cd)
    if prob:
        valid = torch.ones_like(lse, dtype=torch.bool)
        denom = torch.tensor(float(lse.numel()), dtype=torch.float64, device=x.device)
    else:
        valid = tgt != ignore_index
        wt = w[tgt.clamp(0, z.shape[cd] - 1)] if w is not None else torch.ones_like(lse)
        denom = (wt * valid).sum()
    per = per + z_loss * torch.where(valid, lse * lse, 0.0)
    if reduction == "sum":
        out = per.sum()
    elif reduction == "mean":
        out = per.sum() / denom
    else:
        out = per
    return (out, lse.detach()) if return_lse else out


def test_composed_ref_is_torch_without_extras(device):
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(5, 7, generator=gen, dtype=torch.float64).to(device)
    t = torch.tensor([1, -100, 3, 6, 0], device=device)
    w = (torch.rand(7, generator=gen, dtype=torch.float64) + 0.5).to(device)
    for red in REDUCTIONS:
        torch.testing.assert_close(composed_ref(x, t, w, reduction=red, label_smoothing=0.3),
                                   F.cross_entropy(x, t, w, reduction=red, label_smoothing=0.3))


EXTRAS = [
    {"logit_scale": 0.5},
    {"logit_scale": 2.5, "softcap": 4.0},
    {"softcap": 1.5},
    {"z_loss": 0.1},
    {"logit_scale": 0.7, "softcap": 5.0, "z_loss": 1e-2},
]


EXTRA_DTYPES = (torch.bfloat16, torch.float64)  # the ends; fp32 / fp16 share bf16's fp32 path
EXTRA_CASES = [
    # every extra x dtype x target kind, the reduction rotating so that each extra meets
    # each reduction
    (extras, dtype, kind, REDUCTIONS[(i + j + k) % 3])
    for i, extras in enumerate(EXTRAS) for j, dtype in enumerate(EXTRA_DTYPES)
    for k, kind in enumerate(("index", "prob"))
]


@pytest.mark.parametrize(
    "extras,dtype,kind,reduction", EXTRA_CASES,
    ids=["-".join(f"{k}={v}" for k, v in e.items()) + f"-{str(d)[6:]}-{kd}-{r}" for e, d, kd, r in EXTRA_CASES])
def test_extras_vs_composed_torch(extras, dtype, kind, reduction, device):
    """Every extra with weight, smoothing and ignored rows; index targets on (N, C),
    probability targets on (N, C, d)."""
    gen = torch.Generator().manual_seed(9)
    C = 29
    shape = (5, C) if kind == "index" else (2, C, 2)
    x = (3 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype).to(device)
    if kind == "index":
        t = torch.tensor([3, -100, 28, 0, -100], device=device)
    else:
        t = torch.softmax(torch.randn(shape, generator=gen, dtype=torch.float64), 1).to(dtype).to(device)
    w = (torch.rand(C, generator=gen, dtype=torch.float64) + 0.5).to(dtype).to(device)
    zmax = finite_max(x) * extras.get("logit_scale", 1.0)
    kw = dict(weight=w, reduction=reduction, label_smoothing=0.1, **extras)
    lead = t.shape if kind == "index" else (2, 2)
    up = torch.randn(lead, generator=gen).to(dtype).to(device) if reduction == "none" else None
    loss, grad = loss_and_grad(ce, x, t, up, **kw)
    r_loss, r_grad = loss_and_grad(composed_ref, x.double(), t, up.double() if up is not None else None, **kw)
    assert loss.dtype == dtype
    assert_close_to_ref(loss, r_loss, dtype, zmax, f"{reduction} loss")
    assert_close_to_ref(grad, r_grad, dtype, zmax, f"{reduction} grad")


@pytest.mark.parametrize("shape", ["2d", "1d", "4d"])
@pytest.mark.parametrize("kind,dtype", [("index", torch.bfloat16), ("prob", torch.float64)])
def test_return_lse(shape, kind, dtype, device):
    gen = torch.Generator().manual_seed(10)
    C = 13
    xshape = {"2d": (4, C), "1d": (C,), "4d": (2, C, 3)}[shape]
    x = (2 * torch.randn(xshape, generator=gen, dtype=torch.float64)).to(dtype).to(device)
    if kind == "index":
        lead = {"2d": (4,), "1d": (), "4d": (2, 3)}[shape]
        t = torch.randint(0, C, lead, generator=gen).to(device)
    else:
        t = torch.softmax(torch.randn(xshape, generator=gen, dtype=torch.float64), class_dim(x)).to(dtype).to(device)
    for extras, reduction in (({}, "none"), ({"logit_scale": 1.5, "softcap": 3.0}, "mean")):
        # with a gradient: lse is not differentiable and does not disturb the loss's
        xl = x.detach().clone().requires_grad_(True)
        loss, lse = ce(xl, t, reduction=reduction, return_lse=True, **extras)
        xr = x.detach().double().clone().requires_grad_(True)
        r_loss, r_lse = composed_ref(xr, t, reduction=reduction, return_lse=True, **extras)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        assert lse.dtype == acc
        # the target's shape (index); the input's without the class dim (probabilities)
        assert lse.shape == (t.shape if kind == "index" else r_lse.shape)
        assert not lse.requires_grad
        assert_close_to_ref(lse, r_lse, acc, 2 * finite_max(x), "lse")
        assert_close_to_ref(loss, r_loss, dtype, 2 * finite_max(x), "loss")
        loss.sum().backward()
        r_loss.sum().backward()
        assert_close_to_ref(xl.grad, xr.grad, dtype, 2 * finite_max(x), "grad")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_inplace_backward(dtype, reduction, device):
    """fp16 writes the gradient over the logits in the backward (grad_output folded in),
    the others in the forward."""
    gen = torch.Generator().manual_seed(11)
    C = 31
    x0 = (3 * torch.randn(5, C, generator=gen)).to(dtype).to(device)
    t = torch.tensor([1, -100, 30, 4, 4], device=device)
    w = (torch.rand(C, generator=gen) + 0.5).to(dtype).to(device)
    up = torch.randn(5, generator=gen).to(dtype).to(device) if reduction == "none" else None
    kw = dict(weight=w, label_smoothing=0.1, reduction=reduction)
    x = x0.clone().requires_grad_(True)
    loss = ce(x, t, inplace_backward=True, **kw)
    loss.backward(up if up is not None else torch.ones_like(loss))
    t_loss, t_grad = loss_and_grad(F.cross_entropy, x0, t, up, **kw)
    r_loss, r_grad = loss_and_grad(F.cross_entropy, x0.double(), t, up.double() if up is not None else None,
                                   **dict(kw, weight=w.double()))
    assert_accurate(loss, t_loss, r_loss, dtype, finite_max(x0), "loss")
    assert_accurate(x.grad, t_grad, r_grad, dtype, finite_max(x0), "grad")
    # the logits' storage really was overwritten -- by the gradient
    assert not torch.equal(x.detach(), x0)
    assert torch.equal(x.detach(), x.grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("layout", ["contiguous", "contiguous-one-row", "classes-innermost"])
def test_inplace_backward_k_dim_hands_back_the_inputs_layout(layout, dtype, device):
    """(N, C, d) logits with inplace_backward: the gradient reaching the logits has their
    layout, so autograd keeps it without a copy. Where the rows of classes are a copy (a
    contiguous input) it is written over that copy and handed back contiguous (it came
    back a classes-last view, which a leaf's .grad copied: one logits-sized buffer more
    than without inplace_backward); where they view the logits, over the logits."""
    gen = torch.Generator().manual_seed(13)
    if layout.startswith("contiguous"):  # (one row: its classes-last rows are a strided view)
        x0 = torch.randn(1 if layout.endswith("row") else 3, 7, 5, generator=gen)
    else:
        x0 = torch.randn(3, 5, 7, generator=gen).transpose(1, 2)
    x0 = x0.to(dtype).to(device)
    t = torch.randint(0, 7, (x0.shape[0], 5), generator=gen).to(device)
    x = x0.clone(memory_format=torch.preserve_format).requires_grad_()
    z = x * 1
    seen = []
    z.register_hook(seen.append)
    ce(z, t, inplace_backward=True).backward()
    plain = x0.clone(memory_format=torch.preserve_format).requires_grad_()
    ce(plain, t).backward()  # (and without inplace_backward, the same layout)
    assert plain.grad.stride() == plain.stride()
    assert seen[0].stride() == z.stride()
    assert x.grad.stride() == x.stride()
    t_grad, r_grad = (loss_and_grad(F.cross_entropy, a, t)[1] for a in (x0, x0.double()))
    assert_accurate(x.grad, t_grad, r_grad, dtype, finite_max(x0), "grad")
    assert torch.equal(z.detach(), seen[0]) == (layout == "classes-innermost")


def test_inplace_backward_refused_double_backward_keeps_the_gradient(device):
    """create_graph=True through inplace_backward is refused; the graph keeps the gradient
    written in the forward, so an ordinary backward of it still gives torch's (the
    refused one dropped it)."""
    x0 = torch.randn(6, 5, device=device)
    t = torch.tensor([0, 4, -100, 3, 2, 1], device=device)
    x = x0.clone().requires_grad_()
    loss = ce(x * 1, t, inplace_backward=True)
    with pytest.raises(RuntimeError, match="no gradient of the gradient"):
        torch.autograd.grad(loss, x, create_graph=True)
    loss.backward()
    torch.testing.assert_close(x.grad, loss_and_grad(F.cross_entropy, x0, t)[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_inplace_backward_second_backward_raises(dtype, device):
    x = torch.randn(3, 6, device=device).to(dtype).requires_grad_(True)
    t = torch.tensor([0, 1, 2], device=device)
    loss = ce(x, t, inplace_backward=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="overwritten"):
        loss.backward()


def test_inplace_backward_without_grad_leaves_input(device):
    x = torch.randn(3, 6, device=device)
    x0 = x.clone()
    t = torch.tensor([0, 1, 2], device=device)
    got = ce(x, t, inplace_backward=True)
    assert torch.equal(x, x0)
    torch.testing.assert_close(got, F.cross_entropy(x0, t))


@pytest.mark.parametrize("requires_grad", [False, True])
def test_input_never_modified_by_default(requires_grad, device):
    gen = torch.Generator().manual_seed(12)
    C = 12
    cases = [
        (torch.randn(4, C, generator=gen), torch.tensor([1, -100, 3, 11]), dict(label_smoothing=0.2)),
        (torch.randn(4, C, generator=gen), torch.softmax(torch.randn(4, C, generator=gen), 1), dict(reduction="sum")),
        (torch.randn(2, C, 2, generator=gen), torch.tensor([[1, 2], [3, 4]]),
         dict(reduction="none", softcap=2.0, z_loss=0.1, logit_scale=3.0)),
        (torch.randn(C, generator=gen), torch.tensor(3), dict(weight=torch.rand(C, generator=gen))),
    ]
    for x, t, kw in cases:
        kw = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        x, t = x.to(device), t.to(device)
        x0 = x.clone()
        xl = x.requires_grad_(requires_grad)
        loss = ce(xl, t, **kw)
        if requires_grad:
            loss.sum().backward()
        assert torch.equal(x.detach(), x0)


# --------------------------------------------------------------------------- gradcheck & co
GRADCHECK_CASES = [  # (name, target kind, kwargs, reduction)
    ("index w+ls+ignore", "index", dict(label_smoothing=0.2, weight=True), "mean"),
    ("index w+ls+ignore", "index", dict(label_smoothing=0.2, weight=True), "none"),
    ("index ignore inside", "index-ii", dict(label_smoothing=0.3, weight=True, ignore_index=2), "mean"),
    ("prob w+ls", "prob", dict(label_smoothing=0.2, weight=True), "mean"),
    ("prob w+ls", "prob", dict(label_smoothing=0.2, weight=True), "none"),
    ("index extras", "index", dict(logit_scale=0.7, softcap=3.0, z_loss=0.05, weight=True, label_smoothing=0.1), "mean"),
    ("index extras", "index", dict(logit_scale=0.7, softcap=3.0, z_loss=0.05, weight=True, label_smoothing=0.1), "none"),
    ("prob extras", "prob", dict(logit_scale=1.3, softcap=2.0, z_loss=0.05), "mean"),
    ("4d index", "index-4d", dict(label_smoothing=0.1), "none"),
]


def _gradcheck_inputs(kind, device, gen):
    C = 4
    if kind == "index-4d":
        x = torch.randn(2, C, 2, generator=gen, dtype=torch.float64)
        t = torch.tensor([[0, -100], [3, 2]])
    else:
        x = torch.randn(3, C, generator=gen, dtype=torch.float64)
        t = {"index": torch.tensor([1, -100, 3]), "index-ii": torch.tensor([1, 2, 3]),
             "prob": torch.softmax(torch.randn(3, C, generator=gen, dtype=torch.float64), 1)}[kind]
    return x.to(device), t.to(device), (torch.rand(C, generator=gen, dtype=torch.float64) + 0.5).to(device)


@pytest.mark.parametrize("name,kind,kw,reduction", GRADCHECK_CASES,
                         ids=[f"{c[0]}-{c[3]}" for c in GRADCHECK_CASES])
def test_gradcheck_fp64(name, kind, kw, reduction, device):
    gen = torch.Generator().manual_seed(13)
    x, t, w = _gradcheck_inputs(kind, device, gen)
    kw = dict(kw, reduction=reduction, weight=w if kw.get("weight") else None)
    x.requires_grad_(True)
    # the full Jacobian once (3 x 4: 24 forward pairs), fast mode (random projections) elsewhere
    full = name == "index w+ls+ignore" and reduction == "mean"
    assert torch.autograd.gradcheck(lambda inp: ce(inp, t, **kw), (x,), fast_mode=not full)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_second_backward_same_gradient(reduction, device):
    gen = torch.Generator().manual_seed(14)
    x = torch.randn(4, 9, generator=gen).to(device).requires_grad_(True)
    t = torch.tensor([1, -100, 8, 2], device=device)
    w = (torch.rand(9, generator=gen) + 0.5).to(device)
    loss = ce(x, t, weight=w, reduction=reduction, label_smoothing=0.1, z_loss=1e-2)
    up = torch.randn(4, generator=gen).to(device) if reduction == "none" else torch.ones((), device=device)
    loss.backward(up, retain_graph=True)
    g1 = x.grad.clone()
    x.grad = None
    loss.backward(up, retain_graph=True)  # recomputed from the saved logits
    assert torch.equal(g1, x.grad)
    x.grad = None
    (g,) = torch.autograd.grad(loss, x, 2 * up)
    torch.testing.assert_close(g, 2 * g1)


@pytest.mark.parametrize("kind", ["index", "prob"])
def test_grad_output_not_one(kind, device):
    gen = torch.Generator().manual_seed(15)
    x = torch.randn(4, 9, generator=gen).to(device)
    t = (torch.tensor([1, -100, 8, 2]) if kind == "index" else torch.softmax(torch.randn(4, 9, generator=gen), 1)).to(device)
    for red in ("mean", "sum"):
        for mul in (3.0, 0.0):
            g = []
            for fn in (ce, F.cross_entropy):
                xl = x.clone().requires_grad_(True)
                (fn(xl, t, reduction=red, label_smoothing=0.1) * mul).backward()
                g.append(xl.grad)
            torch.testing.assert_close(g[0], g[1])
            if mul == 0.0:
                assert torch.equal(g[0], torch.zeros_like(x))


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_prob_target_gradient_like_torch(reduction, device):
    """torch differentiates through class-probability targets (distillation with a soft
    teacher that requires grad); a drop-in must too -- not silently leave target.grad None."""
    gen = torch.Generator().manual_seed(16)
    x = torch.randn(3, 6, generator=gen, dtype=torch.float64).to(device)
    q = torch.softmax(torch.randn(3, 6, generator=gen, dtype=torch.float64), 1).to(device)
    grads = []
    for fn in (ce, F.cross_entropy):
        xl, ql = x.clone().requires_grad_(True), q.clone().requires_grad_(True)
        fn(xl, ql, reduction=reduction, label_smoothing=0.1).sum().backward()
        grads.append((xl.grad, ql.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    assert grads[0][1] is not None, "target requires grad but got no gradient (torch gives one)"
    torch.testing.assert_close(grads[0][1], grads[1][1])


def test_prob_target_gradient_only_target_requires_grad(device):
    """Logits without grad, soft target with grad (learning the teacher): torch gives the
    target its gradient."""
    x = torch.randn(3, 6, device=device, dtype=torch.float64)
    q0 = torch.softmax(torch.randn(3, 6, device=device, dtype=torch.float64), 1)
    grads = []
    for fn in (ce, F.cross_entropy):
        q = q0.clone().requires_grad_(True)
        fn(x, q).backward()
        grads.append(q.grad)
    assert grads[0] is not None
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("kind", ["index", "prob"])
def test_weight_requires_grad_like_torch(kind, device):
    """torch: index targets refuse a weight that requires grad (RuntimeError at the call);
    probability targets differentiate w.r.t. the weight."""
    x = torch.randn(4, 10, device=device, dtype=torch.float64)
    t = (torch.tensor([1, 2, -100, 3], device=device) if kind == "index"
         else torch.softmax(torch.randn(4, 10, device=device, dtype=torch.float64), 1))
    w0 = torch.rand(10, device=device, dtype=torch.float64) + 0.5
    res = []
    for fn in (ce, F.cross_entropy):
        w = w0.clone().requires_grad_(True)
        try:
            fn(x, t, weight=w, label_smoothing=0.1).backward()
            res.append(w.grad)
        except Exception as e:  # noqa: BLE001 -- compared with torch's below
            res.append(e)
    ours, theirs = res
    if isinstance(theirs, Exception):
        assert isinstance(ours, type(theirs)), f"torch: {theirs!r}; ours: {ours!r}"
    else:
        assert isinstance(ours, torch.Tensor), f"torch gives a weight gradient; ours: {ours!r}"
        torch.testing.assert_close(ours, theirs)


def test_unusual_ignore_index_values(device):
    """ignore_index -1 and one >= C: rows on it are ignored, like torch."""
    x = torch.randn(4, 10, device=device)
    w = torch.rand(10, device=device) + 0.5
    for ii, red in ((-1, "none"), (15, "mean"), (255, "sum")):
        t = torch.tensor([1, ii, 9, ii], device=device)
        got, g = loss_and_grad(ce, x, t, None if red != "none" else torch.ones(4, device=device),
                               weight=w, ignore_index=ii, reduction=red, label_smoothing=0.1)
        exp, eg = loss_and_grad(F.cross_entropy, x, t, None if red != "none" else torch.ones(4, device=device),
                                weight=w, ignore_index=ii, reduction=red, label_smoothing=0.1)
        torch.testing.assert_close(got, exp)
        torch.testing.assert_close(g, eg)


def test_mixed_dtype_prob_target(device):
    """bf16 logits with fp32 soft targets: the loss is fp32 (type promotion, like torch)
    and at least as accurate as torch's."""
    gen = torch.Generator().manual_seed(24)
    x = (3 * torch.randn(5, 33, generator=gen)).bfloat16().to(device)
    q = torch.softmax(torch.randn(5, 33, generator=gen), 1).to(device)
    up = torch.randn(5, generator=gen).to(device)
    loss, grad = loss_and_grad(ce, x, q, up, reduction="none", label_smoothing=0.1)
    t_loss, t_grad = loss_and_grad(F.cross_entropy, x, q, up, reduction="none", label_smoothing=0.1)
    r_loss, r_grad = loss_and_grad(F.cross_entropy, x.double(), q.double(), up.double(), reduction="none",
                                   label_smoothing=0.1)
    assert_accurate(loss, t_loss, r_loss, torch.float32, finite_max(x), "loss")
    assert_accurate(grad, t_grad, r_grad, torch.bfloat16, finite_max(x), "grad")


# --------------------------------------------------------------------------- errors
def _x(d):
    return torch.randn(4, 10, device=d)


def _t(d):
    return torch.tensor([1, 2, -100, 3], device=d)


def _q(d):
    return torch.rand(4, 10, device=d)


# (name, device -> (args, kwargs), regex our message must match)
ERROR_CASES = [
    ("float index target", lambda d: ((_x(d), _t(d).float()), {}), "Long"),
    ("int16 index target", lambda d: ((_x(d), _t(d).short()), {}), "Long"),
    ("int prob target", lambda d: ((_x(d), _q(d).int()), {}), "floating point"),
    ("2-d target for 2-d input", lambda d: ((_x(d), torch.zeros(4, 2, dtype=torch.long, device=d)), {}), "target"),
    ("wrong spatial target shape", lambda d: ((torch.randn(2, 10, 3, 3, device=d),
                                               torch.zeros(2, 3, 4, dtype=torch.long, device=d)), {}), "target"),
    ("1-d input, target of 2", lambda d: ((torch.randn(10, device=d), torch.tensor([1, 2], device=d)), {}), "target"),
    ("batch mismatch", lambda d: ((_x(d), _t(d)[:3]), {}), "batch_size"),
    # torch checks the batch size before the target's dtype and rank
    ("batch mismatch, float target", lambda d: ((_x(d), _q(d)[:3]), {}), "batch_size"),
    ("batch mismatch, 2-d target", lambda d: ((_x(d), torch.zeros(1, 4, dtype=torch.long, device=d)), {}),
     "batch_size"),
    ("batch mismatch, spatial float target", lambda d: ((torch.randn(2, 10, 3, device=d),
                                                         torch.rand(6, 10, device=d)), {}), "batch_size"),
    ("weight wrong size", lambda d: ((_x(d), _t(d)), dict(weight=torch.rand(9, device=d))), "weight"),
    ("weight 2-d", lambda d: ((_x(d), _t(d)), dict(weight=torch.rand(10, 2, device=d))), "weight"),
    ("weight wrong dtype", lambda d: ((_x(d), _t(d)), dict(weight=torch.rand(10, dtype=torch.float64, device=d))),
     "Double"),
    ("label_smoothing > 1", lambda d: ((_x(d), _t(d)), dict(label_smoothing=1.5)), "label_smoothing"),
    ("label_smoothing tensor with grad", lambda d: (
        (_x(d), _t(d)), dict(label_smoothing=torch.tensor(0.1, requires_grad=True))), "label_smoothing"),
    ("prob target, ignore_index 1", lambda d: ((_x(d), _q(d)), dict(ignore_index=1)), "ignore_index"),
    ("prob target, ignore_index 0", lambda d: ((_x(d), _q(d)), dict(ignore_index=0)), "ignore_index"),
    ("invalid reduction", lambda d: ((_x(d), _t(d)), dict(reduction="avg")), "avg"),
    ("integer input", lambda d: ((_x(d).long(), _t(d)), {}), "Long|int64"),
    ("0-d input", lambda d: ((torch.tensor(1.0, device=d), torch.tensor(0, device=d)), {}), "."),
]


def _raised(fn, args, kw):
    try:
        fn(*args, **kw)
    except Exception as e:  # noqa: BLE001 -- we compare exception types with torch's
        return e
    return None


@pytest.mark.parametrize("name,make,words", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_errors_like_torch(name, make, words, device):
    args, kw = make(device)
    theirs = _raised(F.cross_entropy, args, kw)
    ours = _raised(ce, args, kw)
    assert theirs is not None, f"{name}: torch accepts this call (test bug)"
    assert ours is not None, f"{name}: torch raises {type(theirs).__name__}({theirs}), we accept"
    assert isinstance(ours, type(theirs)), (
        f"{name}: torch raises {type(theirs).__name__}({theirs}); we raise {type(ours).__name__}({ours})")
    assert re.search(words, str(ours)), f"{name}: unhelpful message {ours!r}"


@pytest.mark.parametrize("smoothing", [2.0, 1.25, 3, 1 + 1e-9])
def test_label_smoothing_error_message_is_torchs(smoothing, device):
    args = (_x(device), _t(device))
    theirs = _raised(F.cross_entropy, args, dict(label_smoothing=smoothing))
    assert str(_raised(ce, args, dict(label_smoothing=smoothing))) == str(theirs)


def test_nn_module_repr_shows_the_extras_that_are_set():
    assert repr(fused_softmax.nn.CrossEntropyLoss()) == repr(torch.nn.CrossEntropyLoss())
    m = fused_softmax.nn.CrossEntropyLoss(label_smoothing=0.1, softcap=30.0, z_loss=1e-4)
    assert repr(m) == "CrossEntropyLoss(softcap=30.0, z_loss=0.0001)"


def test_int32_target_accepted(device):
    x = torch.randn(4, 10, device=device)
    t = torch.tensor([1, 2, -100, 9], device=device)
    assert _raised(F.cross_entropy, (x, t.int()), {}) is not None  # torch refuses int32
    torch.testing.assert_close(ce(x, t.int()), F.cross_entropy(x, t))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_int32_target_with_ignore_index_beyond_int32(reduction, device):
    """An ignore_index outside int32's range ignores nothing, as for int64 targets (torch
    would wrap 2**32 + 1 to 1 when comparing it with an int32 tensor)."""
    x = torch.randn(4, 10, device=device, requires_grad=True)
    t = torch.tensor([1, 2, 1, 9], device=device)
    far = 2**32 + 1
    ours = ce(x, t.int(), ignore_index=far, reduction=reduction)
    theirs = F.cross_entropy(x, t, ignore_index=far, reduction=reduction)
    torch.testing.assert_close(ours, theirs)
    g, = torch.autograd.grad(ours.sum(), x)
    gt, = torch.autograd.grad(theirs.sum(), x)
    torch.testing.assert_close(g, gt)


@pytest.mark.skipif(CUDA, reason="CPU raises IndexError; CUDA marks the row NaN (test_cuda_out_of_range_target)")
@pytest.mark.parametrize("bad,kw", [(10, {}), (-5, {}), (12, {"label_smoothing": 0.1}),
                                    (57, {"weight": "w"}), (10, {"ignore_index": 3})])
def test_target_out_of_range_cpu(bad, kw, device):
    x = torch.randn(4, 10, device=device)
    t = torch.tensor([1, 2, bad, 3], device=device)
    if kw.get("weight") == "w":
        kw = dict(weight=torch.rand(10, device=device))
    theirs = _raised(F.cross_entropy, (x, t), kw)
    with pytest.raises(IndexError, match=str(bad)) as info:
        ce(x, t, **kw)
    assert isinstance(info.value, type(theirs)) and str(info.value) == str(theirs)
    with pytest.raises(IndexError, match=str(bad)):
        ce(x.clone().requires_grad_(True), t, reduction="none", **kw)


def test_1d_input_with_one_element_target_like_torch(device):
    """torch accepts a (C,) input with a target of shape (1,) (treated as one sample)."""
    x = torch.randn(10, device=device)
    t = torch.tensor([3], device=device)
    for red in REDUCTIONS:
        exp = F.cross_entropy(x, t, reduction=red)
        got = ce(x, t, reduction=red)
        assert got.shape == exp.shape
        torch.testing.assert_close(got, exp)


def test_negative_label_smoothing_like_torch(device):
    """torch takes label_smoothing < 0 without complaint and ignores it (index and prob
    targets); only > 1 is an error there."""
    x = torch.randn(4, 10, device=device)
    for t in (torch.tensor([1, 2, -100, 3], device=device), torch.rand(4, 10, device=device)):
        exp = F.cross_entropy(x, t, label_smoothing=-0.1)
        torch.testing.assert_close(exp, F.cross_entropy(x, t))
        torch.testing.assert_close(ce(x, t, label_smoothing=-0.1), exp)


@pytest.mark.parametrize("fp64", ["target", "weight"])
def test_prob_target_fp64_promotion_computes_in_fp64(fp64, device):
    """Probability targets: torch promotes with the target's and the weight's dtype (fp32
    logits, an fp64 target or weight -> fp64 loss) and forms the products and sums in fp64
    from fp32 log-probabilities. Ours computes the row in fp64 then: the fp64 loss of the
    fp32 logits to fp64 accuracy (summing in fp32 was ~3x torch's error, 1.1e-7 against
    3.8e-8, and failed assert_close with torch at fp64's tolerance), the gradient fp32 as
    torch's, ``lse`` fp32 as documented."""
    gen = torch.Generator().manual_seed(5)
    x = (5 * torch.randn(16, 300, generator=gen)).to(device)
    q = torch.softmax(3 * torch.randn(16, 300, generator=gen, dtype=torch.float64), 1).to(device)
    w = (torch.rand(300, generator=gen, dtype=torch.float64) + 0.5).to(device)
    up = torch.randn(16, generator=gen, dtype=torch.float64).to(device)
    target = q if fp64 == "target" else q.float()
    extra = {} if fp64 == "target" else dict(weight=w)
    got, g = loss_and_grad(ce, x, target, up, reduction="none", **extra)
    exp, eg = loss_and_grad(F.cross_entropy, x, target, up, reduction="none", **extra)
    ref, _ = loss_and_grad(F.cross_entropy, x.double(), target.double(), up,
                           reduction="none", **extra)
    assert got.dtype == exp.dtype == torch.float64 and g.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=64 * torch.finfo(torch.float64).eps, atol=0.0)
    torch.testing.assert_close(got, exp)  # fp64's default tolerance
    torch.testing.assert_close(g, eg)
    _, lse = ce(x, target, reduction="none", return_lse=True, **extra)
    assert lse.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("kind", ["index", "index weight", "prob", "prob weight"])
def test_one_class_gradient_is_exactly_torchs_zero(kind, dtype, device):
    """One class: the softmax is 1 and torch's gradient exactly 0, with label smoothing
    and class weights too (ours formed the coefficient and the target's share from
    different products: 2.2e-8 instead of 0)."""
    x = torch.randn(5, 1, generator=torch.Generator().manual_seed(3)).to(device, dtype)
    t = torch.zeros(5, dtype=torch.long, device=device) if kind.startswith("index") else \
        torch.rand(5, 1, generator=torch.Generator().manual_seed(4)).to(device, dtype)
    w = torch.tensor([0.7], device=device, dtype=dtype) if "weight" in kind else None
    up = torch.tensor([1.0, -2.0, 0.3, 5.0, 1.0], device=device, dtype=dtype)
    for smoothing in (0.0, 0.1, 0.7):
        got, g = loss_and_grad(ce, x, t, up, weight=w, label_smoothing=smoothing, reduction="none")
        exp, eg = loss_and_grad(F.cross_entropy, x, t, up, weight=w, label_smoothing=smoothing,
                                reduction="none")
        assert torch.equal(g, eg) and torch.equal(g, torch.zeros_like(g)), (smoothing, g)
        torch.testing.assert_close(got, exp)


@pytest.mark.parametrize("target_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_smoothed_prob_target_in_its_dtype_like_torch(target_dtype, device):
    """torch smooths a probability target in the target's own dtype (``q * (1 - eps) +
    eps / C``, rounded after each op): fp64 logits with an fp32 / fp16 / bf16 target give
    torch's loss and gradients to fp64 accuracy, not the exactly smoothed ones (7.6e-8
    apart for fp32 targets)."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(6, 37, generator=gen, dtype=torch.float64).to(device)
    q = torch.softmax(2 * torch.randn(6, 37, generator=gen), 1).to(target_dtype).to(device)
    w = (torch.rand(37, generator=gen) + 0.5).to(target_dtype).to(device)
    up = torch.randn(6, generator=gen, dtype=torch.float64).to(device)
    for extra in ({}, dict(weight=w)):
        got, g = loss_and_grad(ce, x, q, up, reduction="none", label_smoothing=0.3, **extra)
        exp, eg = loss_and_grad(F.cross_entropy, x, q, up, reduction="none", label_smoothing=0.3,
                                **extra)
        tol = dict(rtol=64 * torch.finfo(torch.float64).eps, atol=1e-15)
        torch.testing.assert_close(got, exp, **tol)
        torch.testing.assert_close(g, eg, **tol)
        # the exactly smoothed target is measurably elsewhere (the test sees the rounding)
        exact = F.cross_entropy(x, q.double(), reduction="none", label_smoothing=0.3,
                                **{k: v.double() for k, v in extra.items()})
        assert (exact - exp).abs().max() > 1e3 * torch.finfo(torch.float64).eps


@pytest.mark.parametrize("size_average,reduce", [(None, False), (False, None), (True, None),
                                                 (True, True), (False, True), (True, False), (None, True)])
def test_legacy_size_average_reduce(size_average, reduce, device):
    gen = torch.Generator().manual_seed(17)
    x = torch.randn(4, 10, generator=gen).to(device)
    t = torch.tensor([1, 2, -100, 9], device=device)
    w = (torch.rand(10, generator=gen) + 0.5).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exp = F.cross_entropy(x, t, w, size_average, -100, reduce)
        got = ce(x, t, w, size_average, -100, reduce)
        got_kw = ce(x, t, weight=w, size_average=size_average, reduce=reduce, reduction="sum")
    assert got.shape == exp.shape
    torch.testing.assert_close(got, exp)
    torch.testing.assert_close(got_kw, exp)


@pytest.mark.parametrize("size_average,reduce", [(False, None), (None, False), (True, True)])
def test_legacy_size_average_reduce_compile_fullgraph(size_average, reduce, device):
    """torch's compiled F.cross_entropy takes the legacy arguments; so does ours (torch's
    mapping, without the deprecation warning, which Dynamo cannot trace)."""
    x = torch.randn(4, 10, device=device)
    t = torch.tensor([1, 2, -100, 9], device=device)
    torch._dynamo.reset()
    f = torch.compile(lambda x, t: ce(x, t, size_average=size_average, reduce=reduce),
                      fullgraph=True, backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exp = F.cross_entropy(x, t, size_average=size_average, reduce=reduce)
    got = f(x, t)
    assert got.shape == exp.shape
    torch.testing.assert_close(got, exp)


# --------------------------------------------------------------------------- nn module
NN_CONFIGS = [
    ("default", {}, "index"),
    ("weight+ignore+ls+sum", dict(weight=True, ignore_index=2, label_smoothing=0.2, reduction="sum"), "index"),
    ("prob none", dict(reduction="none", label_smoothing=0.1), "prob"),
    ("legacy size_average=False", dict(size_average=False, weight=True), "index"),
    ("4d mean weight", dict(weight=True), "index-4d"),
]


@pytest.mark.parametrize("name,cfg,kind", NN_CONFIGS, ids=[c[0] for c in NN_CONFIGS])
def test_nn_module_equals_torch(name, cfg, kind, device):
    gen = torch.Generator().manual_seed(18)
    C = 8
    if kind == "index-4d":
        x = torch.randn(2, C, 3, generator=gen).to(device)
        t = torch.tensor([[1, -100, 2], [7, 2, 0]], device=device)
    else:
        x = torch.randn(4, C, generator=gen).to(device)
        t = (torch.tensor([1, 2, cfg.get("ignore_index", -100), 7]) if kind == "index" else torch.softmax(torch.randn(4, C, generator=gen), 1)).to(device)
    cfg = dict(cfg)
    if cfg.get("weight"):
        cfg["weight"] = (torch.rand(C, generator=gen) + 0.5).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours, theirs = fused_softmax.nn.CrossEntropyLoss(**cfg), torch.nn.CrossEntropyLoss(**cfg)
    for attr in ("ignore_index", "reduction", "label_smoothing"):
        assert getattr(ours, attr) == getattr(theirs, attr)
    loss, grad = loss_and_grad(ours, x, t, None if ours.reduction != "none" else torch.ones(4, device=device))
    t_loss, t_grad = loss_and_grad(theirs, x, t, None if ours.reduction != "none" else torch.ones(4, device=device))
    torch.testing.assert_close(loss, t_loss)
    torch.testing.assert_close(grad, t_grad)


def test_nn_module_extras(device):
    x = torch.randn(4, 8, device=device)
    t = torch.tensor([1, 2, -100, 7], device=device)
    kw = dict(label_smoothing=0.1, logit_scale=0.5, softcap=3.0, z_loss=1e-2)
    m = fused_softmax.nn.CrossEntropyLoss(**kw)
    torch.testing.assert_close(m(x, t), ce(x, t, **kw))
    torch.testing.assert_close(m(x, t), composed_ref(x, t, **kw).float())


def test_nn_state_dict_roundtrip_with_torch(device):
    C = 6
    w = (torch.rand(C) + 0.5).to(device)
    ours = fused_softmax.nn.CrossEntropyLoss(weight=w, ignore_index=1)
    sd = ours.state_dict()
    assert set(sd) == {"weight"}
    theirs = torch.nn.CrossEntropyLoss(weight=torch.ones(C, device=device), ignore_index=1)
    theirs.load_state_dict(sd)
    assert torch.equal(theirs.weight, w)
    back = fused_softmax.nn.CrossEntropyLoss(weight=torch.zeros(C, device=device), ignore_index=1)
    back.load_state_dict(theirs.state_dict())
    assert torch.equal(back.weight, w)
    x = torch.randn(3, C, device=device)
    t = torch.tensor([0, 1, 5], device=device)
    torch.testing.assert_close(back(x, t), theirs(x, t))
    assert set(fused_softmax.nn.CrossEntropyLoss().state_dict()) == set(torch.nn.CrossEntropyLoss().state_dict())
    # the weight is a buffer: it follows .to()
    assert ours.to(torch.float64).weight.dtype == torch.float64


# --------------------------------------------------------------------------- backend
BACKEND_CONFIGS = [
    ("plain mean", "index", dict()),
    ("weight ls ignore none", "index", dict(weight=True, label_smoothing=0.1, ignore_index=3, reduction="none")),
    ("prob sum", "prob", dict(reduction="sum", label_smoothing=0.2, weight=True)),
    ("extras", "index", dict(logit_scale=0.5, softcap=2.0, z_loss=0.1, reduction="none")),
    ("inf rows", "inf", dict(reduction="none", label_smoothing=0.1)),
]


def _backend_inputs(kind, device, gen, ignore_index=-100):
    C = 12
    x = torch.randn(5, C, generator=gen)
    if kind == "prob":
        t = torch.softmax(torch.randn(5, C, generator=gen), 1)
    else:
        t = torch.tensor([0, 3, ignore_index, 11, 3])
    if kind == "inf":
        x[0, 0] = -math.inf
        x[1] = -math.inf
        x[3, 5] = math.inf
        x[2] = math.nan
    return x.to(device), t.to(device), (torch.rand(C, generator=gen) + 0.5).to(device)


def test_kernels_really_run(device):
    x = torch.randn(4, 10, device=device, requires_grad=True)
    if not _backend.use_triton(x):
        pytest.skip("no Triton path for this device (no CUDA, no interpreter)")
    t = torch.tensor([1, 2, -100, 3], device=device)
    lc = _backend.launch_counts
    f0, b0 = lc["cross_entropy_fwd_kernel"], lc["cross_entropy_bwd_kernel"]
    loss = ce(x, t, reduction="none")
    assert lc["cross_entropy_fwd_kernel"] == f0 + 1 and lc["cross_entropy_bwd_kernel"] == b0
    loss.backward(torch.randn(4, device=device))
    assert lc["cross_entropy_bwd_kernel"] == b0 + 1
    with torch.no_grad():
        ce(x, t)
    assert lc["cross_entropy_fwd_kernel"] == f0 + 2


@pytest.mark.parametrize("name,kind,kw", BACKEND_CONFIGS, ids=[c[0] for c in BACKEND_CONFIGS])
def test_torch_path_equals_kernels(name, kind, kw, device, monkeypatch):
    gen = torch.Generator().manual_seed(19)
    x, t, w = _backend_inputs(kind, device, gen, kw.get("ignore_index", -100))
    kw = dict(kw, weight=w if kw.get("weight") else None)
    up = torch.randn(5, generator=gen).to(device) if kw.get("reduction") == "none" else None
    res = {}
    for path in ("kernels", "torch"):
        if path == "torch":
            monkeypatch.setattr(ce_mod, "use_triton", lambda t: False)
        before = sum(_backend.launch_counts.values())
        res[path] = loss_and_grad(ce, x, t, up, **kw)
        launched = sum(_backend.launch_counts.values()) - before
        if path == "torch":
            assert launched == 0
        elif _backend.use_triton(x):
            assert launched == 2
    (l1, g1), (l2, g2) = res["kernels"], res["torch"]
    torch.testing.assert_close(l1, l2, equal_nan=True)
    torch.testing.assert_close(g1, g2, equal_nan=True)
    if kind != "inf":
        exp, eg = loss_and_grad(composed_ref, x, t, up, **kw)
        torch.testing.assert_close(l2, exp.float())
        torch.testing.assert_close(g2, eg.float())


# --------------------------------------------------------------------------- custom ops
def _op_args(kind, device, compute_grad=None, extras=False):
    C = 10
    x = torch.randn(4, C, device=device)
    if kind == "index":
        t = torch.tensor([1, -100, 9, 0], device=device)
        w = torch.rand(C, device=device) + 0.5
        scalars = torch.stack([1.0 / w[[1, 9, 0]].sum(), w.sum()])
    else:
        t = torch.softmax(torch.randn(4, C, device=device), 1)
        w = None
        scalars = torch.tensor([0.25, float(C)], device=device)
    args = [x, t, w, scalars, -100, 0.1, 0.5 if extras else 1.0, 2.0 if extras else 0.0,
            0.05 if extras else 0.0, kind == "prob"]
    return args + ([compute_grad] if compute_grad is not None else [])


@pytest.mark.parametrize("kind,compute_grad,extras", [("index", True, False), ("index", False, False),
                                                      ("prob", True, False), ("prob", False, True),
                                                      ("index", True, True)])
def test_opcheck_fwd(kind, compute_grad, extras, device):
    args = _op_args(kind, device, compute_grad, extras)
    torch.library.opcheck(torch.ops.fused_softmax.cross_entropy_fwd.default, args)
    loss, lse, grad = torch.ops.fused_softmax.cross_entropy_fwd.default(*args)
    x, t, w = args[:3]
    xl = x.double().requires_grad_(True)
    kw = dict(weight=w, label_smoothing=0.1, logit_scale=args[6], softcap=args[7] or None, z_loss=args[8])
    ref, ref_lse = composed_ref(xl, t, reduction="none", return_lse=True, **kw)
    torch.testing.assert_close(loss, ref.float())
    torch.testing.assert_close(lse, ref_lse.float())
    if compute_grad:
        ref.sum().backward()
        torch.testing.assert_close(grad, (xl.grad * args[3][0].double()).float())  # scaled by scalars[0]
    else:
        assert grad.numel() == 0


@pytest.mark.parametrize("kind", ["index", "prob"])
def test_opcheck_fwd_inplace(kind, device):
    args = _op_args(kind, device)
    torch.library.opcheck(torch.ops.fused_softmax.cross_entropy_fwd_inplace.default, args)
    x0 = args[0].clone()
    loss, lse = torch.ops.fused_softmax.cross_entropy_fwd_inplace.default(*args)
    _, _, grad = torch.ops.fused_softmax.cross_entropy_fwd.default(x0, *args[1:], True)
    torch.testing.assert_close(args[0], grad)  # the gradient was written over x


@pytest.mark.parametrize("dscale_shape", [(), (4,)])
@pytest.mark.parametrize("inplace", [False, True])
def test_opcheck_fwd_with_grad_output(dscale_shape, inplace, device):
    """``dscale`` (grad_output per row or one for all) folded into the gradient: the
    unscaled gradient times it."""
    args = _op_args("index", device, True, extras=True)
    dscale = torch.tensor([2.0, float("nan"), -0.5, 4096.0], device=device)[:4 if dscale_shape else 1]
    dscale = dscale.reshape(dscale_shape) if dscale_shape else dscale[0].reshape(())
    _, _, g0 = torch.ops.fused_softmax.cross_entropy_fwd.default(*args)
    if inplace:
        op, call = torch.ops.fused_softmax.cross_entropy_fwd_inplace.default, args[:-1] + [dscale]
    else:
        op, call = torch.ops.fused_softmax.cross_entropy_fwd.default, args + [dscale]
    torch.library.opcheck(op, [a.clone() if isinstance(a, torch.Tensor) else a for a in call])
    out = op(*call)
    grad = call[0] if inplace else out[2]
    exp = g0 * (dscale[:, None] if dscale.dim() else dscale)
    exp[1] = 0.0  # an ignored row: 0 whatever its grad_output (NaN here)
    torch.testing.assert_close(grad, exp)


@pytest.mark.parametrize("dloss_shape", [(), (4,)])
def test_opcheck_bwd(dloss_shape, device):
    grad = torch.randn(4, 10, device=device)
    dloss = torch.randn(dloss_shape, device=device)
    torch.library.opcheck(torch.ops.fused_softmax.cross_entropy_bwd_.default, (grad, dloss))
    g0 = grad.clone()
    torch.ops.fused_softmax.cross_entropy_bwd_.default(grad, dloss)
    torch.testing.assert_close(grad, g0 * (dloss[:, None] if dloss.dim() else dloss))
    ones = torch.ones(4, device=device)  # the device-side skip of rows scaled by exactly 1
    torch.ops.fused_softmax.cross_entropy_bwd_.default(grad, ones)
    torch.testing.assert_close(grad, g0 * (dloss[:, None] if dloss.dim() else dloss))
    target = torch.tensor([1, 0, 9, 3], device=device)
    for whole_row in (False, True):  # a non-finite grad_output: NaN at the target / the row
        torch.library.opcheck(torch.ops.fused_softmax.cross_entropy_bwd_.default,
                              (grad.clone(), dloss, None if whole_row else target, whole_row))
        g1 = g0.clone()
        inf = torch.full_like(ones, math.inf)
        torch.ops.fused_softmax.cross_entropy_bwd_.default(g1, inf, None if whole_row else target,
                                                           whole_row)
        nan_at = torch.ones_like(g1, dtype=torch.bool) if whole_row else \
            torch.arange(10, device=device) == target[:, None]
        assert torch.equal(g1.isnan(), nan_at | (g0 == 0))


@pytest.mark.parametrize("whole_row", [False, True])
def test_bwd_leaves_ignored_rows_alone(whole_row, device):
    """With ``ignore_index`` the rescale leaves the rows of that target as they are (their
    gradient is 0 from the forward and stays 0 whatever grad_output holds, as torch's):
    the backward forms no host-side mask for them."""
    g0 = torch.randn(4, 10, device=device)
    g0[1] = 0.0  # an ignored row's gradient from the forward
    target = torch.tensor([1, -100, 9, 3], device=device)
    dloss = torch.tensor([2.0, math.nan, math.inf, 1.0], device=device)
    grad = g0.clone()
    torch.library.opcheck(torch.ops.fused_softmax.cross_entropy_bwd_.default,
                          (grad.clone(), dloss, target, whole_row, -100))
    torch.ops.fused_softmax.cross_entropy_bwd_.default(grad, dloss, target, whole_row, -100)
    assert torch.equal(grad[1], torch.zeros(10, device=device))
    torch.testing.assert_close(grad[0], g0[0] * 2)
    torch.testing.assert_close(grad[3], g0[3])
    nan_at = torch.ones(10, dtype=torch.bool, device=device) if whole_row else \
        torch.arange(10, device=device) == 9
    assert torch.equal(grad[2].isnan(), nan_at | (g0[2] == 0))


def test_bwd_ignore_index_without_target_scales_every_row(device):
    """``ignore_index`` means nothing without ``target``: every row is scaled, on the kernel
    as on the torch path (the kernel once compared grad_output's values with it)."""
    g0 = torch.randn(3, 6, device=device)
    grad = g0.clone()
    dloss = torch.tensor([-100.0, 2.0, 0.5], device=device)
    torch.ops.fused_softmax.cross_entropy_bwd_.default(grad, dloss, None, False, -100)
    torch.testing.assert_close(grad, g0 * dloss[:, None])


@pytest.mark.parametrize("scale", [1 + 2**-8, 3.0, 1 - 2**-9, 2.0**-130, 2.0**100])
def test_bf16_stores_round_to_nearest_even(scale, device):
    """Every bf16 value times ``scale`` in fp32 (exact but for under/overflow), stored in
    bf16 by the rescale kernel: bit-identical to torch's round-to-nearest-even cast.
    (1 + 2^-8) makes the product of every odd significand a tie. Triton's interpreter
    truncates fp32 -> bf16 and flushes bf16 subnormals, so the kernels round the bits
    (``out_cast``). Its bf16 -> fp32 read of a subnormal (below 1.2e-38) is also off, but
    that is left alone (no softmax or loss can notice), so the inputs here are normal."""
    v = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    v = v[(v.abs() >= torch.finfo(torch.bfloat16).tiny) | (v == 0) | ~v.isfinite()]
    grad = v[: v.numel() // 16 * 16].reshape(16, -1).to(device)
    exp = (grad.float() * scale).to(torch.bfloat16)
    torch.ops.fused_softmax.cross_entropy_bwd_.default(grad, torch.tensor(scale, device=device))
    assert torch.equal(grad.isnan(), exp.isnan())
    same = grad.view(torch.int16) == exp.view(torch.int16)
    assert bool(same[~exp.isnan()].all()), (grad[~same], exp[~same])


# Calls torch refuses: our error must be torch's, word for word (type, message, and which
# of several problems torch reports first).
TORCH_ERRORS = {
    "0-d input, 1-d target": lambda x, t: (x[0, 0], t),
    "ignore_index beyond int64": lambda x, t: (x, t, None, 2**64),
    "float target of the wrong shape": lambda x, t: (x, torch.rand(3, 6)),
    "float target, 3-d mismatch": lambda x, t: (torch.randn(3, 2, 4), torch.rand(3, 5, 3)),
    "class weight requiring grad": lambda x, t: (x, t, torch.rand(5, requires_grad=True)),
    "label_smoothing None": lambda x, t: (x, t, None, -100, "mean", None),
    "label_smoothing str": lambda x, t: (x, t, None, -100, "mean", "0.1"),
    "ignore_index float": lambda x, t: (x, t, None, 1.0),
    "weight size, probabilities": lambda x, t: (x, torch.rand(3, 5), torch.rand(4)),
    "weight size, (N, C, d)": lambda x, t: (torch.randn(3, 5, 2), torch.zeros(3, 2).long(),
                                            torch.rand(4)),
    "integer input": lambda x, t: (x.long(), t),
    "integer input, probabilities, ignore_index": lambda x, t: (x.long(), torch.rand(3, 5),
                                                                None, 1),
    "probabilities, ignore_index, smoothing 1.5": lambda x, t: (x, torch.rand(3, 5), None, 1,
                                                                "mean", 1.5),
    "bad reduction": lambda x, t: (x, t, None, -100, "avg"),
}


@pytest.mark.parametrize("case", TORCH_ERRORS)
def test_errors_word_for_word_like_torch(case):
    def call(fn):
        x, t = torch.randn(3, 5), torch.tensor([0, 1, 2])
        args = TORCH_ERRORS[case](x, t)
        kw = dict(zip(("weight", "ignore_index", "reduction", "label_smoothing"), args[2:]))
        try:
            fn(*args[:2], **kw)
        except Exception as e:  # noqa: BLE001
            return type(e), str(e)
        return None

    theirs = call(F.cross_entropy)
    assert theirs is not None
    assert call(ce) == theirs


def test_bad_extras_and_int32_targets_keep_our_errors():
    """The extras are ours (torch is not asked, nor does it compute a loss to find nothing
    wrong), and an int32 target, which we take, never turns into torch's complaint."""
    x, t32 = torch.randn(3, 5), torch.tensor([1, 2, 0], dtype=torch.int32)
    with pytest.raises(ValueError, match="softcap must be"):
        ce(x, t32, softcap=-1.0)
    with pytest.raises(ValueError, match="logit_scale must be"):
        ce(x, t32, logit_scale=math.nan)
    with pytest.raises(RuntimeError, match="weight tensor should be defined"):
        ce(x, t32, weight=torch.rand(4))


COMPILE_CASES = [
    ("index weight ls ignore", "index", dict(weight=True, label_smoothing=0.1)),
    ("fp16 index weight", "index-fp16", dict(weight=True, label_smoothing=0.1)),
    ("index extras none", "index", dict(reduction="none", z_loss=1e-2, softcap=3.0, logit_scale=2.0)),
    ("prob", "prob", dict(label_smoothing=0.1)),
]


@pytest.mark.parametrize("name,kind,kw", COMPILE_CASES, ids=[c[0] for c in COMPILE_CASES])
def test_torch_compile_fullgraph(name, kind, kw, device):
    gen = torch.Generator().manual_seed(20)
    C = 16
    x = torch.randn(5, C, generator=gen).to(device)
    if kind == "index-fp16":  # the backward forms the gradient (the op with dscale)
        x = x.half()
    if kind.startswith("index"):
        t = torch.tensor([1, -100, 15, 0, 7], device=device)
    else:
        t = torch.softmax(torch.randn(5, C, generator=gen), 1).to(device)
    w = (torch.rand(C, generator=gen) + 0.5).to(x.dtype).to(device)
    kw = dict(kw, weight=w if kw.get("weight") else None)

    def f(x, t):
        loss, lse = ce(x, t, return_lse=True, **kw)
        return loss.sum() * 2, lse

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True)
    xl = x.clone().requires_grad_(True)
    out, lse = cf(xl, t)
    out.backward()
    xr = x.clone().requires_grad_(True)
    eout, else_ = composed_ref(xr, t, return_lse=True, **kw)
    (eout.sum() * 2).backward()
    torch.testing.assert_close(out, 2 * eout.sum().to(out.dtype))
    torch.testing.assert_close(lse, else_.float())
    tol = dict(rtol=2e-3, atol=2e-4) if x.dtype == torch.float16 else {}
    torch.testing.assert_close(xl.grad, xr.grad.to(x.dtype), **tol)


# --------------------------------------------------------------------------- CUDA only
@needs_cuda
def test_cuda_out_of_range_target_gives_nan(device):
    x = torch.randn(5, 100, device=device)
    t = torch.tensor([1, 100, -100, 10**9, -7], device=device)
    for kw in ({}, dict(label_smoothing=0.1, weight=torch.rand(100, device=device))):
        assert ce(x, t, **kw).isnan().item()
        xl = x.clone().requires_grad_(True)
        loss = ce(xl, t, reduction="none", **kw)
        loss.sum().backward()
        torch.cuda.synchronize()  # never crashes
        assert torch.equal(loss.isnan(), torch.tensor([False, True, False, True, True], device=device))
        assert loss[2].item() == 0.0
        exp = F.cross_entropy(x[:1], t[:1], reduction="none", **kw)
        torch.testing.assert_close(loss[:1], exp)
        assert xl.grad[[1, 3, 4]].isnan().all() and torch.isfinite(xl.grad[[0, 2]]).all()
    torch.testing.assert_close(torch.ones(3, device=device).sum().cpu(), torch.tensor(3.0))  # context alive


@needs_cuda
def test_cuda_64bit_offsets(device):
    C = 32000
    rows = 2**31 // C + 8  # rows * C > 2**31 elements (~4.3 GB of bf16)
    assert rows * C >= 2**31
    x = torch.randn(rows, C, device=device, dtype=torch.bfloat16)
    t = torch.randint(0, C, (rows,), device=device)
    idx = torch.tensor([0, 1, rows - 70000 if rows > 70000 else rows // 2, rows - 2, rows - 1], device=device)
    with torch.no_grad():
        loss = ce(x, t, reduction="none", label_smoothing=0.1)
    exp = F.cross_entropy(x[idx].float(), t[idx], reduction="none", label_smoothing=0.1)
    torch.testing.assert_close(loss[idx].float(), exp, rtol=1e-2, atol=1e-2)
    del loss
    x.requires_grad_(True)
    up = torch.randn(rows, device=device, dtype=torch.bfloat16)
    loss, lse = ce(x, t, reduction="none", return_lse=True)
    loss.backward(up)
    xs = x.detach()[idx].float().requires_grad_(True)
    el = F.cross_entropy(xs, t[idx], reduction="none")
    el.backward(up[idx].float())
    torch.testing.assert_close(loss[idx].float(), el, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(lse[idx], torch.logsumexp(xs.detach(), 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad[idx].float(), xs.grad, rtol=2e-2, atol=1e-4)


SYNC_CONFIGS = [
    ("index weight ls mean", "index", dict(label_smoothing=0.1, weight=True)),
    ("index extras none", "index", dict(reduction="none", z_loss=1e-3, softcap=10.0, logit_scale=0.5)),
    ("index z_loss none", "index", dict(reduction="none", z_loss=1e-3, logit_scale=0.5)),
    ("prob sum", "prob", dict(reduction="sum", label_smoothing=0.1)),
    ("index inplace none", "index", dict(reduction="none", inplace_backward=True)),
]


@needs_cuda
@pytest.mark.parametrize("name,kind,kw", SYNC_CONFIGS, ids=[c[0] for c in SYNC_CONFIGS])
def test_cuda_no_host_sync(name, kind, kw, device):
    C = 1000
    x = torch.randn(8, C, device=device)
    if kind == "index":
        tgt = torch.tensor([1, -100, 3, 999, 0, 5, -100, 7], device=device)
    else:
        tgt = torch.softmax(torch.randn(8, C, device=device), 1)
    kw = dict(kw, weight=torch.rand(C, device=device) + 0.5 if kw.get("weight") else None)
    up = torch.randn(8, device=device)
    # warm-up outside the check: compile the kernels
    xl = x.clone().requires_grad_(True)
    loss = ce(xl, tgt, **kw)
    loss.backward(up if loss.dim() else None)
    torch.cuda.synchronize()
    try:
        torch.cuda.set_sync_debug_mode("error")
        xl = x.clone().requires_grad_(True)
        loss = ce(xl, tgt, **kw)
        loss.backward(up if loss.dim() else None)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    exp, eg = loss_and_grad(composed_ref, x, tgt, up if loss.dim() else None,
                            **{k: v for k, v in kw.items() if k != "inplace_backward"})
    torch.testing.assert_close(loss.detach(), exp.float())
    torch.testing.assert_close(xl.grad, eg.float())


@needs_cuda
def test_cuda_graph_capture(device):
    C = 2048
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(16, C, generator=gen).to(device).requires_grad_(True)
    t = torch.randint(0, C, (16,), generator=gen).to(device)
    t[3] = -100
    w = (torch.rand(C, generator=gen) + 0.5).to(device)
    kw = dict(weight=w, label_smoothing=0.1, z_loss=1e-3)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            x.grad = None
            ce(x, t, **kw).backward()
    torch.cuda.current_stream().wait_stream(s)
    x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = ce(x, t, **kw)
        static_loss.backward()
    for seed in (22, 23):
        g = torch.Generator().manual_seed(seed)
        new_x = torch.randn(16, C, generator=g).to(device)
        new_t = torch.randint(0, C, (16,), generator=g).to(device)
        new_t[5] = -100
        with torch.no_grad():
            x.copy_(new_x)
        t.copy_(new_t)
        graph.replay()
        torch.cuda.synchronize()
        exp, eg = loss_and_grad(composed_ref, new_x, new_t, None, **kw)
        torch.testing.assert_close(static_loss, exp.float())
        torch.testing.assert_close(x.grad, eg.float())


def test_no_gradient_written_under_no_grad(monkeypatch, device):
    """Inference under torch.no_grad() must not write a logits-sized gradient, even when the
    logits require grad (autograd.Function's needs_input_grad ignores grad mode)."""
    ce_mod = importlib.import_module("fused_softmax.cross_entropy")
    wrote_grad = []
    original = ce_mod._run_fwd

    def spy(x, target, weight, scalars, grad, *args, **kw):
        wrote_grad.append(grad is not None)
        return original(x, target, weight, scalars, grad, *args, **kw)

    monkeypatch.setattr(ce_mod, "_run_fwd", spy)
    x = torch.randn(4, 10, device=device, requires_grad=True)
    t = torch.randint(0, 10, (4,), device=device)
    with torch.no_grad():
        loss = fused_softmax.cross_entropy(x, t)
    assert not loss.requires_grad
    fused_softmax.cross_entropy(x, t).backward()
    assert wrote_grad == [False, True]
    torch.testing.assert_close(loss, F.cross_entropy(x.detach(), t))


@pytest.mark.parametrize("autocast", [False, True], ids=["fp16", "fp16-autocast"])
def test_fp16_gradient_scaled_before_rounding(autocast, device):
    """GradScaler multiplies the loss by 2^16 (2^12 here for a plain fp16 loss, whose own
    dtype caps grad_output): torch scales the gradient before rounding it to fp16, so
    entries of p / N below fp16's 6e-8 survive. A gradient formed in the forward and scaled
    later lost ~90% of the entries; the fp16 backward forms it with grad_output folded in."""
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(64, 512, generator=gen) * 4).half().to(device)
    t = torch.randint(0, 512, (64,), generator=gen).to(device)
    scale = 65536.0 if autocast else 4096.0
    ref_x = x.double().requires_grad_(True)
    F.cross_entropy(ref_x, t).backward(torch.tensor(scale, dtype=torch.float64, device=device))
    ref = ref_x.grad
    errs = {}
    for name, fn in (("ours", fused_softmax.cross_entropy), ("torch", F.cross_entropy)):
        xl = x.clone().requires_grad_(True)
        with torch.autocast(torch.device(device).type, dtype=torch.float16, enabled=autocast):
            loss = fn(xl, t)
        loss.backward(torch.tensor(scale, dtype=loss.dtype, device=device))
        g = xl.grad.double()
        errs[name] = ((g - ref).abs().sum() / ref.abs().sum()).item(), (g == 0).sum().item()
    assert (ref == 0).sum().item() == 0
    assert errs["ours"][0] <= 2 * errs["torch"][0] + 1e-3, errs
    assert errs["ours"][1] <= errs["torch"][1] + 64, errs  # torch keeps (almost) every entry


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_fp16_label_smoothing_sum_does_not_overflow(reduction, device):
    """torch sums the smoothing term -sum_c log p_c in fp16: past 65504 (4000 classes of
    logits of std 4) its loss is inf. Ours sums in fp32: the fp64 reference's loss, the
    same gradient (README, Limitations)."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 4000, generator=gen) * 4).half().to(device)
    t = torch.tensor([0, 5], device=device)
    ref = F.cross_entropy(x.double(), t, label_smoothing=0.1, reduction=reduction)
    xl = x.clone().requires_grad_(True)
    loss = ce(xl, t, label_smoothing=0.1, reduction=reduction)
    if device == "cpu":  # the overflow is torch's CPU and CUDA behaviour alike; asserted once
        assert not F.cross_entropy(x, t, label_smoothing=0.1, reduction=reduction).isfinite().all()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-3, atol=0)
    loss.sum().backward()
    x2 = x.clone().requires_grad_(True)
    F.cross_entropy(x2, t, label_smoothing=0.1, reduction=reduction).sum().backward()
    torch.testing.assert_close(xl.grad, x2.grad)  # fp16 defaults: up to one fp16 ulp apart


def test_elementwise_mean_is_torchs_deprecated_mean(device):
    x, t = _x(device), _t(device)
    with pytest.warns(UserWarning, match="elementwise_mean"):
        exp = F.cross_entropy(x, t, reduction="elementwise_mean")
    with pytest.warns(UserWarning, match="elementwise_mean"):
        got = ce(x, t, reduction="elementwise_mean")
    torch.testing.assert_close(got, exp)
    with pytest.warns(UserWarning, match="elementwise_mean"):
        got = fused_softmax.nn.CrossEntropyLoss(reduction="elementwise_mean")(x, t)
    torch.testing.assert_close(got, exp)


def test_nn_module_scripts_like_torch(device):
    """torch.jit.script takes torch's CrossEntropyLoss; ours too (the kernels left to Python)."""
    w = torch.rand(10, device=device) + 0.5
    x, t = _x(device), _t(device)
    ours = torch.jit.script(fused_softmax.nn.CrossEntropyLoss(weight=w, label_smoothing=0.1))
    theirs = torch.jit.script(torch.nn.CrossEntropyLoss(weight=w, label_smoothing=0.1))
    torch.testing.assert_close(ours(x, t), theirs(x, t))


def test_fp16_double_backward_with_gradscaler_scale(device):
    """create_graph=True under fp16 autocast with GradScaler's 2^16: the differentiable
    backward works in fp32 (2^16 is inf in fp16), as torch's autocast cross_entropy on the
    CPU. (On CUDA torch's autocast keeps log_softmax in fp16, and its gradient overflows to
    NaN here; the reference there is torch's fp32 composition.)"""
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(4, 16, generator=gen).half().to(device)
    t = torch.tensor([0, 3, 5, 7], device=device)
    grads = []
    ref = F.cross_entropy if device == "cpu" else lambda a, *args, **kw: F.cross_entropy(a.float(), *args, **kw)
    for fn in (fused_softmax.cross_entropy, ref):
        xl = x.clone().requires_grad_(True)
        with torch.autocast(torch.device(device).type, dtype=torch.float16):
            loss = fn(xl, t, reduction="sum")
        g, = torch.autograd.grad(loss, xl, torch.tensor(65536.0, device=device), create_graph=True)
        (g.float() / 65536.0).pow(2).sum().backward()  # a penalty on the unscaled gradient
        grads.append((g.detach(), xl.grad))
    (g, gg), (tg, tgg) = grads
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g, tg, rtol=2e-3, atol=1.0)
    torch.testing.assert_close(gg.float(), tgg.float(), rtol=1e-2, atol=tgg.float().abs().max().item() * 1e-3)


def test_subnormal_float_argument(device):
    """A float argument whose fp64 bits lie in [2^31, 2^32) (a subnormal near 1.5e-314) is
    passed as 0 (the interpreter would type its bits uint32): the loss is the unsmoothed one."""
    x = torch.randn(3, 5, dtype=torch.float64, device=device)
    t = torch.tensor([0, 1, 2], device=device)
    torch.testing.assert_close(ce(x, t, label_smoothing=1.5e-314), F.cross_entropy(x, t))
    torch.testing.assert_close(ce(x, t, z_loss=1.5e-314), F.cross_entropy(x, t))


def test_inplace_backward_on_overlapping_logits(device):
    """One row broadcast over the batch (stride 0): the rows share memory, so the gradient
    is not written over them (each row's would overwrite the others')."""
    b = torch.randn(1, 37, device=device, requires_grad=True)
    t = torch.tensor([3, 0, 36, 5], device=device)
    for dtype in (torch.float32, torch.float16):
        bl = b.detach().to(dtype).requires_grad_(True)
        ce(bl.expand(4, 37), t, inplace_backward=True).backward()
        br = b.detach().to(dtype).requires_grad_(True)
        F.cross_entropy(br.expand(4, 37).double(), t).backward()
        torch.testing.assert_close(bl.grad.float(), br.grad.float(), rtol=2e-3, atol=2e-4)
