"""fused_softmax: fused, numerically stable Triton kernels for softmax, log-softmax,
log-sum-exp and cross-entropy, as drop-in replacements of ``torch.nn.functional``.

>>> from fused_softmax import softmax, log_softmax, logsumexp, cross_entropy
"""

from . import distributed, nn
from .cross_entropy import cross_entropy
from .linear_cross_entropy import linear_cross_entropy
from .patch import patch, unpatch
from .sampling import sample
from .softmax import log_softmax, logsumexp, softmax

__all__ = ["softmax", "log_softmax", "logsumexp", "cross_entropy", "linear_cross_entropy", "nn", "distributed", "patch", "unpatch", "sample"]
__version__ = "0.1.0"
