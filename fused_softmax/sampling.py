"""sample: draw token ids from logits with temperature, top-k, top-p and min-p, no sort.

Device code and the algorithm: ``kernels/sampling.py``. Every parameter reaches the kernel
as a per-row device tensor (a Python number becomes a one-element tensor read with row
stride 0), and the noise seed is drawn from the caller's generator on the device, so a call
never synchronises with the host and can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Optional, Union

import numpy as np
import torch

from . import _backend
from ._backend import check_float, use_triton

if _backend.HAS_TRITON:
    import triton

    from .kernels import sampling as _k

Param = Union[float, int, torch.Tensor, None]

#: Temperatures below this are greedy (kernels/sampling.py's GREEDY_BELOW).
_GREEDY_BELOW = 1e-30

#: Tokens per draw block: a draw picks a block (one noise value per block), then a token in
#: it (one per token of that block only): see kernels/sampling.py.
DRAW_BLOCK = 2048

#: Draw blocks per step of a pass when a program walks a long row and rows are fewer than
#: SMs (kernels/sampling.py, ``UNROLL``).
UNROLL_FEW_ROWS = 8

#: Largest int64 a seed may take (``torch.randint``'s bound is exclusive).
_SEED_HIGH = 2**63 - 1


# --------------------------------------------------------------------------- launcher
#: Launches of rejection rounds over split rows before the rest of the rounds run one
#: program per row (untuned): top-p 0.9 accepts the first candidate with probability 0.9
#: or more, and each round removes the rejected candidate and everything below it.
SPLIT_ROUNDS = 4


def launch_config(n_rows: int, vocab: int, device: torch.device, split_ok: bool = False):
    """``(meta-parameters, n_split, split_cols, grid)`` of the sampling launch.

    Whole short rows, several to a tile (a tile of 8192 fp32 values, 16 per thread at 16
    warps); long rows one to a program, in blocks of ``DRAW_BLOCK`` (a block is the unit of
    the two-level draw); a persistent grid of a few programs per SM: ``sample_kernel``.
    Fewer rows than fill the GPU four times over (``split_ok``) are cut into parts of
    2048-wide blocks, one program each, one launch per pass: ``split_kernel`` (top-k with
    top-p: four more for the radix select of the k-th largest value). One program walking
    a 128k row alone took 0.075 ms on an H200 (plain, before the two-level draw) and
    0.062 ms (min-p, after it); split plain sampling 0.009 ms.
    """
    cfg, n_split, split_cols, grid = _launch_config(
        n_rows, vocab, device.type == "cuda", _backend.num_programs_per_wave(device), split_ok,
        DRAW_BLOCK, UNROLL_FEW_ROWS)
    return dict(cfg), n_split, split_cols, grid  # a copy: the cached one stays as computed


@functools.lru_cache(maxsize=4096)  # pure in its arguments; a few microseconds a call saved
def _launch_config(n_rows, vocab, on_cuda, per_wave, split_ok, draw_block, unroll_few_rows):
    # (DRAW_BLOCK and UNROLL_FEW_ROWS come as arguments: tests and benchmarks change them,
    # and a cached result must follow)
    # A block is also a draw block (kernels/sampling.py): at most draw_block, and >= 4 (one
    # Philox call per 4 tokens).
    block_n = max(4, min(triton.next_power_of_2(vocab), draw_block))
    # Long rows one per program on a GPU (parallelism); under the interpreter, few
    # programs with wide tiles are cheapest.
    one_row = vocab > block_n and on_cuda
    block_r = min(1 if one_row else max(1, 8192 // block_n), triton.next_power_of_2(n_rows))
    n_tiles = triton.cdiv(n_rows, block_r)
    want = 4 * per_wave
    n_blocks = triton.cdiv(vocab, draw_block)
    n_split = min(n_blocks, triton.cdiv(want, n_rows))
    if split_ok and n_tiles < want and n_split > 1:
        split_cols = triton.cdiv(n_blocks, n_split) * draw_block
        n_split = triton.cdiv(vocab, split_cols)
        grid = min(n_rows * n_split, per_wave * 8)
        return dict(BLOCK_R=1, BLOCK_N=draw_block, SPLIT=True, UNROLL=1, num_warps=4), \
            n_split, split_cols, grid
    # One long row per program: 8 warps (untuned: 2048-wide blocks since the two-level
    # draw; 8192-wide ones had 16 warps). Fewer rows than SMs (no other program to hide a
    # program's memory latency): UNROLL draw blocks per step (untimed; compiled for sm_90
    # at 8 warps it takes 255 registers, and top-k with top-p spills up to 124 bytes; at
    # 16 warps it spills more).
    unroll = 1
    if one_row and n_rows < per_wave:
        unroll = min(unroll_few_rows, triton.next_power_of_2(triton.cdiv(vocab, draw_block)))
    num_warps = 8 if one_row else min(16, max(4, block_r * block_n // 512))
    grid = min(n_tiles, per_wave * 4)
    return (dict(BLOCK_R=block_r, BLOCK_N=block_n, SPLIT=False, UNROLL=unroll,
                 num_warps=num_warps), 1, vocab, grid)


def _split_pays(logits: torch.Tensor) -> bool:
    """Whether few rows may be split across programs (``launch_config``): on CUDA only
    while a CUDA graph is captured or when rows fill the SMs. A split row takes 2 to 11
    launches (top-k or top-p: 6; both: 11, one a memset), and each costs the host 40-90
    us on an H100 machine. Launched eagerly, rows of 128256 with top-k took 0.11 / 0.22 /
    0.28 ms whole at batch 1 / 16 / 64 against 0.46 / 0.30 / 0.48 ms split, and 0.46
    against 0.34 ms at batch 256 (top-p: 0.16 / 0.33 / 0.22 / 0.42 whole against 0.32 /
    0.31 / 0.66 / 0.33 split); replayed from a CUDA graph, split rows were faster at every
    batch (bench/results/sampling-h100-2026-11-26-*.json)."""
    if logits.device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return True
    return logits.shape[0] >= _backend.num_programs_per_wave(logits.device)


def _param_args(t: Optional[torch.Tensor], like: torch.Tensor):
    """(pointer, row stride) of an optional per-row parameter; a dummy when absent."""
    if t is None:
        return like, 0
    return t, t.stride(0)


def _launch(logits, seed, temperature, top_k, top_p, min_p, config=None) -> torch.Tensor:
    n_rows, vocab = logits.shape
    out = torch.empty(n_rows, dtype=torch.int64, device=logits.device)
    if n_rows == 0:
        return out
    cfg, n_split, split_cols, grid = config or launch_config(
        n_rows, vocab, logits.device, split_ok=_split_pays(logits))
    params = (seed, temperature, temperature.stride(0), *_param_args(top_k, seed),
              *_param_args(top_p, temperature), *_param_args(min_p, temperature))
    filters = dict(HAS_TOP_K=top_k is not None, HAS_TOP_P=top_p is not None,
                   HAS_MIN_P=min_p is not None)
    if not cfg["SPLIT"]:
        _backend.launch(_k.sample_kernel, grid, logits, out, *params, n_rows, vocab,
                        logits.stride(0), **filters,
                        **{k: v for k, v in cfg.items() if k != "SPLIT"})
        return out
    rounds = top_k is not None or top_p is not None
    select = top_k is not None and top_p is not None  # top-p after top-k: radix select
    f32, i64 = dict(dtype=torch.float32, device=logits.device), dict(dtype=torch.int64,
                                                                     device=logits.device)
    # each part's (max, sum) (top-p, min-p); the parts' results of a launch, double
    # buffered: the best draw-block score as an unevaluated sum (hi, lo), its block,
    # count and mass above the candidate; each row's candidate and whether it is undecided
    part_mz = torch.empty((n_rows, 2, n_split) if top_p is not None or min_p is not None
                          else (0,), **f32)
    # top-k with top-p: each row's byte histograms of radix select (added up atomically by
    # the parts) and each part's share of the top-k set's mass
    row_hist = torch.zeros((n_rows, 4, 256) if select else (0,), dtype=torch.int32,
                           device=logits.device)
    part_top = torch.empty((n_rows, n_split) if select else (0,), **f32)
    part_best = torch.empty((2, 2, n_rows, n_split), **f32)
    part_idx = torch.empty((2, n_rows, n_split), **i64)
    part_cnt = torch.empty((2, n_rows, n_split) if rounds else (0,), **i64)
    part_mass = torch.empty((2, n_rows, n_split) if rounds else (0,), **f32)
    row_cand = torch.empty((2, n_rows) if rounds else (0,), **i64)
    row_active = torch.empty((2, n_rows) if rounds else (0,), dtype=torch.int32,
                             device=logits.device)
    if min_p is not None or select:
        # min-p's reference point first, the draws need it; top-k with top-p: the same
        # launch starts radix select of the k-th largest key, one launch per byte
        stats_args = (logits, *params[1:7], part_mz, row_hist, n_rows, vocab, logits.stride(0),
                      n_split, split_cols)
        for level in range(4 if select else 1):
            _backend.launch(_k.split_stats_kernel, grid, *stats_args, level, STATS=level == 0,
                            WITH_SUM=top_p is not None, SELECT=select, BLOCK_N=cfg["BLOCK_N"],
                            num_warps=4)
    args = (logits, out, *params, part_mz, part_best, part_idx, part_cnt, part_mass, row_cand,
            row_active, row_hist, part_top, n_rows, vocab, logits.stride(0), n_split, split_cols)
    meta = dict(**filters, STATS_FIRST=top_p is not None and min_p is None and not select,
                BLOCK_N=cfg["BLOCK_N"], BLOCK_S=triton.next_power_of_2(n_split), num_warps=4)
    _backend.launch(_k.split_kernel, grid, *args, 0, STAGE=0, **meta)
    last = SPLIT_ROUNDS + 1 if rounds else 1
    for rnd in range(1, last):
        _backend.launch(_k.split_kernel, grid, *args, rnd, STAGE=1, **meta)
    _backend.launch(_k.split_kernel, min(n_rows, grid), *args, last, STAGE=2, **meta)
    return out


# --------------------------------------------------------------------------- torch path
def _torch_kept(logits, temperature, top_k, top_p, min_p):
    """``(s, keep, greedy)``: scaled logits, the kept set and the greedy rows, with torch ops
    (a sort is fine here: CPU only, no Triton)."""
    vocab = logits.shape[1]
    t = temperature.float()
    greedy = t < _GREEDY_BELOW
    inv_t = torch.where(greedy, 1.0, 1.0 / torch.where(greedy, 1.0, t))
    s = logits.float() * inv_t[:, None] + 0.0
    keep = torch.ones_like(s, dtype=torch.bool)
    desc = s.sort(dim=1, descending=True).values
    in_top_k = torch.ones_like(desc, dtype=torch.bool)
    if top_k is not None:
        kth = desc.gather(1, (top_k.clamp(max=vocab) - 1)[:, None])
        keep &= s >= kth
        in_top_k = desc >= kth
    if top_p is not None or min_p is not None:
        m = s.amax(1, keepdim=True)
        shift = torch.where(m.isinf(), 0.0, m)
        e = torch.exp(s - shift)
    if top_p is not None:
        # the mass of the top-k set's renormalised distribution (top-p after top-k), in
        # fp64 prefix sums; a target no prefix reaches (rounding: p near 1) keeps everything
        mass = torch.where(in_top_k, torch.exp(desc - shift), 0.0).double().cumsum(1)
        target = top_p.double()[:, None] * mass[:, -1:]
        reached = mass >= target
        first = torch.where(reached.any(1, keepdim=True),
                            reached.int().argmax(1, keepdim=True), vocab - 1)
        tau = desc.gather(1, first)
        keep &= (s >= tau) | (top_p[:, None] >= 1)
    if min_p is not None:
        keep &= e >= min_p.float()[:, None]
    return s, keep, greedy


def _torch_sample(logits, seed, temperature, top_k, top_p, min_p) -> torch.Tensor:
    """The kernel's semantics with torch ops."""
    if logits.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=logits.device)
    s, keep, greedy = _torch_kept(logits, temperature, top_k, top_p, min_p)
    gen = torch.Generator(device=logits.device).manual_seed(int(seed[0]))
    # in (0, 1): torch.rand gives exactly 0 once in 2^24, a -inf Gumbel variate (kernels'
    # uniform() has the same floor)
    u = torch.rand(s.shape, generator=gen, device=s.device).clamp_min(torch.finfo(torch.float32).tiny)
    sk = torch.where(keep, s, -torch.inf)
    # noise added to s less the largest kept value: full precision at large |s| (kernels')
    m = sk.amax(1, keepdim=True)
    rel = sk - torch.where(m.isinf(), 0.0, m)
    return torch.where(greedy[:, None], sk, rel - torch.log(-torch.log(u))).argmax(1)


# --------------------------------------------------------------------------- custom op
@_backend.custom_op("fused_softmax::sample")
def sample_op(
    logits: torch.Tensor, seed: torch.Tensor, temperature: torch.Tensor,
    top_k: Optional[torch.Tensor], top_p: Optional[torch.Tensor], min_p: Optional[torch.Tensor],
) -> torch.Tensor:
    """Token ids of a ``(rows, V)`` logits tensor; parameters are ``(rows,)`` tensors
    (stride 0 to broadcast), ``seed`` one int64 on the logits' device."""
    if use_triton(logits):
        return _launch(logits, seed, temperature, top_k, top_p, min_p)
    return _torch_sample(logits, seed, temperature, top_k, top_p, min_p)


@sample_op.register_fake
def _(logits, seed, temperature, top_k, top_p, min_p):
    return logits.new_empty(logits.shape[0], dtype=torch.int64)


# --------------------------------------------------------------------------- public API
def _is_number(v) -> bool:
    """A Python or numpy int or float (not a bool, nor another ``numbers.Real`` such as a
    ``Fraction``, which torch takes as no number)."""
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _in_bounds(v, low, low_excluded: bool, high):
    """``low (<|<=) v <= high`` for a number or elementwise for a tensor (NaN is out)."""
    above = (v > low) if low_excluded else (v >= low)
    return above & (v <= high)


def _broadcasts(shape, to) -> bool:
    """Whether ``shape`` broadcasts to ``to`` (torch's rule, on sizes alone)."""
    return len(shape) <= len(to) and all(
        s == 1 or s == t for s, t in zip(reversed(tuple(shape)), reversed(tuple(to))))


def _row_param(value: Param, name: str, dtype: torch.dtype, logits: torch.Tensor,
               bounds: tuple, valid_text: str, clamp: dict) -> torch.Tensor:
    """A parameter as a ``(rows,)`` tensor on the logits' device (stride 0 for a number,
    which the caller has checked).

    A tensor is checked only on the CPU and outside ``torch.compile``: on CUDA, reading its
    values would synchronise with the host, so there it is clamped into range instead and
    its NaN entries replaced by ``clamp["nan"]`` (the value that disables the filter).
    A number is clamped too, so that it stays in range once rounded to fp32 (a ``top_p`` of
    1e-50 must not become 0).
    """
    batch = logits.shape[:-1]
    n_rows = batch.numel()
    low, high = clamp.get("min", -math.inf), clamp.get("max", math.inf)
    if _is_number(value):
        value = min(max(value, low), high)
        return torch.full((1,), value, dtype=dtype, device=logits.device).expand(n_rows)
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"sample(): {name} must be a number or a tensor, not {type(value).__name__}")
    if value.device != logits.device:
        raise ValueError(
            f"sample(): {name} is on {value.device} but logits are on {logits.device}")
    integer_wanted = dtype == torch.int64
    if ((integer_wanted and value.is_floating_point()) or value.is_complex()
            or value.dtype == torch.bool):
        raise TypeError(f"sample(): {name} has dtype {value.dtype}; expected "
                        + ("an integer tensor" if integer_wanted else "a real tensor"))
    # per row: a trailing 1 broadcasts as in x / T (Hugging Face's (B, 1)): to the batch
    # shape + (1,); any other shape to the batch shape
    if value.dim() and value.shape[-1] == 1 and _broadcasts(value.shape, (*batch, 1)):
        value = torch.broadcast_to(value, (*batch, 1))[..., 0]
    elif _broadcasts(value.shape, batch):
        value = torch.broadcast_to(value, batch)
    else:
        raise ValueError(
            f"sample(): {name} of shape {tuple(value.shape)} broadcasts neither to the batch "
            f"shape {tuple(batch)} of logits {tuple(logits.shape)} nor to "
            f"{tuple(batch) + (1,)}")
    value = value.reshape(n_rows)
    if value.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(_in_bounds(value.double(), *bounds).all()):
            raise ValueError(f"sample(): every entry of {name} must be {valid_text}")
    if value.dtype == torch.uint64:  # 2^63 and beyond would wrap casting to int64
        value = value.double().clamp(max=2.0 ** 62)  # (a top_k >= V anyway)
    value = value.to(dtype)  # valid values only move where fp32 rounding left the range
    if value.is_floating_point():
        value = torch.nan_to_num(value, nan=clamp["nan"], posinf=high, neginf=low)
    return value.clamp(low, None if math.isinf(high) else high)


def sample(
    logits: torch.Tensor, *, temperature: Param = 1.0, top_k: Param = None,
    top_p: Param = None, min_p: Param = None, generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    r"""Draw one token id per row of ``logits`` from :math:`\mathrm{softmax}(x / T)`
    restricted to the top-k, top-p and min-p sets, in one fused kernel and without a sort.

    Args:
        logits (Tensor): ``(..., V)`` float16 / bfloat16 / float32 / float64; rows are the
            leading dimensions. Computed in fp32.
        temperature (float or Tensor): ``T >= 0``; ``T = 0`` (or below 1e-30, where
            ``x / T`` would overflow) is greedy. A number that small returns
            :func:`torch.argmax` itself (first index on ties, NaN counts as the largest, fp64
            compared exactly) and consumes no random numbers. A tensor gives one value per
            row: a shape that ends in 1 and broadcasts to ``logits.shape[:-1] + (1,)``
            is taken as in ``x / T`` (Hugging Face's ``(B, 1)``), any other shape must
            broadcast to ``logits.shape[:-1]``; its greedy rows take
            the argmax inside the kernel, in fp32 (rows holding NaN: unspecified).
        top_k (int or integer Tensor, optional): keep the ``k >= 1`` largest logits; every
            token tied with the k-th largest is kept too.
        top_p (float or Tensor, optional): ``0 < p <= 1``: keep the smallest set of most
            probable tokens whose probability (under ``softmax(x / T)``, renormalised over
            the top-k set when ``top_k`` is given) is ``>= p``; every token tied with the
            least probable member is kept too.
        min_p (float or Tensor, optional): ``0 <= min_p <= 1``: keep tokens with
            probability ``>= min_p`` times the largest probability.
        generator (torch.Generator, optional): on the logits' device; the kernel's seed is
            drawn from it (on the device, no host synchronisation), so equal generator
            states give equal draws and successive calls give fresh ones. Not under
            ``torch.compile(fullgraph=True)``, which cannot trace a generator (nor torch's
            ``multinomial(..., generator=g)``); compiled, the global RNG is used.

    The filters apply in Hugging Face's order (FlashInfer's ``top_k_first``; vLLM's V1
    sampler applies min-p first): top-k, then top-p on the distribution renormalised
    over the top-k set, and min-p
    (a ratio to the largest probability, which renormalising leaves alone); a token is
    drawn from ``softmax(x / T)`` renormalised over the tokens that all of them keep.
    Per-row tensors are validated on the CPU (outside :func:`torch.compile`); on CUDA
    (where reading them would synchronise) and in compiled code, out-of-range entries are
    clamped into range instead, and a NaN entry disables its filter (temperature: 1).
    A row whose logits are all ``-inf`` gives token 0 and a row holding ``+inf`` its first
    ``+inf`` token (torch.multinomial would raise for both); NaN logits give an unspecified
    token. fp64 logits are rounded to fp32 (except by the greedy ``torch.argmax`` of a
    number ``T``), so values beyond fp32's range become ``±inf``.

    Returns:
        int64 tensor of shape ``logits.shape[:-1]``.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> ids = fused_softmax.sample(torch.randn(4, 32000), temperature=0.7, top_p=0.9, generator=g)
        >>> ids.shape, ids.dtype
        (torch.Size([4]), torch.int64)
        >>> fused_softmax.sample(torch.tensor([[0.0, 5.0, 1.0]]), temperature=0)  # greedy
        tensor([1])
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"sample(): argument 'logits' must be Tensor, not {type(logits).__name__}")
    check_float("sample", logits)
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"sample(): logits of shape {tuple(logits.shape)} have no vocabulary "
                         "dimension to sample from")
    vocab = logits.shape[-1]
    if temperature is None:
        raise TypeError("sample(): temperature must be a number or a tensor, not None")
    f32_max = torch.finfo(torch.float32).max
    values = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    specs = dict(  # name: (dtype, (low, low excluded, high), in words, clamp on CUDA)
        temperature=(torch.float32, (0.0, False, f32_max),
                     "a number >= 0 and finite in float32", dict(min=0.0, max=f32_max, nan=1.0)),
        top_k=(torch.int64, (1, False, math.inf), "an integer >= 1", dict(min=1)),
        top_p=(torch.float32, (0.0, True, 1.0), "in (0, 1]",
               dict(min=torch.finfo(torch.float32).tiny, max=1.0, nan=1.0)),
        min_p=(torch.float32, (0.0, False, 1.0), "in [0, 1]", dict(min=0.0, max=1.0, nan=0.0)),
    )
    for name, (dtype, bounds, words, _) in specs.items():
        value = values[name]
        if value is not None and _is_number(value):  # in Python: nothing for torch.compile to trace
            if dtype == torch.int64 and not isinstance(value, numbers.Integral):
                raise TypeError(f"sample(): {name} must be an int or an integer tensor, got {value!r}")
            if not _in_bounds(value, *bounds):
                raise ValueError(f"sample(): {name} must be {words}, got {value}")
    greedy = _is_number(temperature) and temperature < _GREEDY_BELOW
    # Filters that keep everything: skip their search.
    if _is_number(top_k) and top_k >= vocab:
        values["top_k"] = None
    if _is_number(top_p) and top_p == 1:
        values["top_p"] = None
    if _is_number(min_p) and min_p == 0:
        values["min_p"] = None
    temperature, top_k, top_p, min_p = (  # checks every tensor, greedy or not
        None if values[name] is None else _row_param(values[name], name, spec[0], logits, *spec[1:])
        for name, spec in specs.items())
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"sample(): generator must be a torch.Generator, not {type(generator).__name__}")
    if generator is not None and generator.device.type != logits.device.type:
        raise RuntimeError(f"sample(): generator is on {generator.device} but logits are on "
                           f"{logits.device}")
    if greedy:
        return logits.argmax(-1)  # greedy: torch.argmax itself (its NaN rule, fp64 exact)
    seed = torch.randint(0, _SEED_HIGH, (1,), generator=generator, device=logits.device)
    rows = logits.reshape(-1, vocab)
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    ids = _backend.call(sample_op, rows, seed, temperature, top_k, top_p, min_p)
    return ids.reshape(logits.shape[:-1])
