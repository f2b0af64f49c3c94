"""The one table of benchmark cases, shared by ``python -m fused_softmax bench`` and the
pytest-benchmark suite in ``bench/``.

A :class:`Case` names an op, a mode (``fwd`` or ``fwd+bwd``), a dtype, a shape and the
reduced dimension. It knows how to make its inputs and how many bytes a perfect kernel
must move (read every input once, write every output once): the numerator of the
effective bandwidth that the benchmarks report.

The standard table, for each of bf16, fp16 and fp32:

* softmax forward over ``rows × N`` with ``2**28`` elements in all, ``N = 1024 … 262144``;
* softmax, log_softmax and logsumexp forward + backward at ``8192 × 32768`` (log_softmax
  and logsumexp also forward alone);
* softmax forward along a non-last dimension: dim 0 of ``32768 × 8192`` and dim 1 of
  ``64 × 4096 × 1024``;
* cross-entropy over ``8192 × V`` logits for ``V = 32000, 128256, 256000`` (Llama-2,
  Llama-3 and Gemma vocabularies), forward and forward + backward;
* linear + cross-entropy (the LM-head loss) for ``8192`` tokens of hidden size ``4096``
  and ``V = 128256, 256000``, bf16 only (the training dtype), forward and forward +
  backward: shape ``(tokens, hidden, V)``; a matmul-bound op, so its cases also count flops.

``quick`` cases are the headline subset, bf16 only: the rows of the design notes' table.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, Iterable, Optional, Sequence, Tuple

import torch

OPS = ("softmax", "log_softmax", "logsumexp", "cross_entropy", "linear_cross_entropy")
MODES = ("fwd", "fwd+bwd")
DTYPES: Dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}

#: Elements in each softmax sweep case: 512 MiB of bf16, whatever the row length.
SWEEP_ELEMENTS = 2**28
SWEEP_N = (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144)
HEADLINE_SHAPE = (8192, 32768)
NON_LAST_DIM = (((32768, 8192), 0), ((64, 4096, 1024), 1))
CE_ROWS = 8192
CE_VOCABS = (32000, 128256, 256000)
LCE_SHAPES = ((8192, 4096, 128256), (8192, 4096, 256000))
#: Bytes of one class-index target (int64).
TARGET_BYTES = 8


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark case: ``op`` in ``mode`` on a ``dtype`` tensor of ``shape`` along ``dim``."""

    op: str
    mode: str
    dtype: str
    shape: Tuple[int, ...]
    dim: int = -1
    quick: bool = False

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"unknown op {self.op!r}; expected one of {OPS}")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; expected one of {MODES}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; expected one of {tuple(DTYPES)}")
        if self.op == "cross_entropy" and (len(self.shape) != 2 or self.dim != -1):
            raise ValueError("cross_entropy cases are (rows, vocabulary) logits over the last dim")
        if self.op == "linear_cross_entropy" and (len(self.shape) != 3 or self.dim != -1):
            raise ValueError("linear_cross_entropy cases are (tokens, hidden, vocabulary)")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def name(self) -> str:
        """Readable label, e.g. ``softmax fwd bf16 8192x32768`` (``dim=0`` when not last)."""
        shape = "x".join(str(s) for s in self.shape)
        dim = "" if self.dim in (-1, len(self.shape) - 1) else f" dim={self.dim}"
        return f"{self.op} {self.mode} {self.dtype} {shape}{dim}"

    @property
    def id(self) -> str:
        """The name with no spaces: a pytest id and a file-name-safe key."""
        return self.name.replace(" ", "-").replace("=", "")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def rows(self) -> int:
        """Number of independent reductions (slices along ``dim``)."""
        if self.op == "linear_cross_entropy":
            return self.shape[0]
        return self.numel // self.shape[self.dim]

    def flops(self) -> int:
        """Matmul flops a perfect implementation must do: 0 for the reductions; for
        linear_cross_entropy ``2·M·H·V`` for the logits, and as much again for each of the
        input and weight gradients in ``fwd+bwd``."""
        if self.op != "linear_cross_entropy":
            return 0
        M, H, V = self.shape
        return 2 * M * H * V * (1 if self.mode == "fwd" else 3)

    def bytes_moved(self) -> int:
        """Bytes a perfect implementation must move: inputs read once, outputs written once.

        * softmax / log_softmax: forward reads ``x`` and writes ``y``; backward reads ``y``
          and ``dy`` and writes ``dx``: ``2`` resp. ``5`` tensor passes.
        * logsumexp: forward reads ``x`` and writes one value per row; backward reads ``x``,
          the row gradient and the saved row result and writes ``dx``.
        * cross_entropy (class-index targets, mean reduction): forward reads the logits and
          the targets; forward + backward, fused, reads the logits once and writes their
          gradient once, plus the targets. The scalar loss is not counted.
        * linear_cross_entropy: the hidden states and the head's weight (and their
          gradients), plus the targets; the logits need not touch memory at all.
        """
        e = torch.empty((), dtype=self.torch_dtype).element_size()
        if self.op == "linear_cross_entropy":  # read x and W (and write their gradients)
            M, H, V = self.shape
            return (M * H + V * H) * e * (1 if self.mode == "fwd" else 2) + M * TARGET_BYTES
        full = self.numel * e
        per_row = self.rows * e
        if self.op in ("softmax", "log_softmax"):
            return 2 * full if self.mode == "fwd" else 5 * full
        if self.op == "logsumexp":
            return full + per_row if self.mode == "fwd" else 3 * full + 3 * per_row
        targets = self.rows * TARGET_BYTES
        return full + targets if self.mode == "fwd" else 2 * full + targets

    def make_inputs(self, device, seed: int = 0) -> dict:
        """Inputs on ``device``: ``x`` (logits, N(0, 1)), and ``target`` (cross-entropy) or
        ``dy`` (the incoming gradient of a softmax-like op in ``fwd+bwd`` mode)."""
        g = torch.Generator(device=device).manual_seed(seed)
        if self.op == "linear_cross_entropy":
            M, H, V = self.shape
            x = torch.randn((M, H), device=device, generator=g).to(self.torch_dtype)
            w = (torch.randn((V, H), device=device, generator=g) * H ** -0.5).to(self.torch_dtype)
            target = torch.randint(0, V, (M,), device=device, generator=g)
            return {"x": x, "weight": w, "target": target}
        x = torch.randn(self.shape, dtype=self.torch_dtype, device=device, generator=g)
        inputs = {"x": x}
        if self.op == "cross_entropy":
            inputs["target"] = torch.randint(
                0, self.shape[-1], (self.shape[0],), device=device, generator=g)
        elif self.mode == "fwd+bwd":
            out_shape = self.shape
            if self.op == "logsumexp":
                out_shape = tuple(s for i, s in enumerate(self.shape) if i != self.dim % len(self.shape))
            inputs["dy"] = torch.randn(out_shape, dtype=self.torch_dtype, device=device, generator=g)
        return inputs


def _standard_cases() -> Tuple[Case, ...]:
    cases = []
    for dtype in DTYPES:
        headline = dtype == "bf16"
        for n in SWEEP_N:
            cases.append(Case("softmax", "fwd", dtype, (SWEEP_ELEMENTS // n, n),
                              quick=headline and n in (32768, 131072)))
        cases.append(Case("softmax", "fwd+bwd", dtype, HEADLINE_SHAPE, quick=headline))
        for op in ("log_softmax", "logsumexp"):
            for mode in MODES:
                cases.append(Case(op, mode, dtype, HEADLINE_SHAPE))
        for shape, dim in NON_LAST_DIM:
            cases.append(Case("softmax", "fwd", dtype, shape, dim=dim, quick=headline and dim == 0))
        for vocab in CE_VOCABS:
            for mode in MODES:
                cases.append(Case("cross_entropy", mode, dtype, (CE_ROWS, vocab),
                                  quick=headline and vocab == 128256))
    for shape in LCE_SHAPES:
        for mode in MODES:
            cases.append(Case("linear_cross_entropy", mode, "bf16", shape,
                              quick=mode == "fwd+bwd" and shape[2] == 128256))
    return tuple(cases)


#: Every standard case, in the order the benchmarks run them.
CASES: Tuple[Case, ...] = _standard_cases()


def select(
    ops: Optional[Iterable[str]] = None,
    dtypes: Optional[Iterable[str]] = None,
    modes: Optional[Iterable[str]] = None,
    quick: bool = False,
    cases: Sequence[Case] = CASES,
) -> Tuple[Case, ...]:
    """The cases matching every given filter (``None`` matches all); ``quick`` keeps the
    headline subset only. Raises ``ValueError`` for an unknown op, dtype or mode."""

    def check(values, allowed, what):
        if values is None:
            return None
        values = set(values)
        unknown = values - set(allowed)
        if unknown:
            raise ValueError(f"unknown {what} {sorted(unknown)}; expected some of {list(allowed)}")
        return values

    ops, dtypes, modes = check(ops, OPS, "op"), check(dtypes, DTYPES, "dtype"), check(modes, MODES, "mode")
    return tuple(
        c for c in cases
        if (ops is None or c.op in ops)
        and (dtypes is None or c.dtype in dtypes)
        and (modes is None or c.mode in modes)
        and (c.quick or not quick)
    )
