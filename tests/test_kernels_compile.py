"""Compile every kernel for an H100 (sm_90) without a GPU.

The interpreter runs kernels as Python, so it never sees errors that only the compiler
raises (a ``@triton.jit`` function whose returns differ in type, a constexpr misuse, an
unsupported op): one such error reached a GPU once. Triton's own toolchain compiles to
PTX and cubin for a named target with no device present; these tests do that for each
constexpr switch the launchers use. The compilation runs in a subprocess without
``TRITON_INTERPRET`` (the test session itself has the interpreter on).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SOFTMAX_CASES = {f"softmax mode={m} single_pass={s}": (m, s) for m in (0, 1, 2) for s in (True, False)}
CE_CASES = {
    "ce index plain grad": (False, False, True),
    "ce index all-features grad": (False, True, True),
    "ce index all-features no-grad": (False, True, False),
    "ce prob plain grad": (True, False, True),
    "ce prob all-features grad": (True, True, True),
}
#: (NONFINITE_ROW, HAS_TARGET, SKIP_IGNORED): linear CE's rescale, class indices without
#: and with smoothing (ignored rows skipped), probability targets
CE_BWD_CASES = [(False, False, False), (False, True, True), (True, True, True), (True, False, False)]

SCRIPT = textwrap.dedent("""
    import importlib, json, sys
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ksm = importlib.import_module("fused_softmax.kernels.softmax")
    kce = importlib.import_module("fused_softmax.kernels.cross_entropy")
    H100 = GPUTarget("cuda", 90, 32)
    ACC_PTRS = {"SCALARS", "LOSS", "LSE", "DLOSS", "DSCALE"}

    def compile_for_h100(kernel, constexprs, data="bf16", override=None):
        # Pointers in the data dtype (fp32 side buffers), ints (and float bits) i64.
        # The softmax forward's SCALE is 0 (T = 1) unless given (the backward has none).
        constexprs = {k: v for k, v in constexprs.items() if k in kernel.arg_names}
        if "SCALE" in kernel.arg_names:
            constexprs.setdefault("SCALE", 0)
        if "DIVIDE" in kernel.arg_names:  # x * (1 / T) on a GPU, as torch's CUDA kernels
            constexprs.setdefault("DIVIDE", False)
        acc = "fp64" if constexprs.get("ACC") == tl.float64 else "fp32"
        sig = {}
        for name in kernel.arg_names:
            if name in constexprs:
                sig[name] = "constexpr"
            elif name == "TARGET":
                sig[name] = "*i64"
            elif name.isupper() and name not in ("N", "K", "C"):  # N, K, C: sizes
                sig[name] = f"*{acc}" if name in ACC_PTRS else f"*{data}"
            else:
                sig[name] = "i64"
        sig.update(override or {})
        cc = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs),
                            target=H100, options=dict(num_warps=8))
        assert len(cc.asm["cubin"]) > 0
        return cc

    softmax_cases, ce_cases, ce_bwd_cases = (json.loads(a) for a in sys.argv[1:4])
    out = {}
    def attempt(name, fn):
        try:
            fn()
            out[name] = "ok"
        except Exception as e:
            out[name] = f"{type(e).__name__}: {e}"[:2000]

    for name, (mode, single) in softmax_cases.items():
        const = dict(MODE=mode, ACC=tl.float32, BLOCK_R=2, BLOCK_N=1024, SINGLE_PASS=single, WIDE=False)
        for data in ("bf16", "fp32"):  # fp32: libdevice exp/log and div.rn
            attempt(f"{name} {data} fwd", lambda: compile_for_h100(ksm.softmax_fwd_kernel, const, data))
            attempt(f"{name} {data} bwd", lambda: compile_for_h100(ksm.softmax_bwd_kernel, const, data))

    def precise_only_in_fp32():
        const = dict(MODE=0, ACC=tl.float32, BLOCK_R=2, BLOCK_N=1024, SINGLE_PASS=True, WIDE=False)
        fp32, bf16 = (compile_for_h100(ksm.softmax_fwd_kernel, const, d).asm["ptx"] for d in ("fp32", "bf16"))
        assert "div.rn.f32" in fp32 and "div.rn.f32" not in bf16, "correctly rounded division"
        # CUDA's expf splits x * log2(e) into an integer (a round-down FMA) and a fraction
        # before ex2.approx; tl.exp calls ex2.approx on the product directly.
        assert "fma.rm.ftz.f32" in fp32 and "fma.rm.ftz.f32" not in bf16, "libdevice expf"
    attempt("fp32 softmax is precise", precise_only_in_fp32)

    def no_scaling_at_unit_temperature():
        # T = 1 (SCALE 0) compiles without the temperature's per-element -inf guard (a
        # compare and a select for each of a thread's 4 elements here), which cost the
        # one-program-per-SM forwards up to 27 % on an H200.
        const = dict(MODE=0, ACC=tl.float32, BLOCK_R=1, BLOCK_N=1024, SINGLE_PASS=True, WIDE=False)
        plain, scaled = (compile_for_h100(ksm.softmax_fwd_kernel, dict(const, SCALE=k)).asm["ptx"].count("selp.f32")
                         for k in (0, 1))
        assert scaled - plain >= 4, (plain, scaled)
    attempt("softmax T = 1 skips the scaling", no_scaling_at_unit_temperature)
    attempt("softmax fp64 fwd", lambda: compile_for_h100(
        ksm.softmax_fwd_kernel,
        dict(MODE=0, ACC=tl.float64, BLOCK_R=1, BLOCK_N=512, SINGLE_PASS=False, WIDE=False), data="fp64"))
    # dtype= wider than the input (bf16 read, fp32 written; the backward the other way)
    widen = dict(MODE=1, ACC=tl.float32, BLOCK_R=2, BLOCK_N=1024, SINGLE_PASS=False, WIDE=False)
    attempt("softmax widening fwd", lambda: compile_for_h100(
        ksm.softmax_fwd_kernel, widen, "bf16", dict(Y="*fp32")))
    attempt("softmax widening bwd", lambda: compile_for_h100(
        ksm.softmax_bwd_kernel, widen, "fp32", dict(DX="*bf16")))
    attempt("softmax temperature fp32 fwd", lambda: compile_for_h100(  # x * (1/T), unrounded
        ksm.softmax_fwd_kernel,
        dict(MODE=0, ACC=tl.float32, BLOCK_R=2, BLOCK_N=1024, SINGLE_PASS=True, WIDE=False,
             SCALE=1), "fp32"))
    for data in ("bf16", "fp16"):  # a temperature: x / T rounded to the dtype, as torch's
        attempt(f"softmax rounded temperature {data} fwd", lambda: compile_for_h100(
            ksm.softmax_fwd_kernel,
            dict(MODE=0, ACC=tl.float32, BLOCK_R=2, BLOCK_N=1024, SINGLE_PASS=False, WIDE=False,
                 SCALE=2), data))
    attempt("softmax wide-offsets fwd", lambda: compile_for_h100(
        ksm.softmax_fwd_kernel,
        dict(MODE=1, ACC=tl.float32, BLOCK_R=64, BLOCK_N=64, SINGLE_PASS=False, WIDE=True)))
    for name, (prob, feats, grad) in ce_cases.items():
        const = dict(PROB_TARGET=prob, HAS_WEIGHT=feats, HAS_SMOOTHING=feats, HAS_SOFTCAP=feats,
                     HAS_Z_LOSS=feats, COMPUTE_GRAD=grad, HAS_DSCALE=grad and feats,
                     ACC=tl.float32, BLOCK_N=4096)
        for data in ("bf16", "fp32"):
            attempt(f"{name} {data}", lambda: compile_for_h100(kce.cross_entropy_fwd_kernel, const, data))
    # smoothed probability targets in their own dtype (torch's rounding; mul.rn / add.rn:
    # no fused multiply-add), as the loss of fp32 logits, and of fp64 logits
    smoothed = dict(PROB_TARGET=True, HAS_WEIGHT=True, HAS_SMOOTHING=True, HAS_SOFTCAP=False,
                    HAS_Z_LOSS=False, COMPUTE_GRAD=True, HAS_DSCALE=False, BLOCK_N=2048)
    def smoothed_target_in_its_dtype(acc, data, target):
        ptx = compile_for_h100(kce.cross_entropy_fwd_kernel, dict(smoothed, ACC=acc), data,
                               dict(TARGET=f"*{target}")).asm["ptx"]
        assert f"mul.rn.{'f64' if target == 'fp64' else 'f32'}" in ptx, "torch's two roundings"
    for acc, data, target in ((tl.float32, "bf16", "bf16"), (tl.float32, "fp32", "fp16"),
                              (tl.float64, "fp64", "fp32"), (tl.float64, "fp64", "fp64")):
        attempt(f"ce smoothed {target} target of {data}",
                lambda: smoothed_target_in_its_dtype(acc, data, target))
    # fp16's deferred backward of index targets without smoothing (grad_output folded in)
    attempt("ce index deferred fp16", lambda: compile_for_h100(kce.cross_entropy_fwd_kernel, dict(
        PROB_TARGET=False, HAS_WEIGHT=False, HAS_SMOOTHING=False, HAS_SOFTCAP=False,
        HAS_Z_LOSS=False, COMPUTE_GRAD=True, HAS_DSCALE=True, ACC=tl.float32, BLOCK_N=4096),
        "fp16"))
    for row, tgt, skip in ce_bwd_cases:
        attempt(f"ce bwd row={row} target={tgt} skip={skip}", lambda: compile_for_h100(
            kce.cross_entropy_bwd_kernel,
            dict(NONFINITE_ROW=row, HAS_TARGET=tgt, SKIP_IGNORED=skip, ACC=tl.float32,
                 BLOCK_N=4096)))
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(SOFTMAX_CASES), json.dumps(CE_CASES),
         json.dumps(CE_BWD_CASES)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", [f"{n} {t} {d}" for n in SOFTMAX_CASES for t in ("bf16", "fp32")
                                  for d in ("fwd", "bwd")]
                         + ["fp32 softmax is precise", "softmax T = 1 skips the scaling", "softmax fp64 fwd", "softmax wide-offsets fwd",
                            "softmax widening fwd", "softmax widening bwd",
                            "softmax temperature fp32 fwd", "softmax rounded temperature bf16 fwd",
                            "softmax rounded temperature fp16 fwd", "ce index deferred fp16"]
                         + [f"ce smoothed {t} target of {d}" for d, t in
                            (("bf16", "bf16"), ("fp32", "fp16"), ("fp64", "fp32"), ("fp64", "fp64"))]
                         + [f"{n} {t}" for n in CE_CASES for t in ("bf16", "fp32")]
                         + [f"ce bwd row={r} target={t} skip={k}" for r, t, k in CE_BWD_CASES])
def test_kernel_compiles_for_sm90(compiled, name):
    assert compiled[name] == "ok", compiled[name]
