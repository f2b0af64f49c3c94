"""pytest-benchmark suite over the shared case table (``fused_softmax.cases``).

``pytest bench --benchmark-only`` times every case × provider on a CUDA GPU, with CUDA
synchronisation around each round. Without a GPU, or with ``TRITON_INTERPRET=1`` (which
would time Triton's CPU interpreter), every benchmark is skipped, and pytest exits 0.

Filters (the same as ``python -m fused_softmax bench``)::

    pytest bench --benchmark-only --bench-quick
    pytest bench --benchmark-only --bench-op cross_entropy --bench-dtype bf16 \\
        --bench-providers fused_softmax,torch --benchmark-json bench/results/ce.json
"""

import os

import pytest
import torch

from fused_softmax import cases
from fused_softmax.bench import PROVIDERS


def _csv(text):
    return [v.strip() for v in text.split(",") if v.strip()] if text else None


def pytest_addoption(parser):
    group = parser.getgroup("fused_softmax bench")
    group.addoption("--bench-quick", action="store_true", help="only the headline cases")
    group.addoption("--bench-op", default=None, help=f"comma-separated ops of {','.join(cases.OPS)}")
    group.addoption("--bench-dtype", default=None, help=f"comma-separated dtypes of {','.join(cases.DTYPES)}")
    group.addoption("--bench-mode", default=None, help="fwd and/or fwd+bwd, comma-separated")
    group.addoption("--bench-providers", default=",".join(PROVIDERS),
                    help=f"comma-separated subset of {','.join(PROVIDERS)} (default: all)")


def pytest_generate_tests(metafunc):
    opt = metafunc.config.getoption
    if "case" in metafunc.fixturenames:
        selected = cases.select(_csv(opt("--bench-op")), _csv(opt("--bench-dtype")),
                                _csv(opt("--bench-mode")), quick=opt("--bench-quick"))
        metafunc.parametrize("case", selected, ids=[c.id for c in selected])
    if "provider" in metafunc.fixturenames:
        providers = _csv(opt("--bench-providers"))
        unknown = set(providers) - set(PROVIDERS)
        if unknown:
            raise pytest.UsageError(f"unknown providers {sorted(unknown)}; choose from {PROVIDERS}")
        metafunc.parametrize("provider", providers)


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        reason = "benchmarks need a CUDA GPU"
    elif os.environ.get("TRITON_INTERPRET", "0") == "1":
        reason = "TRITON_INTERPRET=1 would time Triton's CPU interpreter"
    else:
        return
    for item in items:
        item.add_marker(pytest.mark.skip(reason=reason))
