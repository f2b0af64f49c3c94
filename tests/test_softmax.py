"""Tests of fused_softmax.softmax / log_softmax / logsumexp against torch (the contract).

On a CPU-only machine the real Triton kernels run through the Triton interpreter
(``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before anything imports triton), so every
shape here is small; the same file runs unchanged on a GPU.

Layout of this file:
  * ``SHAPES``, ``VALUES`` and ``CASES``: the one table of cases (OpInfo style) that drives
    the forward accuracy tests and, through ``GRAD_TABLE``, the gradient tests;
  * accuracy against an fp64 reference, with torch's own error in the same dtype as yardstick;
  * gradients, gradcheck, double backward;
  * API parity (legacy ``dim=None``, ``dtype=``, errors, logsumexp dims, nn modules);
  * backend (kernels really ran; the torch path gives the same results);
  * opcheck and ``torch.compile(fullgraph=True)``;
  * 64-bit offsets.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import warnings
import zlib
from typing import Optional, Tuple

import pytest
import torch
import torch.nn.functional as F

import fused_softmax as fs
from fused_softmax import _backend

# ``fused_softmax.softmax`` is the function (the package re-exports it); the module is:
fsm = importlib.import_module("fused_softmax.softmax")

# The Triton interpreter runs kernels through numpy, which warns on every overflowing exp
# (expected here: infinities are part of the table) and on a deprecated array-to-scalar
# conversion inside Triton 3.6 itself.  Neither is about this library; recording
# thousands of them also costs seconds.
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:triton.runtime.interpreter"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
]

FP16, BF16, FP32, FP64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
ALL_DTYPES = (FP16, BF16, FP32, FP64)
SHORT = {FP16: "fp16", BF16: "bf16", FP32: "fp32", FP64: "fp64"}

# Machine epsilon (distance from 1 to the next representable number) of each dtype.
EPS = {FP16: 2.0**-10, BF16: 2.0**-7, FP32: 2.0**-23, FP64: 2.0**-52}

INF, NAN = math.inf, math.nan


# ============================================================================ the table
@dataclasses.dataclass(frozen=True)
class ShapeCase:
    """Logical shape, reduced dim and memory layout of an input.

    layout: None (contiguous); ("T",) the last two dims transposed in memory; ("step", d)
    a slice with step 2 along dim d; ("expand", d) a size-1 dim d expanded (stride 0).
    """

    name: str
    shape: Tuple[int, ...]
    dim: int
    layout: Optional[tuple] = None
    dtypes: Tuple[torch.dtype, ...] = ALL_DTYPES


@dataclasses.dataclass(frozen=True)
class ValueCase:
    """What the logits look like: ``randn * scale`` (clamped to +-4 sigma so that 1e4-scale
    logits fit fp16), special values, and the softmax temperature."""

    name: str
    scale: float = 1.0
    special: Tuple[str, ...] = ()  # "neginf_some", "neginf_row", "posinf", "nan"
    temperature: float = 1.0


@dataclasses.dataclass(frozen=True)
class Case:
    shape: ShapeCase
    values: ValueCase
    dtype: torch.dtype

    @property
    def id(self):
        return f"{self.shape.name}-{self.values.name}-{SHORT[self.dtype]}"


# Tiles hold 32768 elements for 2-byte dtypes, 16384 for fp32, 8192 for fp64: rows longer
# than that take the two-pass (online max/sum, then re-read) path.  A strided reduction
# uses 64-position tiles and goes two-pass once 64 * next_pow2(N) > tile / 2.
SHAPES = [
    ShapeCase("2d_last", (5, 37), -1),
    ShapeCase("2d_last_pow2", (4, 64), 1),
    ShapeCase("2d_dim0", (37, 6), 0),
    ShapeCase("3d_mid", (3, 33, 5), 1),
    ShapeCase("4d_mid_neg", (2, 3, 17, 4), -2),
    ShapeCase("3d_dim0", (7, 3, 4), 0),
    ShapeCase("3d_neg3", (5, 2, 3), -3),
    ShapeCase("0d", (), 0),
    ShapeCase("0d_neg", (), -1),
    ShapeCase("1d", (50,), 0),
    ShapeCase("1d_neg", (7,), -1),
    ShapeCase("N1_last", (6, 1), -1),
    ShapeCase("N1_mid", (4, 1, 9), 1),
    ShapeCase("npow2_1000", (3, 1000), -1),
    ShapeCase("many_short_rows", (300, 3), -1),
    # rows longer than one tile: the two-pass row path
    ShapeCase("long_row_2b", (2, 33000), -1, dtypes=(FP16, BF16)),
    ShapeCase("long_row_fp32", (2, 17000), -1, dtypes=(FP32,)),
    ShapeCase("long_row_fp64", (2, 9000), -1, dtypes=(FP64,)),
    # strided (non-last) reduced dim, long enough for the two-pass strided path
    ShapeCase("long_strided", (2, 300, 32), 1),
    ShapeCase("long_strided_dim0", (5000, 3), 0, dtypes=(BF16, FP32)),
    # non-contiguous inputs
    ShapeCase("transposed_last", (9, 13), -1, layout=("T",)),
    ShapeCase("transposed_dim0", (9, 13), 0, layout=("T",)),
    ShapeCase("step_reduced", (4, 21), -1, layout=("step", 1)),
    ShapeCase("step_outer", (6, 3, 10), 2, layout=("step", 0)),
    ShapeCase("step_mid_reduced", (3, 12, 5), 1, layout=("step", 1)),
    ShapeCase("expand_outer", (5, 19), -1, layout=("expand", 0)),
    ShapeCase("expand_reduced", (4, 11), 1, layout=("expand", 1)),
    ShapeCase("expand_inner", (3, 7, 6), 1, layout=("expand", 2)),
    # empty tensors
    ShapeCase("empty_rows", (0, 5), -1),
    ShapeCase("empty_reduced", (3, 0), 1),
    ShapeCase("empty_reduced_mid", (2, 0, 3), 1),
    ShapeCase("empty_other", (4, 0, 3), 0),
]
SHAPE = {s.name: s for s in SHAPES}

VALUES = [
    ValueCase("plain"),
    ValueCase("scale100", scale=100.0),
    ValueCase("scale1e4", scale=1e4),
    ValueCase("neginf", special=("neginf_some",)),
    ValueCase("neginf_row", special=("neginf_some", "neginf_row")),
    ValueCase("posinf", scale=100.0, special=("posinf",)),
    ValueCase("posinf_neginf_1e4", scale=1e4, special=("neginf_some", "posinf")),
    ValueCase("nan", special=("nan",)),
    ValueCase("all_special", scale=10.0, special=("neginf_some", "neginf_row", "posinf", "nan")),
    ValueCase("T0.5", temperature=0.5),
    ValueCase("T3", temperature=3.0),
    ValueCase("T3_scale100", scale=100.0, temperature=3.0),
    ValueCase("T0.5_scale1e4", scale=1e4, temperature=0.5),
    ValueCase("T3_neginf_row", special=("neginf_some", "neginf_row"), temperature=3.0),
]
VALUE = {v.name: v for v in VALUES}

# The table: every shape in every dtype it lists, with plain logits; every kind of values
# on a short last-dim shape in every dtype; a selection of values on a middle (strided) dim,
# 1-d, 0-d, a transposed input and the long two-pass shapes (row and strided), where the
# online max/sum rescaling meets large logits and infinities.  (Interpreter time bounds
# the size of the cross product; each line below is one slice of it.)
_LONG_VALUES = ("scale1e4", "neginf_row", "posinf", "posinf_neginf_1e4", "T3_scale100")
_SELECTION = [  # (shape, values, dtypes)
    ("2d_last", [v.name for v in VALUES], ALL_DTYPES),
    ("3d_mid", ["scale1e4", "all_special", "T3", "T0.5_scale1e4", "posinf_neginf_1e4"], ALL_DTYPES),
    ("1d", ["neginf_row", "posinf", "nan", "T0.5"], (BF16, FP32)),
    ("0d", ["posinf", "nan", "T3", "neginf_row"], (FP32, FP64)),
    ("transposed_dim0", ["all_special"], (BF16, FP32)),
    ("N1_last", ["all_special", "T3"], (FP16, FP32)),
    ("long_row_2b", _LONG_VALUES, (FP16, BF16)),
    ("long_row_fp32", _LONG_VALUES, (FP32,)),
    ("long_row_fp64", _LONG_VALUES, (FP64,)),
    ("long_strided", _LONG_VALUES, (BF16, FP32)),
    ("long_strided", ("posinf_neginf_1e4",), (FP16, FP64)),
    ("long_strided_dim0", ("posinf_neginf_1e4",), (FP32,)),
]
CASES = [Case(s, VALUE["plain"], dt) for s in SHAPES for dt in s.dtypes]
CASES += [Case(SHAPE[s], VALUE[v], dt) for s, vs, dts in _SELECTION
          for v in vs if v != "plain" for dt in dts]

OPS = ("softmax", "log_softmax", "logsumexp")
OURS = {"softmax": fs.softmax, "log_softmax": fs.log_softmax, "logsumexp": fs.logsumexp}
TORCH = {"softmax": torch.softmax, "log_softmax": torch.log_softmax, "logsumexp": torch.logsumexp}


def _seed(*parts) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


def make_input(case: Case, device) -> torch.Tensor:
    """The case's logits, in its dtype and layout, with its special values."""
    sc, vc = case.shape, case.values
    shape, dim = sc.shape, sc.dim
    gen = torch.Generator().manual_seed(_seed(case.id))
    gen_shape = list(shape)
    if sc.layout and sc.layout[0] == "expand":
        gen_shape[sc.layout[1]] = 1
    vals = torch.randn(gen_shape, generator=gen, dtype=FP64).clamp_(-4, 4) * vc.scale
    if vc.special and vals.dim() > 0 and vals.numel() > 0:
        v = vals.movedim(dim, -1)  # a view: writes land in vals
        n = v.shape[-1]
        first = (0,) * (v.dim() - 1)
        last = tuple(s - 1 for s in v.shape[:-1])
        if "neginf_some" in vc.special:
            v[..., 1::4] = -INF
        if "posinf" in vc.special:
            # at the end of the last slice (the last tile of a long row, after the running
            # max has grown large) and at the start of the first slice
            v[last + (n - 1,)] = INF
            v[first + (0,)] = INF
        if "neginf_row" in vc.special:
            v[first] = -INF  # the first slice all -inf (overrides the +inf above)
        if "nan" in vc.special:
            v[last + (n // 2,)] = NAN
    if vals.dim() == 0 and vc.special:
        vals.fill_(NAN if "nan" in vc.special else INF if "posinf" in vc.special else -INF)
    dtype = case.dtype
    layout = sc.layout
    if layout is None:
        x = vals.to(device=device, dtype=dtype)
    elif layout[0] == "T":
        tshape = list(shape)
        tshape[-1], tshape[-2] = tshape[-2], tshape[-1]
        x = torch.empty(tshape, dtype=dtype, device=device).transpose(-1, -2)
        x.copy_(vals)
        assert not x.is_contiguous()
    elif layout[0] == "step":
        big = list(shape)
        big[layout[1]] *= 2
        x = torch.empty(big, dtype=dtype, device=device).fill_(123.0)  # the skipped elements
        x = x[(slice(None),) * layout[1] + (slice(None, None, 2),)]
        x.copy_(vals)
        assert not x.is_contiguous()
    elif layout[0] == "expand":
        x = vals.to(device=device, dtype=dtype).expand(shape)
        assert x.stride(layout[1]) == 0
    else:
        raise AssertionError(layout)
    return x


def fp64_reference(op: str, x: torch.Tensor, dim, temperature: float = 1.0) -> torch.Tensor:
    """The op in fp64 on the (dtype-rounded) input; temperature as ``x.double() / T``."""
    xd = x.detach().double()
    if op == "logsumexp":
        return torch.logsumexp(xd / temperature if temperature != 1.0 else xd, dim)
    return TORCH[op](xd / temperature if temperature != 1.0 else xd, dim)


def torch_same_dtype(op: str, x: torch.Tensor, dim, temperature: float = 1.0) -> torch.Tensor:
    """What a torch user gets in the input's dtype (temperature as ``x / T`` in that dtype)."""
    xs = x.detach() / temperature if temperature != 1.0 else x.detach()
    return TORCH[op](xs, dim)


def run_ours(op: str, x: torch.Tensor, dim, temperature: float = 1.0) -> torch.Tensor:
    if op == "logsumexp":
        assert temperature == 1.0
        return fs.logsumexp(x, dim)
    if temperature == 1.0:
        return OURS[op](x, dim)
    return OURS[op](x, dim, temperature=temperature)


def max_abs_err(out: torch.Tensor, ref: torch.Tensor, where: torch.Tensor) -> float:
    if not bool(where.any()):
        return 0.0
    return (out.double() - ref)[where].abs().max().item()


def _nonfinite_pattern(t: torch.Tensor):
    t = t.detach().cpu()
    return t.isnan(), t.isposinf(), t.isneginf()


def assert_same_nonfinite(ours: torch.Tensor, expected: torch.Tensor, what: str):
    for name, a, b in zip(("NaN", "+inf", "-inf"), _nonfinite_pattern(ours),
                          _nonfinite_pattern(expected)):
        assert torch.equal(a, b), (
            f"{what}: {name} positions differ: ours at {a.nonzero().tolist()[:8]}, "
            f"expected at {b.nonzero().tolist()[:8]}")


# ============================================================================ accuracy
# Tolerance.  Let eps be the dtype's machine epsilon (fp16 2^-10, bf16 2^-7, fp32 2^-23,
# fp64 2^-52) and z = x / T the scaled logits.  Softmax is conditioned by |z|: rounding
# each z_i once (relative error eps/2) moves log_softmax by up to eps*max|z| and softmax_i
# by p_i times that; rounding the result into the dtype adds eps/2 * |result|, and a
# log-sum-exp result is at most max|z| + log N.  So any correctly implemented kernel that
# rounds each step once is within a few eps * (1 + max|z| + log N) of the fp64 reference:
#     err_ours <= FACTOR * err_torch + SLACK_EPS * eps * (1 + max|z| + log N)
# FACTOR: we may be at most twice as far as torch's own kernel in the same dtype;
# SLACK_EPS = 4: a handful of roundings (scale, subtract, exp, sum/divide or log, store).
# For fp64 the reference *is* torch's computation, so err_torch is 0 and only the slack counts.
FACTOR = 2.0
SLACK_EPS = 4.0


def tolerance(case: Case, op: str, x: torch.Tensor, err_torch: float) -> float:
    eps = EPS[case.dtype]
    T = case.values.temperature
    xd = x.detach().double() / T
    fin = xd[torch.isfinite(xd)]
    zmax = fin.abs().max().item() if fin.numel() else 0.0
    n = x.shape[case.shape.dim] if x.dim() else 1
    return FACTOR * err_torch + SLACK_EPS * eps * (1.0 + zmax + math.log(max(n, 1)))


def _accuracy_params():
    for c in CASES:
        for op in OPS:
            if op == "logsumexp" and c.values.temperature != 1.0:
                continue  # torch.logsumexp has no temperature; softmax/log_softmax cover it
            yield pytest.param(c, op, id=f"{op}-{c.id}")


@pytest.mark.parametrize("case,op", list(_accuracy_params()))
def test_forward_accuracy(case: Case, op: str, device):
    x = make_input(case, device)
    dim, T = case.shape.dim, case.values.temperature

    fwd_before = _backend.launch_counts["softmax_fwd_kernel"]
    out = run_ours(op, x, dim, T)
    launched = _backend.launch_counts["softmax_fwd_kernel"] - fwd_before
    ref = fp64_reference(op, x, dim, T)
    tout = torch_same_dtype(op, x, dim, T)

    # shape, dtype, device like torch
    assert out.shape == tout.shape and out.dtype == tout.dtype and out.device == tout.device

    # The Triton kernel served the call whenever there is something to compute.
    reduced = x.shape[dim] if x.dim() else 1
    if _backend.use_triton(x) and out.numel() > 0 and reduced > 0:
        assert launched == 1, f"softmax_fwd_kernel launched {launched} times"
    else:
        assert launched == 0

    # Non-finite results exactly where torch has them (with a temperature too: x / T is
    # rounded to fp16 / bf16 as torch's, overflow included).
    expected = tout
    assert_same_nonfinite(out, expected, f"{op} {case.id}")

    # Accuracy against the fp64 reference, measured where the result is finite.
    where = torch.isfinite(expected.double()) & torch.isfinite(ref)
    err_ours = max_abs_err(out, ref, where)
    where_t = where & torch.isfinite(tout.double())
    err_torch = max_abs_err(tout, ref, where_t)
    tol = tolerance(case, op, x, err_torch)
    assert err_ours <= tol, (
        f"{op} {case.id}: max |ours - fp64 ref| = {err_ours:.3e} > tol {tol:.3e} "
        f"(torch's own error {err_torch:.3e})")

    # And directly against torch in the same dtype: inf/NaN must coincide, finite values
    # agree to the a-priori rounding slack above (2 eps relative, the slack as absolute;
    # torch.testing's default atol of 1e-5 is below one fp16 ulp of a 1e2-scale logit).
    slack = tolerance(case, op, x, 0.0)
    torch.testing.assert_close(out, tout, equal_nan=True, rtol=2 * EPS[case.dtype], atol=slack,
                               msg=lambda m: f"{op} {case.id} vs torch {SHORT[case.dtype]}: {m}")


@pytest.mark.skipif(not _backend.HAS_TRITON, reason="reads the Triton launch configuration")
def test_table_covers_the_requirements():
    """The table holds every kind of case the requirements name (guards against edits)."""
    names = {c.shape.name for c in CASES}
    vnames = {c.values.name for c in CASES}
    assert {c.dtype for c in CASES} == set(ALL_DTYPES)
    assert {"0d", "1d", "N1_last", "npow2_1000", "long_row_2b", "long_row_fp32",
            "long_strided", "transposed_last", "step_reduced", "expand_outer",
            "empty_reduced", "4d_mid_neg", "2d_dim0"} <= names
    assert {"scale1e4", "neginf", "neginf_row", "posinf", "nan", "T0.5", "T3"} <= vnames
    # the long shapes really take the two-pass paths
    for name, dtype in (("long_row_2b", BF16), ("long_row_fp32", FP32), ("long_row_fp64", FP64),
                        ("long_strided", FP32), ("long_strided", BF16),
                        ("long_strided_dim0", FP32)):
        sc = SHAPE[name]
        x = torch.empty(sc.shape, dtype=dtype)
        xv, shape3, strides = fsm.view3d(x, sc.dim % x.dim())
        cfg, _ = fsm.launch_config(xv, shape3, strides)
        assert not cfg["SINGLE_PASS"], (name, dtype, cfg)


# ============================================================================ gradients
# (shape, dtypes, temperatures, upstream-gradient kinds); every op runs on each line.
GRAD_TABLE = [
    ("2d_last", (FP32, FP64), (1.0, 3.0), ("randn", "from_sum", "noncontig")),
    ("3d_mid", (FP32, FP64), (1.0, 0.5), ("randn", "from_sum", "noncontig")),
    ("2d_dim0", (FP32,), (1.0,), ("randn", "noncontig")),
    ("0d", (FP32, FP64), (1.0,), ("randn", "from_sum")),
    ("N1_last", (FP32,), (1.0,), ("randn",)),
    ("transposed_dim0", (FP32,), (1.0, 3.0), ("randn", "noncontig")),
    ("step_reduced", (FP64,), (1.0,), ("randn",)),
    ("expand_outer", (FP32,), (1.0,), ("randn", "from_sum")),
    ("empty_reduced", (FP32,), (1.0,), ("randn",)),
    ("long_row_fp32", (FP32,), (1.0,), ("randn", "from_sum")),
    ("long_row_fp64", (FP64,), (3.0,), ("randn",)),
    ("long_strided", (FP32, FP64), (1.0,), ("randn",)),
    ("long_strided", (FP32,), (3.0,), ("from_sum",)),
]


def _grad_params():
    for s, dts, temps, gkinds in GRAD_TABLE:
        sc = SHAPE[s]
        for dt in dts:
            for op in OPS:
                for T in temps if op != "logsumexp" else (1.0,) if 1.0 in temps else ():
                    for gkind in gkinds:
                        yield pytest.param(sc, dt, op, T, gkind,
                                           id=f"{op}-{s}-{SHORT[dt]}-T{T}-{gkind}")


def _upstream(kind: str, y: torch.Tensor, seed: int) -> Optional[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if kind == "randn":
        return torch.randn(y.shape, generator=gen, dtype=y.dtype).to(y.device)
    if kind == "from_sum":
        return None  # y.sum().backward(): an expanded (stride 0) gradient
    # a non-contiguous gradient: every other element of a bigger tensor
    if y.dim() == 0:
        return torch.randn((), generator=gen, dtype=y.dtype).to(y.device)
    big = torch.randn(y.shape[:-1] + (2 * y.shape[-1],), generator=gen, dtype=y.dtype)
    g = big.to(y.device)[..., ::2]
    assert g.shape == y.shape
    return g


@pytest.mark.parametrize("sc,dtype,op,T,gkind", list(_grad_params()))
def test_gradients_match_torch(sc, dtype, op, T, gkind, device):
    case = Case(sc, VALUE["plain"], dtype)
    x = make_input(case, device).detach().requires_grad_(True)
    xt = x.detach().clone().requires_grad_(True)
    dim = sc.dim

    y = run_ours(op, x, dim, T)
    yt = TORCH[op](xt / T if T != 1.0 else xt, dim)
    g = _upstream(gkind, y, _seed(sc.name, op, gkind))

    bwd_before = _backend.launch_counts["softmax_bwd_kernel"]
    if g is None:
        y.sum().backward()
        yt.sum().backward()
    else:
        y.backward(g)
        yt.backward(g)
    launched = _backend.launch_counts["softmax_bwd_kernel"] - bwd_before
    if _backend.use_triton(x) and x.numel() > 0:
        assert launched == 1, f"softmax_bwd_kernel launched {launched} times"

    assert x.grad is not None and x.grad.shape == x.shape and x.grad.dtype == x.dtype
    # Gradients are O(1) (softmax: |dx| <= |dy|); a few roundings of that in the dtype.
    # (log_softmax of a "sum" upstream: dx = 1 - N p, so scale the bound by N.)
    n = x.shape[dim] if x.dim() else 1
    atol = 16 * EPS[dtype] * (n if op == "log_softmax" else 1) * (1 + 1 / T)
    torch.testing.assert_close(x.grad, xt.grad, rtol=16 * EPS[dtype], atol=atol)


@pytest.mark.parametrize("op,T,shape,dim", [
    ("softmax", 1.0, (2, 5), -1),
    ("softmax", 0.5, (2, 3, 2), 1),
    ("softmax", 3.0, (3, 2), 0),
    ("log_softmax", 1.0, (2, 5), -1),
    ("log_softmax", 3.0, (2, 3, 2), 1),
    ("log_softmax", 0.5, (3, 2), 0),
    ("logsumexp", 1.0, (2, 5), -1),
    ("logsumexp", 1.0, (2, 3, 2), 1),
    ("logsumexp", 1.0, (2, 3, 2), (0, 2)),
    ("logsumexp", 1.0, (), 0),
    ("softmax", 3.0, (), 0),
])
def test_gradcheck_fp64(op, T, shape, dim, device):
    gen = torch.Generator().manual_seed(_seed(op, T, shape, dim))
    x = torch.randn(shape, generator=gen, dtype=FP64).to(device).requires_grad_(True)
    before = _backend.launch_counts["softmax_bwd_kernel"]
    assert torch.autograd.gradcheck(lambda t: run_ours(op, t, dim, T), (x,))
    if _backend.use_triton(x):
        assert _backend.launch_counts["softmax_bwd_kernel"] > before


@pytest.mark.parametrize("inv_t", [0.5, 3.0])
def test_gradcheck_fp64_logsumexp_mode_with_temperature(inv_t, device):
    """The LOGSUMEXP mode of the registered op (and its autograd) also takes an inverse temperature."""
    x = torch.randn(2, 4, dtype=FP64, device=device, requires_grad=True)
    f = lambda t: torch.ops.fused_softmax.softmax_fwd(t, 1, fsm.LOGSUMEXP, inv_t)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x,))
    torch.testing.assert_close(f(x), torch.logsumexp(x * inv_t, 1))


@pytest.mark.parametrize("upstream", ["constant_weights", "weights_require_grad"])
@pytest.mark.parametrize("op", OPS)
def test_double_backward_is_right_or_raises_clear_error(op, upstream, device):
    """Double backward must either match torch or raise a clear RuntimeError -- never give
    a silently wrong second derivative.  The loss is a gradient penalty-like
    ``sum(dL/dx * x)``: torch's gradient of it is ``dL/dx + H x``."""
    gen = torch.Generator().manual_seed(_seed(op, "double"))
    x0 = torch.randn(3, 4, generator=gen, dtype=FP64).to(device)
    w0 = torch.randn((3, 4) if op != "logsumexp" else (3,), generator=gen, dtype=FP64).to(device)

    def second_order(fn):
        x = x0.clone().requires_grad_(True)
        w = w0.clone().requires_grad_(upstream == "weights_require_grad")
        y = fn(x, -1)
        (gx,) = torch.autograd.grad((y * w).sum(), x, create_graph=True)
        (ggx,) = torch.autograd.grad((gx * x).sum(), x)
        return gx.detach(), ggx

    gx_t, ggx_t = second_order(TORCH[op])
    try:
        gx, ggx = second_order(OURS[op])
    except RuntimeError as e:
        assert "twice" in str(e) or "double backward" in str(e), f"unclear error: {e}"
        return
    torch.testing.assert_close(gx, gx_t)  # first order is right
    torch.testing.assert_close(ggx, ggx_t, msg=lambda m: (
        f"{op}: double backward gave a silently wrong result (no error): {m}"))


@pytest.mark.parametrize("op", OPS)
def test_double_backward_through_backward_matches_torch(op, device):
    """With a differentiable upstream gradient, ``.backward()`` on the first-order gradient
    reaches both ``x`` and ``w``; the second derivatives equal torch's."""
    x0 = torch.randn(3, 4, dtype=FP64, device=device)
    w0 = torch.randn(3, 4 if op != "logsumexp" else 1, dtype=FP64, device=device)
    grads = []
    for impl in ("ours", "torch"):
        x = x0.clone().requires_grad_()
        w = w0[:, 0].clone() if op == "logsumexp" else w0.clone()
        w.requires_grad_()
        y = run_ours(op, x, -1) if impl == "ours" else TORCH[op](x, -1)
        (gx,) = torch.autograd.grad((y * w).sum(), x, create_graph=True)
        (gx * x).sum().backward()
        grads.append((x.grad, w.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


# ============================================================================ API parity
def _dim_warnings(records):
    # ("dimension", not "dim": numpy's interpreter warnings mention "ndim")
    return [w for w in records if "dimension" in str(w.message)]


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
@pytest.mark.parametrize("ndim", [0, 1, 2, 3, 4])
def test_implicit_dim_legacy_rule_and_warning(name, ndim, device):
    shape = (2, 3, 4, 5)[:ndim]
    x = torch.randn(shape, device=device)
    tfn = getattr(F, name)
    with warnings.catch_warnings(record=True) as wt:
        warnings.simplefilter("always")
        expected = tfn(x)
    with warnings.catch_warnings(record=True) as wo:
        warnings.simplefilter("always")
        out = getattr(fs, name)(x)
    torch.testing.assert_close(out, expected)  # same implicit dim (0 for 0/1/3-d, else 1)
    # (the Triton interpreter itself emits numpy Runtime/DeprecationWarnings: ignore those)
    wo, wt = _dim_warnings(wo), _dim_warnings(wt)
    assert len(wo) == 1 and len(wt) == 1
    assert wo[0].category is UserWarning  # torch's category, not DeprecationWarning
    assert "Implicit dimension choice" in str(wo[0].message)
    assert str(wo[0].message) == str(wt[0].message)
    assert wo[0].filename == __file__, "stacklevel should point at the caller, like torch"


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_explicit_dim_does_not_warn(name, device):
    x = torch.randn(2, 3, device=device)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        getattr(fs, name)(x, 1)
        getattr(fs, name)(x, dim=0)
    assert [w for w in rec if issubclass(w.category, UserWarning)] == []


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
@pytest.mark.parametrize("src,dst", [(FP16, FP32), (BF16, FP32), (FP32, FP64), (FP64, FP32),
                                     (FP32, FP16), (torch.int64, FP32), (torch.int32, FP64)])
def test_dtype_argument_casts_first(name, src, dst, device):
    x = (torch.randn(3, 7) * 3).to(src).to(device)
    out = getattr(fs, name)(x, -1, dtype=dst)
    expected = getattr(F, name)(x, -1, dtype=dst)
    assert out.dtype == dst == expected.dtype
    # the cast happens before the op: the result is torch's in dst, as exact as dst allows
    torch.testing.assert_close(out, expected, rtol=4 * EPS[dst], atol=4 * EPS[dst])


def test_dtype_argument_gradient_flows_to_input(device):
    x = torch.randn(3, 7, dtype=FP16, device=device, requires_grad=True)
    xt = x.detach().clone().requires_grad_(True)
    fs.softmax(x, -1, dtype=FP32).pow(2).sum().backward()
    F.softmax(xt, -1, dtype=FP32).pow(2).sum().backward()
    assert x.grad.dtype == FP16
    torch.testing.assert_close(x.grad, xt.grad)


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_input_raises_like_torch(name, dtype, device):
    """torch's own error (type and message); an empty integer tensor is returned as torch
    does, and a bad dim is reported before the dtype, as torch checks them."""
    x = torch.ones(2, 3, device=device).to(dtype)
    with pytest.raises(NotImplementedError) as theirs:
        getattr(torch, name)(x, -1)
    with pytest.raises(NotImplementedError) as ours:
        getattr(fs, name)(x, -1)
    assert str(ours.value) == str(theirs.value)
    empty = torch.ones(0, 3, device=device).to(dtype)
    out, exp = getattr(fs, name)(empty, 1), getattr(torch, name)(empty, 1)
    assert out.dtype == exp.dtype and out.shape == exp.shape
    with pytest.raises(IndexError):
        getattr(fs, name)(x, 5)
    with pytest.warns(UserWarning, match="Implicit dimension"), pytest.raises(NotImplementedError):
        getattr(fs, name)(x)  # torch warns about the implicit dim before it raises


def _outcome(fn):
    """``fn()``'s result, or its error as (type, message)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - comparing whatever torch raises
        return type(e), str(e)


# (name, call(module, x)): bad arguments (torch's error, word for word) and calls torch
# takes that a kernel does not serve (torch's result)
TORCH_DECIDES = [
    ("softmax dim float", lambda m, x: m.softmax(x, 1.0)),
    ("softmax dim tuple", lambda m, x: m.softmax(x, (0,))),
    ("softmax dim float, int dtype", lambda m, x: m.softmax(x, 1.0, dtype=torch.int64)),
    ("softmax int dim out of range", lambda m, x: m.softmax(x.long(), 5)),
    ("softmax dtype=complex of empty", lambda m, x: m.softmax(x[:0], 0, dtype=torch.complex64)),
    ("softmax dtype not a dtype", lambda m, x: m.softmax(x, 0, dtype="float32")),
    ("softmax non-tensor", lambda m, x: m.softmax(None, 0)),
    ("softmax sparse", lambda m, x: m.softmax(x.to_sparse(), 1)),
    ("logsumexp repeated dim", lambda m, x: m.logsumexp(x, (0, 0))),
    ("logsumexp dim None", lambda m, x: m.logsumexp(x, None)),
    ("logsumexp dim float", lambda m, x: m.logsumexp(x, 1.0)),
    ("logsumexp keepdim int", lambda m, x: m.logsumexp(x, 0, 1)),
    ("logsumexp list input", lambda m, x: m.logsumexp([1.0], 0)),
    ("logsumexp int out", lambda m, x: m.logsumexp(x, 0, out=torch.empty(2, dtype=torch.long))),
    ("logsumexp dim () non-empty", lambda m, x: m.logsumexp(x, ())),
    ("logsumexp dim () empty", lambda m, x: m.logsumexp(x[:0], ())),
    ("logsumexp dim tensor", lambda m, x: m.logsumexp(x, torch.tensor([0]))),
]


@pytest.mark.parametrize("name,call", TORCH_DECIDES, ids=[n for n, _ in TORCH_DECIDES])
def test_bad_arguments_and_unserved_calls_like_torch(name, call, device):
    x = torch.randn(3, 2, device=device)
    ours = _outcome(lambda: call(fs, x))
    theirs = _outcome(lambda: call(F if name.startswith("softmax") else torch, x))
    if isinstance(theirs, torch.Tensor):
        assert isinstance(ours, torch.Tensor), ours
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs)
    else:
        assert ours == theirs


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_integer_input_with_a_temperature_is_softmax_of_x_over_t(name, device):
    """``softmax(x, temperature=T)`` is ``softmax(x / T)``, and ``x / T`` promotes an
    integer ``x`` to the default float dtype (T = 1, the default, keeps torch's error)."""
    x = torch.arange(6, device=device).view(2, 3)
    for t in (2.0, 0.5, 1.00000001):  # the last: 1 / T rounds to 1 in fp32, but T is not 1
        ours, theirs = getattr(fs, name)(x, -1, temperature=t), getattr(F, name)(x / t, -1)
        assert ours.dtype == theirs.dtype == torch.get_default_dtype()
        torch.testing.assert_close(ours, theirs)
    empty = getattr(fs, name)(x[:0], -1, temperature=2.0)
    assert empty.dtype == torch.get_default_dtype() and empty.shape == (0, 3)


@pytest.mark.parametrize("temperature", [1e-40, 1e-50, 1e39, 1e300, 1e-320])
@pytest.mark.parametrize("dtype", [FP16, BF16, FP32, FP64])
@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_temperature_beyond_the_dtypes_range_is_torchs_x_over_t(name, dtype, temperature,
                                                                 device):
    """Where ``T`` or ``1 / T`` overflows the computing dtype, ``x * (1 / T)`` is not
    ``x / T`` (``0 * inf`` is NaN where ``0 / T`` is 0): the result is torch's
    ``softmax(x / T)``, NaN rows included, with no numpy overflow warning."""
    x = torch.tensor([[0.0, -1.0, -INF, 2.0], [1.0, 1.0, 1.0, 1.0], [0.0, -INF, -INF, -INF]],
                     device=device).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = getattr(fs, name)(x, -1, temperature=temperature)
    theirs = getattr(F, name)(x / temperature, -1)
    assert ours.dtype == theirs.dtype
    torch.testing.assert_close(ours, theirs, equal_nan=True)


def test_nested_tensors_go_to_torch(device):
    """Nested tensors (strided layout) are served by torch's own softmax, as torch serves
    them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's prototype-stage warning
        nt = torch.nested.nested_tensor([torch.randn(2, 3), torch.randn(4, 3)]).to(device)
    ours, theirs = fs.softmax(nt, -1), F.softmax(nt, -1)
    assert ours.is_nested
    for a, b in zip(ours.unbind(), theirs.unbind()):
        torch.testing.assert_close(a, b)
    # torch has no nested log_softmax or logsumexp: its error
    assert _outcome(lambda: fs.log_softmax(nt, -1)) == _outcome(lambda: F.log_softmax(nt, -1))
    assert _outcome(lambda: fs.logsumexp(nt, -1)) == _outcome(lambda: torch.logsumexp(nt, -1))


@pytest.mark.parametrize("dtype", [FP16, BF16])
def test_logsumexp_gradient_uses_the_rounded_result_as_torch(dtype, device):
    """torch's logsumexp backward is ``grad * exp(x - result)`` with ``result`` in ``x``'s
    dtype: at large logits its rounding scales every gradient (a row of fp16 [1e4, 0,
    -1e4, 1e4] gets [1, 0, 0, 1]; bf16 logits near 100, about 5 %). Ours is computed in
    fp32 from that same result, so it is torch's gradient within the dtype's rounding."""
    rows = [torch.tensor([[1e4, 0.0, -1e4, 1e4]]),
            torch.randn(4, 50, generator=torch.Generator().manual_seed(1)) * 3 + 100]
    for x0 in rows:
        x = x0.to(dtype).to(device).requires_grad_()
        xt = x.detach().clone().requires_grad_()
        g = torch.linspace(0.5, 2.0, x.shape[0], device=device).to(dtype)
        y, yt = fs.logsumexp(x, 1), torch.logsumexp(xt, 1)
        assert y.dtype == yt.dtype == dtype
        torch.testing.assert_close(y, yt)
        (gx,), (gt,) = torch.autograd.grad(y, x, g), torch.autograd.grad(yt, xt, g)
        torch.testing.assert_close(gx, gt, rtol=2 * EPS[dtype], atol=1e-5)
    assert gx.dtype == dtype


def test_logsumexp_gradient_keeps_small_probabilities(device):
    """The fp16 backward forms exp(x - lse) in fp32 and rounds once: with a large
    grad_output the entries torch rounds to 0 (exp in fp16) are the fp64 reference's, and
    an inf grad_output gives inf there, where torch's is NaN (README, Limitations)."""
    dtype = FP16
    x = torch.tensor([[0.0, -18.4, -25.0, -200.0]], dtype=dtype, device=device).requires_grad_()
    ref = torch.softmax(x.detach().double(), 1) * 60000.0
    g = torch.full((1,), 60000.0, dtype=dtype, device=device)
    (gx,) = torch.autograd.grad(fs.logsumexp(x, 1), x, g)
    assert gx.dtype == dtype
    torch.testing.assert_close(gx.double(), ref.to(dtype).double(), rtol=EPS[dtype], atol=0)
    (gx,) = torch.autograd.grad(fs.logsumexp(x, 1), x, torch.full_like(g, math.inf))
    assert gx[0, :3].tolist() == [math.inf] * 3  # exp(-200) is 0 in fp32 too: inf * 0
    assert gx[0, 3].isnan()
    xt = x.detach().clone().requires_grad_()
    (gt,) = torch.autograd.grad(torch.logsumexp(xt, 1), xt, g)
    assert gt[0, 1:].tolist() == [0.0] * 3  # torch's fp16 exp loses them


def test_temperature_checked_before_torch_takes_the_call():
    with pytest.raises(ValueError, match="temperature"):
        fs.softmax(torch.empty(0, 3, dtype=torch.long), 1, temperature=-1.0)


def test_logsumexp_integer_input_with_wider_out_is_exact(device):
    """torch sums an integer input's fp32 exps into an fp64 ``out``; ours computes in fp64."""
    x = torch.randint(-5, 5, (8, 50), generator=torch.Generator().manual_seed(0)).to(device)
    out = torch.empty(8, dtype=torch.float64, device=device)
    fs.logsumexp(x, 1, out=out)
    torch.testing.assert_close(out, torch.logsumexp(x.double(), 1), rtol=4e-16, atol=0)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int8, torch.bool])
def test_logsumexp_promotes_integers_like_torch(dtype, device):
    x = torch.tensor([[0, 1, 3], [2, 1, 0]], device=device).to(dtype)
    expected = torch.logsumexp(x, 1)
    out = fs.logsumexp(x, 1)
    assert out.dtype == expected.dtype == torch.get_default_dtype()
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("shape,dim", [((2, 3), 2), ((2, 3), -3), ((4,), 1), ((), 1), ((), -2)])
@pytest.mark.parametrize("op", OPS)
def test_dim_out_of_range_raises_indexerror_like_torch(op, shape, dim, device):
    x = torch.randn(shape, device=device)
    with pytest.raises(IndexError):
        TORCH[op](x, dim)
    with pytest.raises(IndexError, match="out of range"):
        OURS[op](x, dim)


def test_logsumexp_tuple_dim_out_of_range_and_repeated(device):
    x = torch.randn(2, 3, 4, device=device)
    with pytest.raises(IndexError):
        torch.logsumexp(x, (0, 3))
    with pytest.raises(IndexError):
        fs.logsumexp(x, (0, 3))
    with pytest.raises(RuntimeError):
        torch.logsumexp(x, (1, -2))
    with pytest.raises(RuntimeError, match="multiple times"):
        fs.logsumexp(x, (1, -2))


@pytest.mark.parametrize("dims", [0, 2, -1, (0,), (0, 2), (2, 0), (-1, 1), (0, 1, 2), [1, 2]])
@pytest.mark.parametrize("keepdim", [False, True])
@pytest.mark.parametrize("dtype", [FP32, FP64, BF16])
def test_logsumexp_dims_and_keepdim(dims, keepdim, dtype, device):
    gen = torch.Generator().manual_seed(_seed(dims, keepdim, dtype))
    x = (torch.randn(3, 4, 5, generator=gen) * 30).to(dtype).to(device)
    x[1, 2, :] = -INF
    expected = torch.logsumexp(x.double(), dims, keepdim=keepdim)
    out = fs.logsumexp(x, dims, keepdim=keepdim)
    assert out.shape == torch.logsumexp(x, dims, keepdim=keepdim).shape
    assert out.dtype == dtype
    eps = EPS[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=2 * eps, atol=4 * eps * 150)


def test_logsumexp_tuple_dims_gradient(device):
    x = torch.randn(3, 4, 5, dtype=FP64, device=device, requires_grad=True)
    xt = x.detach().clone().requires_grad_(True)
    g = torch.randn(3, 1, 1, dtype=FP64, device=device)
    fs.logsumexp(x, (2, 1), keepdim=True).backward(g)
    torch.logsumexp(xt, (2, 1), keepdim=True).backward(g)
    torch.testing.assert_close(x.grad, xt.grad)


@pytest.mark.parametrize("shape,dims", [((3, 0), 1), ((2, 0, 4), 1), ((2, 0, 4), (1, 2)),
                                        ((0,), 0), ((0, 3), 0), ((0, 3), 1)])
def test_logsumexp_empty(shape, dims, device):
    x = torch.randn(shape, device=device)
    expected = torch.logsumexp(x, dims)
    out = fs.logsumexp(x, dims)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert torch.equal(out, expected)  # -inf for an empty slice
    if expected.numel():
        assert bool((out == -INF).all())


def test_softmax_of_empty_keeps_shape_and_backward(device):
    for shape, dim in (((0, 5), 1), ((3, 0), 1), ((2, 0, 3), 0)):
        x = torch.randn(shape, device=device, requires_grad=True)
        for name in ("softmax", "log_softmax"):
            y = getattr(fs, name)(x, dim)
            assert y.shape == x.shape and y.dtype == x.dtype
            y.sum().backward()
            assert x.grad.shape == x.shape


@pytest.mark.parametrize("value", [2.5, -1e4, INF, -INF, NAN])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_zero_dim_input(op, value, dtype, device):
    x = torch.tensor(value, dtype=dtype, device=device)
    for dim in (0, -1):
        out = OURS[op](x, dim)
        expected = TORCH[op](x, dim)
        assert out.shape == () and out.dtype == expected.dtype
        torch.testing.assert_close(out, expected, equal_nan=True, rtol=0, atol=0)
    if op == "logsumexp":
        torch.testing.assert_close(fs.logsumexp(x, 0, keepdim=True),
                                   torch.logsumexp(x, 0, keepdim=True), equal_nan=True)


@pytest.mark.parametrize("dim", [None, 0, 1, -1])
@pytest.mark.parametrize("name", ["Softmax", "LogSoftmax"])
def test_nn_modules_match_torch(name, dim, device):
    ours = getattr(fs.nn, name)(dim=dim)
    theirs = getattr(torch.nn, name)(dim=dim)
    assert repr(ours) == repr(theirs)
    x = torch.randn(4, 6, device=device)
    with warnings.catch_warnings(record=True) as wo:
        warnings.simplefilter("always")
        out = ours(x)
    with warnings.catch_warnings(record=True) as wt:
        warnings.simplefilter("always")
        expected = theirs(x)
    torch.testing.assert_close(out, expected)
    wo, wt = _dim_warnings(wo), _dim_warnings(wt)
    assert len(wo) == (dim is None)
    assert [str(w.message) for w in wo] == [str(w.message) for w in wt]
    assert [w.filename for w in wo] == [w.filename for w in wt]
    # positional dim and state_dict like torch's
    assert getattr(fs.nn, name)(1).dim == getattr(torch.nn, name)(1).dim == 1
    assert ours.state_dict().keys() == theirs.state_dict().keys()


def test_nn_module_temperature(device):
    m = fs.nn.Softmax(dim=-1, temperature=2.0)
    assert repr(m) == "Softmax(dim=-1, temperature=2.0)"
    x = torch.randn(3, 5, dtype=FP64, device=device)
    torch.testing.assert_close(m(x), torch.softmax(x / 2.0, -1))
    ml = fs.nn.LogSoftmax(0, temperature=0.5)
    torch.testing.assert_close(ml(x), torch.log_softmax(x / 0.5, 0))


@pytest.mark.parametrize("temperature", [0.0, -1.0, -0.0, INF, -INF, NAN])
@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_bad_temperature_raises_valueerror(name, temperature, device):
    x = torch.randn(2, 3, device=device)
    with pytest.raises(ValueError, match="temperature"):
        getattr(fs, name)(x, -1, temperature=temperature)
    with pytest.raises(ValueError, match="temperature"):
        getattr(fs.nn, "Softmax" if name == "softmax" else "LogSoftmax")(
            -1, temperature=temperature)(x)


def test_non_tensor_input_raises_like_torch():
    """torch: F.softmax / F.log_softmax call ``input.softmax``, so a list gives an
    AttributeError; torch.logsumexp's argument parser gives a TypeError."""
    for ours, theirs in ((fs.softmax, F.softmax), (fs.log_softmax, F.log_softmax),
                         (fs.logsumexp, torch.logsumexp)):
        with pytest.raises(Exception) as e_theirs:
            theirs([1.0, 2.0], 0)
        with pytest.raises(e_theirs.type):
            ours([1.0, 2.0], 0)


def test_temperature_is_keyword_only():
    x = torch.randn(2, 3)
    with pytest.raises(TypeError):
        fs.softmax(x, -1, 3, None, 2.0)  # noqa


def test_extreme_logits_do_not_overflow(device):
    """exp(1000) overflows any float; the max shift keeps the kernel finite, like torch."""
    x = torch.tensor([[1000.0, 1001.0, 999.0], [-1000.0, -1001.0, -999.0]], device=device)
    torch.testing.assert_close(fs.softmax(x, -1), torch.softmax(x, -1))
    torch.testing.assert_close(fs.log_softmax(x, -1), torch.log_softmax(x, -1))
    torch.testing.assert_close(fs.logsumexp(x, -1), torch.logsumexp(x, -1))
    # log_softmax is not log(softmax): the underflowed probability keeps its log
    y = fs.log_softmax(torch.tensor([0.0, -200.0], device=device), 0)
    torch.testing.assert_close(y, torch.tensor([0.0, -200.0], device=device))


# ============================================================================ backend
def test_use_triton_under_the_interpreter_or_cuda(device):
    x = torch.randn(2, 3, device=device)
    if device == "cuda" or (_backend.HAS_TRITON and _backend.INTERPRET):
        assert _backend.use_triton(x)


@pytest.mark.parametrize("shape_name,T", [
    ("2d_last", 1.0), ("2d_last", 3.0), ("3d_mid", 1.0), ("transposed_dim0", 3.0),
    ("expand_inner", 1.0), ("long_row_fp32", 1.0), ("long_strided", 1.0), ("0d", 1.0),
    ("empty_reduced", 1.0)])
def test_torch_path_matches_triton_path(shape_name, T, device, monkeypatch):
    sc = SHAPE[shape_name]
    dtype = FP32
    x = make_input(Case(sc, VALUE["all_special" if T == 1.0 else "plain"], dtype), device)
    dim = sc.dim

    def run_all():
        res = []
        for op in OPS:
            if op == "logsumexp" and T != 1.0:
                continue
            xr = x.detach().clone().requires_grad_(True)
            y = run_ours(op, xr, dim, T)
            g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(device)
            y.backward(g)
            res.append((op, y.detach(), xr.grad))
        return res

    triton_res = run_all()
    counts = dict(_backend.launch_counts)
    monkeypatch.setattr(fsm, "use_triton", lambda t: False)
    torch_res = run_all()
    assert dict(_backend.launch_counts) == counts, "the torch path launched a kernel"
    for (op, y1, g1), (_, y2, g2) in zip(triton_res, torch_res):
        tol = dict(rtol=8 * EPS[dtype], atol=8 * EPS[dtype] * (1 + x.detach().abs()
                   .nan_to_num(0, 0, 0).max().item() if x.numel() else 1))
        torch.testing.assert_close(y1, y2, equal_nan=True, **tol, msg=f"{op} forward")
        torch.testing.assert_close(g1, g2, equal_nan=True, **tol, msg=f"{op} backward")


@pytest.mark.parametrize("mode", [fsm.SOFTMAX, fsm.LOG_SOFTMAX, fsm.LOGSUMEXP])
@pytest.mark.parametrize("dtype", [BF16, FP32, FP64])
def test_torch_fwd_bwd_functions_match_kernels(mode, dtype, device):
    gen = torch.Generator().manual_seed(_seed(mode, dtype))
    x = (torch.randn(4, 9, 6, generator=gen) * 5).to(dtype).to(device)
    inv_t = 0.5 if mode != fsm.LOGSUMEXP else 1.0
    dim = 1
    y_t = fsm._torch_fwd(x, dim, mode, inv_t)
    y_k = torch.ops.fused_softmax.softmax_fwd(x, dim, mode, inv_t)
    eps = EPS[dtype]
    torch.testing.assert_close(y_k, y_t, rtol=4 * eps, atol=4 * eps * 10)
    if mode == fsm.LOGSUMEXP:
        saved, lse, g = x, y_k, torch.randn(4, 6, generator=gen).to(device)
    else:
        saved, lse, g = y_k, None, torch.randn(4, 9, 6, generator=gen).to(dtype).to(device)
    dx_t = fsm._torch_bwd(saved, g, lse, dim, mode, inv_t)
    dx_k = torch.ops.fused_softmax.softmax_bwd(saved, g, lse, dim, mode, inv_t)
    assert dx_k.dtype == dx_t.dtype == dtype
    torch.testing.assert_close(dx_k, dx_t, rtol=8 * eps, atol=8 * eps * 10)


# ============================================================================ opcheck / compile
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("mode", [0, 1, 2])
def test_opcheck_softmax_fwd(mode, requires_grad, device):
    op = torch.ops.fused_softmax.softmax_fwd.default
    for shape, dim, inv_t, dtype in (((3, 5, 7), 1, 0.5, FP32), ((6, 4), 0, 2.0, BF16)):
        x = torch.randn(shape, device=device).to(dtype).requires_grad_(requires_grad)
        torch.library.opcheck(op, (x, dim, mode, inv_t))


@pytest.mark.parametrize("mode", [0, 1])
def test_opcheck_widening_out_dtype(mode, device):
    """softmax_fwd with a wider out_dtype (the dtype= fold) and softmax_bwd with the input's
    narrower dx_dtype."""
    x = torch.randn(4, 9, device=device).to(BF16).requires_grad_(True)
    torch.library.opcheck(torch.ops.fused_softmax.softmax_fwd.default, (x, 1, mode, 0.5, FP32))
    y = torch.ops.fused_softmax.softmax_fwd.default(x.detach(), 1, mode, 1.0, FP32)
    assert y.dtype == FP32
    g = torch.randn(4, 9, device=device)
    torch.library.opcheck(torch.ops.fused_softmax.softmax_bwd.default, (y, g, None, 1, mode, 1.0, BF16))


@pytest.mark.parametrize("src,dst", [(torch.float16, FP32), (BF16, FP32), (FP32, torch.float64),
                                     (torch.float16, torch.float64), (BF16, torch.float64)])
@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_widening_dtype_reads_the_input_in_place(op, src, dst, device):
    """``dtype=`` wider than the input (``softmax(scores, dtype=float32)``): equal to
    torch's cast-then-softmax, values and gradient (in the input's dtype), with one kernel
    launch (fp16/bf16 -> fp64 casts first, with a torch copy, not a kernel)."""
    gen = torch.Generator().manual_seed(21)
    x = (torch.randn(5, 40, generator=gen) * 6).to(src).to(device)
    up = torch.randn(5, 40, generator=gen, dtype=torch.float64).to(dst).to(device)
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    before = sum(_backend.launch_counts.values())
    y = getattr(fs, op)(a, 0, dtype=dst, temperature=0.8)
    assert sum(_backend.launch_counts.values()) - before == (1 if _backend.use_triton(x) else 0)
    exp = getattr(torch, op)(b.to(dst) / 0.8, 0)
    assert y.dtype == dst
    torch.testing.assert_close(y, exp, rtol=4 * torch.finfo(dst).eps, atol=4 * torch.finfo(dst).eps)
    y.backward(up)
    exp.backward(up)
    assert a.grad.dtype == src
    tol = 2 * torch.finfo(src).eps  # one rounding into src, and torch's own
    torch.testing.assert_close(a.grad, b.grad, rtol=tol, atol=tol * b.grad.abs().max().item())


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_opcheck_softmax_bwd(mode, device):
    op = torch.ops.fused_softmax.softmax_bwd.default
    x = torch.randn(3, 5, 7, device=device)
    for dim in (1, 2):
        if mode == 2:
            saved, lse = x, torch.logsumexp(x, dim)
            g = torch.randn(lse.shape, device=device)
        else:
            saved = (torch.softmax if mode == 0 else torch.log_softmax)(x, dim)
            lse, g = None, torch.randn(x.shape, device=device)
        torch.library.opcheck(op, (saved, g, lse, dim, mode, 1.0))


def test_torch_compile_fullgraph_all_ops(device):
    def f(x):
        return (fs.softmax(x, -1) * x).sum() \
            + fs.log_softmax(x, 1, temperature=2.0).square().sum() \
            + fs.logsumexp(x, 0).square().sum()

    def f_torch(x):
        return (torch.softmax(x, -1) * x).sum() \
            + torch.log_softmax(x / 2.0, 1).square().sum() \
            + torch.logsumexp(x, 0).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    x = torch.randn(4, 6, 8, device=device, requires_grad=True)
    xt = x.detach().clone().requires_grad_(True)
    before = dict(_backend.launch_counts)
    out = compiled(x)
    out.backward()
    expected = f_torch(xt)
    expected.backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(x.grad, xt.grad)
    if _backend.use_triton(x):
        assert _backend.launch_counts["softmax_fwd_kernel"] > before.get("softmax_fwd_kernel", 0)
        assert _backend.launch_counts["softmax_bwd_kernel"] > before.get("softmax_bwd_kernel", 0)


@pytest.mark.parametrize("dynamic", [None, True])
@pytest.mark.parametrize("dims", [(0, 2), (2, 1)])
def test_torch_compile_fullgraph_logsumexp_tuple_dims(dims, dynamic, device):
    """Static shapes, and symbolic ones (dynamic=True, or a second shape): the dims' order
    by stride is taken without sorting symbolic strides, which Dynamo refuses."""
    def f(x):
        return fs.logsumexp(x, dims, keepdim=True)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, dynamic=dynamic)
    for shape in ((3, 4, 5), (4, 5, 6)):
        x = torch.randn(shape, device=device, requires_grad=True)
        out = compiled(x)
        torch.testing.assert_close(out, torch.logsumexp(x, dims, keepdim=True))
        expected = torch.autograd.grad(torch.logsumexp(x, dims, keepdim=True).sum(), x)[0]
        torch.testing.assert_close(torch.autograd.grad(out.sum(), x)[0], expected)


# ============================================================================ 64-bit offsets
def test_strided_dim_offsets_past_2_31_elements(device):
    """Reduced-dim offsets ``j * stride`` above 2^31 elements must not wrap around (int32).

    A (3, 2) view of a 2^32-element fp16 buffer with stride 2^30 along the reduced dim 0:
    element j of the slice sits 2^30 * j elements further on, 2^31 for j = 2.  On CPU the
    buffer is never touched except at the 6 elements (and 64 sentinels), so it costs no RSS.
    """
    try:
        base = torch.empty(2**32 + 64, dtype=FP16, device=device)
    except (RuntimeError, MemoryError) as e:  # e.g. strict overcommit: not a library matter
        pytest.skip(f"cannot reserve an 8 GB buffer here: {e}")
    base[:64] = 7.0  # where a wrapped (int32) offset would land
    x = base.as_strided((3, 2), (2**30, 1), storage_offset=2**31)
    x.copy_(torch.tensor([[1.0, 2.0], [3.0, 0.5], [-1.0, 0.0]]))
    for op in OPS:
        expected = fp64_reference(op, x, 0)
        out = OURS[op](x, 0)
        torch.testing.assert_close(out.double(), expected, rtol=2**-10, atol=2**-10,
                                   msg=lambda m: f"{op} along a 2^30-stride dim: {m}")
    del base


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (2^31+ elements)")
def test_rows_times_n_past_2_31_elements_cuda():
    """65537 rows x 32768 bf16 = 2^31 + 32768 elements: row offsets need 64 bits."""
    rows, n = 65537, 32768
    x = torch.empty(rows, n, dtype=BF16, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    check = [0, 1, 65535, 65536]
    for r in check:
        x[r] = torch.randn(n, generator=gen, device="cuda").to(BF16) * (r % 7 + 1)
    for op in ("softmax", "log_softmax"):
        out = OURS[op](x, -1)
        for r in check:
            torch.testing.assert_close(out[r], TORCH[op](x[r], -1), rtol=2**-7, atol=2**-9,
                                       msg=lambda m: f"{op} row {r}: {m}")
        del out
    lse = fs.logsumexp(x, -1)
    for r in check:
        torch.testing.assert_close(lse[r].double(), torch.logsumexp(x[r].double(), -1),
                                   rtol=2**-7, atol=2**-7)
    # backward through the 64-bit path as well
    y = fs.softmax(x, -1)
    dy = torch.zeros_like(y)
    for r in check:
        dy[r] = torch.randn(n, generator=gen, device="cuda").to(BF16)
    dx = torch.ops.fused_softmax.softmax_bwd(y, dy, None, 1, fsm.SOFTMAX, 1.0)
    for r in check:
        yr = y[r].float()
        expected = yr * (dy[r].float() - (dy[r].float() * yr).sum())
        torch.testing.assert_close(dx[r].float(), expected, rtol=2**-7, atol=2**-12)
