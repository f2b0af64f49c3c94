"""fused_softmax: fused, numerically stable Triton kernels for softmax, log-softmax,
log-sum-exp and cross-entropy, as drop-in replacements of ``torch.nn.functional``.

>>> from fused_softmax import softmax, log_softmax, logsumexp, cross_entropy
"""



def _source_kernels() -> None:
    """A source checkout imported from its root (``import fused_softmax`` there, or through
    PYTHONPATH, whatever is installed): the ``fused_softmax.kernels`` subpackage is the
    top-level ``kernels/`` folder (pyproject's package-dir), beside this one. Registered
    whenever this package has no ``kernels`` folder of its own (an installed wheel has),
    so that the checkout's Python code never runs with another copy's kernels (an editable
    install of a different checkout would provide them)."""
    import importlib.util
    import os
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(os.path.dirname(here), "kernels")
    init = os.path.join(path, "__init__.py")
    if os.path.isfile(os.path.join(here, "kernels", "__init__.py")) or not os.path.isfile(init):
        return
    spec = importlib.util.spec_from_file_location(__name__ + ".kernels", init,
                                                  submodule_search_locations=[path])
    sys.modules[spec.name] = module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    setattr(sys.modules[__name__], "kernels", module)  # as an import would


_source_kernels()

from . import distributed, nn  # noqa: E402
from .cross_entropy import cross_entropy  # noqa: E402
from .linear_cross_entropy import linear_cross_entropy  # noqa: E402
from .patch import patch, unpatch  # noqa: E402
from .sampling import sample  # noqa: E402
from .softmax import log_softmax, logsumexp, softmax  # noqa: E402

__all__ = ["softmax", "log_softmax", "logsumexp", "cross_entropy", "linear_cross_entropy", "nn", "distributed", "patch", "unpatch", "sample"]
__version__ = "0.1.0"
