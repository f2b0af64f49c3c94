"""Where a tensor runs, and the small device facts the launchers need.

* CUDA tensor: the Triton kernels (an error, never a silent fallback, if Triton is missing).
* CPU tensor with ``TRITON_INTERPRET=1`` set before import: the same Triton kernels, run by
  Triton's interpreter (this is how CI tests the real kernel code without a GPU).
* CPU tensor otherwise, or no Triton: a torch implementation with the same semantics.
"""

from __future__ import annotations

import collections
import functools
import inspect
import operator
import os
import struct
import sys
import threading
import warnings
from typing import Optional

import numpy as np
import torch

try:
    import triton

    HAS_TRITON = True
except ImportError:  # macOS / Windows: every op still works through its torch path
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

if HAS_TRITON and INTERPRET and triton.__version__.startswith("3.6.") \
        and tuple(int(v) for v in np.__version__.split(".")[:2]) >= (2, 4):
    warnings.warn(
        f"fused_softmax: Triton {triton.__version__}'s interpreter breaks loops with runtime "
        f"bounds under numpy {np.__version__} (kernels fail with 'only 0-dimensional arrays "
        "can be converted to Python scalars'); install numpy<2.4, or triton>=3.9",
        RuntimeWarning, stacklevel=2)

_INTERPRETER_LOCK = threading.Lock()

#: Number of Triton kernel launches by kernel name. Tests read it to prove that the
#: kernels (not the torch path) served a call; it costs a dict update per launch.
launch_counts: collections.Counter = collections.Counter()


def use_triton(t: torch.Tensor) -> bool:
    """True when the Triton kernels serve tensor ``t`` (CUDA, or CPU under the interpreter)."""
    if t.device.type == "cuda":
        if not HAS_TRITON:
            raise RuntimeError(
                "fused_softmax: a CUDA tensor needs Triton, which is not installed "
                "(pip install triton)"
            )
        return True
    return HAS_TRITON and INTERPRET and t.device.type == "cpu"


def launch(kernel, grid: int, *args, **kwargs) -> None:
    """Run the Triton ``kernel`` on a 1-D ``grid`` and count the launch. Under the
    interpreter the numpy warnings it emits (masked lanes' 0 / 0 and log(0), its own
    DeprecationWarnings) are silenced: they are the interpreter's, not the caller's, and
    would fail a program run with ``-W error``."""
    launch_counts[kernel.__name__] += 1
    if INTERPRET:
        # one launch at a time: Triton's interpreter keeps global state (concurrent calls
        # from threads failed or gave wrong values), and catch_warnings is process-wide
        with _INTERPRETER_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kernel[(grid,)](*args, **kwargs)
        return
    device = foreign_device(args)
    if device is None:
        kernel[(grid,)](*args, **kwargs)
    else:
        with torch.cuda.device(device):
            kernel[(grid,)](*args, **kwargs)


def foreign_device(args) -> Optional[torch.device]:
    """The CUDA device of a launch's tensors (the first tensor argument's) where it is not
    the current device, else ``None``. Triton launches on the current device and its
    stream, not the tensors': a model on ``cuda:1`` while ``cuda:0`` is current would get
    device-1 pointers on device 0, so ``launch`` makes that device current first."""
    for a in args:
        if isinstance(a, torch.Tensor):
            device = a.device
            if device.type == "cuda" and device.index != torch.cuda.current_device():
                return device
            return None
    return None


def custom_op(name: str, mutates_args=()):
    """``torch.library.custom_op(name, mutates_args=...)`` that also keeps the function it
    wraps (``op.eager``) and the positions of the arguments it mutates, for :func:`call`."""
    def wrap(fn):
        op = torch.library.custom_op(name, mutates_args=mutates_args)(fn)
        params = list(inspect.signature(fn).parameters)
        op.eager, op.mutated = fn, tuple(params.index(a) for a in mutates_args)
        return op
    return wrap


_pre_dispatch_modes = getattr(torch._ops, "_len_torch_dispatch_stack_pre_dispatch", lambda: 0)


def _plain(t: torch.Tensor) -> bool:
    """A tensor the ops' functions may read as memory: a plain (or Parameter) tensor with
    storage (not the batched tensors of ``is_grads_batched`` / vectorized jacobians), not
    on ``meta`` (the dispatcher gives those the fake implementation) and with no lazy
    negation or conjugation (which the dispatcher resolves before an op runs)."""
    return ((type(t) is torch.Tensor or type(t) is torch.nn.Parameter)
            and torch._C._has_storage(t) and not t.is_meta and not t.is_neg()
            and not t.is_conj())


def dispatch_free(args) -> bool:
    """Whether a custom op may be called as its plain function: eager code, plain tensors
    (``_plain``), and nothing that watches or rewrites the dispatcher's ops (no
    torch.compile, export, FakeTensor or other dispatch mode, pre-dispatch tracing, torch
    function mode, functorch transform or ``torch.jit.trace``). The dispatcher's Python
    layers for a custom op cost more host time than the op's own launcher
    (bench/host_overhead.py). Seen only through the dispatcher, so absent from the direct
    route: kernels registered with ``register_kernel``, the ops' profiler events."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
            or _pre_dispatch_modes() or torch._C._is_torch_function_mode_enabled()
            or torch._C._are_functorch_transforms_active() or torch._C._get_tracing_state()):
        return False
    return all(_plain(a) for a in args if isinstance(a, torch.Tensor))


def in_compiled_autograd() -> bool:
    """Inside a backward that Dynamo traces (compiled autograd), whose graph replays no
    change a backward makes to its autograd context."""
    ca = sys.modules.get("torch._dynamo.compiled_autograd")
    return bool(ca is not None and ca.in_compiled_autograd_region)


def exporting() -> bool:
    """Under ``torch.export``'s tracing, strict or not (not under ``torch.compile``)."""
    return bool(getattr(torch.compiler, "is_exporting", lambda: False)())


def call(op, *args):
    """``op(*args)`` for a :func:`custom_op`; its function directly where
    :func:`dispatch_free` allows, with the version counters of the tensors it mutates
    bumped as the dispatcher would (autograd's check that saved tensors are unchanged)."""
    if not dispatch_free(args):
        return op(*args)
    out = op.eager(*args)
    for i in op.mutated:
        if not args[i].is_inference():
            torch.autograd.graph.increment_version(args[i])
    return out


def keep(ctx, saved, held) -> None:
    """``ctx.save_for_backward(*saved)``, and the tensors ``held`` (a tuple; None allowed)
    kept for the first backward outside it (see :func:`take`): no version check, not
    moved by ``saved_tensors_hooks``, and dropped once that backward has taken them. Under
    ``torch.compile`` they are saved with the others: compiled autograd does not hand the
    tensors that a compiled forward keeps on its context to the backward it traces (an
    IndexError in AOTAutograd's backward prologue, torch 2.13), and a compiled graph saves
    only the tensors its backward reads."""
    if torch.compiler.is_compiling():
        ctx.save_for_backward(*saved, *held)
        ctx.held = len(held)
    else:
        ctx.save_for_backward(*saved)
        ctx.held = tuple(held)


def take(ctx) -> tuple:
    """The tensors :func:`keep` held, taken: a later backward (retain_graph) finds None."""
    if isinstance(ctx.held, int):
        return tuple(ctx.saved_tensors[len(ctx.saved_tensors) - ctx.held:])
    held, ctx.held = ctx.held, (None,) * len(ctx.held)
    return held


def saved(ctx) -> tuple:
    """``ctx.saved_tensors`` without the tensors :func:`keep` held."""
    tensors = ctx.saved_tensors
    return tuple(tensors[:len(tensors) - ctx.held]) if isinstance(ctx.held, int) else tensors


@functools.lru_cache(maxsize=None)
def num_programs_per_wave(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a fixed stand-in under the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter runs programs one after another: few, long programs are cheapest


# torch's autocast runs these ops in fp32 (policy ``fp32``, or ``fp32_set_opt_dtype`` for
# softmax / log_softmax) on the devices where they have an autocast kernel: CUDA, XPU and
# MPS for the softmax family; cross_entropy also on CPU (``cross_entropy_loss`` has a CPU
# autocast kernel; elsewhere its log_softmax and nll_loss do). Read from the dispatcher
# once, so that the answer follows the installed torch.
_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA", "xpu": "AutocastXPU",
                  "mps": "AutocastMPS"}


def _autocast_devices(*ops: str) -> frozenset:
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return frozenset(dev for dev, key in _AUTOCAST_KEYS.items() if any(has(op, key) for op in ops))


_AUTOCAST_FP32 = {
    "softmax": _autocast_devices("aten::softmax.int"),
    "log_softmax": _autocast_devices("aten::log_softmax.int"),
    "logsumexp": _autocast_devices("aten::logsumexp"),
    "cross_entropy": _autocast_devices("aten::cross_entropy_loss", "aten::log_softmax.int"),
}


def autocast_fp32_active(fn: str, device_type: str) -> bool:
    """True when the autocast now active makes torch's ``fn`` cast its fp16 / bf16 tensor
    arguments to fp32 on ``device_type``."""
    return device_type in _AUTOCAST_FP32[fn] and torch.is_autocast_enabled(device_type)


LOW_FLOATS = (torch.float16, torch.bfloat16)


def autocast_to_fp32(fn: str, t: torch.Tensor) -> bool:
    """True when, under the autocast now active, torch's ``fn`` would compute the fp16 /
    bf16 tensor ``t`` in fp32 (and return fp32)."""
    return t.dtype in LOW_FLOATS and autocast_fp32_active(fn, t.device.type)


def fp32_if_low(t):
    """Autocast's cast of an operand: an fp16 / bf16 tensor to fp32; anything else (None,
    integers, fp32, fp64) as it is."""
    return t.float() if isinstance(t, torch.Tensor) and t.dtype in LOW_FLOATS else t


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp64 for fp64 inputs, fp32 for everything narrower."""
    return torch.float64 if dtype == torch.float64 else torch.float32


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float(name: str, t: torch.Tensor) -> None:
    """Raise torch's error type (NotImplementedError) for a dtype the kernels do not take."""
    if t.dtype not in FLOAT_DTYPES:
        raise NotImplementedError(
            f"fused_softmax.{name}: not implemented for input dtype {t.dtype}; expected "
            "float16, bfloat16, float32 or float64 (cast the input first, input.float())"
        )


def as_symint(value):
    """``value`` as a Python int where torch's argument parser takes it for a SymInt
    parameter (``ignore_index``): anything with ``__index__`` (a numpy integer or 0-d
    array, a one-element integer tensor, ...) but a bool or a bool tensor; else ``None``."""
    if isinstance(value, torch.SymInt) or (
            torch.compiler.is_compiling() and type(value) is int):
        # (an int may be symbolic under torch.compile: index() would pin it to its value)
        return value
    if (isinstance(value, bool) or not hasattr(type(value), "__index__")
            or (isinstance(value, torch.Tensor) and value.dtype == torch.bool)):
        return None
    return operator.index(value)


def as_index(value):
    """``value`` as a Python int where torch's argument parser takes it for an int
    parameter (``dim``): an int, a numpy integer, a 0-d integer tensor; not a bool, a bool
    tensor or another object with ``__index__``; else ``None``."""
    if isinstance(value, torch.Tensor):
        integral = not (value.is_floating_point() or value.is_complex()
                        or value.dtype == torch.bool)
        return operator.index(value) if value.dim() == 0 and integral else None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer, torch.SymInt)):
        return None
    return operator.index(value)


def is_finite(v) -> bool:
    """``math.isfinite`` that also takes the symbolic floats of ``torch.compile(dynamic=True)``
    (``inf - inf`` and ``nan - nan`` are NaN, which equals nothing)."""
    return v - v == 0


def wrap_dim(dim: int, ndim: int) -> int:
    """torch's dimension wrapping, with torch's IndexError for a dimension out of range."""
    n = max(ndim, 1)
    index = as_index(dim)  # (a 0-d int tensor or a numpy integer, not an array)
    if index is None:
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    dim = index
    if not -n <= dim < n:
        raise IndexError(
            f"Dimension out of range (expected to be in range of [{-n}, {n - 1}], but got {dim})"
        )
    return dim % n


def _foreign_subclass(t: torch.Tensor) -> bool:
    """A tensor subclass with its own dispatch (DTensor, nested jagged tensors, wrapper
    subclasses): torch's ops have its rules, the custom ops do not. Parameters and the
    tracing tensors of FakeTensorMode / export are plain for this purpose."""
    if type(t) is torch.Tensor or isinstance(t, torch.nn.Parameter):
        return False
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor
    return not isinstance(t, (FakeTensor, FunctionalTensor))


def needs_torch_ops(*tensors) -> bool:
    """True for inputs of ``torch.func`` transforms (``grad``, ``vmap``, ``jvp``,
    ``jacfwd``, ...) and of autograd's own vmap (``autograd.grad(..., is_grads_batched=True)``,
    a vectorized jacobian), forward-mode AD dual tensors, tensor subclasses with their own
    dispatch (DTensor, nested tensors) and sparse layouts. The custom ops define reverse-mode
    autograd only (no batching or forward-AD rule, where torch would silently give a zero
    tangent), so such calls go through torch's own ops: same semantics, every transform.
    Likewise under ``torch.jit.trace``: a TorchScript graph of torch's ops, which loads
    without this package, and whose trace check passes (an autograd.Function's arguments,
    grad mode included, would be baked into the graph)."""
    if torch.compiler.is_compiling():
        return False
    if torch.jit.is_tracing():
        return True
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        if _foreign_subclass(t) or t.layout != torch.strided or t.is_nested:  # DTensor, sparse, ...
            return True
        if torch._C._functorch.is_functorch_wrapped_tensor(t):
            return True
        if torch._C._functorch.is_legacy_batchedtensor(t):  # is_grads_batched's vmap
            return True
        if torch.autograd.forward_ad.unpack_dual(t).tangent is not None:
            return True
    return False


def differentiated(t) -> bool:
    """True for a tensor a transform differentiates with respect to: a forward-AD dual, or
    the wrapper of a ``torch.func`` grad / vjp / jvp level (not vmap's batching alone). A
    backward's ``grad_output`` is one where the backward itself is differentiated with
    respect to it (``jvp`` or ``grad`` of ``autograd.grad(y, x, v)`` in ``v``): the ops have
    no rule for that, so the backward forms its result with torch's ops."""
    if torch.compiler.is_compiling() or not isinstance(t, torch.Tensor):
        return False  # (Dynamo traces no functorch query; a compiled backward is plain)
    if torch.autograd.forward_ad.unpack_dual(t).tangent is not None:
        return True
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        if functorch.is_gradtrackingtensor(t):
            return True
        t = functorch.get_unwrapped(t)
    return False


def float_bits(v: float) -> int:
    """The bits of ``v`` as an fp64, as a signed int64: how a float argument reaches a
    kernel exactly (see ``kernels.softmax.float_arg``)."""
    bits = struct.unpack("<q", struct.pack("<d", float(v)))[0]
    # The positive subnormals 1.06e-314 .. 2.12e-314 have bits in [2^31, 2^32), which the
    # interpreter passes as uint32 (the bitcast to fp64 then fails): 0 for them, everywhere.
    return 0 if 2**31 <= bits < 2**32 else bits


def torch_function_dispatch(*tensors) -> bool:
    """Whether to hand the call to ``__torch_function__`` (torch.fx proxies, tensor
    subclasses), as torch's own functions do. Not inside torch.compile, whose Dynamo sees
    the subclass's own ``__torch_function__`` already (and fails, fullgraph, on a second
    dispatch from within it)."""
    return (not torch.compiler.is_compiling()
            and torch.overrides.has_torch_function_variadic(*tensors))


def extras_repr(module, defaults) -> str:
    """``", name=value"`` for each of a module's keyword-only extras ``(name, default)``
    that differs from its default (torch's own arguments print as torch prints them)."""
    def is_default(v, default):  # a tensor (not a valid extra) is shown, never compared
        return v is default or (type(v) in (int, float, bool) and v == default)

    return "".join(f", {k}={getattr(module, k)}" for k, default in defaults
                   if not is_default(getattr(module, k), default))
