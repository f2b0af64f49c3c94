"""Edge cases where the library once differed from torch: each one compared with torch
itself (values, exception types), on the Triton kernels (GPU, or CPU through the
interpreter) and, in CI's second pass, on the torch path.

Found by independent audits against torch 2.13: uint8 targets against ignore_index,
strided class weights, large-offset logits, no classes, argument types, torch.func
transforms and forward-mode AD, torch.compile with dynamic shapes, sample's greedy rule.
"""

from __future__ import annotations

import itertools
import math
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fused_softmax as fs
from fused_softmax import _backend


def raised(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - the type is what is compared
        return e
    return None


def same_error(theirs_fn, ours_fn, *args, **kwargs):
    theirs, ours = raised(theirs_fn, *args, **kwargs), raised(ours_fn, *args, **kwargs)
    assert theirs is not None, "torch accepts this call (test bug)"
    assert type(ours) is type(theirs), f"torch raises {theirs!r}; we raise {ours!r}"


# --------------------------------------------------------------------------- cross_entropy
@pytest.mark.parametrize("fn", ["cross_entropy", "linear_cross_entropy"])
def test_label_smoothing_types_as_torchs_argument_parser(fn, device):
    """``label_smoothing`` is a float to torch's parser: a Python or numpy number or a 0-d
    tensor without autograd history (numpy's bool and complex scalars included, a complex
    as its real part); a string, None, a Python complex, a ``Fraction``, a 1-element
    tensor or a numpy array is its TypeError, with its message."""
    if not hasattr(F, fn):
        pytest.skip(f"torch {torch.__version__} has no {fn}")
    x = torch.randn(2, 5, device=device)
    t = torch.tensor([1, 2], device=device)
    args = (x, t) if fn == "cross_entropy" else (x, torch.randn(5, 5, device=device), t)
    for ls in (0, 1, True, np.float32(0.1), np.int64(0), np.bool_(True), np.complex64(0.1),
               torch.tensor(0.1), torch.tensor(0.1 + 0j), torch.tensor(1, dtype=torch.uint8)):
        with warnings.catch_warnings(record=True) as theirs:  # numpy's complex -> real
            warnings.simplefilter("always")
            expected = getattr(F, fn)(*args, label_smoothing=ls)
        with warnings.catch_warnings(record=True) as ours:
            warnings.simplefilter("always")
            got = getattr(fs, fn)(*args, label_smoothing=ls)
        torch.testing.assert_close(got, expected)
        assert [type(w.message) for w in ours] == [type(w.message) for w in theirs], ls
    for ls in (torch.tensor([0.1]), np.array(0.1), "0.1", None, 0.1 + 0j, Fraction(1, 10),
               torch.tensor(0.1, requires_grad=True)):
        theirs = raised(getattr(F, fn), *args, label_smoothing=ls)
        ours = raised(getattr(fs, fn), *args, label_smoothing=ls)
        assert type(ours) is type(theirs) is TypeError and str(ours) == str(theirs), (ls, ours)


class _Idx:
    def __index__(self):
        return 1


@pytest.mark.parametrize("fn", ["cross_entropy", "linear_cross_entropy", "vocab_parallel"])
def test_ignore_index_types_as_torchs_symint(fn, device):
    """``ignore_index`` is a SymInt to torch's parser, which takes more than ``dim``'s int:
    any ``__index__`` object, a one-element integer tensor, a 0-d numpy array (not a bool:
    torch's TypeError; a bool tensor: torch's error too)."""
    x = torch.randn(3, 4, device=device)
    t = torch.tensor([1, 2, 3], device=device)
    args = {"cross_entropy": (x, t), "vocab_parallel": (x, t),
            "linear_cross_entropy": (x, torch.eye(4, device=device), t)}[fn]
    ours = {"cross_entropy": fs.cross_entropy, "linear_cross_entropy": fs.linear_cross_entropy,
            "vocab_parallel": fs.distributed.vocab_parallel_cross_entropy}[fn]
    theirs = F.cross_entropy if fn != "linear_cross_entropy" else \
        (lambda x, w, t, **kw: F.cross_entropy(x @ w.T, t, **kw))
    for ii in (_Idx(), torch.tensor([1]), torch.tensor(1, dtype=torch.uint8), np.array(1),
               np.int64(1)):
        torch.testing.assert_close(ours(*args, ignore_index=ii), theirs(*args, ignore_index=1))
    for ii in (True, torch.tensor(True)):
        assert raised(ours, *args, ignore_index=ii) is not None
        assert raised(F.cross_entropy, x, t, ignore_index=ii) is not None


@pytest.mark.parametrize("kw", [{}, dict(label_smoothing=0.1), dict(prob=True)])
def test_logits_changed_in_place_after_the_forward(kw, device):
    """torch's cross_entropy saves log_softmax's output, so the caller may change the
    logits in place after the forward; so may ours (the first backward only rescales the
    gradient formed in the forward, and reads no saved logits)."""
    gen = torch.Generator().manual_seed(8)
    base = torch.randn(3, 5, generator=gen).to(device)
    t = torch.tensor([0, 2, 4], device=device)
    kw = dict(kw)
    if kw.pop("prob", False):
        t = torch.softmax(torch.randn(3, 5, generator=gen), 1).to(device)
    grads = []
    for f in (fs.cross_entropy, F.cross_entropy):
        a = base.clone().requires_grad_(True)
        y = a * 2
        loss = f(y, t, **kw)
        y.add_(1.0)
        loss.backward(torch.tensor(3.0, device=device))
        grads.append(a.grad)
    torch.testing.assert_close(*grads)


@pytest.mark.parametrize("changed", ["target", "weight"])
@pytest.mark.parametrize("prob", [False, True])
def test_target_or_weight_changed_in_place_after_the_forward(changed, prob, device):
    """torch's backward saves the target and the class weights: changing either in place
    after the forward is autograd's error there, and ours (the first backward, which only
    rescales the gradient formed in the forward, would silently use the new target)."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(3, 5, generator=gen).to(device)
    t = torch.tensor([0, 2, 4], device=device)
    if prob:
        t = torch.softmax(torch.randn(3, 5, generator=gen), 1).to(device)
    w = torch.rand(5, generator=gen).to(device)
    for f in (F.cross_entropy, fs.cross_entropy):
        a, tc, wc = x.clone().requires_grad_(True), t.clone(), w.clone()
        loss = f(a, tc, wc)
        (tc if changed == "target" else wc).mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


def test_uint8_target_is_compared_with_ignore_index_as_an_integer(device):
    """-100 is not the byte 156: class 156 is a real class."""
    x = torch.randn(2, 200, device=device)
    t = torch.tensor([156, 3], dtype=torch.uint8, device=device)
    for reduction in ("mean", "sum", "none"):
        torch.testing.assert_close(fs.cross_entropy(x, t, reduction=reduction),
                                   F.cross_entropy(x, t, reduction=reduction))


@pytest.mark.parametrize("make_weight", [lambda: torch.tensor([0.7]).expand(5),
                                         lambda: torch.arange(1.0, 11.0)[::2]],
                         ids=["stride 0", "stride 2"])
def test_strided_class_weight(make_weight, device):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, generator=gen).to(device)
    t = torch.tensor([0, 1, 2, 3], device=device)
    w = make_weight().to(device)
    for smoothing in (0.0, 0.2):
        torch.testing.assert_close(fs.cross_entropy(x, t, weight=w, label_smoothing=smoothing),
                                   F.cross_entropy(x, t, weight=w, label_smoothing=smoothing))


@pytest.mark.parametrize("smoothing", [0.0, 0.3])
@pytest.mark.parametrize("prob", [False, True], ids=["index", "probabilities"])
def test_loss_does_not_cancel_for_large_logits(smoothing, prob, device):
    """Logits near 1e4: the loss is (max - z_t) + log(sum), not lse - z_t, which loses
    ~1e-3 in fp32. Compared with fp64 torch, within a few fp32 ulps of the loss."""
    gen = torch.Generator().manual_seed(1)
    x64 = 1e4 + torch.randn(8, 50, generator=gen, dtype=torch.float64)
    if prob:
        t = torch.softmax(torch.randn(8, 50, generator=gen, dtype=torch.float64), 1)
    else:
        t = torch.randint(0, 50, (8,), generator=gen)
    ref = F.cross_entropy(x64, t, label_smoothing=smoothing, reduction="none")
    ours = fs.cross_entropy(x64.float().to(device), t.to(torch.float32 if prob else torch.int64).to(device),
                            label_smoothing=smoothing, reduction="none")
    theirs = F.cross_entropy(x64.float(), t.float() if prob else t, label_smoothing=smoothing,
                             reduction="none")
    ref_err = (theirs.double() - ref).abs().max().item()
    err = (ours.cpu().double() - ref).abs().max().item()
    assert err <= max(4 * ref_err, 8 * torch.finfo(torch.float32).eps * ref.abs().max().item()), (err, ref_err)


@pytest.mark.parametrize("prob", [False, True], ids=["index", "probabilities"])
def test_loss_does_not_cancel_for_one_far_class(prob, device):
    """One class 1e4 below the rest, of weight 0, with label smoothing: the smoothing sum
    is taken relative to the row's max (a reference at the far class would make the other
    terms ~1e4 each and cancel to ~1e-5 relative error in fp32)."""
    gen = torch.Generator().manual_seed(2)
    x64 = torch.randn(8, 40, generator=gen, dtype=torch.float64)
    x64[:, 0] -= 1e4
    w = torch.rand(40, generator=gen, dtype=torch.float64) + 0.5
    w[0] = 0.0
    if prob:
        t = torch.softmax(torch.randn(8, 40, generator=gen, dtype=torch.float64), 1)
    else:
        t = torch.randint(1, 40, (8,), generator=gen)
    kw = dict(label_smoothing=0.1, reduction="none")
    ref = F.cross_entropy(x64, t, weight=w, **kw)
    theirs = F.cross_entropy(x64.float(), t.float() if prob else t, weight=w.float(), **kw)
    ours = fs.cross_entropy(x64.float().to(device), (t.float() if prob else t).to(device),
                            weight=w.float().to(device), **kw)
    ref_err = (theirs.double() - ref).abs().max().item()
    err = (ours.cpu().double() - ref).abs().max().item()
    assert err <= max(4 * ref_err, 8 * torch.finfo(torch.float32).eps * ref.abs().max().item()), (err, ref_err)


def test_softcap_gradient_accurate_where_tanh_saturates(device):
    """softcap's derivative is 1/cosh^2 (sech^2 from one exp), not 1 - tanh^2, which
    cancels where tanh saturates: fp32 gradient error within torch's own there."""
    gen = torch.Generator().manual_seed(3)
    x64 = 3 * torch.randn(16, 64, generator=gen, dtype=torch.float64)
    t = torch.randint(0, 64, (16,), generator=gen)
    scale, cap = 7.5, 3.0

    def torch_grad(x):
        x = x.clone().requires_grad_(True)
        z = cap * torch.tanh(x * scale / cap)
        F.cross_entropy(z, t.to(x.device), reduction="sum").backward()
        return x.grad

    ref = torch_grad(x64)
    theirs = torch_grad(x64.float())
    x = x64.float().to(device).requires_grad_(True)
    fs.cross_entropy(x, t.to(device), reduction="sum", logit_scale=scale, softcap=cap).backward()
    ref_err = (theirs.double() - ref).abs().max().item()
    err = (x.grad.cpu().double() - ref).abs().max().item()
    assert err <= max(ref_err, 4 * torch.finfo(torch.float32).eps * ref.abs().max().item()), (err, ref_err)


@pytest.mark.parametrize("target, reduction", [
    (torch.full((3,), -100), "mean"), (torch.full((3,), -100), "sum"), (torch.full((3,), -100), "none"),
    (torch.zeros(3, 0), "sum"), (torch.zeros(3, 0), "none"), (torch.zeros(3, 0), "mean")])
def test_no_classes(target, reduction, device):
    x = torch.randn(3, 0, device=device)
    torch.testing.assert_close(fs.cross_entropy(x, target.to(device), reduction=reduction),
                               F.cross_entropy(x, target.to(device), reduction=reduction),
                               equal_nan=True)
    bad = torch.tensor([0, -100, 0], device=device)
    if device == "cpu":  # every class index is out of range: torch's IndexError
        same_error(F.cross_entropy, fs.cross_entropy, x, bad)
        with pytest.raises(IndexError, match="Target 0 is out of bounds"):
            fs.cross_entropy(x, bad.int())  # int32 taken, then torch's int64 error
        ignored = torch.full((3,), -100, dtype=torch.int32)  # int32 taken, as for C > 0
        torch.testing.assert_close(fs.cross_entropy(x, ignored, reduction=reduction),
                                   F.cross_entropy(x, ignored.long(), reduction=reduction),
                                   equal_nan=True)
    else:  # torch's CUDA loss would hit a device-side assert; out-of-range rows are NaN
        got = fs.cross_entropy(x, bad, reduction=reduction)
        expected = {"none": torch.tensor([math.nan, 0.0, math.nan])}.get(reduction, torch.tensor(math.nan))
        torch.testing.assert_close(got.cpu(), expected, equal_nan=True)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("kw", [{}, dict(weight=True), dict(label_smoothing=0.1)],
                         ids=["plain", "weight", "smoothing"])
def test_no_classes_on_a_nan_row_device(kw, reduction, monkeypatch):
    """CUDA's rule for zero classes (every non-ignored row out of range: NaN), run here by
    declaring the CPU such a device: int64, int32 and uint8 targets, all rows ignored."""
    import importlib
    ce_mod = importlib.import_module("fused_softmax.cross_entropy")
    monkeypatch.setattr(ce_mod, "NAN_ROW_DEVICES", ("cpu",))
    x = torch.randn(3, 0, requires_grad=True)
    kw = dict(kw, weight=torch.ones(0)) if "weight" in kw else kw
    nan = math.nan
    cases = [(torch.tensor([0, -100, 5]), [nan, 0.0, nan]),
             (torch.tensor([0, -100, 5], dtype=torch.int32), [nan, 0.0, nan]),
             (torch.tensor([0, 156, 5], dtype=torch.uint8), [nan, nan, nan]),  # -100 is no byte
             (torch.full((3,), -100), [0.0, 0.0, 0.0])]
    for target, rows in cases:
        got = fs.cross_entropy(x, target, reduction=reduction, **kw)
        # label smoothing over no classes divides by C = 0: NaN on every row, as torch's
        rows = torch.full((3,), nan) if "label_smoothing" in kw else torch.tensor(rows)
        expected = {"none": rows, "sum": rows.sum(), "mean": torch.tensor(nan)}[reduction]
        torch.testing.assert_close(got.detach(), expected, equal_nan=True, msg=str(target))
        got.sum().backward()  # an empty gradient, and no error
        assert x.grad.shape == (3, 0)


CE_ERRORS = {
    "ignore_index float": (lambda d: (torch.randn(2, 5, device=d), torch.zeros(2, dtype=torch.long, device=d)),
                           dict(ignore_index=1.5)),
    "ignore_index bool": (lambda d: (torch.randn(2, 5, device=d), torch.zeros(2, dtype=torch.long, device=d)),
                          dict(ignore_index=True)),
    "ignore_index None": (lambda d: (torch.randn(2, 5, device=d), torch.zeros(2, dtype=torch.long, device=d)),
                          dict(ignore_index=None)),
    "3-d batch": (lambda d: (torch.randn(2, 5, 3, device=d), torch.zeros(3, 3, dtype=torch.long, device=d)), {}),
    "4-d batch": (lambda d: (torch.randn(2, 5, 3, 4, device=d), torch.zeros(3, 3, 4, dtype=torch.long, device=d)), {}),
    "3-d spatial": (lambda d: (torch.randn(2, 5, 3, device=d), torch.zeros(2, 4, dtype=torch.long, device=d)), {}),
    "2-d input, 0-d target": (lambda d: (torch.randn(2, 5, device=d), torch.tensor(1, device=d)), {}),
    "0-d input, 0-d float target": (lambda d: (torch.tensor(1.0, device=d), torch.tensor(0.0, device=d)), {}),
    "0-d input, 0-d index target": (lambda d: (torch.tensor(1.0, device=d), torch.tensor(0, device=d)), {}),
    "uint8 with (N, C, d)": (lambda d: (torch.randn(2, 5, 3, device=d), torch.zeros(2, 3, dtype=torch.uint8, device=d)), {}),
    "integer input, bad reduction": (lambda d: (torch.ones(2, 5, dtype=torch.long, device=d),
                                                torch.zeros(2, dtype=torch.long, device=d)), dict(reduction="foo")),
}


@pytest.mark.parametrize("name", CE_ERRORS)
def test_cross_entropy_errors_like_torch(name, device):
    make, kw = CE_ERRORS[name]
    same_error(F.cross_entropy, fs.cross_entropy, *make(device), **kw)


def test_nan_label_smoothing_is_no_smoothing(device):
    x = torch.randn(4, 7, device=device)
    t = torch.randint(0, 7, (4,), device=device)
    torch.testing.assert_close(fs.cross_entropy(x, t, label_smoothing=math.nan),
                               F.cross_entropy(x, t, label_smoothing=math.nan))
    torch.testing.assert_close(fs.cross_entropy(x, t, label_smoothing=math.nan), F.cross_entropy(x, t))


def test_infinite_weight_of_an_untargeted_class(device):
    """Without smoothing an untargeted class's weight never enters: no 0 * inf = NaN."""
    x = torch.randn(2, 3, device=device, requires_grad=True)
    w = torch.tensor([1.0, 1.0, math.inf], device=device)
    t = torch.tensor([0, 1], device=device)
    loss = fs.cross_entropy(x, t, weight=w)
    loss.backward()
    x2 = x.detach().clone().requires_grad_()
    ref = F.cross_entropy(x2, t, weight=w)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(x.grad, x2.grad)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_nonfinite_weight_of_the_ignored_class(bad, smoothing, device):
    """Inverse-frequency weights give the never-counted padding class an inf weight: the
    ignored rows' weights never enter the mean's denominator (torch: finite loss; inf with
    smoothing, whose sum takes every class's weight)."""
    x = torch.randn(3, 4, device=device, generator=None)
    w = torch.tensor([bad, 1.0, 2.0, 0.5], device=device)
    for t, ignore_index in ((torch.tensor([-100, 1, 3]), -100), (torch.tensor([0, 1, 3]), 0)):
        t = t.to(device)
        for reduction in ("mean", "sum", "none"):
            kw = dict(weight=w, ignore_index=ignore_index, reduction=reduction,
                      label_smoothing=smoothing)
            torch.testing.assert_close(fs.cross_entropy(x, t, **kw), F.cross_entropy(x, t, **kw),
                                       equal_nan=True)
    if smoothing == 0.0:  # the case is what it claims: torch's mean is finite
        assert math.isfinite(F.cross_entropy(x, t.to(device), w, ignore_index=0).item())


def test_infinite_weight_or_target_at_the_largest_logit(device):
    """torch's ``w * log_softmax`` is inf * (z - lse), infinite, at the largest logit; the
    kernel's sums are relative to the row max, where inf * 0 would be NaN."""
    x = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]], device=device)
    w = torch.tensor([math.inf, 1.0, 1.0], device=device)
    t = torch.tensor([1, 2], device=device)
    q = torch.tensor([[math.inf, 0.5, 0.2], [0.1, -math.inf, 0.3]], device=device)
    for smoothing, (target, weight) in itertools.product((0.0, 0.1), ((t, w), (q, None))):
        kw = dict(reduction="none", label_smoothing=smoothing)
        theirs = F.cross_entropy(x, target, weight, **kw)
        torch.testing.assert_close(fs.cross_entropy(x, target, weight, **kw), theirs)
        if smoothing or target is q:  # the case is what it claims (index targets without
            assert theirs.isinf().all()  # smoothing never read the untargeted inf weight)


def test_soft_target_gradient_at_large_logits(device):
    """The gradient with respect to a probability target is -log_softmax: formed from the
    logits less their max, not as z - lse (whose rounding at 1e4 is 1e-3)."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 8, generator=gen) + 1e4).to(device)
    q0 = torch.softmax(torch.randn(4, 8, generator=gen), -1).to(device)
    q, q64 = q0.clone().requires_grad_(), q0.double().requires_grad_()
    fs.cross_entropy(x, q, label_smoothing=0.1).backward()
    F.cross_entropy(x.double(), q64, label_smoothing=0.1).backward()
    torch.testing.assert_close(q.grad.double(), q64.grad, rtol=0, atol=1e-6)  # was 9e-5


def test_empty_spatial_input_with_uint8_target(device):
    """torch refuses uint8 targets for (N, C, d...) inputs, but reduces an empty one (and on
    CUDA takes any empty one)."""
    for shape in ((2, 5, 0), (0, 7, 2)):
        x = torch.randn(*shape, device=device)
        t = torch.zeros(shape[0], *shape[2:], dtype=torch.uint8, device=device)
        for reduction in ("mean", "sum") if device == "cpu" else ("mean", "sum", "none"):
            got = fs.cross_entropy(x, t, reduction=reduction)
            exp = F.cross_entropy(x, t, reduction=reduction)
            assert got.shape == exp.shape and got.dtype == exp.dtype
            torch.testing.assert_close(got, exp, equal_nan=True)
        if device == "cpu":
            same_error(F.cross_entropy, fs.cross_entropy, x, t, reduction="none")


@pytest.mark.parametrize("args", [
    lambda x, t: (x, t, [1.0, 1.0, 1.0]), lambda x, t: (x, [0, 1]), lambda x, t: ([[1.0]], t),
    lambda x, t: (x, None), lambda x, t: (x, t, 2.0)], ids=["weight", "target", "input",
                                                            "None target", "float weight"])
def test_non_tensor_arguments_get_torchs_error(args, device):
    x, t = torch.randn(2, 3, device=device), torch.tensor([0, 1], device=device)
    theirs, ours = raised(F.cross_entropy, *args(x, t)), raised(fs.cross_entropy, *args(x, t))
    assert theirs is not None
    assert (type(ours), str(ours)) == (type(theirs), str(theirs))


# --------------------------------------------------------------------------- transforms
HEAD = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))


OPS = {
    "softmax": (lambda a: fs.softmax(a, -1), lambda a: F.softmax(a, -1)),
    "log_softmax": (lambda a: fs.log_softmax(a, 0, temperature=2.0), lambda a: F.log_softmax(a / 2.0, 0)),
    "logsumexp": (lambda a: fs.logsumexp(a, 1), lambda a: torch.logsumexp(a, 1)),
    "cross_entropy": (lambda a: fs.cross_entropy(a, torch.tensor([0, 2, 1]), label_smoothing=0.1),
                      lambda a: F.cross_entropy(a, torch.tensor([0, 2, 1]), label_smoothing=0.1)),
    "linear_cross_entropy": (lambda a: fs.linear_cross_entropy(a, HEAD, torch.tensor([0, 5, 1])),
                             lambda a: F.cross_entropy(F.linear(a, HEAD), torch.tensor([0, 5, 1]))),
}


@pytest.mark.parametrize("op", OPS)
def test_torch_func_transforms_and_forward_ad(op):
    """jvp (forward mode), grad/jacrev and vmap give torch's answers: never a silent zero."""
    ours, theirs = OPS[op]
    x = torch.randn(3, 4, dtype=torch.float64)
    v = torch.randn_like(x)
    torch.testing.assert_close(torch.func.jvp(ours, (x,), (v,))[1], torch.func.jvp(theirs, (x,), (v,))[1])
    torch.testing.assert_close(torch.func.jacrev(ours)(x), torch.func.jacrev(theirs)(x))
    xs = torch.randn(2, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(torch.func.vmap(ours)(xs), torch.func.vmap(theirs)(xs))
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(ours(fwAD.make_dual(x, v))).tangent
        ref = fwAD.unpack_dual(theirs(fwAD.make_dual(x, v))).tangent
    torch.testing.assert_close(tangent, ref)


_T = torch.tensor([0, 2, 1])
BACKWARD_OPS = {
    **OPS,
    "logsumexp dims": (lambda a: fs.logsumexp(a, (0, 1)), lambda a: torch.logsumexp(a, (0, 1))),
    "cross_entropy none": (lambda a: fs.cross_entropy(a, _T, reduction="none"),
                           lambda a: F.cross_entropy(a, _T, reduction="none")),
    "cross_entropy prob": (lambda a: fs.cross_entropy(a, torch.softmax(a.detach() * 3, 1)),
                           lambda a: F.cross_entropy(a, torch.softmax(a.detach() * 3, 1))),
    "linear_cross_entropy none": (
        lambda a: fs.linear_cross_entropy(a, HEAD, torch.tensor([0, 5, 1]), reduction="none"),
        lambda a: F.cross_entropy(F.linear(a, HEAD), torch.tensor([0, 5, 1]), reduction="none")),
    "linear_cross_entropy vocab": (
        lambda a: fs.linear_cross_entropy(a, HEAD, torch.tensor([0, 5, 1]), vocab_chunk_size=4),
        lambda a: F.cross_entropy(F.linear(a, HEAD), torch.tensor([0, 5, 1]))),
    "vocab_parallel none": (
        lambda a: fs.distributed.vocab_parallel_cross_entropy(a, _T, reduction="none"),
        lambda a: F.cross_entropy(a, _T, reduction="none")),
    "cross_entropy fp16": (lambda a: fs.cross_entropy(a.half(), _T, reduction="none"),
                           lambda a: F.cross_entropy(a.half(), _T, reduction="none")),
}


@pytest.mark.parametrize("op", BACKWARD_OPS)
def test_backward_differentiated_in_grad_output(op):
    """A graph built outside any transform, its backward ``autograd.grad(y, x, v)`` then
    differentiated with respect to ``v``: by torch.func's jvp and grad, or with ``v`` a
    forward-AD dual. The ops have no rule for such a ``v``, so the backward forms its result
    with torch's ops; it gave a zero derivative (or a lost tangent) before. (CPU: the
    interpreter's pass runs the kernels' route, as the other transform tests.)"""
    import torch.autograd.forward_ad as fwAD
    ours, theirs = BACKWARD_OPS[op]
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(3, 4, dtype=torch.float64, generator=gen)
    U = torch.randn(3, 4, dtype=torch.float64, generator=gen)
    results = []
    for fn in (ours, theirs):
        x = x0.clone().requires_grad_()
        y = fn(x)
        v = torch.randn(y.shape, dtype=y.dtype, generator=gen)
        tv = torch.randn(y.shape, dtype=y.dtype, generator=gen)
        jvp = torch.func.jvp(lambda v: torch.autograd.grad(y, x, v, retain_graph=True)[0],
                             (v,), (tv,))[1]
        with fwAD.dual_level():
            dual = torch.autograd.grad(y, x, fwAD.make_dual(v, tv), retain_graph=True)[0]
            tangent = fwAD.unpack_dual(dual).tangent
        exact = torch.autograd.grad(y, x, tv, retain_graph=True)[0]
        tol = dict(rtol=2e-3, atol=1e-3) if y.dtype == torch.float16 else {}
        torch.testing.assert_close(jvp, exact, **tol)
        torch.testing.assert_close(tangent, exact, **tol)
        if not op.startswith("vocab_parallel"):  # which has no double backward
            results.append(torch.func.grad(lambda v: (torch.autograd.grad(
                y, x, v, retain_graph=True, create_graph=True)[0] * U).sum())(v))
    if results:
        torch.testing.assert_close(results[0], results[1], **tol)


def test_compile_with_dynamic_shapes_and_implicit_dim(device):
    x = torch.randn(3, 7, device=device)
    t = torch.tensor([0, 3, 6], device=device)
    f = torch.compile(lambda a: fs.softmax(a, -1, temperature=0.5).sum(1)
                      + fs.cross_entropy(a, t, logit_scale=2.0, reduction="none"),
                      fullgraph=True, dynamic=True)
    torch.testing.assert_close(f(x), F.softmax(x / 0.5, -1).sum(1)
                               + F.cross_entropy(2.0 * x, t, reduction="none"))
    with pytest.warns(UserWarning):
        expected = F.softmax(x)
    g = torch.compile(lambda a: fs.softmax(a), fullgraph=True)
    torch.testing.assert_close(g(x), expected)


# --------------------------------------------------------------------------- softmax, logsumexp
@pytest.mark.parametrize("fn", ["softmax", "log_softmax"])
def test_odd_stacklevel_and_non_tensor_input_as_torch(fn, device):
    """torch hands ``_stacklevel`` to ``warnings.warn`` only when it warns (dim=None), and
    calls ``input.dim()`` / ``input.softmax(dim)`` on whatever it is given: its errors,
    word for word (ours added 1 to a None stacklevel, and named a numpy array 'ndarray')."""
    ours, theirs = getattr(fs, fn), getattr(F, fn)
    x = torch.randn(2, 3, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
    for level in (3, np.int64(3), torch.tensor(3)):  # the warning points at this line
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            ours(x, _stacklevel=level)
        assert seen and seen[0].filename == __file__, (level, seen[0].filename)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for level in (None, "a", 3.0):
            torch.testing.assert_close(ours(x, 1, _stacklevel=level), theirs(x, 1, _stacklevel=level))
            t, o = raised(theirs, x, _stacklevel=level), raised(ours, x, _stacklevel=level)
            assert type(o) is type(t) is TypeError and str(o) == str(t), (level, o)
        for args in ((np.ones(3), 0), ([1.0], 0), (np.ones(3),)):
            t, o = raised(theirs, *args), raised(ours, *args)
            assert type(o) is type(t) is AttributeError and str(o) == str(t), (args, o)


def test_integer_like_dims(device):
    x = torch.randn(3, 4, device=device)
    for dim in (np.int64(1), torch.tensor(1)):
        torch.testing.assert_close(fs.softmax(x, dim), F.softmax(x, 1))
        torch.testing.assert_close(fs.logsumexp(x, dim), torch.logsumexp(x, 1))


def test_logsumexp_arguments_like_torch(device):
    x = torch.randn(2, 3, device=device)
    z = torch.randn(3, dtype=torch.complex64, device=device)
    torch.testing.assert_close(fs.logsumexp(z, 0), torch.logsumexp(z, 0))
    out = torch.empty(0, device=device)
    assert fs.logsumexp(x, 1, out=out) is out
    torch.testing.assert_close(out, torch.logsumexp(x, 1))
    same_error(torch.logsumexp, fs.logsumexp, x, 1, keepdim=1)
    same_error(torch.logsumexp, fs.logsumexp, x, ())
    torch.testing.assert_close(fs.logsumexp(x, (), keepdim=True), torch.logsumexp(x, (), keepdim=True))
    same_error(F.softmax, fs.softmax, x, 1, dtype="float32")


def test_logsumexp_dim_must_be_an_int_or_a_tuple(device):
    """torch takes an int, a tuple or a list of ints as ``dim``; a set, a range or a
    generator is its TypeError (an iterable was once accepted)."""
    x = torch.randn(2, 3, 4, device=device)
    for dim in ({0, 2}, range(0, 3, 2), (d for d in (0, 2)), {0: 1}):
        same_error(torch.logsumexp, fs.logsumexp, x, dim)
    torch.testing.assert_close(fs.logsumexp(x, [0, 2]), torch.logsumexp(x, [0, 2]))


def _inplace_error(loss_fn, change):
    """Whether backpropagating ``loss_fn()`` after ``change()`` is autograd's error."""
    loss = loss_fn()
    change()
    try:
        loss.sum().backward()
    except RuntimeError as e:
        assert "modified by an inplace operation" in str(e), e
        return True
    return False


# (torch's linear_cross_entropy: (N, H) input and int64 targets only)
@pytest.mark.parametrize("fn, case", [
    *(("cross_entropy", c) for c in ("strided target", "uint8 target", "strided weight",
                                      "3-d strided target", "3-d target")),
    ("linear_cross_entropy", "strided target"), ("linear_cross_entropy", "strided weight")])
def test_caller_tensors_changed_in_place_as_torch(fn, case, device):
    """The caller's target and class weight are watched, not the kernels' copies of them
    (a strided or uint8 target, a strided weight, all copied, went unnoticed); torch's own
    copy (a strided target of 3-d logits, which nll_loss_nd saves contiguous) is not."""
    gen = torch.Generator().manual_seed(17)
    three_d = case.startswith("3-d")
    C = 5
    x = torch.randn(*((4, C, 3) if three_d else (4, C)), generator=gen).to(device)
    h, W = torch.randn(4, 6, generator=gen).to(device), torch.randn(C, 6, generator=gen).to(device)
    results = []
    for ours in (True, False):
        if three_d:
            t = torch.randint(0, C, (3, 4), generator=gen).to(device).t() if "strided" in case \
                else torch.randint(0, C, (4, 3), generator=gen).to(device)
        elif case == "strided target":
            t = torch.randint(0, C, (4, 2), generator=gen).to(device)[:, 0]
        else:
            t = torch.tensor([0, 1, 2, 3], device=device, dtype=torch.uint8 if "uint8" in case else torch.long)
        w = torch.rand(C, 2, generator=gen).to(device)[:, 0] if "weight" in case else None
        if fn == "cross_entropy":
            a = x.clone().requires_grad_(True)
            f = (fs.cross_entropy if ours else F.cross_entropy)
            loss_fn = lambda: f(a, t, w)  # noqa: E731
        else:
            a = h.clone().requires_grad_(True)
            loss_fn = (lambda: fs.linear_cross_entropy(a, W, t, weight=w)) if ours else \
                (lambda: F.cross_entropy(F.linear(a, W), t, w))
        results.append(_inplace_error(loss_fn, (lambda: w.mul_(2)) if w is not None else (lambda: t.fill_(4))))
    assert results[0] == results[1], results


@pytest.mark.parametrize("fn", ["cross_entropy", "cross_entropy prob", "linear_cross_entropy"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_allow_mutation_on_saved_tensors_as_torch(fn, dtype, device):
    """Inside ``torch.autograd.graph.allow_mutation_on_saved_tensors()`` torch copies a
    saved tensor before it changes in place: a target, class weight or bias changed after
    the forward is no error, and the backward sees the old values (ours raised autograd's
    in-place error from its own version check). Here with a non-finite grad_output too,
    whose NaN lands at the old target."""
    gen = torch.Generator().manual_seed(23)
    C = 6
    x = torch.randn(4, C, generator=gen).to(device, dtype)
    h = torch.randn(4, 5, generator=gen).to(device, dtype)
    W = torch.randn(C, 5, generator=gen).to(device, dtype)
    grads = []
    for ours in (True, False):
        t = torch.tensor([1, 2, -100, 4], device=device)
        w = (torch.rand(C, generator=torch.Generator().manual_seed(3)) + 0.5).to(device, dtype)
        q = torch.softmax(torch.randn(4, C, generator=torch.Generator().manual_seed(4)), 1).to(device, dtype)
        bias = torch.linspace(-1, 1, C, device=device, dtype=dtype)
        a = (h if fn == "linear_cross_entropy" else x).clone().requires_grad_(True)
        with torch.autograd.graph.allow_mutation_on_saved_tensors():
            if fn == "cross_entropy":
                f = fs.cross_entropy if ours else F.cross_entropy
                loss = f(a, t, w, reduction="none")
                up = torch.tensor([1.0, math.inf, 2.0, -1.0], device=device, dtype=dtype)
            elif fn == "cross_entropy prob":
                f = fs.cross_entropy if ours else F.cross_entropy
                loss = f(a, q, w, reduction="sum")
                up = torch.tensor(3.0, device=device, dtype=dtype)
            else:  # 'none': its backward recomputes the logits, reading the bias
                loss = fs.linear_cross_entropy(a, W, t, linear_bias=bias, weight=w,
                                               reduction="none") if ours else \
                    F.cross_entropy(F.linear(a, W, bias), t, w, reduction="none")
                up = torch.tensor([2.0, -1.0, 0.5, 1.0], device=device, dtype=dtype)
            t.fill_(0)
            w.mul_(3)
            q.zero_()
            bias.add_(1.0)
            loss.backward(up)
        grads.append(a.grad)
    # (fp16: ours computes in fp32, torch's in fp16 in places; the changed tensors would
    # move the gradient by far more: a class weight x3, other targets)
    tol = {} if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-3)
    torch.testing.assert_close(grads[0], grads[1], equal_nan=True, **tol)


@pytest.mark.parametrize("dims", [(0, 2), (2, 0, 1), (1, 2), (0, 1), (2, 1), (-1, -2)])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_logsumexp_several_dims_saves_the_input_itself(dims, layout, device):
    """Several dims, in any order: one pass over a view where they merge (in memory order),
    else over a permuted copy: values and gradients as torch's (one dim at a time gave NaN
    gradients where one slice of a group is all -inf), and an in-place change of the
    input after the forward is autograd's error, as torch's (the copy hid it)."""
    gen = torch.Generator().manual_seed(len(dims))
    base = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64).to(device)
    base[0, 1, :] = -math.inf
    base[1, :, 2] = -math.inf
    base[2, 3, 4] = -math.inf
    if layout == "transposed":
        base = base.transpose(0, 2).contiguous().transpose(0, 2)
    a, b = base.clone().requires_grad_(True), base.clone().requires_grad_(True)
    got, exp = fs.logsumexp(a, dims, keepdim=True), torch.logsumexp(b, dims, keepdim=True)
    torch.testing.assert_close(got, exp)
    up = torch.randn(exp.shape, generator=gen, dtype=torch.float64).to(device)
    torch.testing.assert_close(torch.autograd.grad(got, a, up)[0],
                               torch.autograd.grad(exp, b, up)[0])
    z = a * 1
    out = fs.logsumexp(z, dims)
    z.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_logsumexp_several_dims_exports_with_its_gradient(device):
    """Strict torch.export of logsumexp over dims that do not merge (a permuted copy): the
    exported program still backpropagates (an autograd.Function around the copy lost its
    gradient under Dynamo's export)."""
    class M(torch.nn.Module):
        def forward(self, x):
            return fs.logsumexp(x, (0, 2))

    x = torch.randn(3, 4, 5, device=device)
    ep = torch.export.export(M(), (x,), strict=True)
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out = ep.module()(a)
    assert out.requires_grad
    torch.testing.assert_close(torch.autograd.grad(out.sum(), a)[0],
                               torch.autograd.grad(torch.logsumexp(b, (0, 2)).sum(), b)[0])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_probability_targets_export_with_a_dynamic_batch(reduction, device):
    """torch.export with a dynamic batch Dim: the mean's denominator of probability targets
    (the batch size) stays symbolic (float() of it pinned the batch: a constraint error),
    for cross_entropy and linear_cross_entropy with explicit row chunks."""
    W = torch.randn(7, 6, device=device)

    class M(torch.nn.Module):
        def forward(self, x, p, h):
            return (fs.cross_entropy(x, p, reduction=reduction),
                    fs.linear_cross_entropy(h, W, p, reduction=reduction, chunk_size=4))

    def args(n):
        return (torch.randn(n, 7, device=device), torch.randn(n, 7, device=device).softmax(-1),
                torch.randn(n, 6, device=device))

    b = torch.export.Dim("b", min=2, max=64)
    ep = torch.export.export(M(), args(8), dynamic_shapes=({0: b}, {0: b}, {0: b}))
    x, p, h = args(13)
    ce, lce = ep.module()(x, p, h)
    torch.testing.assert_close(ce, F.cross_entropy(x, p, reduction=reduction))
    torch.testing.assert_close(lce, F.cross_entropy(h @ W.T, p, reduction=reduction))


@pytest.mark.parametrize("case", ["index", "prob", "linear-index", "linear-prob"])
def test_exported_losses_train_and_form_no_gradient_in_the_forward(case, device):
    """An exported program holds the custom ops without their autograd.Function: it calls
    them with no gradient formed in the forward (an inference program wrote a logits-sized
    gradient it never read), and backpropagates through their registered autograd (it
    raised "no autograd formula"), with torch's values and parameter gradients."""
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(8, 6, generator=gen).to(device)
    t = (torch.randn(8, 7, generator=gen).softmax(-1) if case.endswith("prob")
         else torch.tensor([0, 6, -100, 3, 3, 1, 2, 5])).to(device)
    w = torch.rand(7, generator=gen).to(device)
    kw = dict(weight=w, label_smoothing=0.1, reduction="mean" if case.endswith("x") else "none")
    linear = case.startswith("linear")

    class Net(torch.nn.Module):
        def __init__(self, ours):
            super().__init__()
            torch.manual_seed(1)
            self.body, self.head, self.ours = torch.nn.Linear(6, 5), torch.nn.Linear(5, 7), ours
            self.to(device)

        def forward(self, h, t):
            z = self.body(h)
            if self.ours and linear:
                return fs.linear_cross_entropy(z, self.head.weight, t, linear_bias=self.head.bias,
                                               chunk_size=3, **kw)
            return (fs.cross_entropy if self.ours else F.cross_entropy)(self.head(z), t, **kw)

    results = []
    for ours in (False, True):
        ep = torch.export.export(Net(ours), (h, t))
        if ours:
            calls = [n for n in ep.graph.nodes if "cross_entropy_fwd" in str(n.target)]
            flags = calls[0].args[-3:] if linear else calls[0].args[-1:]
            assert len(calls) == 1 and not any(flags)
        m = ep.module()
        loss = m(h, t)
        loss.sum().backward()
        results.append([loss.detach()] + [p.grad for p in m.parameters()])
    for ours, theirs in zip(*reversed(results)):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("case", ["cross_entropy", "linear_cross_entropy", "class-weight-grad"])
def test_compiled_autograd_backward_matches_torch(case, device):
    """A backward traced by Dynamo (compiled autograd): the in-place-change checks read no
    version counter there (they raised "at version 1; expected version 1 instead" for a
    target changed in place before the forward: labels[mask] = -100); a class weight that
    requires grad (probability targets) reaches the reduction's scalars only as a
    constant (compiled autograd added the None gradient of that path: a TypeError)."""
    gen = torch.Generator().manual_seed(0)
    h0, W0, b0 = (torch.randn(*s, dtype=torch.float64, generator=gen).to(device)
                  for s in ((6, 5), (7, 5), (7,)))
    t = torch.tensor([0, 6, 4, 3, 2, 1], device=device)
    t[2] = -100
    grads = []
    for lib in (fs, F):
        h, W, b = (a.clone().requires_grad_() for a in (h0, W0, b0))
        if case == "class-weight-grad":  # (b: the class weight, W: unused)
            loss = lib.cross_entropy(h @ W0[:5].T, h0.softmax(-1), weight=b[:5],
                                     reduction="none")
        elif case == "cross_entropy":
            loss = lib.cross_entropy(F.linear(h, W, b), t, label_smoothing=0.1, reduction="none")
        elif lib is fs:
            loss = fs.linear_cross_entropy(h, W, t, linear_bias=b, reduction="none")
        else:
            loss = F.cross_entropy(F.linear(h, W, b), t, reduction="none")
        torch._dynamo.reset()
        with torch._dynamo.compiled_autograd._enable(torch.compile(backend="aot_eager")):
            (loss ** 2).sum().backward()
        grads.append((h.grad, W.grad, b.grad))
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("case", ["cross_entropy", "inplace_backward", "linear_cross_entropy"])
def test_compiled_autograd_second_backward_of_a_retained_graph(case, device):
    """retain_graph=True, then a second backward, both traced by compiled autograd: each
    gives torch's gradient (the second gave the first's times grad_output again: the
    gradient formed in the forward was rescaled in place twice, as the traced graph does
    not replay the backward taking it from the context)."""
    gen = torch.Generator().manual_seed(0)
    h0, W0 = (torch.randn(*s, dtype=torch.float64, generator=gen).to(device) for s in ((4, 3), (5, 3)))
    t = torch.tensor([0, 3, 1, 4], device=device)
    grads = []
    for lib in (fs, F):
        h, W = h0.clone().requires_grad_(), W0.clone().requires_grad_()
        if lib is fs and case == "linear_cross_entropy":
            loss = 3.0 * fs.linear_cross_entropy(h, W, t, chunk_size=2)
        else:
            kw = dict(inplace_backward=True) if lib is fs and case == "inplace_backward" else {}
            loss = 3.0 * lib.cross_entropy(h @ W.T, t, **kw)
        for _ in range(2):
            torch._dynamo.reset()
            with torch._dynamo.compiled_autograd._enable(torch.compile(backend="aot_eager")):
                loss.backward(retain_graph=True)
            grads.append((h.grad.clone(), W.grad.clone()))
            h.grad = W.grad = None
    torch.testing.assert_close(grads[:2], grads[2:])


@pytest.mark.parametrize("case", ["cross_entropy", "inplace_backward", "none-fp16",
                                  "linear_cross_entropy", "linear_cross_entropy-none"])
def test_compiled_autograd_after_a_compiled_forward(case, device):
    """A forward compiled with torch.compile, its backward traced by compiled autograd: the
    tensors the forward holds for the backward outside save_for_backward (the fused
    gradients, the rescale's target, the linear loss's bias) are saved with the others
    under torch.compile, as compiled autograd does not hand the held ones to the backward
    it traces (an IndexError in AOTAutograd's backward prologue)."""
    gen = torch.Generator().manual_seed(0)
    h0, W0, b0 = (torch.randn(*s, dtype=torch.float64, generator=gen).to(device)
                  for s in ((6, 5), (7, 5), (7,)))
    t = torch.tensor([0, 6, -100, 3, 2, 1], device=device)

    def loss_of(lib, h, W, b):
        if case.startswith("linear"):
            kw = dict(reduction="none") if case.endswith("none") else {}
            loss = (fs.linear_cross_entropy(h, W, t, linear_bias=b, **kw) if lib is fs
                    else F.cross_entropy(F.linear(h, W, b), t, **kw))
        elif case == "none-fp16":  # the gradient formed in the backward (fp16, per-row scale)
            loss = lib.cross_entropy(F.linear(h, W, b).half(), t, reduction="none").double()
        else:
            kw = dict(inplace_backward=True) if lib is fs and case == "inplace_backward" else {}
            loss = lib.cross_entropy(F.linear(h, W, b), t, label_smoothing=0.1, **kw)
        return (loss ** 2).sum()

    grads = []
    for lib in (fs, F):
        h, W, b = (a.clone().requires_grad_() for a in (h0, W0, b0))
        torch._dynamo.reset()
        with torch._dynamo.compiled_autograd._enable(torch.compile(backend="aot_eager")):
            torch.compile(loss_of, backend="aot_eager")(lib, h, W, b).backward()
        grads.append((h.grad, W.grad, b.grad))
    tol = dict(rtol=2e-3, atol=2e-3) if case == "none-fp16" else {}
    torch.testing.assert_close(grads[0], grads[1], **tol)


def test_ops_differentiate_their_loss_only(device):
    """The two ops an exported program calls differentiate their loss; their other outputs
    (lse, the forward's gradients) are not differentiable, rather than a gradient silently
    dropped (d sum(lse)/dx came back 0)."""
    from fused_softmax.cross_entropy import cross_entropy_fwd
    from fused_softmax.linear_cross_entropy import linear_cross_entropy_fwd
    x = torch.randn(4, 5, device=device, requires_grad=True)
    h = torch.randn(4, 3, device=device, requires_grad=True)
    W = torch.randn(5, 3, device=device, requires_grad=True)
    t, s = torch.tensor([0, 4, 2, 1], device=device), torch.tensor([1.0, 5.0], device=device)
    ce = cross_entropy_fwd(x, t, None, s, -100, 0.0, 1.0, 0.0, 0.0, False, True)
    lce = linear_cross_entropy_fwd(h, W, None, t, None, s, None, -100, 0.0, 1.0, 0.0, 0.0, False,
                                   5, 2, True, True, False)
    for out in (ce, lce):
        assert out[0].requires_grad and not any(o.requires_grad for o in out[1:])
    torch.testing.assert_close(torch.autograd.grad(ce[0].sum(), x)[0],
                               torch.autograd.grad(F.cross_entropy(x, t, reduction="sum"), x)[0])


# --------------------------------------------------------------------------- linear_cross_entropy
@pytest.mark.skipif(not hasattr(F, "linear_cross_entropy"), reason="torch < 2.13 has no linear_cross_entropy")
def test_linear_cross_entropy_edges_like_torch(device):
    x = torch.randn(5, 8, device=device)
    W = torch.randn(7, 8, device=device)
    t = torch.randint(0, 7, (5,), device=device)
    for args, kw in [((x.long(), W, t), {}), ((x, W, t), dict(ignore_index=1.5)), ((x, W, t[:3]), {}),
                     ((x, W, t[0]), {}), ((x[0], W, t[:2]), {}), ((x, W[:0], t), {})]:
        same_error(F.linear_cross_entropy, fs.linear_cross_entropy, *args, **kw)
    torch.testing.assert_close(fs.linear_cross_entropy(x, W, t, label_smoothing=math.nan),
                               F.linear_cross_entropy(x, W, t, label_smoothing=math.nan))
    t8 = torch.tensor([156, 3], dtype=torch.uint8, device=device)
    x2, W2 = torch.randn(2, 8, device=device), torch.randn(200, 8, device=device)
    torch.testing.assert_close(fs.linear_cross_entropy(x2, W2, t8), F.linear_cross_entropy(x2, W2, t8))
    ignored = torch.full((5,), -100, device=device)
    torch.testing.assert_close(fs.linear_cross_entropy(x, W[:0], ignored, reduction="none"),
                               F.linear_cross_entropy(x, W[:0], ignored, reduction="none"))
    meta = fs.linear_cross_entropy(x.to("meta"), W.to("meta"), t.to("meta"))
    assert meta.device.type == "meta" and meta.shape == ()


# --------------------------------------------------------------------------- sample
def test_greedy_number_temperature_is_torch_argmax(device):
    rows = [torch.tensor([-math.inf, math.nan, -math.inf]),
            torch.tensor([0.0] * 8193 + [math.nan]),
            torch.tensor([1.0, 1.0 + 1e-12], dtype=torch.float64),
            torch.tensor([1e39, 2e39], dtype=torch.float64)]
    for r in rows:
        r = r.to(device)
        assert int(fs.sample(r, temperature=0)) == int(r.argmax())
        assert int(fs.sample(r, temperature=0, top_p=0.5, top_k=1)) == int(r.argmax())


def test_tiny_temperature_is_greedy(device):
    x = torch.tensor([[5.0, 6.0, 1.0], [-2.0, -1.0, -3.0]], device=device)
    assert fs.sample(x, temperature=1e-38).tolist() == [1, 1]
    assert fs.sample(x, temperature=torch.tensor([1e-38, 1e-40], device=device)).tolist() == [1, 1]


def test_sample_argument_types(device):
    x = torch.randn(10, device=device)
    with pytest.raises(TypeError, match="top_k"):
        fs.sample(x, top_k=10.5)
    with pytest.raises(TypeError, match="top_k"):
        fs.sample(x, top_k=math.inf)


def test_sample_compiles_fullgraph(device):
    x = torch.randn(3, 50, device=device)
    f = torch.compile(lambda a: fs.sample(a, temperature=0.7, top_p=0.9, top_k=5), fullgraph=True)
    ids = f(x)
    assert ids.shape == (3,) and ids.dtype == torch.int64
    top5 = x.topk(5, dim=-1).indices
    assert (ids[:, None] == top5).any(1).all()
    g = torch.compile(lambda a, t: fs.sample(a, temperature=t), fullgraph=True)
    ids = g(x, torch.tensor([0.5, 0.0, 1.0], device=device))
    assert int(ids[1]) == int(x[1].argmax())


def test_ignored_row_gradient_is_zero_whatever_grad_output(device):
    """reduction='none': a NaN or inf grad_output on an ignored row leaves its gradient 0
    (torch's too: nll_loss never reads it)."""
    t = torch.tensor([-100, 1], device=device)
    up = torch.tensor([math.nan, 1.0], device=device)
    x = torch.zeros(2, 3, device=device, requires_grad=True)
    fs.cross_entropy(x, t, reduction="none").backward(up)
    x2 = torch.zeros(2, 3, device=device, requires_grad=True)
    F.cross_entropy(x2, t, reduction="none").backward(up)
    torch.testing.assert_close(x.grad, x2.grad)
    h = torch.randn(2, 4, device=device, requires_grad=True)
    W = torch.randn(3, 4, device=device, requires_grad=True)
    fs.linear_cross_entropy(h, W, t, reduction="none").backward(up)
    h2, W2 = h.detach().clone().requires_grad_(), W.detach().clone().requires_grad_()
    F.cross_entropy(F.linear(h2, W2), t, reduction="none").backward(up)
    torch.testing.assert_close(h.grad, h2.grad)
    torch.testing.assert_close(W.grad, W2.grad)


def test_mean_over_zero_total_weight_is_nan(device):
    x = torch.zeros(2, 3, device=device)
    t = torch.tensor([0, 1], device=device)
    w = torch.tensor([0.0, 0.0, 1.0], device=device)
    for smoothing in (0.0, 0.2):
        assert torch.isnan(F.cross_entropy(x, t, weight=w, label_smoothing=smoothing))
        assert torch.isnan(fs.cross_entropy(x, t, weight=w, label_smoothing=smoothing))
        assert torch.isnan(fs.linear_cross_entropy(torch.zeros(2, 4, device=device),
                                                   torch.zeros(3, 4, device=device), t,
                                                   weight=w, label_smoothing=smoothing))


def test_sample_temperature_none_is_a_type_error(device):
    with pytest.raises(TypeError, match="temperature"):
        fs.sample(torch.randn(10, device=device), temperature=None)


def test_linear_cross_entropy_takes_torchs_options_argument(device):
    x, W = torch.randn(3, 4, device=device), torch.randn(5, 4, device=device)
    t = torch.tensor([0, 4, 2], device=device)
    torch.testing.assert_close(fs.linear_cross_entropy(x, W, t, options=None),
                               F.cross_entropy(F.linear(x, W), t))
    m = fs.nn.LinearCrossEntropyLoss(4, 5, out_features=[2])
    assert m.out_features == [2] and m.options is None and "options=None" in repr(m)


@pytest.mark.parametrize("kw", [dict(), dict(label_smoothing=0.2, reduction="sum"),
                                dict(reduction="none", ignore_index=1)], ids=["mean", "smooth-sum", "none"])
def test_cross_entropy_double_backward_matches_torch(kw, device):
    """create_graph=True (gradient penalties, Hessians; patched F.cross_entropy too)."""
    x = torch.randn(4, 5, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.tensor([0, kw.get("ignore_index", -100), 3, 1], device=device)
    w = torch.rand(5, dtype=torch.float64, device=device)
    ours = torch.autograd.functional.hessian(lambda a: fs.cross_entropy(a, t, w, **kw).sum(), x)
    theirs = torch.autograd.functional.hessian(lambda a: F.cross_entropy(a, t, w, **kw).sum(), x)
    torch.testing.assert_close(ours, theirs)
    assert torch.autograd.gradgradcheck(lambda a: fs.cross_entropy(a, t, **kw), (x,))
    with fs.patch():
        g, = torch.autograd.grad(F.cross_entropy(x, t, w, **kw).sum(), x, create_graph=True)
        (g * g).sum().backward()
    ref_x = x.detach().clone().requires_grad_()
    g2, = torch.autograd.grad(F.cross_entropy(ref_x, t, w, **kw).sum(), ref_x, create_graph=True)
    (g2 * g2).sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad)


_LOSS_OF_LOSS = {
    "ce-none": lambda ce, z, t, p, W: (ce(z, t, reduction="none") ** 2).sum(),
    "ce-mean": lambda ce, z, t, p, W: ce(z, t, label_smoothing=0.2) ** 3,
    "ce-prob": lambda ce, z, t, p, W: ce(z, p, reduction="none").exp().sum(),
    "lce-rows": lambda ce, z, t, p, W: (_lce(ce, z, W, t, chunk_size=2) ** 2).sum(),
    "lce-vocab": lambda ce, z, t, p, W: _lce(ce, z, W, t, vocab_chunk_size=2).exp(),
}


def _lce(ce, h, W, t, **chunks):
    if ce is F.cross_entropy:
        return F.cross_entropy(h @ W.T, t, reduction="none" if "chunk_size" in chunks else "mean")
    return fs.linear_cross_entropy(h, W, t, reduction="none" if "chunk_size" in chunks else "mean",
                                   **chunks)


@pytest.mark.parametrize("case", list(_LOSS_OF_LOSS))
def test_second_derivatives_of_a_function_of_the_loss(case, device):
    """A Hessian (and create_graph=True) of a function of the loss that is not linear in it:
    the backward's grad_output (``2 * loss`` for ``loss ** 2``) depends on the same inputs.
    It entered the differentiable backward as a factor, so autograd differentiated it too:
    gradients 3x torch's, Hessians off by O(1), memory growing without bound for a weighted
    smoothed loss."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(3, 5, dtype=torch.float64, generator=gen).to(device)
    p = torch.randn(3, 5, dtype=torch.float64, generator=gen).softmax(-1).to(device)
    W = torch.randn(5, 5, dtype=torch.float64, generator=gen).to(device)
    t = torch.tensor([1, 3, 0], device=device)
    f = _LOSS_OF_LOSS[case]
    for wrt in ((0, 1) if case.startswith("lce") else (0,)):
        def of(ce):
            return lambda a: f(ce, *((a, t, p, W) if wrt == 0 else (z, t, p, a)))
        arg = (z, W)[wrt]
        ours, theirs = (torch.autograd.functional.hessian(of(ce), arg)
                        for ce in (fs.cross_entropy, F.cross_entropy))
        torch.testing.assert_close(ours, theirs)
        a = arg.clone().requires_grad_()
        g_ours, = torch.autograd.grad(of(fs.cross_entropy)(a), a, create_graph=True)
        g_theirs, = torch.autograd.grad(of(F.cross_entropy)(a), a, create_graph=True)
        torch.testing.assert_close(g_ours, g_theirs)


def _tied(lib, W, **chunks):  # input rows taken from the head itself (tied embeddings)
    x, t = W[[1, 0, 3, 2]] * 2.0, torch.tensor([0, 3, 1, 4], device=W.device)
    return fs.linear_cross_entropy(x, W, t, **chunks) if lib is fs else F.cross_entropy(x @ W.T, t)


_DEPENDENT_INPUTS = {  # a second differentiable input computed from the first
    "soft-target-of-logits": lambda lib, z: lib.cross_entropy(z, torch.softmax(0.5 * z, 1)),
    "weight-of-logits": lambda lib, z: lib.cross_entropy(  # (a probability target: torch
        # refuses a class weight that requires grad with class indices)
        z, torch.eye(5, dtype=z.dtype, device=z.device).roll(1, 0) * 0.8 + 0.04,
        weight=torch.sigmoid(z.sum(0)) + 0.5),
    "tied-rows": lambda lib, W: _tied(lib, W, chunk_size=2),
    "tied-vocab": lambda lib, W: _tied(lib, W, vocab_chunk_size=2),
    "bias-of-head": lambda lib, W: (
        fs.linear_cross_entropy(W[:4, :] * 0 + 1.5, W, torch.tensor([0, 3, 1, 4], device=W.device),
                                linear_bias=W.sum(1), chunk_size=2) if lib is fs else
        F.cross_entropy(F.linear(W[:4, :] * 0 + 1.5, W, W.sum(1)),
                        torch.tensor([0, 3, 1, 4], device=W.device))),
}


@pytest.mark.parametrize("case", list(_DEPENDENT_INPUTS))
def test_create_graph_with_one_input_computed_from_another(case, device):
    """create_graph=True where a differentiable input is a function of another (a soft
    target or class weight formed from the logits, an input row or a bias taken from a tied
    head): the backward's partial derivatives are each input's own (its torch-op
    recomputation followed one input into the other as well: the same path counted twice,
    first derivatives up to 3x torch's); second derivatives too."""
    leaf = torch.randn(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    leaf = leaf.to(device)
    f = _DEPENDENT_INPUTS[case]
    grads = []
    for lib in (fs, F):
        a = leaf.clone().requires_grad_()
        g, = torch.autograd.grad(f(lib, a) ** 2, a, create_graph=True)
        grads.append((g, torch.autograd.grad((g * g).sum(), a)[0]))
    torch.testing.assert_close(grads[0], grads[1])


def test_ignored_rows_ignore_an_infinite_scalar_grad_output(device):
    x = torch.zeros(2, 3, device=device, requires_grad=True)
    fs.cross_entropy(x, torch.tensor([-100, 1], device=device)).backward(torch.tensor(math.inf, device=device))
    assert torch.equal(x.grad[0], torch.zeros(3, device=device))


def test_vocab_parallel_edges_in_a_world_of_one(device):
    from fused_softmax.distributed import vocab_parallel_cross_entropy as vp
    for reduction in ("mean", "sum", "none"):
        x = torch.randn(0, 5, device=device, requires_grad=True)
        t = torch.zeros(0, dtype=torch.long, device=device)
        torch.testing.assert_close(vp(x, t, reduction=reduction), F.cross_entropy(x, t, reduction=reduction),
                                   equal_nan=True)
    x = torch.randn(3, 5, device=device, requires_grad=True)
    t = torch.tensor([1, -100, 2], device=device)
    vp(x, t, reduction="none").backward(torch.tensor([1.0, math.nan, 1.0], device=device))
    assert torch.equal(x.grad[1], torch.zeros(5, device=device))
    with pytest.raises(RuntimeError, match="Long but found Byte"):
        vp(torch.randn(2, 5, 3, device=device), torch.zeros(2, 3, dtype=torch.uint8, device=device))
    with pytest.raises(RuntimeError):
        vp(torch.randn(2, 5, device=device), torch.tensor([0, 1], device=device), weight=torch.ones(4, device=device))


def test_vocab_parallel_in_a_world_of_one_is_cross_entropy_under_transforms(device):
    """torch.func transforms (no rules for the custom ops) and no classes at all: in a
    world of 1, cross_entropy's own answers (an autograd.Function error and a loss of 0
    where torch's is NaN before)."""
    from fused_softmax.distributed import vocab_parallel_cross_entropy as vp
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(3, 5, generator=gen).to(device)
    t = torch.tensor([1, 4, -100], device=device)
    for ls in (0.0, 0.2):
        torch.testing.assert_close(torch.func.grad(lambda z: vp(z, t, label_smoothing=ls))(x),
                                   torch.func.grad(lambda z: F.cross_entropy(z, t, label_smoothing=ls))(x))
    xb = torch.randn(2, 3, 5, generator=gen).to(device)
    torch.testing.assert_close(torch.vmap(lambda z: vp(z, t))(xb),
                               torch.vmap(lambda z: F.cross_entropy(z, t))(xb))
    empty, ignored = torch.randn(3, 0, device=device), torch.full((3,), -100, device=device)
    for reduction in ("mean", "sum", "none"):
        torch.testing.assert_close(
            vp(empty, ignored, reduction=reduction, label_smoothing=0.2),
            F.cross_entropy(empty, ignored, reduction=reduction, label_smoothing=0.2), equal_nan=True)


LOSSES = {
    "cross_entropy": (lambda x, w, b, t, **kw: fs.cross_entropy(x @ w.T + b, t, **kw),
                      lambda x, w, b, t, **kw: F.cross_entropy(x @ w.T + b, t, **kw)),
    "cross_entropy inplace_backward": (
        lambda x, w, b, t, **kw: fs.cross_entropy(x @ w.T + b, t, inplace_backward=True, **kw),
        lambda x, w, b, t, **kw: F.cross_entropy(x @ w.T + b, t, **kw)),
    "linear_cross_entropy": (
        lambda x, w, b, t, **kw: fs.linear_cross_entropy(x, w, t, linear_bias=b, **kw),
        lambda x, w, b, t, **kw: F.cross_entropy(F.linear(x, w, b), t, **kw)),
}


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("kw", [{}, dict(reduction="none"), dict(label_smoothing=0.2, reduction="sum")])
def test_batched_grad_outputs(loss, dtype, kw, device):
    """``autograd.grad(..., is_grads_batched=True)`` (autograd's vmap over the backward: a
    vectorized jacobian, ``gradcheck(check_batched_grad=True)``): the in-place rescale of
    the fused gradient cannot take a batched grad_output, so the backward forms it out of
    place there (it raised a batching-rule error)."""
    gen = torch.Generator().manual_seed(13)
    x, w, b = (torch.randn(*s, generator=gen, dtype=torch.float64).to(device) for s in ((4, 6), (5, 6), (5,)))
    t = torch.tensor([0, 4, -100, 2], device=device)
    ours, theirs = LOSSES[loss]
    grads = []
    for f in (ours, theirs):
        ins = [a.to(dtype).requires_grad_(True) for a in (x, w, b)]
        out = f(*ins, t, **kw)
        v = torch.randn((3, *out.shape), generator=gen.manual_seed(14), dtype=torch.float64).to(device)
        grads.append(torch.autograd.grad(out, ins, v.to(dtype), is_grads_batched=True))
    eps = torch.finfo(dtype).eps
    for g, e in zip(*grads):
        torch.testing.assert_close(g, e, rtol=16 * eps, atol=16 * eps * float(e.abs().max()))


def test_smoothed_probability_target_may_change_in_place_after_the_forward(device):
    """torch saves the smoothed copy of a probability target, not the target: changing it
    after the forward is allowed there, and here (the class weight is still checked)."""
    gen = torch.Generator().manual_seed(15)
    x = torch.randn(3, 5, generator=gen).to(device)
    p = torch.softmax(torch.randn(3, 5, generator=gen), 1).to(device)
    grads = []
    for f in (fs.cross_entropy, F.cross_entropy):
        a, pc = x.clone().requires_grad_(True), p.clone()
        loss = f(a, pc, label_smoothing=0.1)
        pc.zero_()
        grads.append(torch.autograd.grad(loss, a)[0])
    torch.testing.assert_close(*grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_bias_may_change_in_place_after_the_forward(dtype, device):
    """torch's addmm saves no bias: changing it after the forward is allowed there, and in
    the fused path here (its first backward reads no saved tensor); the input's and the
    head's change is autograd's error in both."""
    gen = torch.Generator().manual_seed(16)
    x, w, b = (torch.randn(*s, generator=gen).to(dtype).to(device) for s in ((4, 6), (5, 6), (5,)))
    t = torch.tensor([1, 2, 3, 0], device=device)
    grads = []
    for f in (lambda x, w, b: fs.linear_cross_entropy(x, w, t, linear_bias=b),
              lambda x, w, b: F.cross_entropy(F.linear(x, w, b), t)):
        leaves = [a.clone().requires_grad_(True) for a in (x, w, b)]
        xs, ws, bs = (a * 1 for a in leaves)
        loss = f(xs, ws, bs)
        bs.add_(1.0)
        grads.append(torch.autograd.grad(loss, leaves))
        for changed in ("x", "w"):
            xs, ws, bs = (a * 1 for a in leaves)
            loss = f(xs, ws, bs)
            (xs if changed == "x" else ws).add_(1.0)
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                torch.autograd.grad(loss, leaves)
    eps = torch.finfo(dtype).eps
    for g, e in zip(*grads):
        torch.testing.assert_close(g, e, rtol=8 * eps, atol=8 * eps)


def test_class_weight_shapes_like_torch(device):
    x3, t3 = torch.randn(2, 5, 3, device=device), torch.randint(0, 5, (2, 3), device=device)
    w = torch.rand(1, 5, device=device)
    torch.testing.assert_close(fs.cross_entropy(x3, t3, weight=w), F.cross_entropy(x3, t3, weight=w))
    same_error(F.cross_entropy, fs.cross_entropy, torch.randn(2, 5, device=device),
               torch.tensor([0, 1], device=device), weight=w)
    with fs.patch():
        same_error(fs.patch.__globals__["_ORIGINALS"]["cross_entropy"], F.cross_entropy,
                   torch.randn(2, 5, device=device), torch.tensor([0, 1], device=device).int())


def test_softcap_is_accurate_for_small_logits(device):
    """tanh of small arguments: the closed form 1 - 2/(exp(2u)+1) lost ~1000x torch's
    accuracy at softcap=1000; now within a few ulps of fp64."""
    x = torch.tensor([[1e-3, 2e-3, -1e-3, 0.0], [0.3, -2.0, 5.0, 0.01]], device=device)
    t = torch.tensor([0, 2], device=device)
    for cap in (1000.0, 30.0, 2.0):
        loss, lse = fs.cross_entropy(x, t, softcap=cap, return_lse=True, reduction="none")
        z = cap * torch.tanh(x.double().cpu() / cap)
        ref = F.cross_entropy(z, t.cpu(), reduction="none")
        torch.testing.assert_close(loss.cpu().double(), ref, rtol=4e-7, atol=4e-7)
        torch.testing.assert_close(lse.cpu().double(), torch.logsumexp(z, -1), rtol=4e-7, atol=4e-7)


def test_returned_lse_is_torch_logsumexp_on_infinite_rows(device):
    x = torch.tensor([[math.inf, 0.0, 1.0], [-math.inf, -math.inf, -math.inf], [0.0, 1.0, 2.0]],
                     device=device)
    t = torch.tensor([1, 0, 2], device=device)
    loss, lse = fs.cross_entropy(x, t, reduction="none", return_lse=True)
    torch.testing.assert_close(lse, torch.logsumexp(x, -1))
    torch.testing.assert_close(loss, F.cross_entropy(x, t, reduction="none"), equal_nan=True)


def test_zero_total_weight_mean_gradient_is_nan_like_torch(device):
    x = torch.tensor([[0.5, -0.2, 0.1]], device=device, requires_grad=True)
    t = torch.tensor([1], device=device)
    w = torch.tensor([1.0, 0.0, 1.0], device=device)
    fs.cross_entropy(x, t, weight=w, label_smoothing=0.1).backward()
    assert torch.isnan(x.grad).all()


# --------------------------------------------------------------------------- softmax extremes
@pytest.mark.parametrize("n", [3, 4, 5000])
def test_temperature_beyond_fp32_reciprocal(n, device):
    """T beyond fp32's range (1/T rounds to 0): torch's softmax(x / T), in which x / T is
    0 for finite logits (a uniform softmax) and NaN for -inf ones (-inf / inf): the whole
    row is NaN then. The kernels' padding lanes never turn a row NaN (-inf * 0): a row
    without -inf is uniform at every length."""
    x = torch.linspace(-1, 1, n, device=device)
    finite = x.clone()
    x[1] = -math.inf
    for op, top in ((fs.softmax, torch.softmax), (fs.log_softmax, torch.log_softmax)):
        torch.testing.assert_close(op(x, 0, temperature=1e50), top(x / 1e50, 0),
                                   equal_nan=True)
        assert bool(op(x, 0, temperature=1e50).isnan().all())
        uniform = torch.full((n,), 1.0 / n, dtype=torch.float64)
        got = op(finite, 0, temperature=1e50).cpu().double()
        torch.testing.assert_close(got, uniform if op is fs.softmax else uniform.log(),
                                   rtol=1e-6, atol=0)


def test_fp64_temperature_below_fp32_range(device):
    """fp64 with 1/T beyond fp32 (T = 2.9e-39): as fp64 torch's x / T, value and gradient."""
    x = torch.tensor([1.0, 0.5, -1.0, 0.999], dtype=torch.float64, device=device)
    for op, top in ((fs.softmax, torch.softmax), (fs.log_softmax, torch.log_softmax)):
        a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        got, exp = op(a, 0, temperature=2.9e-39), top(b / 2.9e-39, 0)
        torch.testing.assert_close(got, exp)
        up = torch.tensor([0.3, -1.0, 2.0, 0.5], dtype=torch.float64, device=device)
        got.backward(up)
        exp.backward(up)
        torch.testing.assert_close(a.grad, b.grad)


def test_fp64_scalars_reach_the_kernels_exactly(device):
    """fp64 kernels see a float argument's every bit (it travels as its fp64 bits): 1/T for
    T = 3 is the fp64 reciprocal, so log_softmax of a logit of -1e5 matches torch's x / 3
    to an fp64 ulp or two (1/3 as two fp32 halves was off by 8.7e-11 here), and
    cross_entropy's logit_scale / softcap work beyond fp32's range."""
    x = torch.tensor([-3e5, 0.0, 1.0], dtype=torch.float64, device=device)
    got = fs.log_softmax(x, 0, temperature=3.0)
    exp = torch.log_softmax(x / 3.0, 0)
    torch.testing.assert_close(got, exp, rtol=0, atol=4 * 2**-52 * 1e5 / 4)
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(4, 7, generator=gen, dtype=torch.float64).to(device)
    t = torch.tensor([0, 3, 6, 2], device=device)
    a = (z * 1e-40).requires_grad_(True)
    loss = fs.cross_entropy(a, t, logit_scale=1e40, softcap=1e39, reduction="none")
    b = (z * 1e-40).requires_grad_(True)
    scaled = b * 1e40
    ref = F.cross_entropy(1e39 * torch.tanh(scaled / 1e39), t, reduction="none")
    torch.testing.assert_close(loss, ref)
    up = torch.tensor([1.0, -0.5, 2.0, 0.25], dtype=torch.float64, device=device)
    loss.backward(up)
    ref.backward(up)
    torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("path", ["kernel", "torch.func"])
def test_temperature_rounds_x_over_t_as_torch(dtype, path, device):
    """softmax(x, temperature=T) is torch's softmax(x / T): x / T rounded to fp16 / bf16
    (which moves [10, 10.01, 9.99] / 0.01 by a tenth), an overflow to inf included (NaN)."""
    gen = torch.Generator().manual_seed(4)
    x = torch.cat([torch.tensor([[10.0, 10.01, 9.99, 0.0]]), torch.randn(6, 4, generator=gen) * 3])
    x = x.to(dtype).to(device)
    big = torch.tensor([[60000.0, 0.0, 1.0, 2.0]], dtype=dtype, device=device)
    if dtype == torch.bfloat16:
        big[0, 0] = 3e38  # / 0.5 overflows bf16 too
    x = torch.cat([x, big])
    for name, T in itertools.product(("softmax", "log_softmax"), (0.01, 0.5, 0.7, 3.0)):
        # torch's x / T, the rest in fp64: torch's own fp16 log_softmax is 1e-3 off near 0
        z = x / T
        ref = getattr(F, name)(z.double(), -1).to(dtype)
        assert_same_nonfinite(getattr(F, name)(z, -1), ref)
        if path == "kernel":
            got = getattr(fs, name)(x, -1, temperature=T)
        else:  # torch's own ops on x / T: torch's result
            got = torch.func.vmap(lambda v, n=name, t=T: getattr(fs, n)(v, 0, temperature=t))(x)
            ref = getattr(F, name)(z, -1)
        torch.testing.assert_close(got, ref, equal_nan=True, msg=f"{name} T={T}")
        if T == 0.5:
            assert got[-1].isnan().all()  # x / T overflowed: torch's NaN row


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_x_over_t_formed_as_torch_forms_it_on_the_device(dtype, device):
    """torch's ``x / T`` divides on the CPU and multiplies by the rounded reciprocal on
    CUDA; at logits near 1e4 (fp32) the two differ by an ulp of ``x / T``, which the
    softmax turns into a relative error of 1e-4 (out of fp32's tolerance). The kernels
    form ``x / T`` as torch does on the tensor's device: the exact softmax of torch's
    ``x / T`` to the dtype's tolerance, where a multiply on the CPU was 2.8e-4 off."""
    gen = torch.Generator().manual_seed(21)
    scale = {torch.float32: 1e4, torch.float16: 30.0, torch.float64: 1e12}[dtype]
    x = (scale + torch.randn(16, 40, generator=gen, dtype=torch.float64) * 3).to(dtype)
    x = x.to(device)
    for name, T in itertools.product(("softmax", "log_softmax"), (0.03, 0.7, 1.3, 3.0)):
        # torch's x / T, the rest in fp64 (torch's own fp16 log_softmax is 1e-3 off near 0)
        ref = getattr(F, name)((x / T).double(), -1).to(dtype)
        got = getattr(fs, name)(x, -1, temperature=T)
        torch.testing.assert_close(got, ref, msg=f"{name} T={T}")


def test_temperature_derivative_at_minus_inf_under_torch_func(device):
    """Under torch.func (and forward-mode AD) the temperature is torch's own ``x / T``, so
    the derivative at a ``-inf`` logit is torch's (``1 / T`` of the tangent), not 1."""
    x = torch.tensor([1.0, -math.inf, 0.5], dtype=torch.float64, device=device)
    w = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, device=device)
    for name in ("softmax", "log_softmax"):
        ours = torch.func.grad(lambda v: (getattr(fs, name)(v, 0, temperature=2.0) * w).sum())(x)
        ref = torch.func.grad(lambda v: (getattr(F, name)(v / 2.0, 0) * w).sum())(x)
        torch.testing.assert_close(ours, ref, equal_nan=True)
        tangent = torch.ones_like(x)
        jo = torch.func.jvp(lambda v: getattr(fs, name)(v, 0, temperature=2.0), (x,), (tangent,))
        jr = torch.func.jvp(lambda v: getattr(F, name)(v / 2.0, 0), (x,), (tangent,))
        torch.testing.assert_close(jo, jr, equal_nan=True)


def assert_same_nonfinite(a, b):
    assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf())


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_tensor_temperature_is_input_over_t(name, device):
    """A tensor temperature is torch's input / T: broadcast (one per row here), its
    gradient computed, and compiled without a graph break."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 6, generator=gen, dtype=torch.float64).to(device)
    T0 = torch.tensor([[0.5], [1.0], [2.5]], dtype=torch.float64, device=device)
    fn, ref_fn = getattr(fs, name), getattr(F, name)
    T, Tr = T0.clone().requires_grad_(), T0.clone().requires_grad_()
    got, ref = fn(x, -1, temperature=T), ref_fn(x / Tr, -1)
    torch.testing.assert_close(got, ref)
    w = torch.randn(3, 6, generator=gen, dtype=torch.float64).to(device)
    (got * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(T.grad, Tr.grad)
    compiled = torch.compile(lambda a, t: fn(a, -1, temperature=t), fullgraph=True,
                             backend="eager")
    torch.testing.assert_close(compiled(x, T0), ref.detach())
    half = x.to(torch.float16)  # dtype= casts first, then the division
    torch.testing.assert_close(fn(half, -1, dtype=torch.float32, temperature=T0.float()),
                               ref_fn(half.float() / T0.float(), -1))
    # the result in dtype= where given, though T's dtype promotes the quotient
    narrow = fn(x.float(), -1, dtype=torch.float16, temperature=T0.float())
    assert narrow.dtype == torch.float16
    torch.testing.assert_close(narrow, ref_fn(x.float() / T0.float(), -1, dtype=torch.float16))
    # the legacy dim=None rule applies to the quotient's rank (torch's softmax(v / T))
    v, T2 = x[0], T0[:2]
    with pytest.warns(UserWarning, match="Implicit dimension choice"):
        torch.testing.assert_close(fn(v, temperature=T2), ref_fn(v / T2, 1))
    assert "temperature=" in repr(fs.nn.Softmax(1, temperature=T0))


@pytest.mark.parametrize("bad", ["2", None, [2.0], True])
def test_temperature_of_another_type_is_a_type_error(bad, device):
    with pytest.raises(TypeError, match="temperature must be a number or a tensor"):
        fs.softmax(torch.randn(2, 3, device=device), -1, temperature=bad)


def test_fx_symbolic_trace_records_the_fused_functions(device):
    """torch.fx traces through __torch_function__, as for torch's own functions: the graph
    calls ours, and runs as the module does."""
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.sm = fs.nn.Softmax(1)
            self.loss = fs.nn.CrossEntropyLoss(label_smoothing=0.1)

        def forward(self, x, t, h, w):
            return (self.sm(x).sum() + fs.log_softmax(x, 0, temperature=2.0).sum()
                    + fs.logsumexp(x, 1).sum() + self.loss(x, t) + fs.cross_entropy(x, t)
                    + fs.linear_cross_entropy(h, w, t))

    graph_module = torch.fx.symbolic_trace(Model())
    called = {n.target for n in graph_module.graph.nodes if n.op == "call_function"}
    assert {fs.softmax, fs.log_softmax, fs.logsumexp, fs.cross_entropy,
            fs.linear_cross_entropy} <= called
    gen = torch.Generator().manual_seed(6)
    x, h = torch.randn(4, 7, generator=gen).to(device), torch.randn(4, 5, generator=gen).to(device)
    w, t = torch.randn(7, 5, generator=gen).to(device), torch.tensor([0, 3, 6, 1], device=device)
    torch.testing.assert_close(graph_module(x, t, h, w), Model()(x, t, h, w))


class _Subclass(torch.Tensor):
    pass


@pytest.mark.parametrize("call", [
    lambda a: fs.softmax(a, -1), lambda a: fs.log_softmax(a, 0, temperature=2.0),
    lambda a: fs.logsumexp(a, 1), lambda a: fs.cross_entropy(a, torch.arange(3, device=a.device))],
    ids=["softmax", "log_softmax", "logsumexp", "cross_entropy"])
def test_tensor_subclass_compiles_fullgraph(call, device):
    """A __torch_function__ subclass: eager dispatches through it, as torch's functions do;
    torch.compile(fullgraph=True) sees the subclass itself (no second dispatch)."""
    x = torch.randn(3, 4, device=device)
    sub = x.as_subclass(_Subclass)
    eager = call(sub)
    compiled = torch.compile(call, fullgraph=True, backend="eager")(sub)
    assert type(eager) is _Subclass and type(compiled) is _Subclass
    torch.testing.assert_close(compiled.as_subclass(torch.Tensor), call(x))
    torch.testing.assert_close(eager.as_subclass(torch.Tensor), call(x))


def test_inplace_backward_compiles_fullgraph(device):
    t = torch.tensor([1, 0, 3], device=device)
    w = torch.randn(3, 5, device=device, requires_grad=True)
    compiled = torch.compile(lambda z: fs.cross_entropy(z * 1, t, inplace_backward=True),
                             fullgraph=True, backend="aot_eager")
    loss = compiled(w)
    loss.backward()
    w2 = w.detach().clone().requires_grad_()
    F.cross_entropy(w2, t).backward()
    torch.testing.assert_close(loss, F.cross_entropy(w.detach(), t))
    torch.testing.assert_close(w.grad, w2.grad)


def test_logsumexp_out_compiles_fullgraph(device):
    x, out = torch.randn(3, 4, device=device), torch.empty(3, device=device)
    compiled = torch.compile(lambda a, o: fs.logsumexp(a, 1, out=o), fullgraph=True,
                             backend="eager")
    got = compiled(x, out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, torch.logsumexp(x, 1))


@pytest.mark.parametrize("cls,ref", [(fs.nn.Softmax, torch.softmax), (fs.nn.LogSoftmax, torch.log_softmax)])
def test_modules_script_like_torchs(cls, ref, device):
    x = torch.randn(3, 5, device=device)
    scripted = torch.jit.script(cls(dim=1, temperature=2.0))
    torch.testing.assert_close(scripted(x), ref(x / 2.0, 1))


def test_logsumexp_out_like_torch(device):
    x = torch.randn(3, 5, device=device)
    same_error(torch.logsumexp, fs.logsumexp, x, 1, out=torch.empty(3, dtype=torch.long, device=device))
    same_error(torch.logsumexp, fs.logsumexp, x.clone().requires_grad_(True), 1,
               out=torch.empty(3, device=device))
    with pytest.warns(UserWarning, match="resized"):
        fs.logsumexp(x, 1, out=torch.empty(2, device=device))
    h = (torch.randn(4, 7, generator=torch.Generator().manual_seed(1)) * 3).half().to(device)
    ours, theirs = torch.empty(4, device=device), torch.empty(4, device=device)
    fs.logsumexp(h, 1, out=ours)  # computed in out's fp32, not rounded through fp16
    torch.logsumexp(h, 1, out=theirs)
    ref = torch.logsumexp(h.double(), 1)
    assert (ours.double() - ref).abs().max() <= max((theirs.double() - ref).abs().max(), 1e-6)


# --------------------------------------------------------------------------- cross_entropy, later audit
def test_ignored_row_with_nan_logit_and_softcap_gets_zero_gradient(device):
    """Ignored rows get 0 whatever they hold, also through softcap's sech^2 (NaN there)."""
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0)).to(device)
    x[1, 2] = math.nan
    x.requires_grad_(True)
    t = torch.tensor([0, -100, 3], device=device)
    fs.cross_entropy(x, t, softcap=30.0, label_smoothing=0.1).backward()
    assert torch.equal(x.grad[1], torch.zeros_like(x.grad[1]))
    assert torch.isfinite(x.grad[[0, 2]]).all()


@pytest.mark.parametrize("shape,target,weight", [
    ((4, 5), torch.tensor(1.0), None),
    ((4, 5, 3), torch.tensor(1), None),
    ((4, 5, 3), "prob", torch.ones(5, 1)),
], ids=["0-d float target", "0-d index target, K-dim", "probabilities, 2-D weight"])
def test_more_error_types_like_torch(shape, target, weight, device):
    x = torch.randn(*shape, device=device)
    t = torch.softmax(torch.randn(*shape), 1) if isinstance(target, str) else target
    w = weight.to(device) if weight is not None else None
    same_error(F.cross_entropy, fs.cross_entropy, x, t.to(device), weight=w)


# --------------------------------------------------------------------------- autocast
def torch_ce_autocast(device):
    """torch's cross_entropy as autocast runs it on the CPU, where ``cross_entropy_loss``
    has an fp32 autocast kernel: fp32 log-probabilities, like the fused kernel's. CUDA has
    none: its log_softmax keeps the logits' fp16 / bf16 (cross_entropy passes the dtype),
    rounding each log-probability, which the fused kernel never forms (README,
    Limitations); there the reference is torch's fp32 composition."""
    if torch.device(device).type == "cpu":
        return F.cross_entropy

    def fp32(t):
        return t.float() if isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16) else t

    def ce(x, target, weight=None, **kw):
        return F.cross_entropy(fp32(x), fp32(target), weight=fp32(weight), **kw)
    return ce


def _autocast_grad(fn, x, *args, device_type, **kw):
    """``fn`` under bf16 autocast: its result and d(result.sum())/dx."""
    xl = x.clone().requires_grad_(True)
    with torch.autocast(device_type, dtype=torch.bfloat16):
        out = fn(xl, *args, **kw)
    out.float().sum().backward()
    return out.detach(), xl.grad


@pytest.mark.parametrize("kw", [{}, dict(weight="fp32"), dict(weight="bf16"), dict(prob="fp32"),
                                dict(prob="bf16"), dict(reduction="none", label_smoothing=0.1)],
                         ids=["plain", "fp32 weight", "bf16 weight", "fp32 probs", "bf16 probs",
                              "none+smoothing"])
def test_cross_entropy_under_autocast_like_torch(kw, device):
    """torch runs cross_entropy in fp32 under autocast (CPU and CUDA): an fp32 loss from bf16
    logits, fp16 / bf16 weights and probabilities cast to fp32, and a bf16 gradient."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, 9, generator=gen).bfloat16().to(device)
    kw = dict(kw)
    if "prob" in kw:
        target = torch.softmax(torch.randn(6, 9, generator=gen), 1).to(
            torch.float32 if kw.pop("prob") == "fp32" else torch.bfloat16).to(device)
    else:
        target = torch.randint(0, 9, (6,), generator=gen).to(device)
    if "weight" in kw:
        kw["weight"] = (torch.rand(9, generator=gen) + 0.5).to(
            torch.float32 if kw["weight"] == "fp32" else torch.bfloat16).to(device)
    dev = torch.device(device).type
    ours, g_ours = _autocast_grad(fs.cross_entropy, x, target, device_type=dev, **kw)
    theirs, g_theirs = _autocast_grad(torch_ce_autocast(device), x, target, device_type=dev, **kw)
    assert ours.dtype == theirs.dtype == torch.float32
    assert g_ours.dtype == g_theirs.dtype == torch.bfloat16
    torch.testing.assert_close(ours, theirs, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(g_ours, g_theirs, rtol=2**-7, atol=2**-8)
    if dev != "cpu":  # torch's own, from bf16 log-probabilities: within their rounding
        cuda_torch, _ = _autocast_grad(F.cross_entropy, x, target, device_type=dev, **kw)
        torch.testing.assert_close(ours, cuda_torch, rtol=2**-8, atol=2**-8)


def test_cross_entropy_autocast_fp64_weight_error_like_torch(device):
    x = torch.randn(3, 4, device=device).bfloat16()
    t = torch.tensor([0, 1, 2], device=device)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        same_error(F.cross_entropy, fs.cross_entropy, x, t, weight=torch.ones(4, device=device).double())


def test_autocast_table_follows_torch():
    """The devices where torch's ops autocast to fp32 come from torch's dispatcher: softmax,
    log_softmax and logsumexp on CUDA (not CPU), cross_entropy on both."""
    table = _backend._AUTOCAST_FP32
    for fn in ("softmax", "log_softmax", "logsumexp"):
        assert "cuda" in table[fn] and "cpu" not in table[fn], (fn, table[fn])
    assert {"cuda", "cpu"} <= table["cross_entropy"]


@pytest.mark.parametrize("op", ["softmax", "log_softmax", "logsumexp"])
def test_softmax_family_under_autocast_like_torch(op, device, monkeypatch):
    """Under CUDA autocast torch computes these in fp32 and returns fp32 (``dtype=float32``
    for softmax / log_softmax). On CPU, where torch does not, the rule is checked by adding
    CPU to the table and comparing with torch's fp32 result; on CUDA against torch's own."""
    dev = torch.device(device).type
    if dev == "cpu":
        monkeypatch.setitem(_backend._AUTOCAST_FP32, op, frozenset({"cpu"}))
    x = (torch.randn(5, 33, generator=torch.Generator().manual_seed(2)) * 4).half().to(device)
    ours, g_ours = _autocast_grad(getattr(fs, op), x, 1, device_type=dev)
    if dev == "cpu":
        ref_fn = {"softmax": lambda v, d: torch.softmax(v.float(), d),
                  "log_softmax": lambda v, d: torch.log_softmax(v.float(), d),
                  "logsumexp": lambda v, d: torch.logsumexp(v.float(), d)}[op]
        theirs, g_theirs = _autocast_grad(ref_fn, x, 1, device_type=dev)
    else:
        theirs, g_theirs = _autocast_grad(getattr(torch, op), x, 1, device_type=dev)
    assert ours.dtype == theirs.dtype == torch.float32
    assert g_ours.dtype == g_theirs.dtype == torch.float16
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-3, atol=1e-4)
    # an explicit dtype is kept (torch's fp32_set_opt_dtype), not overridden
    if op != "logsumexp":
        with torch.autocast(dev, dtype=torch.bfloat16):
            assert getattr(fs, op)(x, 1, dtype=torch.float64).dtype == torch.float64


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_python_type_as_dtype(op, device):
    """torch takes ``dtype=float`` (fp64)."""
    x = torch.randn(3, 4, device=device)
    got, exp = getattr(fs, op)(x, 1, dtype=float), getattr(F, op)(x, 1, dtype=float)
    assert got.dtype == exp.dtype == torch.float64
    torch.testing.assert_close(got, exp)


def test_calls_raise_no_warnings(device):
    """A program run with ``-W error`` works: the interpreter's numpy warnings (masked
    lanes' 0 / 0, its DeprecationWarnings) are not the caller's."""
    import warnings
    x = torch.randn(3, 8, device=device, requires_grad=True)
    t = torch.tensor([0, 7, 2], device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = fs.softmax(x, -1)
        y.backward(torch.ones_like(y))
        fs.cross_entropy(x, t, label_smoothing=0.1).backward()
        fs.logsumexp(x, 1)
        fs.sample(x.detach(), top_p=0.9, generator=torch.Generator(device).manual_seed(0))
    torch.testing.assert_close(y, torch.softmax(x, -1))


def test_linear_cross_entropy_autocast_casts_class_weight(device):
    """Under autocast torch's cross_entropy casts a bf16 class weight to fp32 (no dtype
    error), as it does for the logits."""
    gen = torch.Generator().manual_seed(8)
    x, w = torch.randn(6, 16, generator=gen).to(device), torch.randn(10, 16, generator=gen).to(device)
    t = torch.randint(0, 10, (6,), generator=gen).to(device)
    cw = (torch.rand(10, generator=gen) + 0.5).bfloat16().to(device)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        got = fs.linear_cross_entropy(x, w, t, weight=cw)
        exp = torch_ce_autocast(device)(F.linear(x, w), t, weight=cw)
    assert got.dtype == exp.dtype == torch.float32
    torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- tensor subclasses
def test_nested_jagged_tensors_take_torchs_ops(device):
    """Nested (jagged) tensors dispatch through torch's own ops (the custom ops have no
    nested rules): values equal torch's."""
    nt = torch.nested.nested_tensor([torch.randn(2, 5), torch.randn(3, 5)], layout=torch.jagged,
                                    device=device)
    for ours, theirs in ((fs.softmax, F.softmax), (fs.log_softmax, F.log_softmax)):
        assert torch.equal(ours(nt, -1).values(), theirs(nt, -1).values())


def test_dtensor_takes_torchs_ops(tmp_path):
    """A DTensor (one-process gloo mesh) goes through torch's ops, which have sharding
    rules; the custom ops have none and raised NotImplementedError."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available here")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdv'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        x = torch.randn(4, 9)
        t = torch.tensor([0, 3, 8, 1])
        for placement in (Replicate(), Shard(0), Shard(1)):
            dx = distribute_tensor(x, mesh, [placement])
            torch.testing.assert_close(fs.softmax(dx, -1).full_tensor(), torch.softmax(x, -1))
            torch.testing.assert_close(fs.log_softmax(dx, 1).full_tensor(), torch.log_softmax(x, 1))
            dt = distribute_tensor(t, mesh, [Replicate()])
            torch.testing.assert_close(fs.cross_entropy(dx, dt, label_smoothing=0.1).full_tensor(),
                                       F.cross_entropy(x, t, label_smoothing=0.1))
    finally:
        dist.destroy_process_group()


class _Index:
    def __index__(self):
        return 1


@pytest.mark.parametrize("dim", [torch.tensor(1), torch.tensor([1]), np.array(1), np.int64(1),
                                 torch.tensor(True), np.bool_(True), torch.tensor(1.0), _Index()],
                         ids=["0-d tensor", "1-d tensor", "0-d array", "numpy int", "bool tensor",
                              "numpy bool", "float tensor", "__index__"])
def test_dim_argument_types_like_torch(dim, device):
    """torch's parser takes a 0-d int tensor or a numpy integer as dim, not an array, a
    bool or float tensor, or another object with ``__index__`` (a bool tensor once gave
    softmax over dim 1)."""
    x = torch.randn(3, 4, device=device)
    for ours, theirs in ((fs.softmax, F.softmax), (fs.log_softmax, F.log_softmax)):
        try:
            exp = theirs(x, dim)
        except TypeError:
            with pytest.raises(TypeError):
                ours(x, dim)
        else:
            torch.testing.assert_close(ours(x, dim), exp)


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_dtype_that_is_no_dtype_is_torchs_error(name, device):
    """A list or dict as ``dtype=``: torch's TypeError and its order of checks (a bad dim
    first), not 'unhashable type'; with a tensor temperature too."""
    x = torch.randn(2, 3, device=device)
    for dim, dtype in ((1, [1]), (1, {}), ("a", [1]), (1, [torch.float32])):
        theirs = raised(getattr(F, name), x, dim, dtype=dtype)
        for kw in ({}, dict(temperature=torch.tensor(2.0, device=device))):
            ours = raised(getattr(fs, name), x, dim, dtype=dtype, **kw)
            assert type(ours) is type(theirs) is TypeError and str(ours) == str(theirs)


def test_vocab_parallel_follows_autocast_and_elementwise_mean(device):
    """World of 1 (no process group): as F.cross_entropy under autocast (fp32 loss, an fp32
    class weight accepted) and with the deprecated reduction='elementwise_mean'."""
    from fused_softmax.distributed import vocab_parallel_cross_entropy as vpce
    gen = torch.Generator().manual_seed(9)
    z = torch.randn(5, 12, generator=gen).bfloat16().to(device)
    t = torch.randint(0, 12, (5,), generator=gen).to(device)
    w = (torch.rand(12, generator=gen) + 0.5).to(device)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        got, exp = vpce(z, t, weight=w), torch_ce_autocast(device)(z, t, weight=w)
    assert got.dtype == exp.dtype == torch.float32
    torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match="elementwise_mean"):
        got = vpce(z.float(), t, reduction="elementwise_mean")
    torch.testing.assert_close(got, F.cross_entropy(z.float(), t))


def test_logsumexp_complex_with_out_like_torch(device):
    """Complex input or out: torch's own kernel and casts (a real out of complex input holds
    log(Re(sum(exp z))), NaN where that real part is negative)."""
    z = torch.randn(6, 4, dtype=torch.complex64, generator=torch.Generator().manual_seed(3)).to(device)
    ours, theirs = torch.empty(6, device=device), torch.empty(6, device=device)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "Casting complex values to real"
        fs.logsumexp(z, 1, out=ours)
        torch.logsumexp(z, 1, out=theirs)
    torch.testing.assert_close(ours, theirs, equal_nan=True)


def test_int32_target_under_torch_func_and_double_backward(device):
    """int32 class indices (ours; torch takes int64) also where the loss is torch's own op
    on our behalf: torch.func transforms and create_graph=True."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(4, 7, generator=gen, dtype=torch.float64).to(device)
    t = torch.tensor([0, 3, -100, 6], device=device)
    for kw in ({}, dict(label_smoothing=0.2)):
        grad = torch.func.grad(lambda a, tt: fs.cross_entropy(a, tt, **kw))
        torch.testing.assert_close(grad(x, t.int()), grad(x, t))
        x32, x64 = x.clone().requires_grad_(), x.clone().requires_grad_()
        g32, = torch.autograd.grad(fs.cross_entropy(x32, t.int(), **kw), x32, create_graph=True)
        g64, = torch.autograd.grad(fs.cross_entropy(x64, t, **kw), x64, create_graph=True)
        torch.testing.assert_close(g32, g64)
        torch.testing.assert_close(torch.autograd.grad(g32.pow(2).sum(), x32)[0],
                                   torch.autograd.grad(g64.pow(2).sum(), x64)[0])


def test_torchs_kernel_dispatch_error_keeps_our_words():
    """On CUDA torch refuses a float index target with its kernel's dtype dispatch
    ('"nll_loss_..._index" not implemented for 'Float''): the same type, our words."""
    from fused_softmax.cross_entropy import raise_torchs_error

    def dispatch_error(**_):
        raise NotImplementedError('"nll_loss_forward_reduce_cuda_kernel_2d_index" not implemented for \'Float\'')

    def other_error(**_):
        raise RuntimeError("torch's words")

    ours = NotImplementedError("expected target dtype to be Long or Byte, but got Float")
    with pytest.raises(NotImplementedError, match="Long or Byte"):
        raise_torchs_error(ours, dispatch_error)
    with pytest.raises(RuntimeError, match="torch's words"):
        raise_torchs_error(ours, other_error)
    with pytest.raises(NotImplementedError, match="Long or Byte"):  # torch takes the call
        raise_torchs_error(ours, lambda **_: None)

    def input_dispatch_error(**_):  # names the input's dtype: torch's words
        raise NotImplementedError('"log_softmax_lastdim_kernel_impl" not implemented for \'Long\'')

    with pytest.raises(NotImplementedError, match="log_softmax_lastdim_kernel_impl"):
        raise_torchs_error(NotImplementedError("ours"), input_dispatch_error)


# --------------------------------------------------------------------------- torch.jit.trace
def test_jit_trace_records_torchs_ops(device):
    """Under torch.jit.trace every function takes torch's own ops (as under torch.func):
    the trace check passes (an autograd.Function's arguments, grad mode included, were
    baked into the graph and differed between the trace and its check), the graph holds
    no fused_softmax op (it loads without this package), and it computes torch's values
    on new inputs."""
    gen = torch.Generator().manual_seed(30)
    x = torch.randn(4, 6, generator=gen).to(device)
    W = torch.randn(5, 6, generator=gen).to(device)
    t = torch.tensor([0, 1, 2, 3], device=device)
    cases = [
        (lambda a: fs.softmax(a, -1), lambda a: F.softmax(a, -1), (x,)),
        (lambda a: fs.log_softmax(a, 0, temperature=0.7), lambda a: F.log_softmax(a / 0.7, 0), (x,)),
        (lambda a: fs.logsumexp(a, (0, 1)), lambda a: torch.logsumexp(a, (0, 1)), (x,)),
        (lambda a, b: fs.cross_entropy(a, b, label_smoothing=0.1),
         lambda a, b: F.cross_entropy(a, b, label_smoothing=0.1), (x, t)),
        (fs.nn.CrossEntropyLoss(), torch.nn.CrossEntropyLoss(), (x, t)),
    ]
    if hasattr(F, "linear_cross_entropy"):
        cases.append((lambda a, w: fs.linear_cross_entropy(a, w, t),
                      lambda a, w: F.linear_cross_entropy(a, w, t), (x, W)))
    for ours, theirs, args in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace(ours, args)
        assert "fused_softmax::" not in str(traced.graph)
        new = tuple(a * 1.5 if a.is_floating_point() else a for a in args)
        torch.testing.assert_close(traced(*new), theirs(*new))


# --------------------------------------------------------------------------- kernel review
def test_return_lse_of_a_row_with_inf_and_nan_is_nan(device):
    """torch.logsumexp of a row holding +inf and NaN is NaN. The kernel's +inf rule now also
    asks the row's sum (NaN): the GPU's max skips NaN, so it saw only the +inf."""
    x = torch.tensor([[math.inf, math.nan, 1.0], [math.inf, 0.0, 1.0], [1.0, 2.0, 3.0]],
                     device=device)
    t = torch.tensor([0, 1, 2], device=device)
    loss, lse = fs.cross_entropy(x, t, reduction="none", return_lse=True)
    torch.testing.assert_close(lse, torch.logsumexp(x, -1), equal_nan=True)
    torch.testing.assert_close(loss, F.cross_entropy(x, t, reduction="none"), equal_nan=True)


@pytest.mark.parametrize("path", ["vocab_parallel", "linear_vocab_chunks", "linear_rows"])
def test_ignored_rows_keep_a_zero_gradient_with_an_inf_class_weight(path, device):
    """Label smoothing with an inf class weight: an ignored row's gradient is 0, as
    cross_entropy's (its smoothing coefficient is 0, and 0 * inf was NaN in the
    vocab-parallel backward, which also serves linear_cross_entropy's vocabulary chunks).
    Kept rows are inf / NaN, as torch's."""
    gen = torch.Generator().manual_seed(31)
    C, H = 10, 8
    w = torch.ones(C, device=device)
    w[4] = math.inf
    t = torch.tensor([-100, 3, -100], device=device)
    kw = dict(weight=w, label_smoothing=0.1, reduction="none")
    if path == "vocab_parallel":
        x = torch.randn(3, C, generator=gen).to(device).requires_grad_()
        loss = fs.distributed.vocab_parallel_cross_entropy(x, t, **kw)
        loss.sum().backward()
        grads = [x.grad]
    else:
        h = torch.randn(3, H, generator=gen).to(device).requires_grad_()
        W = torch.randn(C, H, generator=gen).to(device).requires_grad_()
        if path == "linear_vocab_chunks":
            kw["vocab_chunk_size"] = 4
        loss = fs.linear_cross_entropy(h, W, t, **kw)
        loss.sum().backward()
        grads = [h.grad]
    assert loss[0] == 0 and loss[2] == 0 and loss[1] == math.inf
    for g in grads:
        zero = torch.zeros_like(g[0])
        assert torch.equal(g[0], zero) and torch.equal(g[2], zero)
        assert not g[1].isfinite().all()


# --------------------------------------------------------------------------- checkpointing
@pytest.mark.parametrize("case", ["fp16", "fp16_prob_target_grad", "create_graph", "fp32",
                                  "softmax", "linear", "linear_vocab_chunks"])
def test_non_reentrant_checkpoint(case, device):
    """torch.utils.checkpoint(use_reentrant=False) unpacks each saved tensor once per
    backward; cross_entropy's fp16, probability-target and create_graph backwards read
    ctx.saved_tensors twice (CheckpointError). Gradients equal torch's under the same
    checkpoint."""
    from torch.utils.checkpoint import checkpoint
    gen = torch.Generator().manual_seed(32)
    x = torch.randn(5, 9, generator=gen).to(device)
    t = torch.tensor([1, 8, 0, 3, -100], device=device)
    if case.startswith("fp16"):
        x = x.half()
    if case == "fp16_prob_target_grad":
        t = torch.softmax(torch.randn(5, 9, generator=gen), -1).to(device).half()
    if case == "softmax":
        ours, theirs = (lambda a, _t: fs.log_softmax(a, -1).square().sum(),
                        lambda a, _t: F.log_softmax(a, -1).square().sum())
    elif case.startswith("linear"):
        W = torch.randn(9, 9, generator=gen).to(device)
        kw = dict(vocab_chunk_size=4) if case == "linear_vocab_chunks" else {}
        ours = lambda a, b: fs.linear_cross_entropy(a, W, b, **kw)  # noqa: E731
        theirs = lambda a, b: F.cross_entropy(F.linear(a, W), b)  # noqa: E731
    else:
        ours, theirs = fs.cross_entropy, F.cross_entropy
    results = []
    for fn in (ours, theirs):
        a = x.clone().requires_grad_()
        b = t.clone().requires_grad_() if t.is_floating_point() else t
        loss = checkpoint(fn, a, b, use_reentrant=False)
        if case == "create_graph":
            g, = torch.autograd.grad(loss, a, create_graph=True)
            g.square().sum().backward()
        else:
            loss.backward()
        results.append([loss.detach(), a.grad] + ([b.grad] if b is not t else []))
    for o, r in zip(*results):
        torch.testing.assert_close(o, r, atol=2e-3 if x.dtype == torch.half else 1e-5, rtol=1e-3)


# --------------------------------------------------------------------------- nn modules
@pytest.mark.parametrize("name", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("args, kwargs", [((1, 2), {}), ((), {"foo": 1}), ((0, None), {})])
def test_module_constructor_errors_name_the_class(name, args, kwargs):
    """A bad constructor call is torch's TypeError in torch's words (it named the shared
    _TemperatureMixin.__init__)."""
    errors = []
    for cls in (getattr(torch.nn, name), getattr(fs.nn, name)):
        e = raised(cls, *args, **kwargs)
        assert isinstance(e, TypeError)
        errors.append(str(e))
    assert errors[0] == errors[1]


# --------------------------------------------------------------------------- label smoothing
@pytest.mark.parametrize("smoothing", [0.999, 0.9999999])
def test_label_smoothing_near_one_keeps_its_precision(smoothing, device):
    """1 - label_smoothing is formed in fp64 and rounded once, as torch's scalar (the kernel
    formed it from an fp32 label_smoothing: 1.7 % off at 0.9999999, the gradient 19 %)."""
    q = torch.tensor([[1e6, 0.0], [3.0, 0.5]], device=device)
    results = []
    for fn in (fs.cross_entropy, F.cross_entropy):
        a = torch.zeros(2, 2, device=device, requires_grad=True)
        loss = fn(a, q, label_smoothing=smoothing)
        loss.backward()
        results.append((loss.detach(), a.grad))
    for o, r in zip(*results):
        torch.testing.assert_close(o, r, rtol=4e-7, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("n", [3, 0])
def test_uint8_target_with_weight_and_smoothing_is_torchs_error(reduction, n, device):
    """torch's mean with label smoothing gathers the class weights with a uint8 target as
    the index: its RuntimeError (not for 'sum' / 'none' or an empty batch: their values)."""
    x = torch.randn(n, 5, device=device)
    h = torch.randn(n, 4, device=device)
    W = torch.randn(5, 4, device=device)
    t = torch.tensor([0, 4, 2][:n], dtype=torch.uint8, device=device)
    kw = dict(weight=torch.ones(5, device=device), label_smoothing=0.1, reduction=reduction)
    pairs = [(lambda: F.cross_entropy(x, t, **kw), lambda: fs.cross_entropy(x, t, **kw)),
             (lambda: F.cross_entropy(x, t, **kw),
              lambda: fs.distributed.vocab_parallel_cross_entropy(x, t, **kw))]
    if hasattr(F, "linear_cross_entropy"):
        pairs.append((lambda: F.linear_cross_entropy(h, W, t, **kw),
                      lambda: fs.linear_cross_entropy(h, W, t, **kw)))
    for theirs, ours in pairs:
        e_theirs, e_ours = raised(theirs), raised(ours)
        assert type(e_theirs) is type(e_ours) and str(e_theirs) == str(e_ours)
        if e_theirs is None:  # (an empty mean is NaN)
            torch.testing.assert_close(ours(), theirs(), equal_nan=True)


def test_uint8_target_with_weight_and_smoothing_all_ignored_is_torchs_nan(device):
    """No target kept: torch's smoothing term gathers nothing and its mean is NaN, no error."""
    x = torch.randn(3, 5, device=device)
    t = torch.tensor([2, 2, 2], dtype=torch.uint8, device=device)
    kw = dict(weight=torch.ones(5, device=device), label_smoothing=0.1, ignore_index=2)
    expected = F.cross_entropy(x, t, **kw)
    assert expected.isnan()
    for fn in (fs.cross_entropy, fs.distributed.vocab_parallel_cross_entropy):
        assert fn(x, t, **kw).isnan()
    with pytest.raises(RuntimeError, match=r"gather\(\)"):  # one kept: torch's error
        fs.cross_entropy(x, torch.tensor([2, 2, 1], dtype=torch.uint8, device=device), **kw)


# --------------------------------------------------------------------------- extras' types
@pytest.mark.parametrize("fn", ["cross_entropy", "linear_cross_entropy"])
def test_extras_are_numbers_as_torchs_floats(fn, device):
    """The extras take what torch's parser takes for a float (a Python or numpy number, a
    0-d tensor without grad); a tensor that requires grad (its gradient would be lost
    without a word), of another shape, or a string is a TypeError naming the argument;
    z_loss must be finite and >= 0; the flags are bools."""
    x = torch.randn(3, 5, device=device)
    t = torch.tensor([1, 2, 0], device=device)
    f = getattr(fs, fn)
    args = (x, t) if fn == "cross_entropy" else (x, torch.randn(5, 5, device=device), t)
    for name, plain, alike in (("logit_scale", 2.0, (np.float32(2.0), torch.tensor(2.0),
                                                     torch.tensor(2))),
                               ("softcap", 3.0, (np.float64(3.0), torch.tensor(3.0))),
                               ("z_loss", 0.5, (np.float32(0.5), torch.tensor(0.5)))):
        expected = f(*args, **{name: plain})
        for v in alike:
            torch.testing.assert_close(f(*args, **{name: v}), expected)
        for v in ("2", [2.0], None if name != "softcap" else "x", torch.tensor([2.0]),
                  torch.tensor(2.0, requires_grad=True)):
            with pytest.raises(TypeError, match=name):
                f(*args, **{name: v})
    torch.testing.assert_close(f(*args, logit_scale=True), f(*args))  # a bool, as torch's
    for z in (-0.1, math.inf, math.nan):
        with pytest.raises(ValueError, match="z_loss must be"):
            f(*args, z_loss=z)
    if fn == "cross_entropy":
        for flag in ("return_lse", "inplace_backward"):
            with pytest.raises(TypeError, match=flag):
                f(*args, **{flag: "no"})
            f(*args, **{flag: np.bool_(False)})


@pytest.mark.parametrize("name", ["Softmax", "LogSoftmax"])
def test_softmax_modules_name_themselves_and_check_temperature_at_once(name):
    """A call's argument errors name the class's forward, as torch's do; a bad temperature
    is refused by the constructor (it printed as the default and failed in forward)."""
    for m in (getattr(fs.nn, name)(1), getattr(torch.nn, name)(1)):
        with pytest.raises(TypeError) as e:
            m()
        assert str(e.value) == f"{name}.forward() missing 1 required positional argument: 'input'"
    with pytest.raises(TypeError, match="temperature"):
        getattr(fs.nn, name)(1, temperature=True)
    for bad in (0, -1.0, math.nan):
        with pytest.raises(ValueError, match="temperature"):
            getattr(fs.nn, name)(1, temperature=bad)
    x = torch.randn(2, 3, dtype=torch.float64)
    torch.testing.assert_close(torch.jit.script(getattr(fs.nn, name)(1))(x),
                               getattr(torch.nn, name)(1)(x))

    class Doubled(getattr(fs.nn, name)):  # a user's subclass keeps its own forward
        def forward(self, input, scale=2.0):
            return super().forward(input) * scale
    torch.testing.assert_close(Doubled(1)(x, 3.0), getattr(torch.nn, name)(1)(x) * 3.0)


# --------------------------------------------------------------------------- gradient layout
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "prob target"])
def test_nd_cross_entropy_gradient_is_contiguous_as_torchs(layout, device):
    """(N, C, H, W) logits: the gradient a hook or autograd.grad sees is contiguous, as
    torch's (it came back classes-last, so ``.view`` failed on it); the vocab-parallel loss
    in a world of 1 too. Classes innermost already (channels_last): the gradient keeps the
    input's layout, with no copy (README, Limitations)."""
    gen = torch.Generator().manual_seed(5)
    x0 = torch.randn(2, 3, 4, 5, generator=gen).to(device)
    if layout == "channels_last":
        x0 = x0.contiguous(memory_format=torch.channels_last)
    if layout == "prob target":
        t0 = torch.softmax(torch.randn(2, 3, 4, 5, generator=gen), 1).to(device)
    else:
        t0 = torch.randint(0, 3, (2, 4, 5), generator=gen).to(device)
    fns = [fs.cross_entropy, F.cross_entropy]
    if layout != "prob target":
        fns.append(fs.distributed.vocab_parallel_cross_entropy)
    grads = []
    for fn in fns:
        x = x0.clone(memory_format=torch.preserve_format).requires_grad_()
        t = t0.clone().requires_grad_() if layout == "prob target" else t0
        h = x * 1.0  # a non-leaf, as torch's layout keeps it
        wrt = (h, t) if layout == "prob target" else (h,)
        grads.append(torch.autograd.grad(fn(h, t, label_smoothing=0.1), wrt))
    for ours in grads[:1] + grads[2:]:
        for g, expected in zip(ours, grads[1]):
            if layout == "channels_last":
                assert g.stride() == x0.stride()
            else:
                assert g.stride() == expected.stride()
            torch.testing.assert_close(g, expected)


# --------------------------------------------------------------------------- lifetimes, threads
@pytest.mark.parametrize("kind", ["index", "prob", "linear"])
def test_backward_lets_the_callers_target_and_weight_go(kind, device):
    """After the backward, a loss kept alive (``running = running + loss``) no longer holds
    the caller's target and class weight, as torch's does not (the in-place check held them
    strongly: a distillation loop kept every soft target)."""
    import gc
    import weakref
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(4, 6, generator=gen).to(device).requires_grad_()
    w = torch.rand(6, generator=gen).to(device)
    t = (torch.softmax(torch.randn(4, 6, generator=gen), 1) if kind == "prob"
         else torch.tensor([0, 5, 2, 1])).to(device)
    if kind == "linear":
        loss = fs.linear_cross_entropy(x, torch.eye(6, device=device), t, weight=w)
    else:
        loss = fs.cross_entropy(x, t, w)
    loss.backward(retain_graph=False)
    refs = [weakref.ref(t), weakref.ref(w)]
    del t, w
    gc.collect()
    assert [r() for r in refs] == [None, None] and loss.grad_fn is not None


def test_patch_and_unpatch_from_threads_restore_torch():
    """patch() / unpatch() one at a time: threads patching at once recorded our own
    replacement as torch's original, so unpatch() restored nothing."""
    import importlib
    import sys
    import threading
    patch_mod = importlib.import_module("fused_softmax.patch")
    originals = {name: F.__dict__[name] for name in patch_mod._ORIGINALS}
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(30):
            threads = [threading.Thread(target=fs.patch) for _ in range(4)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            fs.unpatch()
            assert all(F.__dict__[name] is v for name, v in originals.items())
    finally:
        sys.setswitchinterval(old)
        fs.unpatch()


def test_concurrent_calls_from_threads(device):
    """Calls from several threads give the single-threaded values (the interpreter keeps
    global state: its launches are serialised)."""
    import threading
    gen = torch.Generator().manual_seed(8)
    xs = [torch.randn(3, 40, generator=gen).to(device) for _ in range(4)]
    expected = [F.softmax(x, -1) for x in xs]
    got = [None] * 4

    def work(i):
        for _ in range(3):
            got[i] = fs.softmax(xs[i], -1)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
