"""``python -m continual ...``: the same command line as ``continual`` (used by ``continual compare`` for its cells)."""

from continual.cli import main

raise SystemExit(main())
