"""Several experiment presets side by side in one table (for the delta-tuning findings of Ding et al. 2023: full FT >
LoRA > adapter > prefix > prompt, compositions, forgetting): a thin front of ``continual compare``.

    python -m benchmarks.delta_quality configs/quickstart.yaml configs/deltas/lora.yaml configs/baselines/joint.yaml \
        --set training.device=cuda --out outputs/delta_quality --json outputs/delta_quality.json

Writes ``OUT/delta_quality.yaml``, a compare config with one run per preset (a YAML path, or a preset name as
``continual run`` takes it), named after its file stem (made unique), the ``--set`` overrides applied to every cell
and the ``--orders`` x ``--seeds`` grid, then runs it as ``continual compare OUT/delta_quality.yaml`` does: each cell
is a ``continual run`` in its own process, and ``OUT`` gets compare's ``compare.md`` (mean ± standard deviation of
ACC, BWT, FWT, forgetting, parameters and wall time per run), ``compare.csv``, ``compare.json``, ``cells.json``, the
plots and every cell's run folder under ``cells/``. ``--json PATH`` copies ``compare.json`` (one row per run) to
PATH. A failed cell is reported and the others still run; the exit status is then 1 (2 for a bad preset or override,
before anything runs). Finished cells are reused when the same ``--out`` is run again while their settings are
unchanged; a cell whose preset or overrides changed since runs again (compare's ``stale``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List, Sequence

import yaml
from omegaconf import OmegaConf

# The comparison passes its own tracking switch and store to every cell (and uses them for its parent run), so these
# overrides go to its `tracking` node rather than to `set`.
COMPARE_TRACKING_KEYS = ("tracking.enabled", "tracking.uri")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", help="YAML presets (paths, or names as `continual run` takes them)")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="overrides applied to every run, e.g. --set training.epochs=1 training.device=cuda")
    parser.add_argument("--orders", nargs="+", type=int, default=[1], help="stream orders of every run (default: 1)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds of every run (default: 0)")
    parser.add_argument("--jobs", type=int, default=1, help="cells run at once, as separate processes")
    parser.add_argument("--out", default="outputs/delta_quality", help="folder for the compare config and its outputs")
    parser.add_argument("--json", default=None, metavar="PATH", help="also copy the table's rows (compare.json) here")
    return parser.parse_args(argv)


def run_names(configs: Sequence[str]) -> List[str]:
    """A distinct name per preset, usable as a folder name: its file stem, or its folder and stem when stems repeat
    ("experts-order1", "recursive-order1"), with -2, -3... where that still repeats (a preset given twice)."""
    stems = [Path(c).stem for c in configs]
    names: List[str] = []
    for config, stem in zip(configs, stems):
        folder = Path(config).parent.name
        name = f"{folder}-{stem}" if stems.count(stem) > 1 and folder not in ("", ".", "..") else stem
        unique, n = name, 2
        while unique in names:
            unique, n = f"{name}-{n}", n + 1
        names.append(unique)
    return names


def compare_config(args: argparse.Namespace) -> Dict[str, Any]:
    """The compare config (a plain dict) of the command line: one run per preset; its outputs land in ``--out``."""
    out = Path(args.out).resolve()
    tracking = [o for o in args.overrides if o.split("=", 1)[0].strip() in COMPARE_TRACKING_KEYS]
    return {
        "name": out.name,
        "output_dir": str(out.parent),
        "orders": list(args.orders),
        "seeds": list(args.seeds),
        "set": [o for o in args.overrides if o not in tracking],
        "runs": [{"name": name, "preset": config} for name, config in zip(run_names(args.configs), args.configs)],
        **(OmegaConf.to_container(OmegaConf.from_dotlist(tracking)) if tracking else {}),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from continual.cli import main as continual_main

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "delta_quality.yaml"
    command = " ".join(["python -m benchmarks.delta_quality", *(argv if argv is not None else sys.argv[1:])])
    path.write_text(f"# continual compare {path}\n# Written by `{command}`.\n"
                    + yaml.safe_dump(compare_config(args), sort_keys=False))
    status = continual_main(["compare", str(path), "--jobs", str(args.jobs)])
    if args.json and status in (0, 1):  # otherwise nothing ran (2: a bad preset or override), or not to the end
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "compare.json", args.json)
        print(f"table rows: {args.json}")
    return status


if __name__ == "__main__":
    sys.exit(main())
