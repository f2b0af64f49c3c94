"""Run the real Triton kernels on CPU: the interpreter must be on before triton.jit runs."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_report_header(config):
    where = "cuda" if torch.cuda.is_available() else "cpu (Triton interpreter)"
    return f"fused_softmax tests on {where}; TRITON_INTERPRET={os.environ['TRITON_INTERPRET']}"


@pytest.fixture
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"
