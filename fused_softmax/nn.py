"""``torch.nn`` modules backed by the fused kernels: same constructors, same forward."""

from __future__ import annotations

from typing import Optional

import torch

from . import _backend
from . import softmax as _softmax
from .cross_entropy import cross_entropy
from .linear_cross_entropy import LinearCrossEntropyLoss  # noqa: F401


class _TemperatureMixin:
    """The keyword-only ``temperature`` of the softmax modules, on top of torch's module."""

    _LOG = False  # log_softmax rather than softmax

    def _init(self, dim: Optional[int], temperature: float) -> None:
        # called by each class's own __init__, so that argument errors name the class
        # ("Softmax.__init__() takes ..."), as torch's; then torch's own __init__
        super().__init__(dim)
        if not isinstance(temperature, torch.Tensor):  # the forward's errors, at once
            _softmax._temperature_factor(temperature, torch.float32, torch.device("cpu"))
        self.temperature = temperature
        self._log = type(self)._LOG  # an instance attribute: torch.jit.script copies it

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("temperature", 1.0)
        self.__dict__.setdefault("_log", type(self)._LOG)

    @torch.jit.ignore
    def _fused(self, input):  # no annotations: TorchScript reads them as Tensor
        # Left to Python by torch.jit.script (the kernels are not TorchScript), so that a
        # scripted module runs as torch's does; it cannot be saved with torch.jit.save.
        fn = _softmax.log_softmax if self._log else _softmax.softmax
        return fn(input, self.dim, _stacklevel=6, temperature=self.temperature)

    def extra_repr(self) -> str:
        t = self.temperature
        extra = "" if isinstance(t, (int, float)) and t == 1.0 else f", temperature={t}"
        return f"dim={self.dim}{extra}"


class Softmax(_TemperatureMixin, torch.nn.Softmax):
    """Drop-in for :class:`torch.nn.Softmax` (a subclass of it, plus keyword-only
    ``temperature``).

    Example::

        >>> m = fused_softmax.nn.Softmax(dim=-1)
        >>> m(torch.tensor([[0.0, 0.0], [0.0, 1.0986123]]))  # log(3)
        tensor([[0.5000, 0.5000],
                [0.2500, 0.7500]])
    """

    def __init__(self, dim: Optional[int] = None, *, temperature: float = 1.0) -> None:
        self._init(dim, temperature)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # its own: errors name the class
        return self._fused(input)


class LogSoftmax(_TemperatureMixin, torch.nn.LogSoftmax):
    """Drop-in for :class:`torch.nn.LogSoftmax` (a subclass of it, plus keyword-only
    ``temperature``)."""

    _LOG = True

    def __init__(self, dim: Optional[int] = None, *, temperature: float = 1.0) -> None:
        self._init(dim, temperature)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # its own: errors name the class
        return self._fused(input)


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """Drop-in for :class:`torch.nn.CrossEntropyLoss` (a subclass of it), backed by
    :func:`fused_softmax.cross_entropy`.

    Same constructor and forward as torch's, plus the keyword-only extras of
    :func:`fused_softmax.cross_entropy` (``logit_scale``, ``softcap``, ``z_loss``,
    ``inplace_backward``). ``weight`` is a registered buffer, as in torch, so
    ``state_dict`` round-trips with torch's module.

    Example::

        >>> loss_fn = fused_softmax.nn.CrossEntropyLoss(label_smoothing=0.1)
        >>> loss = loss_fn(torch.randn(4, 10, requires_grad=True), torch.tensor([1, 0, 9, 3]))
    """

    def __init__(self, weight: Optional[torch.Tensor] = None, size_average=None,
                 ignore_index: int = -100, reduce=None, reduction: str = "mean",
                 label_smoothing: float = 0.0, *, logit_scale: float = 1.0,
                 softcap: Optional[float] = None, z_loss: float = 0.0,
                 inplace_backward: bool = False) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.logit_scale = logit_scale
        self.softcap = softcap
        self.z_loss = z_loss
        self.inplace_backward = inplace_backward

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self._fused(input, target)

    def extra_repr(self) -> str:  # torch's module prints nothing; the extras that are set
        return _backend.extras_repr(self, (("logit_scale", 1.0), ("softcap", None),
                                           ("z_loss", 0.0), ("inplace_backward", False)))[2:]

    @torch.jit.ignore
    def _fused(self, input, target):  # left to Python by torch.jit.script, as the softmax modules
        return cross_entropy(
            input, target, weight=self.weight, ignore_index=self.ignore_index,
            reduction=self.reduction, label_smoothing=self.label_smoothing,
            logit_scale=self.logit_scale, softcap=self.softcap, z_loss=self.z_loss,
            inplace_backward=self.inplace_backward,
        )
