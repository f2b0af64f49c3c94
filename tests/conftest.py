"""Where the tests run: the real Triton kernels, on the GPU when there is one, else on CPU
through Triton's interpreter (which must be switched on before any triton.jit runs)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_report_header(config):
    from fused_softmax import _backend

    if torch.cuda.is_available():
        where = "cuda"
    elif _backend.HAS_TRITON and _backend.INTERPRET:
        where = "cpu (Triton interpreter)"
    else:
        where = "cpu (torch path: " + ("interpreter off)" if _backend.HAS_TRITON else "no Triton)")
    return f"fused_softmax tests on {where}; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"


@pytest.fixture
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


if torch.cuda.is_available():
    @pytest.fixture(autouse=True)
    def _cuda_context_survives(request):
        """A device-side assert ends this process's CUDA context, and every later CUDA test
        in it would fail for that one: name the test that caused it and end the process
        (pytest-xdist restarts the worker and reports the test as crashed) or, without
        xdist, the session."""
        yield
        if torch.cuda.is_initialized():
            try:
                torch.cuda.synchronize()
            except RuntimeError as e:
                message = f"CUDA context lost in {request.node.nodeid}: {e}"
                if os.environ.get("PYTEST_XDIST_WORKER"):
                    os.write(2, f"\n{message}\n".encode())
                    os._exit(3)
                pytest.exit(message, returncode=1)
