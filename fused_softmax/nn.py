"""``torch.nn`` modules backed by the fused kernels: same constructors, same forward."""

from __future__ import annotations

from typing import Optional

import torch

from . import softmax as _softmax


class _SoftmaxBase(torch.nn.Module):
    __constants__ = ["dim"]
    _fn = None

    def __init__(self, dim: Optional[int] = None, *, temperature: float = 1.0) -> None:
        super().__init__()
        self.dim = dim
        self.temperature = temperature

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("dim", None)
        self.__dict__.setdefault("temperature", 1.0)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return type(self)._fn(input, self.dim, _stacklevel=5, temperature=self.temperature)

    def extra_repr(self) -> str:
        extra = f", temperature={self.temperature}" if self.temperature != 1.0 else ""
        return f"dim={self.dim}{extra}"


class Softmax(_SoftmaxBase):
    """Drop-in for :class:`torch.nn.Softmax` (plus keyword-only ``temperature``).

    Example::

        >>> m = fused_softmax.nn.Softmax(dim=-1)
        >>> m(torch.randn(2, 3)).sum(-1)
        tensor([1.0000, 1.0000])
    """

    _fn = staticmethod(_softmax.softmax)


class LogSoftmax(_SoftmaxBase):
    """Drop-in for :class:`torch.nn.LogSoftmax` (plus keyword-only ``temperature``)."""

    _fn = staticmethod(_softmax.log_softmax)
