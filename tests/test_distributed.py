"""fused_softmax.distributed.vocab_parallel_cross_entropy against
torch.nn.functional.cross_entropy on the concatenated logits.

How. Each case of ``CASES`` (one table) runs in worlds of 1, 2 and 3 ranks. A world of 1 runs
in this process with no process group (torch.distributed not initialised). Worlds of 2 and
3 are spawned once per module (``torch.multiprocessing``, the ``gloo`` backend on CPU, a
``file://`` rendezvous in a temporary directory): every rank builds the same full logits
from the case's seed, keeps its shard, runs every case, and saves its loss, the gradient
of its shard and the collectives it issued. The tests then compare each rank's outputs with
torch on the full logits, which the parent rebuilds from the same seed. A case that raises
in a child fails its own test with the child's traceback; a child that dies or hangs fails
every test of its world.

Tolerances. The reference is torch in fp64 on the same (possibly rounded) logits. The
log-sum-exp of logits of magnitude ``zmax`` carries an absolute error of a few ``eps *
zmax`` of the accumulation dtype (fp32, fp64 for fp64); the loss and every probability in
the gradient inherit it (relative to their size), and the result is rounded once to the
output dtype (half an ``eps`` of that dtype, relative; a full ``eps`` allowed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import re
import subprocess
import sys
import textwrap
import time
import traceback
import zlib
from typing import Optional

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import fused_softmax.distributed as fsd
from fused_softmax import _backend

vp_ce = fsd.vocab_parallel_cross_entropy
CUDA = torch.cuda.is_available()
pytestmark = [
    # Triton's interpreter warns on every launch (numpy deprecations, NaN arithmetic of
    # masked lanes); recording them costs seconds.
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
]

N_ROWS = 6
#: Global targets: both ends of the vocabulary and the classes on either side of the shard
#: boundaries below (13 | 14, 17 | 18, 19 | 20 ...), so ownership changes hands in every layout.
TARGETS = (0, -1, 12, 13, 17, 20)  # -1: the last class, V - 1

#: (start, size) of each rank's shard; "equal" passes no vocab_start_index (rank * V / world).
LAYOUTS = {
    "equal": None,
    "uneven": {2: ((0, 13), (13, 17)), 3: ((0, 7), (7, 11), (18, 12))},
    "reversed": {2: ((17, 13), (0, 17)), 3: ((20, 10), (0, 13), (13, 7))},
    "empty shard": {2: ((0, 0), (0, 30)), 3: ((0, 13), (13, 0), (13, 17))},
    "empty shard past V": {2: ((0, 30), (50, 0)), 3: ((0, 13), (50, 0), (13, 17))},
    # not a tiling of [0, 30) beyond a world of 1: refused
    "overlapping": {1: ((0, 30),), 2: ((0, 15), (10, 15)), 3: ((0, 10), (5, 10), (20, 10))},
}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    layout: str = "uneven"
    dtype: torch.dtype = torch.float32
    reduction: str = "mean"
    weight: bool = False
    label_smoothing: float = 0.0
    logit_scale: float = 1.0
    z_loss: float = 0.0
    ignore_index: int = -100
    ignored_rows: tuple = ()
    shape: str = "2d"  # "1d": (V_local,); "3d": (2, V_local, 3), classes on dim 1
    vocab: int = 30
    weight_extra: int = 0  # a weight longer than the vocabulary (an error)
    bad_target: bool = False  # a target == V (an error)
    uint8: bool = False  # a uint8 target
    inf_weight: Optional[object] = None  # a class (or "argmax": row 0's largest) of weight inf
    error: Optional[tuple] = None  # (exception type name, message regex) every rank raises
    error_worlds: tuple = (1, 2, 3)  # the world sizes in which it does

    @property
    def kwargs(self):
        return dict(ignore_index=self.ignore_index, reduction=self.reduction,
                    label_smoothing=self.label_smoothing, logit_scale=self.logit_scale,
                    z_loss=self.z_loss)


EVERYTHING = dict(weight=True, label_smoothing=0.1, z_loss=0.01, logit_scale=0.7, ignored_rows=(2,))
CASES = [
    Case("equal shards", layout="equal"),
    Case("uneven shards"),
    Case("reversed shards", layout="reversed", reduction="sum"),
    Case("an empty shard", layout="empty shard", weight=True, label_smoothing=0.1),
    Case("ignored rows", ignored_rows=(1, 4), reduction="sum"),
    Case("ignore_index inside the vocabulary", ignore_index=13, weight=True),
    Case("all rows ignored", ignored_rows=tuple(range(N_ROWS))),
    Case("out-of-range target", bad_target=True, error=("IndexError", r"Target 30 is out of bounds")),
    Case("label smoothing", label_smoothing=0.1),
    Case("label smoothing with weight", label_smoothing=0.2, weight=True, layout="reversed"),
    Case("weight", weight=True),
    # inverse-frequency weights: the never-counted padding class's weight is inf
    Case("inf weight of the ignored class", weight=True, ignore_index=13, ignored_rows=(1, 3),
         inf_weight=13),
    Case("inf weight at the largest logit, smoothing", weight=True, label_smoothing=0.1,
         reduction="none", inf_weight="argmax"),
    Case("z_loss", z_loss=0.05),
    Case("logit_scale", logit_scale=0.5, reduction="sum"),
    Case("everything, none", reduction="none", **EVERYTHING),
    Case("everything, fp64 mean", dtype=torch.float64, **EVERYTHING),
    Case("everything, fp64 sum", dtype=torch.float64, reduction="sum", **EVERYTHING),
    Case("everything, fp64 none", dtype=torch.float64, reduction="none", **EVERYTHING),
    Case("everything, bf16 mean", dtype=torch.bfloat16, **EVERYTHING),
    Case("weight not covered by the shards", layout="equal", weight=True, weight_extra=1,
         # (a world of 1: torch's words, checked before the forward)
         error=("RuntimeError", r"the shards hold 30 classes in all, but weight has 31|"
                                r"defined either for all 30 classes or no classes")),
    Case("shards that do not tile the vocabulary", layout="overlapping",
         error=("ValueError", "do not tile the vocabulary"), error_worlds=(2, 3)),
    Case("3-d logits", shape="3d", weight=True, label_smoothing=0.1, reduction="none"),
    Case("1-d logits", shape="1d", label_smoothing=0.1, reduction="none"),
    # the empty shard's rank counts its rows from the target (reshape(-1, 0) cannot)
    Case("3-d logits, an empty shard", layout="empty shard", shape="3d", reduction="sum"),
    # an empty shard is checked against neither the layout nor the weight's size
    Case("an empty shard past the vocabulary, weight", layout="empty shard past V",
         weight=True, label_smoothing=0.1),
    Case("wide vocabulary", layout="equal", vocab=120),
    # uint8 targets with a class weight, label smoothing and the mean: torch's errors, in its
    # order (the weight's size, then an out-of-range target, then its gather() of the bytes)
    Case("uint8, weight, smoothing", uint8=True, weight=True, label_smoothing=0.1,
         error=("RuntimeError", r"gather\(\): Expected dtype int32/int64 for index")),
    Case("uint8 out of range, weight, smoothing", uint8=True, weight=True, label_smoothing=0.1,
         bad_target=True, error=("IndexError", r"Target 30 is out of bounds")),
    Case("uint8, weight too long, smoothing", uint8=True, weight=True, label_smoothing=0.1,
         weight_extra=1, error=("RuntimeError", r"the shards hold 30 classes in all, but weight "
                                                r"has 31|defined either for all 30 classes")),
    Case("uint8, weight, smoothing, sum", uint8=True, weight=True, label_smoothing=0.1,
         reduction="sum"),
]
CASE_BY_NAME = {c.name: c for c in CASES}
WORLDS = (1, 2, 3)


# --------------------------------------------------------------------------- inputs and reference
def shard(case: Case, world: int, rank: int):
    """(start, size, pass vocab_start_index?) of ``rank``'s shard."""
    layout = LAYOUTS[case.layout]
    if layout is None or (world == 1 and 1 not in layout):
        size = case.vocab // world
        return rank * size, size, layout is not None  # world of 1: an explicit start of 0
    start, size = layout[world][rank]
    return start, size, True


def make_inputs(case: Case):
    """Full logits (classes on dim 1), global target, weight and grad_output, from the case's seed."""
    g = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    V = case.vocab
    rows = torch.randn(N_ROWS, V, generator=g, dtype=torch.float64) * 3
    target = torch.tensor([t % V for t in TARGETS])
    if case.bad_target:
        target[0] = V
    target[list(case.ignored_rows)] = case.ignore_index
    if case.uint8:
        target = target.to(torch.uint8)
    weight = None
    if case.weight:
        weight = (torch.rand(V + case.weight_extra, generator=g, dtype=torch.float64) + 0.5).to(case.dtype)
        if case.inf_weight is not None:
            weight[int(rows[0].argmax()) if case.inf_weight == "argmax" else case.inf_weight] = math.inf
    grad_out = torch.rand(N_ROWS, generator=g, dtype=torch.float64) + 0.5
    if case.shape == "1d":
        full, target, grad_out = rows[0], target[0], grad_out[0]
    elif case.shape == "3d":
        full = rows.reshape(2, 3, V).permute(0, 2, 1)
        target, grad_out = target.reshape(2, 3), grad_out.reshape(2, 3)
    else:
        full = rows
    if case.reduction != "none":
        grad_out = torch.tensor(0.75, dtype=torch.float64)
    return full.to(case.dtype), target, weight, grad_out.to(case.dtype)


def reference(case: Case):
    """torch on the full logits in fp64: loss and the gradient of every class."""
    full, target, weight, grad_out = make_inputs(case)
    x = full.detach().double().clone().requires_grad_()
    z = x * case.logit_scale
    w = weight.double() if weight is not None else None
    kw = dict(weight=w, ignore_index=case.ignore_index, label_smoothing=case.label_smoothing)
    if case.z_loss == 0:
        loss = F.cross_entropy(z, target, reduction=case.reduction, **kw)
    else:  # z_loss * lse**2 per non-ignored row, reduced like the loss
        class_dim = 0 if z.dim() == 1 else 1
        lse = torch.logsumexp(z, class_dim)
        valid = target != case.ignore_index
        per = F.cross_entropy(z, target, reduction="none", **kw) + case.z_loss * torch.where(valid, lse * lse, 0.0)
        wt = w[target.clamp(0, case.vocab - 1)] if w is not None else torch.ones_like(lse)
        loss = {"none": per, "sum": per.sum(), "mean": per.sum() / (wt * valid).sum()}[case.reduction]
    loss.backward(grad_out.double())
    return loss.detach(), x.grad, full


def local_slice(full: torch.Tensor, start: int, size: int) -> torch.Tensor:
    dim = 0 if full.dim() == 1 else 1
    return full.narrow(dim, min(start, full.shape[dim]), size)  # an empty shard may start past V


# --------------------------------------------------------------------------- one rank, one case
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object",
               "reduce_scatter", "reduce_scatter_tensor", "broadcast", "reduce", "gather",
               "scatter", "all_to_all", "all_to_all_single", "send", "recv", "barrier")


@contextlib.contextmanager
def recording_collectives():
    """Record (name, elements) of every torch.distributed collective issued inside."""
    calls, originals = [], {n: getattr(dist, n) for n in COLLECTIVES if hasattr(dist, n)}

    def wrap(name, fn):
        def recorded(*args, **kwargs):
            t = args[0] if args else None
            calls.append((name, t.numel() if isinstance(t, torch.Tensor) else -1))
            return fn(*args, **kwargs)
        return recorded

    for name, fn in originals.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def run_case(case: Case, world: int, rank: int, device: str = "cpu", group=None) -> dict:
    """This rank's loss, the gradient of its shard, and the collectives of forward / backward."""
    full, target, weight, grad_out = make_inputs(case)
    start, size, explicit = shard(case, world, rank)
    local = local_slice(full, start, size).clone().to(device).requires_grad_()
    kw = dict(case.kwargs, weight=weight.to(device) if weight is not None else None, group=group)
    if explicit:
        kw["vocab_start_index"] = start
    launched = dict(_backend.launch_counts)
    try:
        with recording_collectives() as fwd:
            loss = vp_ce(local, target.to(device), **kw)
        with recording_collectives() as bwd:
            loss.backward(grad_out.to(device))
    except Exception as e:
        if case.error is None:
            raise
        return dict(error=(type(e).__name__, str(e)))
    kernels = sorted(k for k, n in _backend.launch_counts.items() if n > launched.get(k, 0))
    return dict(loss=loss.detach().cpu(), grad=local.grad.cpu(), fwd=fwd, bwd=bwd,
                kernels=kernels, triton=_backend.use_triton(local), device=local.device.type)


SUBGROUP, SUBGROUP_CASE = [1, 2], "label smoothing with weight"


def _worker(rank, world, backend, init_file, out_dir, case_names):
    """Spawned rank: join the group, run every case, save the results (module level: picklable)."""
    device = "cpu"
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    # A tensor-parallel group inside a larger world: ranks 1 and 2 of 3 (every rank takes
    # part in creating it; only its members run the case on it).
    jobs = [(name, CASE_BY_NAME[name], world, rank, None) for name in case_names]
    if world == 3:
        subgroup = dist.new_group(SUBGROUP)
        if rank in SUBGROUP:
            jobs.insert(0, ("subgroup", CASE_BY_NAME[SUBGROUP_CASE], len(SUBGROUP),
                            dist.get_rank(subgroup), subgroup))
    results = {}
    try:
        for i, (key, case, case_world, case_rank, group) in enumerate(jobs):
            try:
                results[key] = run_case(case, case_world, case_rank, device, group)
            except Exception:
                results[key] = traceback.format_exc()
                # The ranks may now disagree on which collective comes next: stop here.
                for rest in jobs[i + 1:]:
                    results[rest[0]] = f"not run: {key!r} raised before it on rank {rank}"
                break
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    # Leave together, then skip the interpreter's teardown: gloo's threads dying there
    # occasionally abort the process ("terminate called without an active exception")
    # after every result is saved, which would fail a run whose results are all in.
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_world(world, backend, tmp_dir, case_names, deadline_s=240):
    """Run ``_worker`` on ``world`` spawned ranks; {rank: {case name: result}}."""
    os.makedirs(tmp_dir, exist_ok=True)
    init_file = os.path.join(tmp_dir, "rendezvous")
    ctx = mp.start_processes(_worker, args=(world, backend, init_file, tmp_dir, case_names),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + deadline_s
    while not ctx.join(timeout=1):  # raises with the child's traceback if a rank died
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"world of {world}: ranks still running after {deadline_s} s")
    return {r: torch.load(os.path.join(tmp_dir, f"rank{r}.pt")) for r in range(world)}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """outputs(world) -> {rank: {case name: result}}; each world runs once per module."""
    cache = {}

    def get(world):
        if world not in cache:
            if world == 1:  # no process group at all
                cache[world] = {0: {c.name: run_case(c, 1, 0) for c in CASES}}
            else:
                tmp = str(tmp_path_factory.mktemp(f"world{world}"))
                cache[world] = spawn_world(world, "gloo", tmp, [c.name for c in CASES])
        return cache[world]

    return get


# --------------------------------------------------------------------------- checks
def assert_accurate(got, ref, dtype, zmax, what):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    scale = float(ref.abs().nan_to_num(0.0).max()) if ref.numel() else 0.0
    atol = 16 * torch.finfo(acc).eps * (1 + zmax) * max(scale, 1e-30)
    torch.testing.assert_close(got.double(), ref, rtol=torch.finfo(dtype).eps, atol=atol,
                               equal_nan=True, msg=lambda m: f"{what}: {m}")


def check_case(case: Case, world: int, per_rank: dict):
    """Every rank: the same loss as torch, its shard of torch's gradient, O(N) communication."""
    raised = [f"rank {rank} of {world}:\n{res}" for rank, res in per_rank.items() if isinstance(res, str)]
    if raised:
        pytest.fail("raised in a child:\n" + "\n".join(raised))
    if case.error is not None and world in case.error_worlds:
        for rank, res in per_rank.items():
            assert "error" in res, f"rank {rank} did not raise"
            assert res["error"][0] == case.error[0] and re.search(case.error[1], res["error"][1]), res
        return
    ref_loss, ref_grad, full = reference(case)
    zmax = float(full.double().abs().max()) * case.logit_scale
    n_rows = ref_grad.numel() // case.vocab
    k = 3 if case.label_smoothing > 0 else 2
    for rank, res in per_rank.items():
        start, size, _ = shard(case, world, rank)
        assert res["loss"].dtype == case.dtype and res["loss"].shape == ref_loss.shape
        assert_accurate(res["loss"], ref_loss, case.dtype, zmax, f"loss, rank {rank}")
        # identical on every rank, bit for bit (NaN included)
        torch.testing.assert_close(res["loss"], per_rank[0]["loss"], rtol=0, atol=0, equal_nan=True)
        assert res["grad"].shape == local_slice(ref_grad, start, size).shape
        assert_accurate(res["grad"], local_slice(ref_grad, start, size), case.dtype, zmax,
                        f"gradient, rank {rank}")
        # a spawned rank runs the backend this process would (the interpreter env var is inherited)
        assert res["triton"] == _backend.use_triton(torch.empty(0, device=res["device"]))
        if res["triton"] and size > 0:  # the Triton kernels served it (interpreter or GPU)
            assert res["kernels"] == ["vocab_parallel_bwd_kernel", "vocab_parallel_stats_kernel"]
        # two all-reduces of O(rows) floats in forward (none in a world of 1), none in backward
        expected = [] if world == 1 else [("all_reduce", n_rows),
                                          ("all_reduce", k * n_rows + 1 + 2 * world)]
        assert res["fwd"] == expected and res["bwd"] == []


CASE_IDS = [c.name for c in CASES]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", CASE_IDS)
def test_matches_torch_on_concatenated_logits(outputs, world, name):
    case = CASE_BY_NAME[name]
    check_case(case, world, {r: res[name] for r, res in outputs(world).items()})


@pytest.mark.parametrize("world", [w for w in WORLDS if w > 1])
def test_communication_does_not_grow_with_the_vocabulary(outputs, world):
    per_rank = outputs(world)
    for rank in per_rank:
        narrow, wide = per_rank[rank]["equal shards"], per_rank[rank]["wide vocabulary"]
        assert narrow["fwd"] == wide["fwd"] == [("all_reduce", N_ROWS),
                                                ("all_reduce", 2 * N_ROWS + 1 + 2 * world)]


def test_a_subgroup_of_a_larger_world(outputs):
    """group=: ranks 1 and 2 of a world of 3 form the tensor-parallel group; rank 0 idles."""
    per_rank = outputs(3)
    assert "subgroup" not in per_rank[0]
    check_case(CASE_BY_NAME[SUBGROUP_CASE], len(SUBGROUP),
               {i: per_rank[r]["subgroup"] for i, r in enumerate(SUBGROUP)})


# --------------------------------------------------------------------------- a world of 1, in process
def test_kernels_serve_the_call_and_the_torch_path_agrees(monkeypatch):
    case = CASE_BY_NAME["everything, fp64 none"]
    if not _backend.use_triton(torch.empty(0)):
        pytest.skip("the Triton interpreter is off")
    before = dict(_backend.launch_counts)
    kernels = run_case(case, 1, 0)
    for name in ("vocab_parallel_stats_kernel", "vocab_parallel_bwd_kernel"):
        assert _backend.launch_counts[name] > before.get(name, 0), name
    monkeypatch.setattr(fsd, "use_triton", lambda t: False)
    torch_path = run_case(case, 1, 0)
    torch.testing.assert_close(torch_path["loss"], kernels["loss"], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(torch_path["grad"], kernels["grad"], rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_an_empty_extra_dim_gives_torchs_answer(reduction):
    """(N, V, 0) logits: no rows, torch's NaN mean, 0 sum and empty (N, 0) loss."""
    x = torch.randn(2, 12, 0, requires_grad=True)
    t = torch.zeros(2, 0, dtype=torch.long)
    ours, theirs = vp_ce(x, t, reduction=reduction), F.cross_entropy(x, t, reduction=reduction)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, equal_nan=True)
    ours.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradient_at_large_logits_is_as_accurate_as_torch(dtype):
    """The backward forms exp((z - shift) - log_s), not exp(z - lse): at logits of 1e4 in
    fp32, lse's rounding (1e4 * 6e-8) would be every probability's error."""
    def grad_error(fn, x0, t, ref):
        x = x0.detach().clone().requires_grad_()
        fn(x, t).backward()
        return (x.grad.double() - ref).abs().max()

    for c in (1e2, 1e4, 6e4):
        x0 = torch.tensor([[c, c - 1, c - 3, c - 2.5], [-c, 1 - c, 3 - c, 2 - c]], dtype=dtype)
        t = torch.tensor([1, 2])
        ref = x0.detach().double().clone().requires_grad_()
        F.cross_entropy(ref, t).backward()
        ours, torchs = (grad_error(fn, x0, t, ref.grad) for fn in (vp_ce, F.cross_entropy))
        assert ours <= 4 * torchs + 4 * torch.finfo(dtype).eps, (c, ours, torchs)


@pytest.mark.parametrize("reduction, upstream", [("none", [math.nan, 1.0]), ("sum", math.nan),
                                                  ("mean", math.inf)])
def test_non_finite_grad_output_on_a_zero_weight_row_like_torch(reduction, upstream):
    """A kept row whose target has class weight 0 takes torch's 0 * NaN (a NaN row), where
    an ignored row stays 0."""
    w = torch.tensor([1.0, 0.0, 1.0, 1.0])
    t = torch.tensor([1, 2, -100])
    up = torch.tensor(upstream if reduction != "none" else upstream + [1.0])
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    grads = []
    for fn in (vp_ce, F.cross_entropy):
        xi = x.clone().requires_grad_()
        fn(xi, t, weight=w, reduction=reduction).backward(up)
        grads.append(xi.grad)
    torch.testing.assert_close(grads[0], grads[1], equal_nan=True)
    assert bool(grads[0][0].isnan().all()) and bool((grads[0][2] == 0).all())


def test_gradcheck_fp64():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 6, -100])
    w = torch.rand(7, generator=g, dtype=torch.float64) + 0.5
    fn = lambda x: vp_ce(x, t, weight=w, label_smoothing=0.1, z_loss=0.05, logit_scale=0.7,  # noqa: E731
                         reduction="none")
    assert torch.autograd.gradcheck(fn, (x,))


def test_compiles_fullgraph_in_a_world_of_one():
    """torch.compile(fullgraph=True) of the loss and its gradient (world of 1): the CPU's
    host-side checks (shard layout, target range) are left out of the compiled graph,
    which cannot branch on device values (it failed: data-dependent guard); eager keeps
    them (test_out_of_range_target_cpu_error_is_torchs)."""
    x = torch.randn(4, 9)
    t = torch.tensor([0, 3, -100, 5])
    w = torch.rand(9) + 0.5

    def loss_and_grad(fn):
        xs = x.clone().requires_grad_(True)
        loss = fn(xs)
        return loss, torch.autograd.grad(loss, xs)[0]
    loss = lambda x: vp_ce(x, t, weight=w, label_smoothing=0.1, z_loss=1e-2)  # noqa: E731
    torch._dynamo.reset()
    got = loss_and_grad(torch.compile(loss, fullgraph=True, backend="aot_eager"))
    for a, e in zip(got, loss_and_grad(loss)):
        torch.testing.assert_close(a, e)


def test_backward_twice_gives_the_same_gradient():
    x = torch.randn(4, 9, requires_grad=True)
    loss = vp_ce(x, torch.tensor([0, 3, 8, 5]), label_smoothing=0.1)
    g1, = torch.autograd.grad(loss, x, retain_graph=True)
    g2, = torch.autograd.grad(loss, x)
    assert torch.equal(g1, g2)


def test_double_backward_raises():
    x = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    loss = vp_ce(x, torch.tensor([1, 4]))
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, x, create_graph=True)


BAD_ARGS = [
    ("reduction", dict(reduction="avg"), ValueError, "avg is not a valid value for reduction"),
    ("smoothing > 1", dict(label_smoothing=1.5), RuntimeError, "label_smoothing must be between"),
    ("smoothing 2.0", dict(label_smoothing=2.0), RuntimeError, "Got: 2$"),  # torch prints %g
    # uint8 + class weight + smoothing + mean: torch's gather() error, after its IndexError
    ("uint8 smoothed weighted mean", dict(target=torch.tensor([1, 2], dtype=torch.uint8),
                                          weight=torch.ones(5), label_smoothing=0.1),
     RuntimeError, "gather"),
    ("uint8 out of range, smoothed weighted mean", dict(
        target=torch.tensor([1, 255], dtype=torch.uint8), weight=torch.ones(5),
        label_smoothing=0.1), IndexError, "Target 255 is out of bounds"),
    ("logit_scale inf", dict(logit_scale=math.inf), ValueError, "logit_scale must be finite"),
    ("z_loss < 0", dict(z_loss=-1e-4), ValueError, "z_loss must be a finite number >= 0"),
    ("z_loss str", dict(z_loss="1e-4"), TypeError, "z_loss must be a real number"),
    ("logit_scale with grad", dict(logit_scale=torch.tensor(2.0, requires_grad=True)), TypeError,
     "logit_scale must be a real number or a 0-d tensor that does not require grad"),
    ("probability target", dict(target=torch.rand(2, 5)), RuntimeError, "class-probability targets are not supported"),
    ("float16 index", dict(target=torch.tensor([1, 2], dtype=torch.int16)), RuntimeError, "expected target dtype"),
    # the target's shape: torch's checks, types and words (a world of 1 is torch's call)
    ("target batch", dict(target=torch.tensor([1, 2, 3])), ValueError,
     r"Expected input batch_size \(2\) to match target batch_size \(3\)"),
    ("target 2-d", dict(target=torch.zeros(2, 1, dtype=torch.long)), RuntimeError,
     "0D or 1D target tensor expected"),
    ("target of 3-d logits", dict(x=torch.randn(2, 5, 3), target=torch.zeros(2, 4, dtype=torch.long)),
     RuntimeError, r"Expected target size \[2, 3\], got \[2, 4\]"),
    ("target of 1-d logits", dict(x=torch.randn(5), target=torch.zeros(1, 1, dtype=torch.long)),
     RuntimeError, "0D or 1D target tensor expected"),
    ("weight dtype", dict(weight=torch.ones(5, dtype=torch.float64)), RuntimeError, "expected scalar type Float"),
    ("weight 2-d", dict(weight=torch.ones(1, 5)), RuntimeError, "1-D class weight"),
    ("weight too short", dict(weight=torch.ones(4)), RuntimeError, "defined either for all 5 classes"),
    ("weight too short, no rows", dict(x=torch.randn(0, 5), target=torch.zeros(0, dtype=torch.long),
                                       weight=torch.ones(3)), RuntimeError, "defined either for all 5"),
    ("start in a world of 1", dict(vocab_start_index=5), ValueError, "world of 1"),
    ("negative start", dict(vocab_start_index=-1), ValueError, "vocab_start_index must be an int >= 0"),
    ("group without init", dict(group=object()), ValueError, "torch.distributed is not initialised"),
    ("integer logits", dict(x=torch.ones(2, 5, dtype=torch.int64)), NotImplementedError, "not implemented for input dtype"),
]


@pytest.mark.parametrize("name, kw, exc, msg", BAD_ARGS, ids=[b[0] for b in BAD_ARGS])
def test_bad_arguments(name, kw, exc, msg):
    kw = dict(kw)
    x = kw.pop("x", torch.randn(2, 5))
    t = kw.pop("target", torch.tensor([1, 2]))
    with pytest.raises(exc, match=msg):
        vp_ce(x, t, **kw)


def test_out_of_range_target_cpu_error_is_torchs():
    with pytest.raises(IndexError, match="Target 5 is out of bounds"):
        vp_ce(torch.randn(2, 5), torch.tensor([1, 5]))


# --------------------------------------------------------------------------- compiled kernels
COMPILE_SCRIPT = textwrap.dedent("""
    import importlib, json
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    k = importlib.import_module("fused_softmax.kernels.vocab_parallel")
    out = {}
    for kernel in (k.vocab_parallel_stats_kernel, k.vocab_parallel_bwd_kernel):
        for acc, data in ((tl.float32, "bf16"), (tl.float32, "fp32"), (tl.float64, "fp64")):
            for feats in (False, True):
                const = dict(HAS_WEIGHT=feats, HAS_SMOOTHING=feats, HAS_SOFTCAP=feats, ACC=acc,
                             BLOCK_N=4096)
                side = "fp64" if acc == tl.float64 else "fp32"
                sig = {n: ("constexpr" if n in const else "*i64" if n == "TARGET"
                           else f"*{data}" if n in ("X", "WEIGHT", "GRAD")
                           else f"*{side}" if n.isupper() and n != "C"
                           else "i64")
                       for n in kernel.arg_names}
                name = f"{kernel.fn.__name__} {data} " + ",".join(f"{n}={v}" for n, v in const.items())
                try:
                    cc = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=const),
                                        target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8))
                    out[name] = "ok" if cc.asm["cubin"] else "no cubin"
                except Exception as e:
                    out[name] = f"{type(e).__name__}: {e}"[:2000]
    print(json.dumps(out))
""")


def test_kernels_compile_for_sm90():
    """The interpreter never sees compiler-only errors: compile each variant for an H100."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 12 and all(v == "ok" for v in results.values()), results


# --------------------------------------------------------------------------- CUDA / NCCL
@pytest.mark.skipif(not (CUDA and dist.is_nccl_available()), reason="needs CUDA and NCCL")
@pytest.mark.parametrize("world", [1, 2])
def test_nccl_on_gpus(world, tmp_path):
    """On GPUs with NCCL (a world of 1 on a single GPU at least), no host synchronisation."""
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    names = ["everything, none", "everything, fp64 mean", "label smoothing with weight"]
    per_rank = spawn_world(world, "nccl", str(tmp_path), names)
    for name in names:
        check_case(CASE_BY_NAME[name], world, {r: res[name] for r, res in per_rank.items()})


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_no_host_sync_on_cuda():
    case = CASE_BY_NAME["everything, none"]
    full, target, weight, grad_out = make_inputs(case)
    x = full.cuda().requires_grad_()
    target, weight, grad_out = target.cuda(), weight.cuda(), grad_out.cuda()
    vp_ce(x, target, weight=weight, **case.kwargs).backward(grad_out)  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        vp_ce(x, target, weight=weight, **case.kwargs).backward(grad_out)
    finally:
        torch.cuda.set_sync_debug_mode("default")
