"""fused_softmax.linear_cross_entropy against cross_entropy(linear(input, W, b), target).

Every test takes the ``device`` fixture (tests/conftest.py): without CUDA the fused
cross-entropy kernel runs through Triton's interpreter (~25 ms per launch, one launch per
chunk), so shapes are tiny: 7 rows of 8 features, 19 classes (not a power of two), chunks
of 3 rows (which do not divide 7).

References: torch's composition in the same dtype (``torch_loss``), and the same on the
*same* values cast to fp64 (``ref``) to measure the error of low-precision results; the
extras (``logit_scale``, ``softcap``, ``z_loss``), which torch lacks, are composed from
torch ops in ``torch_loss``.
"""

from __future__ import annotations

import importlib
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from fused_softmax import _backend

# The package re-exports the function under the module's name: reach the module itself.
lce_mod = importlib.import_module("fused_softmax.linear_cross_entropy")
ce_mod = importlib.import_module("fused_softmax.cross_entropy")
lce = lce_mod.linear_cross_entropy
LinearCrossEntropyLoss = lce_mod.LinearCrossEntropyLoss

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA-only behaviour")
TORCH_HAS_LCE = hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyLoss")
needs_torch_lce = pytest.mark.skipif(not TORCH_HAS_LCE, reason="torch < 2.13 has no linear_cross_entropy")
pytestmark = [
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
]

M, H, C, CHUNK, VCHUNK = 7, 8, 19, 3, 5
#: The two chunkings: rows (every target kind) and classes (index targets, 2-D weight).
PATHS = {"rows": dict(chunk_size=CHUNK), "vocab": dict(vocab_chunk_size=VCHUNK)}
both_paths = pytest.mark.parametrize("path", list(PATHS))


# --------------------------------------------------------------------------- references
def torch_loss(x, W, t, *, linear_bias=None, weight=None, reduction="mean", ignore_index=None,
               label_smoothing=0.0, logit_scale=1.0, softcap=None, z_loss=0.0, chunk_size=None,
               vocab_chunk_size=None):
    """``cross_entropy(linear(x, W, b), t)`` with torch ops, for ``x`` of shape ``(*, H)``,
    ``W`` of shape ``(C, d..., H)``; the extras composed (z = softcap * tanh(s * logits /
    softcap), plus z_loss * lse**2 on non-ignored rows, reduced like the loss)."""
    b = linear_bias
    lead, h, C_, out = x.shape[:-1], x.shape[-1], W.shape[0], W.shape[1:-1]
    logits = F.linear(x.reshape(-1, h), W.reshape(-1, h), b.reshape(-1) if b is not None else None)
    z = logits.reshape(-1, C_, *out) * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    prob = t.is_floating_point()
    if prob:
        tt = t.reshape(-1, *t.shape[len(lead):])
    else:
        tt = t.reshape(-1, *out).long()
    ii = -100 if ignore_index is None else ignore_index
    kw = dict(weight=weight, ignore_index=ii, label_smoothing=label_smoothing)
    if not z_loss:
        loss = F.cross_entropy(z, tt, reduction=reduction, **kw)
    else:
        per = F.cross_entropy(z, tt, reduction="none", **kw)
        lse = torch.logsumexp(z, 1)
        valid = torch.ones_like(per, dtype=torch.bool) if prob else tt != ii
        per = per + z_loss * torch.where(valid, lse * lse, 0.0)
        if prob:
            denom = per.numel()
        elif weight is not None:
            denom = (weight[tt.clamp(0, C_ - 1)] * valid).sum()
        else:
            denom = valid.sum()
        loss = {"none": per, "sum": per.sum(), "mean": per.sum() / denom}[reduction]
    if reduction == "none":
        loss = loss.reshape(t.shape if not prob else (*lead, *out))
    return loss


def run(fn, x, W, t, b=None, weight=None, upstream=None, dtype=None, **kw):
    """Loss and gradients of x, W (and b) for ``fn`` (``lce``'s signature) on fresh leaf
    copies, cast to ``dtype`` with the class weight and probability target when given."""
    leaves = [a.detach().to(dtype or a.dtype).requires_grad_(True) for a in (x, W) + ((b,) if b is not None else ())]
    if dtype is not None:
        weight = weight.to(dtype) if weight is not None else None
        t = t.to(dtype) if t.is_floating_point() else t
    loss = fn(leaves[0], leaves[1], t, linear_bias=leaves[2] if b is not None else None, weight=weight, **kw)
    loss.backward((upstream if upstream is not None else torch.ones_like(loss)).to(loss.dtype))
    return [loss.detach()] + [leaf.grad for leaf in leaves]


def make(device, dtype=torch.float32, kind="index", lead=(M,), classes=C, out=(), bias=False,
         weighted=False, ignore=-100, seed=0):
    """``x (*lead, H)``, ``W (C, *out, H)``, a target (index with two positions set to
    ``ignore``, or probabilities), ``b`` and class weights when asked; |logits| ~ 3."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, H, generator=gen)
    W = torch.randn(classes, *out, H, generator=gen) / math.sqrt(H) * 2
    b = torch.randn(classes, *out, generator=gen) if bias else None
    if kind == "prob":
        t = torch.softmax(torch.randn(*lead, classes, *out, generator=gen), len(lead))
    else:
        t = torch.randint(0, classes, (*lead, *out), generator=gen)
        flat = t.view(-1)
        if flat.numel() > 1:
            flat[1] = ignore
        if flat.numel() > 4:
            flat[4] = ignore
    w = torch.rand(classes, generator=gen) + 0.5 if weighted else None

    def to(a):
        if a is None:
            return None
        return a.to(device=device, dtype=dtype) if a.is_floating_point() else a.to(device)

    return to(x), to(W), to(t), to(b), to(w)


def assert_all_close(ours, theirs, what="", **tol):
    names = ["loss", "grad input", "grad weight", "grad bias"]
    assert len(ours) == len(theirs)
    for name, a, e in zip(names, ours, theirs):
        assert a.dtype == e.dtype and a.shape == e.shape, \
            f"{what} {name}: {a.dtype}{tuple(a.shape)} vs {e.dtype}{tuple(e.shape)}"
        torch.testing.assert_close(a, e, equal_nan=True, msg=lambda m: f"{what} {name}: {m}", **tol)


# --------------------------------------------------------------------------- equality with torch
CASES = [  # name, kind, reduction, make() options, loss options
    ("index mean bias", "index", "mean", dict(bias=True), {}),
    ("index sum weight smoothing", "index", "sum", dict(weighted=True), dict(label_smoothing=0.1)),
    ("index none weight smoothing bias", "index", "none", dict(weighted=True, bias=True), dict(label_smoothing=0.2)),
    ("index mean weight smoothing", "index", "mean", dict(weighted=True), dict(label_smoothing=1.0)),
    ("index ignore_index is a class", "index", "mean", dict(weighted=True, bias=True, ignore=3), dict(ignore_index=3)),
    ("prob mean smoothing bias", "prob", "mean", dict(bias=True), dict(label_smoothing=0.1)),
    ("prob none weight", "prob", "none", dict(weighted=True), {}),
    ("prob sum weight smoothing", "prob", "sum", dict(weighted=True, bias=True), dict(label_smoothing=0.3)),
    ("extras mean", "index", "mean", dict(bias=True), dict(logit_scale=0.7, softcap=2.5, z_loss=1e-2)),
    ("extras none smoothing weight", "index", "none", dict(weighted=True),
     dict(logit_scale=1.5, softcap=4.0, z_loss=1e-3, label_smoothing=0.1)),
    ("extras prob sum", "prob", "sum", {}, dict(z_loss=1e-2, logit_scale=2.0)),
    ("leading dims", "index", "mean", dict(lead=(2, 4), bias=True), dict(label_smoothing=0.1)),
    ("leading dims none prob", "prob", "none", dict(lead=(2, 1, 3)), {}),
    ("unbatched input", "index", "none", dict(lead=()), {}),
    ("unbatched input prob", "prob", "mean", dict(lead=(), bias=True), {}),
    ("K-dim out_features", "index", "mean", dict(lead=(4,), out=(2, 1), bias=True, weighted=True),
     dict(label_smoothing=0.1)),
    ("K-dim out_features prob none", "prob", "none", dict(lead=(3,), out=(2,), bias=True), {}),
    ("K-dim out_features leading dims", "index", "none", dict(lead=(2, 3), out=(2,), bias=True), {}),
]


CASES_BY_PATH = [pytest.param(*case, path, id=f"{case[0]}-{path}") for case in CASES
                 for path in PATHS if path == "rows" or (case[1] == "index" and "out" not in case[3])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,kind,reduction,mk,kw,path", CASES_BY_PATH)
def test_equals_composed_torch(name, kind, reduction, mk, kw, path, dtype, device):
    x, W, t, b, w = make(device, dtype, kind, **mk)
    gen = torch.Generator().manual_seed(1)
    expected = torch_loss(x, W, t, linear_bias=b, weight=w, reduction=reduction, **kw)
    up = torch.randn(expected.shape, generator=gen, dtype=dtype).to(device)
    ours = run(lce, x, W, t, b, w, up, reduction=reduction, **PATHS[path], **kw)
    theirs = run(torch_loss, x, W, t, b, w, up, reduction=reduction, **kw)
    tol = {} if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    assert_all_close(ours, theirs, name, **tol)


@needs_torch_lce
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_equals_torch_linear_cross_entropy(kind, device):
    """torch 2.13's own function (reference path), K-dimensional weight included."""
    x, W, t, b, w = make(device, torch.float64, kind, lead=(4,), out=(3,), bias=True,
                         weighted=kind == "index")
    kw = dict(reduction="sum", label_smoothing=0.1)
    ours = run(lce, x, W, t, b, w, chunk_size=3, **kw)
    theirs = run(F.linear_cross_entropy, x, W, t, b, w, **kw)
    assert_all_close(ours, theirs, kind)


@pytest.mark.parametrize("chunks", [dict(chunk_size=n) for n in (1, 2, 5, 7, 100)]
                         + [dict(vocab_chunk_size=n) for n in (1, 4, 18, 19, 100)] + [{}],
                         ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()) or "default")
def test_chunk_sizes(chunks, device):
    x, W, t, b, w = make(device, torch.float64, bias=True, weighted=True)
    kw = dict(label_smoothing=0.1, z_loss=1e-3, softcap=4.0)
    ours = run(lce, x, W, t, b, w, **chunks, **kw)
    theirs = run(torch_loss, x, W, t, b, w, **kw)
    assert_all_close(ours, theirs, str(chunks))


@both_paths
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_targets_ignored(reduction, path, device):
    x, W, t, b, w = make(device, bias=True, weighted=True)
    t = torch.full_like(t, -100)
    ours = run(lce, x, W, t, b, w, reduction=reduction, **PATHS[path], label_smoothing=0.1)
    theirs = run(torch_loss, x, W, t, b, w, reduction=reduction, label_smoothing=0.1)
    assert_all_close(ours, theirs, reduction)
    if reduction == "mean":
        assert ours[0].isnan()
    assert all(torch.equal(g, torch.zeros_like(g)) for g in ours[1:])


@pytest.mark.parametrize("chunks", [{}, dict(vocab_chunk_size=VCHUNK)], ids=["default", "vocab"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(reduction, chunks, device):
    x, W, t, b, w = make(device, lead=(0,), bias=True)
    ours = run(lce, x, W, t, b, w, reduction=reduction, **chunks)
    theirs = run(torch_loss, x, W, t, b, w, reduction=reduction)
    assert_all_close(ours, theirs, reduction)


@both_paths
@pytest.mark.parametrize("target_dtype", [torch.int32, torch.uint8])
def test_other_index_dtypes(target_dtype, path, device):
    x, W, t, b, w = make(device, bias=True)
    t = t.clamp(min=0).to(target_dtype)
    ours = run(lce, x, W, t, b, w, **PATHS[path])
    theirs = run(torch_loss, x, W, t.long(), b, w)
    assert_all_close(ours, theirs, str(target_dtype))


@both_paths
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_int32_target_with_ignore_index_beyond_int32(reduction, path, device):
    """An ignore_index outside int32's range ignores nothing, as for an int64 target
    (compared with the int32 tensor, 2**32 + 1 would wrap to class 1)."""
    x, W, t, b, w = make(device, bias=True, weighted=True)
    t = t.clamp(min=0)
    t[0] = 1
    far = 2**32 + 1
    ours = run(lce, x, W, t.int(), b, w, ignore_index=far, reduction=reduction, **PATHS[path])
    theirs = run(torch_loss, x, W, t, b, w, ignore_index=far, reduction=reduction)
    assert_all_close(ours, theirs, reduction)


@both_paths
@pytest.mark.parametrize("upstream", [math.inf, -math.inf])
def test_infinite_grad_output_gives_torchs_nan_input_and_weight_gradients(upstream, path,
                                                                         device):
    """torch multiplies every kept row's logit gradients by inf and sums both signs in the
    matmuls: NaN rows of the input gradient (ignored rows stay 0) and a NaN weight
    gradient (the bias's column sums are inf times their sum: torch's NaN only where a
    column's terms differ in sign, not compared here)."""
    x, W, t, b, _ = make(device, bias=True)
    up = torch.tensor(upstream, device=device)
    ours = run(lce, x, W, t, b, upstream=up, **PATHS[path])
    theirs = run(torch_loss, x, W, t, b, upstream=up)
    ignored = t == -100
    assert bool(ignored.any())
    for name, a, e in zip(["grad input", "grad weight"], ours[1:3], theirs[1:3]):
        torch.testing.assert_close(a, e, equal_nan=True, msg=name)
    assert bool(theirs[1][~ignored].isnan().all()) and bool(theirs[2].isnan().all())


@both_paths
def test_non_contiguous_inputs(path, device):
    x, W, t, b, w = make(device, bias=True)
    xt = x.t().contiguous().t()  # same values, column-major
    Wt = W.t().contiguous().t()
    bs = torch.stack([b, b], 1)[:, 0]
    t2 = torch.stack([t, t], 1)[:, 0]
    assert not xt.is_contiguous() and not Wt.is_contiguous()
    assert not bs.is_contiguous() and not t2.is_contiguous()
    leaves = [a.clone().requires_grad_(True) for a in (xt, Wt, bs)]
    loss = lce(leaves[0], leaves[1], t2, linear_bias=leaves[2], **PATHS[path])
    loss.backward()
    ref = [a.clone().requires_grad_(True) for a in (x, W, b)]
    expected = torch_loss(ref[0], ref[1], t, linear_bias=ref[2])
    expected.backward()
    torch.testing.assert_close(loss, expected)
    for a, e in zip(leaves, ref):
        torch.testing.assert_close(a.grad, e.grad)


@both_paths
@pytest.mark.parametrize("which", ["input", "weight", "bias"])
def test_only_one_input_requires_grad(which, path, device):
    x, W, t, b, _ = make(device, bias=True)
    leaves = {"input": x, "weight": W, "bias": b}
    leaves = {k: v.clone().requires_grad_(k == which) for k, v in leaves.items()}
    lce(leaves["input"], leaves["weight"], t, linear_bias=leaves["bias"], **PATHS[path]).backward()
    ref = {k: v.detach().clone().requires_grad_(True) for k, v in leaves.items()}
    torch_loss(ref["input"], ref["weight"], t, linear_bias=ref["bias"]).backward()
    for k, v in leaves.items():
        if k == which:
            torch.testing.assert_close(v.grad, ref[k].grad)
        else:
            assert v.grad is None


def test_prob_target_and_class_weight_gradients(device):
    """torch differentiates through soft labels and, with them, the class weight."""
    x, W, t, b, w = make(device, torch.float64, "prob", bias=True, weighted=True)
    got, exp = [], []
    for fn, store in ((lce, got), (torch_loss, exp)):
        leaves = [a.clone().requires_grad_(True) for a in (x, W, t, w)]
        kw = dict(weight=leaves[3], reduction="none", label_smoothing=0.1)
        loss = fn(leaves[0], leaves[1], leaves[2], linear_bias=b, chunk_size=CHUNK, **kw)
        loss.backward(torch.linspace(-1, 2, M, dtype=torch.float64, device=device))
        store.extend(a.grad for a in leaves)
    for name, a, e in zip(["input", "weight", "target", "class weight"], got, exp):
        torch.testing.assert_close(a, e, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("fp64", ["target", "weight"])
def test_fp64_prob_target_promotes_like_cross_entropy(fp64, device):
    """fp32 input and head with an fp64 probability target or class weight: torch's loss
    is fp64 (its products and sums fp64 from fp32 log-probabilities); ours computes each
    chunk's rows in fp64 from the fp32 logits, as ``cross_entropy`` does. With an identity
    head the logits are exact, so the loss is that of ``x`` to fp64 accuracy (summed in
    fp32 it was 1.4e-7 from exact against torch's 3.4e-8, and failed assert_close with
    torch); the gradients are fp32, as torch's."""
    gen = torch.Generator().manual_seed(8)
    x = (5 * torch.randn(9, 40, generator=gen)).to(device)
    W = torch.eye(40, device=device)
    q = torch.softmax(3 * torch.randn(9, 40, generator=gen, dtype=torch.float64), 1).to(device)
    w = (torch.rand(40, generator=gen, dtype=torch.float64) + 0.5).to(device)
    t, extra = (q, {}) if fp64 == "target" else (q.float(), dict(weight=w))
    up = torch.randn(9, generator=gen, dtype=torch.float64, device=device)
    got, exp = [], []
    for fn, store in ((lce, got), (torch_loss, exp)):
        xs, Ws = (a.clone().requires_grad_(True) for a in (x, W))
        loss = fn(xs, Ws, t, reduction="none", label_smoothing=0.1, chunk_size=4, **extra)
        store.extend([loss.detach()] + list(torch.autograd.grad(loss, (xs, Ws), up)))
    smoothed = (t * 0.9 + 0.1 / 40).double()  # torch smooths in the target's dtype
    ref = F.cross_entropy(x.double(), smoothed, reduction="none",
                          **{k: v.double() for k, v in extra.items()})
    assert got[0].dtype == exp[0].dtype == torch.float64 and got[1].dtype == torch.float32
    torch.testing.assert_close(got[0], ref, rtol=64 * torch.finfo(torch.float64).eps, atol=0.0)
    for a, e in zip(got, exp):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("target_dtype", [torch.float32, torch.bfloat16])
def test_double_backward_smooths_the_target_as_the_first(target_dtype, device):
    """create_graph=True forms the gradients again with torch ops: a probability target is
    smoothed there in its own dtype too, as torch and the fused first backward do (the
    first differed from torch's by 1.5e-3 with a bf16 target, the second did not)."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(6, 8, generator=gen, dtype=torch.float64).to(device)
    W = torch.randn(11, 8, generator=gen, dtype=torch.float64).to(device)
    t = torch.softmax(torch.randn(6, 11, generator=gen), 1).to(target_dtype).to(device)
    grads = []
    for fn, graph in ((lce, False), (lce, True), (torch_loss, False)):
        xs = x.clone().requires_grad_(True)
        loss = fn(xs, W, t, reduction="sum", label_smoothing=0.3)
        grads.append(torch.autograd.grad(loss, xs, create_graph=graph)[0].detach())
    tol = dict(rtol=64 * torch.finfo(torch.float64).eps, atol=1e-15)
    torch.testing.assert_close(grads[0], grads[2], **tol)
    torch.testing.assert_close(grads[1], grads[2], **tol)


@pytest.mark.parametrize("wrt", ["target", "class weight"])
def test_batched_backward_of_soft_target_grads(wrt, device):
    """autograd's vmap over the backward (``is_grads_batched``, vectorized jacobians,
    gradcheck's check_batched_grad) through the gradients of a probability target and
    its class weight: torch's; ours wrote each chunk into an unbatched tensor (vmap's
    RuntimeError)."""
    gen = torch.Generator().manual_seed(10)
    d = torch.float64
    x = torch.randn(3, 4, generator=gen, dtype=d).to(device).requires_grad_()
    W = torch.randn(5, 4, generator=gen, dtype=d).to(device)
    p = torch.softmax(torch.randn(3, 5, generator=gen, dtype=d), -1).to(device).requires_grad_()
    cw = (torch.rand(5, generator=gen, dtype=d) + 0.5).to(device).requires_grad_()
    leaf = p if wrt == "target" else cw
    got, exp = (
        torch.autograd.grad(fn(x, W, p, weight=cw, reduction="none", chunk_size=2), leaf,
                            torch.eye(3, dtype=d, device=device), is_grads_batched=True)[0]
        for fn in (lce, torch_loss))
    torch.testing.assert_close(got, exp)
    assert torch.autograd.gradcheck(
        lambda p_, w_: lce(x, W, p_, weight=w_, reduction="none", chunk_size=2),
        (p, cw), check_batched_grad=True)


# --------------------------------------------------------------------------- fp64 gradcheck
GRADCHECK = [  # name, kind, options, class weights, full Jacobian (else gradcheck's fast mode), path
    ("index mean weight smoothing", "index", dict(reduction="mean", label_smoothing=0.1), True, True, "rows"),
    ("index none extras", "index", dict(reduction="none", z_loss=1e-2, softcap=3.0, logit_scale=0.5), False, False,
     "rows"),
    ("prob sum", "prob", dict(reduction="sum", label_smoothing=0.2), False, False, "rows"),
    ("vocab mean weight smoothing", "index", dict(reduction="mean", label_smoothing=0.1), True, True, "vocab"),
    ("vocab none extras smoothing", "index",
     dict(reduction="none", z_loss=1e-2, softcap=3.0, logit_scale=0.5, label_smoothing=0.2), True, False, "vocab"),
]


@pytest.mark.parametrize("name,kind,kw,weighted,full,path", GRADCHECK, ids=[g[0] for g in GRADCHECK])
def test_gradcheck_fp64(name, kind, kw, weighted, full, path, device):
    x, W, t, b, w = make(device, torch.float64, kind, lead=(3,), classes=5, bias=True, weighted=weighted)
    x, W = x[:, :3], W[:, :3]  # H = 3: few numerical perturbations
    # the full Jacobian takes 2 forwards per input element: few chunks there
    chunks = dict(chunk_size=3 if full else 2) if path == "rows" else dict(vocab_chunk_size=3 if full else 2)
    fn = lambda x_, W_, b_: lce(x_, W_, t, linear_bias=b_, weight=w, **chunks, **kw)
    inputs = tuple(a.clone().requires_grad_(True) for a in (x, W, b))
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=not full)


@both_paths
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_double_backward_is_torchs(reduction, path, device):
    """create_graph=True: the gradients are formed again with torch ops from the saved
    inputs (logits materialised), so second derivatives (a gradient penalty through
    grad_input, a Hessian-vector product) are torch's composition's, for input, weight and
    bias, with smoothing, class weights and ignored rows."""
    x, W, t, b, w = make(device, torch.float64, bias=True, weighted=True)
    kw = dict(weight=w, reduction=reduction, label_smoothing=0.2, **PATHS[path])
    up = torch.randn(t.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    up = up.to(device) if reduction == "none" else None
    results = []
    for f in (lce, torch_loss):
        xs, Ws, bs = (a.clone().requires_grad_(True) for a in (x, W, b))
        loss = f(xs, Ws, t, linear_bias=bs, **kw)
        gx, gW = torch.autograd.grad(loss, (xs, Ws), up, create_graph=True)
        penalty = (gx ** 2).sum() + (gW * Ws).sum()
        results.append(torch.autograd.grad(penalty, (xs, Ws, bs)))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs)


@both_paths
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_second_backward_and_grad_output(reduction, path, device):
    """retain_graph: the first backward consumes the forward's gradients (rescaled in
    place), the second recomputes them; both with a grad_output that is not 1."""
    x, W, t, b, _ = make(device, bias=True)
    leaves = [a.clone().requires_grad_(True) for a in (x, W, b)]
    loss = lce(leaves[0], leaves[1], t, linear_bias=leaves[2], reduction=reduction, **PATHS[path])
    up = torch.full_like(loss, 2.5) if reduction == "mean" else torch.linspace(-1, 1, M, device=device)
    first = torch.autograd.grad(loss, leaves, up, retain_graph=True)
    second = torch.autograd.grad(loss, leaves, up)
    ref = [a.clone().requires_grad_(True) for a in (x, W, b)]
    expected = torch.autograd.grad(torch_loss(ref[0], ref[1], t, linear_bias=ref[2], reduction=reduction), ref, up)
    for g1, g2, e in zip(first, second, expected):
        torch.testing.assert_close(g1, e)
        torch.testing.assert_close(g2, e)


# --------------------------------------------------------------------------- low precision
def max_error(a, ref):
    return (a.double() - ref).abs().max().item()


@both_paths
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_as_accurate_as_torch(dtype, path, device):
    """Against an fp64 reference on the same values: error <= max(torch's own error in
    ``dtype``, 2 eps of the largest value) for the loss and every gradient (one rounding of
    the logits, of their gradient and of each result, as in torch)."""
    gen = torch.Generator().manual_seed(3)
    n = 24
    x = torch.randn(n, H, generator=gen)
    W = torch.randn(C, H, generator=gen) / math.sqrt(H) * 3
    b = torch.randn(C, generator=gen)
    t = torch.randint(0, C, (n,), generator=gen)
    x, W, b, t = (a.to(device=device, dtype=dtype) if a.is_floating_point() else a.to(device) for a in (x, W, b, t))
    kw = dict(label_smoothing=0.1)
    ours = run(lce, x, W, t, b, **(dict(chunk_size=5) if path == "rows" else PATHS[path]), **kw)
    theirs = run(torch_loss, x, W, t, b, **kw)
    ref = run(torch_loss, x, W, t, b, dtype=torch.float64, **kw)
    eps = torch.finfo(dtype).eps
    for name, a, e, r in zip(["loss", "grad input", "grad weight", "grad bias"], ours, theirs, ref):
        assert a.dtype == dtype
        bound = max(max_error(e, r), 2 * eps * r.abs().max().item())
        assert max_error(a, r) <= bound, f"{name}: error {max_error(a, r):.3e} > {bound:.3e}"


def test_grad_weight_accumulated_in_fp32(device):
    """bf16 weights, 32 chunks of 1 row: one large row, then 31 rows whose contributions to
    grad_W are each below half a bf16 ulp of the running sum. A bf16 running sum drops them
    all (4% low); torch's single matmul and an fp32 accumulator keep them."""
    n, h, v = 32, 4, 4
    x = torch.ones(n, h)
    x[0] = 700.0
    W = torch.zeros(v, h)  # logits 0: p = 1/v, gradient (1/v - onehot) exactly in bf16
    t = torch.zeros(n, dtype=torch.long)
    x, W, t = x.to(device, torch.bfloat16), W.to(device, torch.bfloat16), t.to(device)
    _, _, gw = run(lce, x, W, t, reduction="sum", chunk_size=1)
    _, _, exp = run(torch_loss, x, W, t, reduction="sum")
    _, _, ref = run(torch_loss, x, W, t, reduction="sum", dtype=torch.float64)
    bf16_running_sum = torch.tensor(700.0 * 0.25, dtype=torch.bfloat16)
    for _ in range(n - 1):
        bf16_running_sum += 0.25
    assert abs(bf16_running_sum.item() - ref[1, 0].item()) > 0.03 * abs(ref[1, 0].item())  # the trap
    eps = torch.finfo(torch.bfloat16).eps
    assert max_error(gw, ref) <= eps * ref.abs().max().item()
    assert max_error(gw, ref) <= max_error(exp, ref)


@both_paths
def test_autocast_like_torch(path, device):
    """Under autocast the projection runs in the autocast dtype and the loss is fp32, as
    torch's composition; fp32 weights and input, bf16 gradients cast back to fp32."""
    x, W, t, b, w = make(device, bias=True, weighted=True)
    device_type = torch.device(device).type
    got, exp = [], []
    for fn, store in ((lce, got), (torch_loss, exp)):
        leaves = [a.clone().requires_grad_(True) for a in (x, W, b)]
        with torch.autocast(device_type, dtype=torch.bfloat16):
            loss = fn(leaves[0], leaves[1], t, linear_bias=leaves[2], weight=w, **PATHS[path])
        loss.backward()
        store.extend([loss.detach()] + [a.grad for a in leaves])
    for name, a, e in zip(["loss", "grad input", "grad weight", "grad bias"], got, exp):
        assert a.dtype == e.dtype == torch.float32, name
        scale = e.abs().max().item()
        assert max_error(a, e.double()) <= 4 * torch.finfo(torch.bfloat16).eps * scale, name


def test_autocast_leaves_fp64_alone_like_torch(device):
    """autocast casts fp32 / fp16 / bf16 operands only: fp64 ones stay fp64 (the loss too),
    and an fp64 input with an fp32 (cast) weight fails as torch's matmul does."""
    x, W, t, _, _ = make(device)
    x, W = x.double(), W.double()
    device_type = torch.device(device).type
    with torch.autocast(device_type, dtype=torch.bfloat16):
        got, exp = lce(x, W, t), torch_loss(x, W, t)
        assert got.dtype == exp.dtype == torch.float64
        torch.testing.assert_close(got, exp)
        with pytest.raises(RuntimeError, match="same dtype, but got: double != c10::BFloat16"):
            lce(x, W.float(), t)


def test_elementwise_mean_is_mean_with_torch_warning(device):
    x, W, t, _, _ = make(device)
    with pytest.warns(UserWarning, match="elementwise_mean"):
        got = lce(x, W, t, reduction="elementwise_mean")
    torch.testing.assert_close(got, torch_loss(x, W, t))


# --------------------------------------------------------------------------- kernels, ops, compile
def test_kernel_runs_once_per_chunk(device, monkeypatch):
    x, W, t, b, _ = make(device, bias=True)
    if not _backend.use_triton(x):
        pytest.skip("no Triton path for this device (no CUDA, no interpreter)")
    counts = _backend.launch_counts
    matmuls = []
    real = lce_mod._addmm_into
    monkeypatch.setattr(lce_mod, "_addmm_into", lambda *a, **k: matmuls.append(1) or real(*a, **k))
    before = counts["cross_entropy_fwd_kernel"]
    Wl = W.clone().requires_grad_(True)
    with torch.no_grad():  # loss only, although W requires grad: no gradient matmul
        lce(x, Wl, t, linear_bias=b, chunk_size=CHUNK)
    assert counts["cross_entropy_fwd_kernel"] == before + 3 and not matmuls
    lce(x, Wl, t, linear_bias=b, chunk_size=CHUNK).backward()
    assert counts["cross_entropy_fwd_kernel"] == before + 6 and len(matmuls) == 3
    torch.testing.assert_close(Wl.grad, run(torch_loss, x, W, t, b)[2])


def test_vocab_chunks_run_the_vocab_parallel_kernels(device):
    """Chunks of the vocabulary: the forward runs the statistics kernel once per chunk (one
    logits matmul each) and keeps no gradient; the backward the gradient kernel once per
    chunk; never the row kernel."""
    x, W, t, b, w = make(device, bias=True, weighted=True)
    if not _backend.use_triton(x):
        pytest.skip("no Triton path for this device (no CUDA, no interpreter)")
    counts = _backend.launch_counts
    names = ("vocab_parallel_stats_kernel", "vocab_parallel_bwd_kernel", "cross_entropy_fwd_kernel")
    before = [counts[n] for n in names]
    n_chunks = -(-C // VCHUNK)
    leaves = [a.clone().requires_grad_(True) for a in (x, W, b)]
    loss = lce(*leaves[:2], t, linear_bias=leaves[2], weight=w, label_smoothing=0.1, vocab_chunk_size=VCHUNK)
    assert [counts[n] - k for n, k in zip(names, before)] == [n_chunks, 0, 0]
    loss.backward()
    assert [counts[n] - k for n, k in zip(names, before)] == [n_chunks, n_chunks, 0]
    expected = run(torch_loss, x, W, t, b, w, label_smoothing=0.1)
    assert_all_close([loss.detach()] + [a.grad for a in leaves], expected)


@both_paths
def test_torch_path_equals_kernels(path, device, monkeypatch):
    x, W, t, b, w = make(device, bias=True, weighted=True)
    kw = dict(label_smoothing=0.1, z_loss=1e-3, softcap=5.0, **PATHS[path])
    kernels = run(lce, x, W, t, b, w, **kw)
    monkeypatch.setattr(ce_mod, "use_triton", lambda t: False)
    monkeypatch.setattr(lce_mod, "use_triton", lambda t: False)
    before = sum(_backend.launch_counts.values())
    torch_path = run(lce, x, W, t, b, w, **kw)
    assert sum(_backend.launch_counts.values()) == before
    assert_all_close(kernels, torch_path, "kernels vs torch path")


@pytest.mark.parametrize("grads", [(True, True, True), (False, False, False)])
def test_opcheck(grads, device):
    x, W, t, b, w = make(device, bias=True, weighted=True)
    scalars = torch.tensor([0.2, w.sum().item()], device=device)
    args = (x, W, b, t, w, scalars, None, -100, 0.1, 1.0, 0.0, 0.0, False, C, 4, *grads)
    torch.library.opcheck(torch.ops.fused_softmax.linear_cross_entropy_fwd.default, args)


@pytest.mark.parametrize("grads", [(True, True, True), (True, False, False)])
def test_opcheck_vocab_chunks(grads, device):
    x, W, t, b, w = make(device, bias=True, weighted=True)
    t = t.clamp(min=0)
    torch.library.opcheck(torch.ops.fused_softmax.linear_cross_entropy_stats.default,
                          (x, W, b, t, w, -100, 0.7, 3.0, True, VCHUNK))
    logits = x @ W.t() + b
    shift = logits.amax(1)  # the log-sum-exp as [shift, log of the sum] (sharded_loss)
    lse = torch.stack([shift, torch.log(torch.exp(logits - shift[:, None]).sum(1))], 1)
    coef = torch.rand(M, 3, device=device)
    torch.library.opcheck(torch.ops.fused_softmax.linear_cross_entropy_vocab_bwd.default,
                          (x, W, b, t, w, lse, coef, 1.0, 0.0, VCHUNK, *grads))


@both_paths
def test_torch_compile_fullgraph(path, device):
    """One graph with a mean (gradients from the forward) and a 'none' loss (recomputed in
    backward), leading dims and extras."""
    x, W, t, b, w = make(device, lead=(2, 3), bias=True, weighted=True)
    kw = dict(weight=w, label_smoothing=0.1, z_loss=1e-2, softcap=4.0)
    up = torch.linspace(-1, 1, 6, device=device).reshape(2, 3)

    def f(x_, W_, b_, lossfn, **extra):
        mean = lossfn(x_, W_, t, linear_bias=b_, **kw, **extra)
        none = lossfn(x_, W_, t, linear_bias=b_, reduction="none", **kw, **extra)
        return 3 * mean + (none * up).sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    leaves = [a.clone().requires_grad_(True) for a in (x, W, b)]
    out = compiled(*leaves, lce, **(dict(chunk_size=4) if path == "rows" else PATHS[path]))
    out.backward()
    ref = [a.clone().requires_grad_(True) for a in (x, W, b)]
    expected = f(*ref, torch_loss)
    expected.backward()
    torch.testing.assert_close(out, expected)
    for a, e in zip(leaves, ref):
        torch.testing.assert_close(a.grad, e.grad)


def test_torch_compile_dynamic_shapes_with_a_bias(device):
    """dynamic=True with a bias that requires grad: the bias gradient is rescaled out of
    place (the in-place op on a view of it failed Inductor's decomposition of mutating
    custom ops under symbolic shapes)."""
    x, W, t, b, _ = make(device, bias=True)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x_, W_, b_: lce(x_, W_, t, linear_bias=b_, chunk_size=4),
                             fullgraph=True, dynamic=True)
    leaves = [a.clone().requires_grad_(True) for a in (x, W, b)]
    out = compiled(*leaves)
    out.backward()
    ref = [a.clone().requires_grad_(True) for a in (x, W, b)]
    expected = torch_loss(*ref[:2], t, linear_bias=ref[2])
    expected.backward()
    torch.testing.assert_close(out, expected)
    for a, e in zip(leaves, ref):
        torch.testing.assert_close(a.grad, e.grad)


def test_default_chunk_fits_64_mib():
    """At M=8192, H=4096, V=128256 bf16 the default chunk's logits take <= 64 MiB."""
    V = 128256
    rows = lce_mod.default_chunk_rows(8192, V * 2)
    assert rows == 256 and rows * V * 2 <= 64 << 20
    assert lce_mod.default_chunk_rows(5, V * 2) == 5
    assert lce_mod.default_chunk_rows(8192, 10**9) == 1


def test_default_chunk_is_one_when_logits_fit_the_accumulator():
    """With a bf16 weight that needs a gradient, several chunks need an fp32 grad_W
    accumulator (4 V H bytes): the buffer may take as much; when all the logits fit in
    it, one chunk is both leaner and faster (no accumulator at all)."""
    V, H = 128256, 4096
    assert lce_mod.default_chunk_rows(8192, V * 2, 4 * V * H) == 8192  # M = 2 H: one chunk
    assert lce_mod.default_chunk_rows(8193, V * 2, 4 * V * H) == 8192  # buffer <= accumulator
    assert lce_mod.default_chunk_rows(8192, V * 2, 4 * V * 2048) == 4096
    assert lce_mod.default_chunk_rows(8192, V * 2, 0) == 256            # no accumulator


def test_default_plan():
    """The default chunking is the one that needs less memory beyond inputs, outputs and
    gradients; all the logits in 64 MiB: one chunk of rows."""
    plan = lce_mod.default_plan
    V, Hb = 128256, 4096
    both = dict(grad_input=True, grad_weight=True)
    # The shape: 64 MiB of logits (+ the fp32 grad_input accumulator) against 2 GB.
    assert plan(8192, V, 1, Hb, 2, vocab_chunks_possible=True, **both) == (None, 4096)
    # Probability targets or a K-dim weight: rows, one chunk (no grad_W accumulator).
    assert plan(8192, V, 1, Hb, 2, vocab_chunks_possible=False, **both) == (8192, None)
    # Frozen head: 64 MiB chunks of rows need no accumulator, vocabulary chunks need grad_input's.
    assert plan(8192, V, 1, Hb, 2, vocab_chunks_possible=True, grad_input=True,
                grad_weight=False) == (256, None)
    # Everything fits in 64 MiB: one chunk of rows, three matmuls.
    assert plan(7, 19, 1, 8, 4, vocab_chunks_possible=True, **both) == (7, None)
    assert plan(128, V, 1, Hb, 2, vocab_chunks_possible=True, **both) == (128, None)
    vocab = lce_mod.default_vocab_chunk
    assert vocab(8192, V, 2) == 4096 and vocab(3000, V, 2) == 11136  # multiples of 128
    assert vocab(10**6, V, 2) == 128 and vocab(10, 300, 2) == 300


@pytest.mark.parametrize("dtype,grad,prob,expect", [
    (torch.bfloat16, True, False, dict(vocab_chunks_possible=True, grad_input=True, grad_weight=True)),
    (torch.bfloat16, False, False, dict(vocab_chunks_possible=True, grad_input=False, grad_weight=False)),
    (torch.float32, True, False, dict(vocab_chunks_possible=True, grad_input=False, grad_weight=False)),
    (torch.bfloat16, True, True, dict(vocab_chunks_possible=False, grad_input=True, grad_weight=True)),
])
def test_default_plan_in_the_call(monkeypatch, dtype, grad, prob, expect):
    """The call says which fp32 accumulators the gradients would need (fp16/bf16 tensors
    that require grad) and whether the vocabulary may be chunked."""
    seen = {}
    real = lce_mod.default_plan

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)
    monkeypatch.setattr(lce_mod, "default_plan", spy)
    x = torch.randn(6, 8, dtype=dtype, requires_grad=grad)
    W = torch.randn(20, 8, dtype=dtype, requires_grad=grad)
    t = torch.softmax(torch.randn(6, 20), 1).to(dtype) if prob else torch.randint(0, 20, (6,))
    lce(x, W, t)
    assert seen == expect


@both_paths
def test_non_finite_rows_and_zero_grad_output_like_torch(path, device):
    """Rows holding +inf (their softmax is NaN) get NaN gradients even where grad_output
    is 0, as torch's 0 * NaN. (Ignored rows are 0 whatever they hold: another test.)"""
    x, W, t, b, _ = make(device, torch.float64, bias=True)
    t = t.clamp(min=0)
    b = b.clone()
    b[2] = math.inf  # every row holds +inf
    up = torch.zeros(M, dtype=torch.float64, device=device)
    up[0] = 1.0
    ours = run(lce, x, W, t, b, upstream=up, reduction="none", **PATHS[path])
    theirs = run(torch_loss, x, W, t, b, upstream=up, reduction="none")
    for name, a, e in zip(["loss", "grad input", "grad weight", "grad bias"], ours, theirs):
        assert torch.equal(a.isnan(), e.isnan()) and a.isnan().any(), (name, a, e)


@both_paths
def test_ignored_row_with_nan_and_softcap_gets_zero_input_gradient(path, device):
    x, W, t, b, _ = make(device, bias=True)
    x = x.clone()
    x[1] = math.nan  # row 1 is ignored (make)
    assert t[1] == -100
    leaves = [a.clone().requires_grad_(True) for a in (x, W, b)]
    lce(leaves[0], leaves[1], t, linear_bias=leaves[2], softcap=3.0, label_smoothing=0.1,
        **PATHS[path]).backward()
    g = leaves[0].grad
    assert torch.equal(g[1], torch.zeros_like(g[1])) and torch.isfinite(g[[0, 2, 3]]).all()


@both_paths
def test_out_of_range_target_cpu_error_is_torchs(path):
    x, W, t, _, _ = make("cpu")
    t[0] = C
    with pytest.raises(IndexError, match=f"Target {C} is out of bounds"):
        lce(x, W, t, **PATHS[path])


@both_paths
@pytest.mark.parametrize("far", ["all", "one"])
def test_large_logits_with_smoothing_do_not_cancel(far, path, device):
    """Logits near 1e4, or one class of weight 0 1e4 below the rest (fp32): the smoothing
    term sum(w * z) is taken relative to the row's max, so the loss keeps torch's accuracy
    instead of cancelling."""
    x, W, t, b, w = make(device, bias=True, weighted=True)
    if far == "all":
        b = b + 1e4
    else:
        b[0] -= 1e4
        w[0] = 0.0
        t = torch.where(t == 0, 1, t)
    kw = dict(label_smoothing=0.3, reduction="none")
    ours = lce(x, W, t, linear_bias=b, weight=w, **PATHS[path], **kw)
    theirs = torch_loss(x, W, t, linear_bias=b, weight=w, **kw)
    ref = torch_loss(*(a.double() for a in (x, W)), t, linear_bias=b.double(), weight=w.double(), **kw)
    assert max_error(ours, ref) <= max(2 * max_error(theirs, ref), 1e-5)


# --------------------------------------------------------------------------- errors
ERRORS = [
    ("input/weight features", lambda x, W, t: lce(x, W[:, :-1], t), RuntimeError, "in_features"),
    ("bias shape", lambda x, W, t: lce(x, W, t, linear_bias=torch.zeros(3, device=x.device)), RuntimeError,
     "linear_bias shape"),
    ("weight dim", lambda x, W, t: lce(x, W[0], t), RuntimeError, "dimensionality at least 2"),
    ("dtype mismatch", lambda x, W, t: lce(x, W.double(), t), RuntimeError, "same dtype"),
    ("ignore_index with probabilities", lambda x, W, t: lce(x, W, torch.softmax(x @ W.t(), 1), ignore_index=-100),
     RuntimeError, "ignore_index cannot be specified"),
    ("K-dim unbatched", lambda x, W, t: lce(x[0], W[:, None], t[0]), RuntimeError, "requires batched input"),
    ("target shape", lambda x, W, t: lce(x, W, t[:-1]), ValueError, "to match target batch_size"),
    ("target dtype", lambda x, W, t: lce(x, W, t.float()), RuntimeError, "expected target dtype"),
    ("reduction", lambda x, W, t: lce(x, W, t, reduction="avg"), ValueError, "not a valid value"),
    ("label smoothing", lambda x, W, t: lce(x, W, t, label_smoothing=1.5), RuntimeError, "label_smoothing"),
    ("class weight shape", lambda x, W, t: lce(x, W, t, weight=torch.ones(3, device=x.device)), RuntimeError,
     "weight tensor should be defined"),
    ("chunk size", lambda x, W, t: lce(x, W, t, chunk_size=0), ValueError, "chunk_size"),
    ("vocab chunk size", lambda x, W, t: lce(x, W, t, vocab_chunk_size=0), ValueError, "vocab_chunk_size"),
    ("both chunk sizes", lambda x, W, t: lce(x, W, t, chunk_size=2, vocab_chunk_size=4), ValueError, "not both"),
    ("vocab chunks, probabilities", lambda x, W, t: lce(x, W, torch.softmax(x @ W.t(), 1), vocab_chunk_size=4),
     ValueError, "class-index targets"),
    ("vocab chunks, K-dim weight", lambda x, W, t: lce(x, W[:, None], t[:, None], vocab_chunk_size=4),
     ValueError, "2-D linear_weight"),
    ("integer input", lambda x, W, t: lce(x.long(), W, t), RuntimeError, "same dtype"),
    ("integer input and weight", lambda x, W, t: lce(x.long(), W.long(), t), NotImplementedError,
     "not implemented"),
]


@pytest.mark.parametrize("name,call,exc,words", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors(name, call, exc, words, device):
    x, W, t, _, _ = make(device)
    with pytest.raises(exc, match=words):
        call(x, W, t)


TORCH_LCE = getattr(F, "linear_cross_entropy", None)

#: Calls torch's linear_cross_entropy refuses (torch 2.13): our error is torch's, word for word.
WORD_FOR_WORD = {
    "input/weight features": lambda f, x, W, t: f(x, W[:, :-1], t),
    "bias shape": lambda f, x, W, t: f(x, W, t, linear_bias=torch.zeros(3, device=x.device)),
    "bias dtype": lambda f, x, W, t: f(x, W, t, linear_bias=torch.zeros(
        W.shape[0], dtype=torch.float64, device=x.device)),
    "weight dim": lambda f, x, W, t: f(x, W[0], t),
    "dtype mismatch": lambda f, x, W, t: f(x, W.double(), t),
    "0-d input": lambda f, x, W, t: f(x[0, 0], W, t),
    "list input": lambda f, x, W, t: f(x.tolist(), W, t),
    "integer input": lambda f, x, W, t: f(x.long(), W.long(), t),
    "target shape": lambda f, x, W, t: f(x, W, t[:-1]),
    "target dtype": lambda f, x, W, t: f(x, W, t.float()),
    "reduction": lambda f, x, W, t: f(x, W, t, reduction="avg"),
    "label smoothing": lambda f, x, W, t: f(x, W, t, label_smoothing=1.5),
    "ignore_index bool": lambda f, x, W, t: f(x, W, t, ignore_index=True),
    "ignore_index float": lambda f, x, W, t: f(x, W, t, ignore_index=1.0),
    "class weight shape": lambda f, x, W, t: f(x, W, t, weight=torch.ones(3, device=x.device)),
    "class weight requiring grad": lambda f, x, W, t: f(
        x, W, t, weight=torch.ones(W.shape[0], device=x.device, requires_grad=True)),
}


@pytest.mark.skipif(TORCH_LCE is None, reason="torch has no linear_cross_entropy (before 2.13)")
@pytest.mark.parametrize("name", WORD_FOR_WORD)
def test_errors_word_for_word_like_torch(name, device):
    x, W, t, _, _ = make(device)
    outcome = []
    for f in (TORCH_LCE, lce):
        try:
            WORD_FOR_WORD[name](f, x, W, t)
            outcome.append(None)
        except Exception as e:  # noqa: BLE001 - type and message are compared
            outcome.append((type(e), str(e)))
    assert outcome[0] is not None, "torch takes this call (test bug)"
    assert outcome[1] == outcome[0]


def test_error_path_asks_torch_only_for_small_calls(device, monkeypatch):
    """torch's linear_cross_entropy forms all the logits before it refuses a bad reduction:
    above the bound the error is ours (the same type), and no logits are formed."""
    x, W, t, _, _ = make(device)
    monkeypatch.setattr(lce_mod, "_ERROR_PATH_LOGITS", x.shape[0] * W.shape[0] - 1)
    with pytest.raises(ValueError, match="avg is not a valid value for reduction"):
        lce(x, W, t, reduction="avg")
    bias = torch.zeros(W.shape[0], dtype=torch.float64, device=device)
    with pytest.raises(RuntimeError, match="expected input and linear_bias to have the same"):
        lce(x, W, t, linear_bias=bias)  # ours, where torch's words are its matmul's


def test_class_weight_requiring_grad_with_index_target_errors_like_torch(device):
    x, W, t, _, w = make(device, weighted=True)
    w.requires_grad_(True)
    # ours names the derivative; torch 2.13's (raised in ours' place) the function
    with pytest.raises(RuntimeError, match="(derivative for|differentiable with respect to "
                                           "argument) 'weight'"):
        lce(x, W, t, weight=w)


# --------------------------------------------------------------------------- nn module
def test_module_equals_functional_and_composition(device):
    torch.manual_seed(5)
    x, _, t, _, w = make(device, lead=(2, 3), weighted=True)
    m = LinearCrossEntropyLoss(H, C, bias=True, weight=w, label_smoothing=0.1, chunk_size=4, device=device)
    loss = m(x, t)
    loss.backward()
    Wr = m.linear.weight.detach().clone().requires_grad_(True)
    br = m.linear.bias.detach().clone().requires_grad_(True)
    expected = torch_loss(x, Wr, t, linear_bias=br, weight=w, label_smoothing=0.1)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(m.linear.weight.grad, Wr.grad)
    torch.testing.assert_close(m.linear.bias.grad, br.grad)
    assert "num_classes=19" in repr(m) and "chunk_size=4" in repr(m)


@needs_torch_lce
@pytest.mark.parametrize("cfg", [dict(bias=True, weighted=True), dict(out_features=(2, 1), bias=True)],
                         ids=["bias+weight", "out_features"])
def test_module_state_dict_roundtrip_with_torch(cfg, device):
    cfg = dict(cfg)
    weighted = cfg.pop("weighted", False)
    gen = torch.Generator().manual_seed(6)
    w = (torch.rand(C, generator=gen) + 0.5).to(device) if weighted else None
    kw = dict(weight=w, label_smoothing=0.1, device=device, **cfg)
    torch.manual_seed(7)
    ours = LinearCrossEntropyLoss(H, C, **kw)
    torch.manual_seed(7)
    theirs = torch.nn.LinearCrossEntropyLoss(H, C, **kw)
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert list(sd_ours) == list(sd_theirs)
    for k in sd_ours:  # same construction, same initialisation
        torch.testing.assert_close(sd_ours[k], sd_theirs[k], rtol=0, atol=0)
    fresh_torch = torch.nn.LinearCrossEntropyLoss(H, C, **kw)
    fresh_torch.load_state_dict(sd_ours)
    fresh_ours = LinearCrossEntropyLoss(H, C, **kw)
    fresh_ours.load_state_dict(fresh_torch.state_dict())
    x = torch.randn(4, H, generator=gen).to(device)
    t = torch.randint(0, C, (4, *cfg.get("out_features", ())), generator=gen).to(device)
    torch.testing.assert_close(fresh_ours(x, t), fresh_torch(x, t))


# --------------------------------------------------------------------------- CUDA only
@needs_cuda
@both_paths
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cuda_no_host_sync(reduction, path, device):
    x, W, t, b, w = make(device, bias=True, weighted=True)
    kw = dict(weight=w, label_smoothing=0.1, reduction=reduction, **PATHS[path])
    run(lce, x, W, t, b, **kw)  # warm-up outside the check: compile the kernels
    torch.cuda.synchronize()
    try:
        torch.cuda.set_sync_debug_mode("error")
        ours = run(lce, x, W, t, b, **kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_all_close(ours, run(torch_loss, x, W, t, b, **kw), reduction)


@needs_cuda
def test_cuda_peak_extra_memory(device):
    """M=8192, H=4096, V=128256 bf16, default chunks (of the vocabulary): peak memory beyond
    the inputs and the gradients (input, weight) is at most the 64 MiB chunk buffer + the
    fp32 grad_input accumulator (4 * M * H) + 8 MiB for the per-row vectors and cuBLAS'
    workspace."""
    Mb, Hb, Vb = 8192, 4096, 128256
    gen = torch.Generator(device=device).manual_seed(8)
    x = torch.randn(Mb, Hb, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_(True)
    W = (torch.randn(Vb, Hb, device=device, dtype=torch.bfloat16, generator=gen) * 0.02).requires_grad_(True)
    t = torch.randint(0, Vb, (Mb,), device=device, generator=gen)
    lce(x[:256], W, t[:256]).backward()  # warm-up: kernels, cuBLAS workspace
    x.grad = W.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    lce(x, W, t).backward()
    torch.cuda.synchronize()
    grads = x.numel() * 2 + W.numel() * 2
    extra = torch.cuda.max_memory_allocated() - base - grads
    budget = (64 << 20) + 4 * x.numel() + (8 << 20)
    assert extra <= budget, f"peak extra {extra / 2**20:.0f} MiB > {budget / 2**20:.0f} MiB"


def test_module_is_a_weighted_loss_and_scripts(device):
    """As torch's module: a ``_WeightedLoss`` (hence a ``_Loss``); torch.jit.script takes it
    (the kernels left to Python) and gives the eager result."""
    m = LinearCrossEntropyLoss(8, 5, bias=True, weight=torch.rand(5) + 0.5).to(device)
    assert isinstance(m, torch.nn.modules.loss._WeightedLoss)
    x = torch.randn(3, 8, device=device)
    t = torch.tensor([0, 1, 4], device=device)
    torch.testing.assert_close(torch.jit.script(m)(x, t), m(x, t))


@needs_torch_lce
def test_options_checked_and_warned_about_as_torch(device):
    """``options`` tune torch's own chunked path; ours ignores them but raises torch's errors
    for bad ones and gives its warning where that path could not take the call."""
    O = torch.nn.LinearCrossEntropyOptions
    x, w = torch.randn(4, 8, device=device), torch.randn(5, 8, device=device)
    t = torch.tensor([0, 4, 2, 1], device=device)
    for options, exc in (("abc", AttributeError),
                         (O(batch_chunk_size=3, chunking_method="aspect_ratio"), ValueError)):
        with pytest.raises(exc) as theirs:
            F.linear_cross_entropy(x, w, t, options=options)
        with pytest.raises(exc) as ours:
            lce(x, w, t, options=options)
        assert str(ours.value) == str(theirs.value)
    # its chunked op's own checks: the schema's bool, the accumulation dtypes it implements
    for options, dtype, reduction in ((O(allow_retain_graph="x"), torch.float32, "mean"),
                                      (O(acc_dtype=torch.float64), torch.float32, "sum"),
                                      (O(acc_dtype=torch.float16), torch.bfloat16, "none"),
                                      (O(acc_dtype=torch.float32), torch.float64, "mean")):
        xx, ww = x.to(dtype), w.to(dtype)
        with pytest.raises(RuntimeError) as theirs:
            F.linear_cross_entropy(xx, ww, t, options=options, reduction=reduction)
        with pytest.raises(RuntimeError) as ours:
            lce(xx, ww, t, options=options, reduction=reduction)
        assert str(ours.value) == str(theirs.value).splitlines()[0]
    for options in (O(allow_retain_graph=1), O(allow_retain_graph="x"),  # 'none': no flag
                    O(acc_dtype=torch.float32)):
        reduction = "none" if options.allow_retain_graph == "x" else "mean"
        xx, ww = x.bfloat16(), w.bfloat16()
        torch.testing.assert_close(
            lce(xx, ww, t, options=options, reduction=reduction),
            F.linear_cross_entropy(xx, ww, t, options=options, reduction=reduction))
    probs = torch.softmax(torch.randn(4, 5, device=device), -1)
    for target, kw in ((t, dict(label_smoothing=0.1)), (t.to(torch.uint8), {}), (probs, {}),
                       (t, dict(options=O(batch_chunk_size=2)))):
        kw = {"options": O(), **kw}
        with warnings.catch_warnings(record=True) as theirs:
            warnings.simplefilter("always")
            expected = F.linear_cross_entropy(x, w, target, **kw)
        with warnings.catch_warnings(record=True) as ours:
            warnings.simplefilter("always")
            got = lce(x, w, target, **kw)
        torch.testing.assert_close(got, expected)
        assert [str(m.message) for m in ours] == [str(m.message) for m in theirs]
        assert all(m.filename == __file__ for m in ours)  # torch's stacklevel: this line


@pytest.mark.parametrize("fn", ["cross_entropy", "linear_cross_entropy"])
def test_ignore_index_from_a_shape_keeps_one_graph(fn):
    """An ignore_index computed from a symbolic size (dynamic=True) stays symbolic: one
    graph for every class count, as torch's (ours pinned it, and so the size: a graph per
    class count)."""
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    torch._dynamo.reset()
    if fn == "cross_entropy":
        ours = lambda x, t: ce_mod.cross_entropy(x, t, ignore_index=x.shape[1] - 1)  # noqa: E731
    else:
        ours = lambda x, t: lce(x, torch.eye(x.shape[1]), t, ignore_index=x.shape[1] - 1)  # noqa: E731
    f = torch.compile(ours, backend=counter, fullgraph=True, dynamic=True)
    for c in (8, 9, 11):
        x = torch.randn(4, c)
        t = torch.tensor([0, c - 1, 3, c - 1])
        torch.testing.assert_close(f(x, t), F.cross_entropy(x, t, ignore_index=c - 1))
    assert counter.frame_count == 1


@needs_torch_lce
def test_options_do_not_specialise_a_compiled_graph():
    """Ignored options are not sized against the batch under torch.compile: one graph for
    every batch size with dynamic=True, and the eager loss."""
    from torch._dynamo.testing import CompileCounter

    options = torch.nn.LinearCrossEntropyOptions()
    counter = CompileCounter()
    torch._dynamo.reset()
    f = torch.compile(lambda x, w, t: lce(x, w, t, options=options), backend=counter,
                      fullgraph=True, dynamic=True)
    w = torch.randn(12, 8)
    for B in (4, 6, 9):
        x, t = torch.randn(B, 8), torch.randint(0, 12, (B,))
        torch.testing.assert_close(f(x, w, t), lce(x, w, t))
    assert counter.frame_count == 1
