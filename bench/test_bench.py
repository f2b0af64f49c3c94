"""Time each case of ``fused_softmax.cases`` with each provider (see ``conftest.py``).

Each round runs one step (forward, or forward + backward) and synchronises the device, so
the wall-clock time pytest-benchmark records is the GPU time of that step. The bytes a
perfect kernel must move and the resulting GB/s go into ``extra_info`` (in the
``--benchmark-json`` output).
"""

import pytest
import torch

from fused_softmax.bench import Unavailable, build

ROUNDS = 20


def test_bench(benchmark, case, provider):
    inputs = case.make_inputs("cuda")
    try:
        step = build(case, provider, inputs)
        step()  # compile and warm up outside the timed rounds
    except Unavailable as e:
        pytest.skip(str(e))
    torch.cuda.synchronize()

    def synced_step():
        step()
        torch.cuda.synchronize()

    benchmark.group = case.name
    benchmark.pedantic(synced_step, rounds=ROUNDS, warmup_rounds=2, iterations=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(bytes=case.bytes_moved(), gbps=case.bytes_moved() / median / 1e9)
