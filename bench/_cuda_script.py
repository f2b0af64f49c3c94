"""The shared start of the CUDA-only benchmark scripts (headline, host_overhead, linear_ce,
profile_softmax, sampling, tune): ``-h`` / ``--help`` prints the script's docstring; without
a CUDA GPU, or under the Triton interpreter, a message and exit status 1 instead of a
traceback; the folder of a ``.json`` output path is created before the run, not found
missing after it."""
import os
import sys

import torch


def start(doc: str) -> None:
    name = os.path.basename(sys.argv[0])
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(doc.strip())
        sys.exit(0)
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit(f"bench/{name} needs a CUDA GPU and TRITON_INTERPRET unset (torch "
                 f"{torch.__version__}, CUDA {torch.version.cuda or 'none'}); on a CPU, "
                 "python -m fused_softmax check shows the numerics")
    for arg in sys.argv[1:]:
        if arg.endswith(".json"):
            os.makedirs(os.path.dirname(os.path.abspath(arg)), exist_ok=True)
