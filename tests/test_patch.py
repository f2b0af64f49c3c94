"""``fused_softmax.patch()``: torch's softmax / log_softmax / cross_entropy routed through
the kernels, same results, everything restored by ``unpatch()``."""

import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F

from fused_softmax import _backend
from fused_softmax.patch import patch, unpatch

# The module, not the function that the package re-exports under the same name.
patch_mod = importlib.import_module("fused_softmax.patch")

PATCHED = [(F, "softmax"), (F, "log_softmax"), (F, "cross_entropy"),
           (torch.nn.Softmax, "forward"), (torch.nn.LogSoftmax, "forward"),
           (torch.nn.CrossEntropyLoss, "forward")]  # (the modules' are never replaced)


@pytest.fixture(autouse=True)
def restore_torch():
    """Every test starts and ends with torch untouched, whatever it asserts."""
    before = {key: key[0].__dict__[key[1]] for key in PATCHED}
    yield before
    unpatch()
    for (owner, name), obj in before.items():
        setattr(owner, name, obj)


class TinyClassifier(torch.nn.Module):
    """A 2-layer MLP whose head uses every patched entry point."""

    def __init__(self, n_in=12, n_hidden=32, n_classes=10):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(n_in, n_hidden), torch.nn.Tanh())
        self.head = torch.nn.Linear(n_hidden, n_classes)
        self.gate = torch.nn.Linear(n_hidden, n_hidden)
        self.ce = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
        self.log_softmax = torch.nn.LogSoftmax(dim=-1)
        self.softmax = torch.nn.Softmax(dim=-1)

    def forward(self, x, y):
        h = self.body(x)
        h = h * F.softmax(self.gate(h), dim=-1) * h.shape[-1]  # softmax as attention-like gating
        logits = self.head(h)
        loss = F.cross_entropy(logits, y) + self.ce(logits, y)
        loss = loss + F.nll_loss(F.log_softmax(logits, dim=1), y)
        loss = loss + F.nll_loss(self.log_softmax(logits), y)
        confidence = self.softmax(logits).max(dim=-1).values.mean()
        return loss + 0.1 * confidence


def _loss_and_grads(model, x, y):
    model.zero_grad()
    loss = model(x, y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _launches():
    return sum(_backend.launch_counts.values())


def test_same_loss_and_gradients_with_and_without_patch(device):
    torch.manual_seed(0)
    model = TinyClassifier().to(device)
    x = torch.randn(16, 12, device=device)
    y = torch.randint(0, 10, (16,), device=device)
    ref_loss, ref_grads = _loss_and_grads(model, x, y)

    before = _launches()
    with patch():
        loss, grads = _loss_and_grads(model, x, y)
    if _backend.use_triton(x):
        # 6 forward calls go through the kernels: 3 softmax-likes, 2 CE, the module softmax.
        assert _launches() - before >= 6
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("call,kernel", [
    (lambda x, y: F.softmax(x, dim=-1), "softmax_fwd_kernel"),
    (lambda x, y: F.log_softmax(x, -1), "softmax_fwd_kernel"),
    (lambda x, y: torch.nn.Softmax(dim=1)(x), "softmax_fwd_kernel"),
    (lambda x, y: torch.nn.LogSoftmax(dim=1)(x), "softmax_fwd_kernel"),
    (lambda x, y: F.cross_entropy(x, y), "cross_entropy_fwd_kernel"),
    (lambda x, y: torch.nn.CrossEntropyLoss(reduction="sum")(x, y), "cross_entropy_fwd_kernel"),
])
def test_each_entry_point_calls_the_kernels(call, kernel, device):
    x = torch.randn(4, 16, device=device)
    y = torch.randint(0, 16, (4,), device=device)
    expected = call(x, y)
    before = _backend.launch_counts[kernel]
    with patch():
        got = call(x, y)
    assert _backend.launch_counts[kernel] - before == (1 if _backend.use_triton(x) else 0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_modules_look_up_the_functions_at_each_call(device):
    """Patched, torch's modules call whatever ``torch.nn.functional`` holds at the call, as
    unpatched: a wrapper installed there after ``patch()`` (a profiler's) sees their calls,
    and the kernels still serve them through it."""
    x = torch.randn(3, 8, device=device)
    y = torch.tensor([0, 7, 2], device=device)
    seen = []
    with patch():
        for name, module in (("softmax", torch.nn.Softmax(1)),
                             ("log_softmax", torch.nn.LogSoftmax(1)),
                             ("cross_entropy", torch.nn.CrossEntropyLoss())):
            inner = getattr(F, name)
            setattr(F, name, lambda *a, _inner=inner, _name=name, **k: (seen.append(_name), _inner(*a, **k))[1])
            try:
                before = _launches()
                got = module(x) if name != "cross_entropy" else module(x, y)
                assert _launches() - before == (1 if _backend.use_triton(x) else 0)
            finally:
                setattr(F, name, inner)
    assert seen == ["softmax", "log_softmax", "cross_entropy"]
    torch.testing.assert_close(got, F.cross_entropy(x, y))


def test_unpatch_restores_exactly(restore_torch):
    patch()
    assert F.softmax is patch_mod.softmax
    assert torch.nn.CrossEntropyLoss.forward is restore_torch[(torch.nn.CrossEntropyLoss, "forward")]
    unpatch()
    for (owner, name), obj in restore_torch.items():
        assert owner.__dict__[name] is obj, (owner, name)
    unpatch()  # a second unpatch is a no-op
    assert F.softmax is restore_torch[(F, "softmax")]


def test_unpatch_leaves_a_later_wrapper_in_place(restore_torch):
    """Something that wrapped a patched function after patch() (a profiler, say) keeps its
    wrapper, with a warning; the entries nobody touched go back to torch's."""
    patch()
    patched = F.softmax

    def wrapper(*args, **kwargs):
        return patched(*args, **kwargs)
    F.softmax = wrapper
    with pytest.warns(UserWarning, match=r"torch\.nn\.functional\.softmax was replaced"):
        unpatch()
    assert F.softmax is wrapper and not patch_mod.is_patched()
    for (owner, name), obj in restore_torch.items():
        if (owner, name) != (F, "softmax"):
            assert owner.__dict__[name] is obj, (owner, name)
    patch()  # again: a call that falls through reaches torch's softmax, not the wrapper
    assert patch_mod._ORIGINALS["softmax"] is restore_torch[(F, "softmax")]
    x = torch.randn(2, 3, dtype=torch.float64)  # (falls through on the torch path)
    torch.testing.assert_close(F.softmax(x, 1), restore_torch[(F, "softmax")](x, 1))
    unpatch()
    assert F.softmax is restore_torch[(F, "softmax")]


def test_patch_is_idempotent(restore_torch):
    patch()
    patch()
    assert F.log_softmax is patch_mod.log_softmax
    unpatch()  # one unpatch undoes both: no wrapper was wrapped
    for (owner, name), obj in restore_torch.items():
        assert owner.__dict__[name] is obj, (owner, name)


def test_context_manager_restores_only_what_it_patched(restore_torch):
    with patch() as p:
        assert p is not None and patch_mod.is_patched()
        assert F.cross_entropy is patch_mod.cross_entropy
    assert F.cross_entropy is restore_torch[(F, "cross_entropy")]
    patch()
    with patch():
        pass
    assert patch_mod.is_patched() and F.softmax is patch_mod.softmax  # still patched outside
    unpatch()


def test_uncovered_arguments_fall_through_to_torch(device):
    ints = torch.arange(6, device=device).reshape(2, 3)
    with patch():
        before = _launches()
        with pytest.raises(RuntimeError):
            F.softmax(ints, dim=-1)  # torch's own error for an integer tensor
        assert _launches() == before
        cast = F.softmax(ints, dim=-1, dtype=torch.float32)  # a float after the cast: ours
        assert _launches() - before == (1 if _backend.use_triton(ints) else 0)
    torch.testing.assert_close(cast, torch.softmax(ints.float(), -1))


def test_any_stacklevel_passes_as_torchs(device):
    """torch reads ``_stacklevel`` only for the ``dim=None`` warning: a dim given with a
    ``_stacklevel`` of None (or of another type) works patched as unpatched."""
    x = torch.randn(2, 3, device=device)
    with patch():
        got = [F.softmax(x, -1, None), F.log_softmax(x, 1, "x"), F.softmax(x, 0, 5)]
    torch.testing.assert_close(got, [torch.softmax(x, -1), torch.log_softmax(x, 1),
                                     torch.softmax(x, 0)])


def test_tensor_subclasses_keep_their_torch_function(device):
    class Tagged(torch.Tensor):
        """A subclass with torch's default ``__torch_function__``."""

    x = torch.randn(3, 5, device=device)
    with patch():
        # Handed to torch's F.softmax, whose __torch_function__ dispatch unwraps the
        # subclass and calls the module's (patched) softmax again, then re-wraps the result.
        out = F.softmax(x.as_subclass(Tagged), dim=-1)
    assert type(out) is Tagged
    torch.testing.assert_close(out.as_subclass(torch.Tensor), torch.softmax(x, -1))


def test_implicit_dim_warning_points_at_the_caller(device):
    """torch's deprecation warning for ``dim=None`` names the caller's line, as unpatched."""
    x = torch.randn(2, 3, device=device)
    ints = torch.arange(6, device=device).reshape(2, 3)  # falls through to torch, which raises
    with patch():
        for t in (x, ints):
            with warnings.catch_warnings(record=True) as rec:
                warnings.simplefilter("always")
                try:
                    F.log_softmax(t)
                except RuntimeError:
                    assert t is ints
            implicit = [w for w in rec if "Implicit dimension" in str(w.message)]
            assert [w.filename for w in implicit] == [__file__]


def test_patched_softmax_traces_with_torch_compile(device):
    """Dynamo traces the wrapper (thread-local guard, dispatch checks) without a graph break."""
    x = torch.randn(4, 8, device=device)

    def f(t):
        return F.log_softmax(t * 2, dim=-1)

    with patch():
        got = torch.compile(f, backend="eager", fullgraph=True)(x)
    torch.testing.assert_close(got, torch.log_softmax(x * 2, -1), rtol=1e-5, atol=1e-6)


def test_patched_functions_script_and_keep_torch_function_overrides():
    """TorchScript compiles code that calls the patched functions (scripted code runs
    torch's own), and a __torch_function__ override sees torch's function objects."""
    originals = (F.softmax, F.log_softmax, F.cross_entropy)
    with patch():
        sm = torch.jit.script(torch.nn.Softmax(1))
        ce = torch.jit.script(torch.nn.CrossEntropyLoss(label_smoothing=0.1))
        x, t = torch.randn(3, 4), torch.tensor([0, 3, 1])
        torch.testing.assert_close(sm(x), torch.softmax(x, 1))
        ref = torch._C._nn.cross_entropy_loss(x, t, None, 1, -100, 0.1)
        torch.testing.assert_close(ce(x, t), ref)
        seen = []

        class Logged(torch.Tensor):
            @classmethod
            def __torch_function__(cls, func, types, args=(), kwargs=None):
                seen.append(func)
                return super().__torch_function__(func, types, args, kwargs or {})

        F.softmax(x.as_subclass(Logged), 1)
        F.cross_entropy(x.as_subclass(Logged), t)
    assert originals[0] in seen and originals[2] in seen


def test_fx_traces_the_same_graph_under_the_patch():
    """torch.fx (a __torch_function__ override) records torch's call: same targets, the
    tensors positional and the rest keywords, the caller's _stacklevel."""
    class M(torch.nn.Module):
        def forward(self, x, t):
            return (F.softmax(x, dim=-1).sum() + F.log_softmax(x, 1, dtype=torch.float64).sum()
                    + F.cross_entropy(x, t, label_smoothing=0.1))

    plain = torch.fx.symbolic_trace(M()).code
    with patch():
        patched = torch.fx.symbolic_trace(M()).code
    assert patched == plain
