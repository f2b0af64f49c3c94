"""The docstring examples of the public modules run and print what they say (doctest), on
whichever path the session runs (the interpreter's kernels or the torch path)."""

import doctest
import importlib

import pytest
import torch

import fused_softmax

MODULES = ["fused_softmax", "fused_softmax.softmax", "fused_softmax.cross_entropy",
           "fused_softmax.linear_cross_entropy", "fused_softmax.sampling",
           "fused_softmax.distributed", "fused_softmax.nn", "fused_softmax.patch"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    torch.manual_seed(0)
    result = doctest.testmod(module, extraglobs={"torch": torch, "fused_softmax": fused_softmax},
                             optionflags=doctest.NORMALIZE_WHITESPACE, report=True)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {name} failed"


def test_the_examples_are_there():
    """Each public function and module documents at least one example."""
    finder = doctest.DocTestFinder()
    for obj in (fused_softmax.softmax, fused_softmax.log_softmax, fused_softmax.logsumexp,
                fused_softmax.cross_entropy, fused_softmax.linear_cross_entropy,
                fused_softmax.sample, fused_softmax.nn.Softmax, fused_softmax.nn.CrossEntropyLoss,
                fused_softmax.nn.LinearCrossEntropyLoss):
        assert any(t.examples for t in finder.find(obj)), obj.__qualname__
