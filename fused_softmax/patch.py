"""Route ``torch.nn.functional`` softmax, log_softmax and cross_entropy through
fused_softmax, for code you do not own (a model from another package, say); so too
``torch.nn.Softmax``, ``LogSoftmax`` and ``CrossEntropyLoss``, whose forward looks the
function up in ``torch.nn.functional`` at each call (as does a wrapper someone installs
there after ``patch()``)::

    import fused_softmax

    fused_softmax.patch()            # from here on, until fused_softmax.unpatch()
    with fused_softmax.patch():      # or only inside the block
        loss = model(batch)          # its F.softmax / nn.CrossEntropyLoss use the kernels

A call goes to the kernels only when they serve it: a strided float tensor on a device
where the Triton kernels run (CUDA, or the CPU under ``TRITON_INTERPRET=1``), with no
``__torch_function__`` override on any argument (tensor subclasses, ``torch.fx`` proxies).
Everything else — other devices, sparse or nested tensors, integer inputs, CPU tensors
served by torch's own kernels — falls through to the original torch function untouched.

Only look-ups made after ``patch()`` see it: ``F.softmax(...)`` and the ``torch.nn``
modules do, a name bound earlier by ``from torch.nn.functional import softmax`` does not.
"""

from __future__ import annotations

import threading
import warnings
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch.overrides import handle_torch_function, has_torch_function

from . import _backend
from .cross_entropy import cross_entropy as _fused_cross_entropy
from .softmax import log_softmax as _fused_log_softmax
from .softmax import softmax as _fused_softmax

_state = threading.local()  # .inside: a routed call is running; never route re-entrantly
_patched = False


def _kernels_serve(*tensors) -> bool:
    """True when every tensor (``None`` skipped) can go to the fused kernels unchanged."""
    present = tuple(t for t in tensors if t is not None)
    if not present or getattr(_state, "inside", False) or has_torch_function(present):
        return False
    for t in present:
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.is_nested:
            return False
    return _backend.use_triton(present[0])


def _routed(fn: Callable, *args, **kwargs):
    _state.inside = True
    try:
        return fn(*args, **kwargs)
    finally:
        _state.inside = False


def _float_after_cast(input: torch.Tensor, dtype) -> bool:
    return (dtype or input.dtype) in _backend.FLOAT_DTYPES


#: torch's functions as imported, before any patch: what scripted code (TorchScript) calls.
_TORCH_SOFTMAX = F.softmax
_TORCH_LOG_SOFTMAX = F.log_softmax
_TORCH_CROSS_ENTROPY = F.cross_entropy


def _past_patch(stacklevel):
    """The caller's ``_stacklevel`` past this module's three frames. torch reads it only
    for the legacy ``dim=None`` warning, so any other value (None, say) passes as is."""
    return stacklevel + 3 if isinstance(stacklevel, int) and not isinstance(stacklevel, bool) \
        else stacklevel


def _fall_through(name: str, args: tuple, kwargs: dict, tensors: tuple):
    """torch's function for ``name``. A ``__torch_function__`` override (a subclass,
    ``torch.fx`` tracing) sees torch's own function object, called as torch calls it
    (tensors positional, the rest keywords, the caller's ``_stacklevel``), exactly as
    without the patch."""
    original = _ORIGINALS[name]
    present = tuple(t for t in tensors if t is not None)
    if has_torch_function(present):
        return handle_torch_function(original, present, *args, **kwargs)
    if "_stacklevel" in kwargs:  # the warning points past this module's three frames
        kwargs = dict(kwargs, _stacklevel=_past_patch(kwargs["_stacklevel"]))
    return original(*args, **kwargs)


@torch.jit.unused
def _softmax_eager(input: torch.Tensor, dim: Optional[int], _stacklevel: int,
                   dtype: Optional[int]) -> torch.Tensor:
    if _kernels_serve(input) and _float_after_cast(input, dtype):
        return _routed(_fused_softmax, input, dim, _past_patch(_stacklevel), dtype)
    return _fall_through("softmax", (input,), dict(dim=dim, _stacklevel=_stacklevel, dtype=dtype),
                         (input,))


@torch.jit.unused
def _log_softmax_eager(input: torch.Tensor, dim: Optional[int], _stacklevel: int,
                       dtype: Optional[int]) -> torch.Tensor:
    if _kernels_serve(input) and _float_after_cast(input, dtype):
        return _routed(_fused_log_softmax, input, dim, _past_patch(_stacklevel), dtype)
    return _fall_through("log_softmax", (input,),
                         dict(dim=dim, _stacklevel=_stacklevel, dtype=dtype), (input,))


@torch.jit.unused
def _cross_entropy_eager(input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
                         size_average: Optional[bool], ignore_index: int, reduce: Optional[bool],
                         reduction: str, label_smoothing: float) -> torch.Tensor:
    args = (input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing)
    if (_kernels_serve(input, target, weight) and _float_after_cast(input, None)
            and target.dtype != torch.int32):  # torch refuses int32 targets: its error
        return _routed(_fused_cross_entropy, *args)
    return _fall_through("cross_entropy", (input, target),
                         dict(weight=weight, size_average=size_average, ignore_index=ignore_index,
                              reduce=reduce, reduction=reduction, label_smoothing=label_smoothing),
                         (input, target, weight))


# The wrappers are TorchScript-compatible: scripted code calls torch's own function.
def softmax(input: torch.Tensor, dim: Optional[int] = None, _stacklevel: int = 3,
            dtype: Optional[int] = None) -> torch.Tensor:
    """:func:`torch.nn.functional.softmax`, served by :func:`fused_softmax.softmax` when it can."""
    if torch.jit.is_scripting():
        return _TORCH_SOFTMAX(input, dim, _stacklevel, dtype)
    return _softmax_eager(input, dim, _stacklevel, dtype)


def log_softmax(input: torch.Tensor, dim: Optional[int] = None, _stacklevel: int = 3,
                dtype: Optional[int] = None) -> torch.Tensor:
    """:func:`torch.nn.functional.log_softmax`, served by :func:`fused_softmax.log_softmax` when it can."""
    if torch.jit.is_scripting():
        return _TORCH_LOG_SOFTMAX(input, dim, _stacklevel, dtype)
    return _log_softmax_eager(input, dim, _stacklevel, dtype)


def cross_entropy(input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None,
                  size_average: Optional[bool] = None, ignore_index: int = -100,
                  reduce: Optional[bool] = None, reduction: str = "mean",
                  label_smoothing: float = 0.0) -> torch.Tensor:
    """:func:`torch.nn.functional.cross_entropy`, served by :func:`fused_softmax.cross_entropy` when it can."""
    if torch.jit.is_scripting():
        return _TORCH_CROSS_ENTROPY(input, target, weight, size_average, ignore_index, reduce,
                                    reduction, label_smoothing)
    return _cross_entropy_eager(input, target, weight, size_average, ignore_index, reduce,
                                reduction, label_smoothing)


#: The ``torch.nn.functional`` functions that ``patch()`` replaces, and their replacements.
_REPLACEMENTS = (
    ("softmax", softmax),
    ("log_softmax", log_softmax),
    ("cross_entropy", cross_entropy),
)
#: Name -> the torch function that ``patch()`` replaces (re-read at each ``patch()``).
#: Kept after ``unpatch()``, so a wrapper someone still holds falls through. (Names, not
#: ``(module, name)`` keys: torch 2.11's Dynamo cannot hash a module in a dict key, which
#: broke ``torch.compile(fullgraph=True)`` of a patched call falling through to torch.)
_ORIGINALS: Dict[str, Callable] = {name: F.__dict__[name] for name, _ in _REPLACEMENTS}


#: Entries that ``unpatch()`` left in place (replaced by something else after ``patch()``).
_LEFT_IN_PLACE: Dict[str, Callable] = {}


def is_patched() -> bool:
    """True between :func:`patch` and :func:`unpatch`."""
    return _patched


class _PatchContext:
    """Returned by :func:`patch`; as a context manager, restores the state before the
    ``with`` on exit (so a ``with patch():`` inside a patched program keeps it patched)."""

    def __init__(self, was_patched: bool):
        self._was_patched = was_patched

    def __enter__(self) -> "_PatchContext":
        return self

    def __exit__(self, *exc) -> None:
        if not self._was_patched:
            unpatch()


#: patch() and unpatch() one at a time: two threads patching at once could record our own
#: replacement as torch's original (unpatch() then restored nothing, and a fall-through
#: recursed).
_LOCK = threading.RLock()


def patch() -> _PatchContext:
    """Route torch's softmax, log_softmax and cross_entropy (functions and ``torch.nn``
    modules) through fused_softmax. Idempotent; undo with :func:`unpatch`, or use it as a
    context manager: ``with fused_softmax.patch(): ...``."""
    with _LOCK:
        return _patch()


def _patch() -> _PatchContext:
    global _patched
    was_patched = _patched
    if not was_patched:
        for name, new in _REPLACEMENTS:
            current = F.__dict__[name]
            if _LEFT_IN_PLACE.pop(name, None) is not current:
                # (a wrapper unpatch() left in place may call our function: falling
                # through to it would recurse; torch's original stays the one we keep)
                _ORIGINALS[name] = current
            setattr(F, name, new)
        _patched = True
    return _PatchContext(was_patched)


def unpatch() -> None:
    """Put back exactly the torch objects that :func:`patch` replaced (no-op if unpatched).
    One that something else has replaced since (a profiler's wrapper of the patched
    function, say) is left in place, with a warning: putting torch's back would silently
    remove that wrapper."""
    global _patched
    with _LOCK:
        if not _patched:
            return
        for name, new in _REPLACEMENTS:
            current = F.__dict__.get(name)
            if current is new:
                setattr(F, name, _ORIGINALS[name])
            else:
                _LEFT_IN_PLACE[name] = current
                warnings.warn(
                    f"fused_softmax.unpatch(): {F.__name__}.{name} was replaced after patch(); "
                    "left as it is (it may still call fused_softmax)", stacklevel=2)
        _patched = False
