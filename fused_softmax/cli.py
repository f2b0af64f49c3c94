"""Command line: ``python -m fused_softmax {check,bench}`` (also the ``fused-softmax`` script).

* ``check``: the numerics report — naive vs torch vs ours against fp64, per dtype and
  logit scale; runs on any machine.
* ``bench``: timings against torch eager, ``torch.compile``, Liger-Kernel and quack on a
  CUDA GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from . import __version__

DESCRIPTION = """\
Fused, numerically stable softmax / log_softmax / logsumexp / cross_entropy kernels.

  check   numerics report: errors vs fp64 for naive, torch and ours, per dtype and logit scale
  bench   GPU benchmark vs torch eager, torch.compile, Liger-Kernel and quack

Run `python -m fused_softmax COMMAND --help` for a command's options and examples.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with its two sub-commands."""
    from . import bench, check

    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    parser = argparse.ArgumentParser(  # usage names the script when run as `fused-softmax`
        prog=script if script.startswith("fused-softmax") else "python -m fused_softmax",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fused_softmax {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module, summary in (
        ("check", check, "numerics report: errors vs an fp64 reference, any machine"),
        ("bench", bench, "timings vs torch, torch.compile, Liger-Kernel, quack (CUDA GPU)"),
    ):
        p = sub.add_parser(name, help=summary, description=module.DESCRIPTION,
                           epilog=module.EXAMPLES,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(run=module.run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point: parse ``argv`` (default ``sys.argv[1:]``), run the command, return its
    exit status (0 success, 1 failure such as no GPU for ``bench``, 2 usage error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return args.run(args)
