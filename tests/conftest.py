"""Where the tests run: the real Triton kernels, on the GPU when there is one, else on CPU
through Triton's interpreter (which must be switched on before any triton.jit runs)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_report_header(config):
    where = "cuda" if torch.cuda.is_available() else "cpu (Triton interpreter)"
    return f"fused_softmax tests on {where}; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"


@pytest.fixture
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"
