"""The ``--json PATH`` option every benchmark shares: the printed table as data, so a figure quoted in the README can be
re-read and compared later.

The file holds ``{"args": the parsed arguments, "device": where it ran, "rows": the table's rows, ...extra}``: one
dict per printed row with the same figures (unrounded), plus whatever the script prints beside its table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Optional


def add_json_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="also write the table, the settings and the device to this JSON file")


def write_json(path: Optional[str], args: argparse.Namespace, rows: List[Dict[str, Any]], *, device: Any,
               **extra: Any) -> None:
    """Write ``{"args", "device", "rows", **extra}`` to ``path`` (parent folders created) and say so; no-op for None.

    Values JSON does not know (paths, dtypes, devices) are written as their ``str``.
    """
    if not path:
        return
    report = {"args": vars(args), "device": str(device), "rows": rows, **extra}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"written: {path}")
