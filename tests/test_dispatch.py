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
def test_direct_calls_equal_the_registered_ops(name, device, monkeypatch):
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
    monkeypatch.setattr(_backend, "call", spy)
    a = x.clone().requires_grad_()
    fn(a).backward(dy)
    assert calls and all(calls)


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


# ----------------------------------------------------------------- found by review
def test_lazily_negated_inputs_take_the_dispatcher(device):
    """``complex.conj().imag`` is a real tensor with the negative bit set: its memory holds
    ``-x``. The dispatcher resolves the bit before an op runs; the direct route must not
    hand the raw memory to a kernel."""
    z = torch.randn(2, 5, dtype=torch.complex64, device=device)
    x = z.conj().imag
    assert x.is_neg()
    plain = x.clone()
    assert not _backend.dispatch_free((x,))
    for fn in (lambda a: fs.softmax(a, -1), lambda a: fs.log_softmax(a, 0),
               lambda a: fs.logsumexp(a, 1)):
        torch.testing.assert_close(fn(x), fn(plain), rtol=0, atol=0)
    a = plain.clone().requires_grad_()
    fs.softmax(a, -1).backward(x)  # a negated grad_output
    b = plain.clone().requires_grad_()
    fs.softmax(b, -1).backward(x.clone())
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


def test_batched_gradients(device):
    """``is_grads_batched`` (and vectorized jacobians) run the backward on batched tensors
    with no storage: they take the registered ops, whose fallbacks batch them."""
    x = torch.randn(3, 4, dtype=torch.float64, device=device, requires_grad=True)
    for f in (lambda a: fs.softmax(a, -1), lambda a: fs.log_softmax(a, -1),
              lambda a: fs.logsumexp(a, -1)):
        y = f(x)
        v = torch.randn(5, *y.shape, dtype=y.dtype, device=device)
        g, = torch.autograd.grad(y, x, v, is_grads_batched=True)
        each = torch.stack([torch.autograd.grad(f(x), x, v[i])[0] for i in range(5)])
        torch.testing.assert_close(g, each)
    J = torch.autograd.functional.jacobian(lambda a: fs.softmax(a, -1), x.detach(),
                                           vectorize=True)
    ref = torch.autograd.functional.jacobian(lambda a: torch.softmax(a, -1), x.detach())
    torch.testing.assert_close(J, ref)


def test_pre_dispatch_tracing_records_the_ops():
    """``make_fx(pre_dispatch=True)`` with real tensors holds its mode on the pre-dispatch
    stack: the ops must reach it."""
    from torch.fx.experimental.proxy_tensor import make_fx
    x = torch.randn(4, 9)
    t = torch.tensor([1, 2, 3, 4])
    for f, op in ((lambda a: fs.softmax(a, -1), "fused_softmax.softmax_fwd"),
                  (lambda a: fs.cross_entropy(a, t), "fused_softmax.cross_entropy_fwd")):
        gm = make_fx(f, tracing_mode="real", pre_dispatch=True)(x)
        targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
        assert any(s.startswith(op) for s in targets), targets
        torch.testing.assert_close(gm(x), f(x))


def test_meta_tensors_get_the_fake_implementations():
    x = torch.empty(3, 50, device="meta")
    ids = fs.sample(x, top_p=0.9)
    assert ids.device.type == "meta" and ids.shape == (3,) and ids.dtype == torch.int64
    y = fs.softmax(x, -1)
    assert y.device.type == "meta" and y.shape == x.shape


@pytest.mark.skipif(not _backend.HAS_TRITON, reason="reads the Triton launch configuration")
def test_sampling_launch_config_follows_the_module_constants(monkeypatch):
    """The cached launch configuration takes DRAW_BLOCK and UNROLL_FEW_ROWS as arguments,
    so a changed constant is never answered from the cache."""
    import sys
    smod = sys.modules["fused_softmax.sampling"]
    cpu = torch.device("cpu")
    before = smod.launch_config(2000, 36, cpu)[0]["BLOCK_N"]
    monkeypatch.setattr(smod, "DRAW_BLOCK", 16)
    assert smod.launch_config(2000, 36, cpu)[0]["BLOCK_N"] == 16
    monkeypatch.undo()
    assert smod.launch_config(2000, 36, cpu)[0]["BLOCK_N"] == before == 64


def test_launch_makes_the_tensors_cuda_device_current(monkeypatch):
    """Triton launches on the current CUDA device: a tensor on another device gets a launch
    inside ``torch.cuda.device`` of its own (device-1 pointers on device 0 fail); a tensor
    on the current device, or a CPU one, none. Checked with the current device faked."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)

    def on(device):  # a CPU tensor that says it is on ``device``
        cls = type("OnDevice", (torch.Tensor,),
                   {"device": property(lambda self: torch.device(device))})
        return torch.empty(0).as_subclass(cls)
    assert _backend.foreign_device((3, on("cuda:1"), on("cuda:0"))) == torch.device("cuda:1")
    assert _backend.foreign_device((on("cuda:0"), on("cuda:1"))) is None
    assert _backend.foreign_device((on("cpu"),)) is None
    assert _backend.foreign_device((1, 2.0)) is None
