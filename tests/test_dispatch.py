"""Eager calls run the custom ops' functions directly (``_backend.call``), skipping the
dispatcher's Python layers; anything that watches or rewrites ops (dispatch and torch
function modes, FakeTensor, functorch transforms, ``torch.jit.trace``, torch.compile) gets
the registered ops. Both routes must give the same values, gradients and version counters."""

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import fused_softmax as fs
from fused_softmax import _backend


class Seen(TorchDispatchMode):
    """Records the ops that reach the dispatcher (and so forces the registered ops)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _fused_ops(ops):
    return [o for o in ops if o.startswith("fused_softmax.")]


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated")
def test_dispatch_free_only_for_plain_eager_calls():
    x = torch.randn(3, 4)
    assert _backend.dispatch_free((x, 1, None, torch.nn.Parameter(x)))
    with Seen():
        assert not _backend.dispatch_free((x,))
    with TorchFunctionMode():
        assert not _backend.dispatch_free((x,))
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        assert not _backend.dispatch_free((torch.empty(3),))
    seen = []
    torch.func.vmap(lambda r: seen.append(_backend.dispatch_free((r,))) or r)(x)
    assert seen == [False]
    torch.jit.trace(lambda a: seen.append(_backend.dispatch_free((a,))) or a * 2, (x,),
                    check_trace=False)
    assert seen[-1] is False

    class Sub(torch.Tensor):
        pass
    assert not _backend.dispatch_free((x.as_subclass(Sub),))


def _cases(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 40, generator=g).to(device)
    t = torch.randint(0, 40, (6,), generator=g).to(device)
    t[1] = -100
    W = torch.randn(40, 8, generator=g).to(device)
    h = torch.randn(6, 8, generator=g).to(device)
    return {
        "softmax": (lambda a: fs.softmax(a, -1, temperature=0.7), x),
        "log_softmax": (lambda a: fs.log_softmax(a, 0), x),
        "logsumexp": (lambda a: fs.logsumexp(a, 1), x),
        "cross_entropy": (lambda a: fs.cross_entropy(a, t, label_smoothing=0.1), x),
        "cross_entropy_none": (lambda a: fs.cross_entropy(a, t, reduction="none"), x),
        "linear_cross_entropy": (lambda a: fs.linear_cross_entropy(a, W, t), h),
    }


@pytest.mark.parametrize("name", ["softmax", "log_softmax", "logsumexp", "cross_entropy",
                                  "cross_entropy_none", "linear_cross_entropy"])
def test_direct_calls_equal_the_registered_ops(name, device):
    """Bit for bit, forward and backward; the direct route is taken eagerly (no op reaches
    the dispatcher) and the registered one under a dispatch mode."""
    fn, x = _cases(device)[name]
    dy = None
    results = []
    for route in ("direct", "ops"):
        a = x.clone().requires_grad_()
        seen = Seen()
        if route == "ops":
            with seen:
                y = fn(a)
        else:
            y = fn(a)
        if dy is None:
            dy = torch.randn_like(y)
        y.backward(dy)
        results.append((y.detach(), a.grad))
        if route == "ops":
            assert _fused_ops(seen.ops), seen.ops
    (y0, g0), (y1, g1) = results
    assert torch.equal(y0, y1)
    assert torch.equal(g0, g1)
    # and the direct route really skipped the dispatcher for our ops (torch's own ops of
    # the wrapper do not reach a mode either way outside one)
    calls = []
    orig = _backend.call

    def spy(op, *args):
        calls.append(_backend.dispatch_free(args))
        return orig(op, *args)
    mp = pytest.MonkeyPatch()
    mp.setattr(_backend, "call", spy)
    try:
        a = x.clone().requires_grad_()
        fn(a).backward(dy)
    finally:
        mp.undo()
    assert all(calls)


def test_direct_calls_without_grad(device):
    x = torch.randn(4, 33, device=device)
    with torch.no_grad():
        y = fs.softmax(x, -1)
    with torch.inference_mode():
        z = fs.softmax(x, -1)
        loss = fs.cross_entropy(x, torch.arange(4, device=device))
    with Seen():
        ref = fs.softmax(x, -1)
        ref_loss = fs.cross_entropy(x, torch.arange(4, device=device))
    assert not y.requires_grad
    assert torch.equal(y, ref) and torch.equal(z, ref) and torch.equal(loss, ref_loss)


def test_inplace_backward_bumps_the_version_counter(device):
    """The logits overwritten by the gradient change version on both routes, so autograd
    notices a saved tensor that was overwritten."""
    versions = []
    for route in ("direct", "ops"):
        x = torch.randn(4, 50, device=device, requires_grad=True)
        z = x * 2
        before = z._version
        if route == "ops":
            with Seen():
                loss = fs.cross_entropy(z, torch.arange(4, device=device), inplace_backward=True)
        else:
            loss = fs.cross_entropy(z, torch.arange(4, device=device), inplace_backward=True)
        versions.append(z._version - before)
        loss.backward()
        assert torch.isfinite(x.grad).all()
    # (the torch path's own in-place copy counts too on the direct route: 2 there)
    assert min(versions) >= 1, versions
    # an op that saved z for its backward sees the overwrite
    x = torch.randn(4, 50, device=device, requires_grad=True)
    z = x * 2
    w = z ** 2  # saves z
    fs.cross_entropy(z, torch.arange(4, device=device), inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        w.sum().backward()


def test_sample_direct_equals_registered(device):
    x = torch.randn(3, 300, device=device)
    ids = [fs.sample(x, top_p=0.9, generator=torch.Generator(device).manual_seed(5))]
    with Seen():
        ids.append(fs.sample(x, top_p=0.9, generator=torch.Generator(device).manual_seed(5)))
    assert torch.equal(ids[0], ids[1])
