"""``python -m fused_softmax``: see :mod:`fused_softmax.cli`."""

from .cli import main

raise SystemExit(main())
