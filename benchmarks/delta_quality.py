"""Accuracy of several experiment presets run one after the other, in one combined table (for the delta-tuning
findings of Ding et al. 2023: full FT > LoRA > adapter > prefix > prompt, compositions, forgetting).

    python -m benchmarks.delta_quality configs/quickstart.yaml configs/deltas/lora.yaml configs/baselines/joint.yaml \
        --set training.device=cuda --out outputs/delta_quality

Each preset (a YAML path, or a preset name as ``continual run`` takes it) is loaded with the ``--set key=value``
overrides applied to all of them and run through ``continual.recipes.run.run_experiment`` (MLflow tracking and per-run
artifacts as usual; each run is named after its preset unless ``--set tracking.run_name=...`` says otherwise). The
combined table has, per run: the last row of the accuracy matrix (accuracy on every task after the whole stream),
ACC, BWT, FWT, forgetting, trainable parameters per task and the parameters stored at the end. It is printed and
written to ``--out`` as ``delta_quality.md`` (with every run's full accuracy matrix) and ``delta_quality.csv``.
A run that fails is reported in the table and the others still run; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np


@dataclass
class RunRow:
    """One preset's outcome: what the combined table shows."""

    label: str
    config: str
    strategy: str = ""
    task_names: List[str] = field(default_factory=list)
    matrix: Optional[np.ndarray] = None  # [T, T], 0..1, NaN where not evaluated
    initial: Optional[np.ndarray] = None  # [T] accuracy before training, when measured
    summary: Dict[str, float] = field(default_factory=dict)  # acc, bwt, fwt, forgetting (0..1)
    trainable: List[int] = field(default_factory=list)  # per task record
    stored: Optional[int] = None  # after the last task
    wall_time_s: float = math.nan
    error: str = ""

    @property
    def final_row(self) -> np.ndarray:
        """Accuracy on every task after the whole stream: the last evaluated row."""
        rows = [row for row in self.matrix if not np.isnan(row).all()] if self.matrix is not None else []
        return rows[-1] if rows else np.full(len(self.task_names), np.nan)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", help="YAML presets (paths, or names as `continual run` takes them)")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="overrides applied to every run, e.g. --set training.epochs=1 stream.order=2")
    parser.add_argument("--out", default="outputs/delta_quality", help="folder for delta_quality.md and .csv")
    return parser.parse_args(argv)


def run_labels(configs: Sequence[str]) -> List[str]:
    """A distinct short name per preset: its stem, or its path under configs/ when stems repeat."""
    stems = [Path(c).stem for c in configs]
    labels = []
    for config, stem in zip(configs, stems):
        label = stem if stems.count(stem) == 1 else Path(config).with_suffix("").as_posix().replace("/", "-")
        while label in labels:
            label += "'"
        labels.append(label)
    return labels


def run_one(config: str, label: str, overrides: Sequence[str]) -> RunRow:
    from continual.cli import resolve_config
    from continual.metrics import summarize
    from continual.recipes.run import load_config, run_experiment

    row = RunRow(label=label, config=config)
    start = time.perf_counter()
    try:
        # The preset's own name first, so that runs sharing a strategy do not share an output folder; --set wins.
        cfg = load_config(resolve_config(config), overrides=[f"tracking.run_name={label}", *overrides])
        row.strategy = _describe_strategy(cfg)
        result = run_experiment(cfg)
    except Exception as err:  # one failed preset must not lose the others' results
        traceback.print_exc(file=sys.stderr)
        row.error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:200]
        row.wall_time_s = time.perf_counter() - start
        return row
    row.wall_time_s = time.perf_counter() - start
    row.task_names, row.matrix, row.summary = list(result.task_names), result.matrix, summarize(result)
    row.initial = result.initial
    row.trainable = [record.trainable_parameters for record in result.records]
    row.stored = result.records[-1].stored_parameters if result.records else None
    return row


def _describe_strategy(cfg) -> str:
    strategy = cfg.strategy
    if strategy.name == "delta":
        return f"delta[{'+'.join(strategy.kinds)}, {strategy.composition}]"
    return str(strategy.name)


# ---------------------------------------------------------------------------------------------------- output
def _pct(value: float, digits: int = 1) -> str:
    return "-" if value is None or not math.isfinite(float(value)) else f"{100 * float(value):.{digits}f}"


def _per_task(values: List[int]) -> str:
    if not values:
        return "-"
    return f"{values[0]:,}" if len(set(values)) == 1 else " / ".join(f"{v:,}" for v in values)


def shared_tasks(rows: List[RunRow]) -> Optional[List[str]]:
    """The task names when every finished run has the same ones (then each task gets a column)."""
    names = {tuple(r.task_names) for r in rows if not r.error}
    return list(next(iter(names))) if len(names) == 1 else None


def table_rows(rows: List[RunRow]) -> List[List[str]]:
    tasks = shared_tasks(rows)
    header = ["run", "strategy"] + ([f"{t} %" for t in tasks] if tasks else ["final row %"]) + [
        "ACC", "BWT", "FWT", "forgetting", "trainable params / task", "stored params", "wall s"]
    out = [header]
    for r in rows:
        if r.error:
            width = len(tasks) if tasks else 1
            out.append([r.label, r.strategy or "-"] + [f"failed: {r.error}"] + [""] * (width + 6))
            continue
        final = r.final_row
        accs = [_pct(v) for v in final] if tasks else [", ".join(f"{t} {_pct(v)}" for t, v in zip(r.task_names, final))]
        out.append([r.label, r.strategy] + accs + [
            _pct(r.summary.get("acc"), 2), _pct(r.summary.get("bwt"), 2), _pct(r.summary.get("fwt"), 2),
            _pct(r.summary.get("forgetting"), 2), _per_task(r.trainable),
            "-" if r.stored is None else f"{r.stored:,}", f"{r.wall_time_s:.0f}"])
    return out


def markdown(table: List[List[str]], left: int = 2) -> List[str]:
    """A Markdown table; the first ``left`` columns are text, the others right-aligned numbers."""
    align = ["---" if i < left else "---:" for i in range(len(table[0]))]
    lines = ["| " + " | ".join(table[0]) + " |", "|" + "|".join(align) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in table[1:]]


def matrix_markdown(row: RunRow) -> List[str]:
    table = [["accuracy %"] + row.task_names]
    if row.initial is not None:
        table.append(["initial"] + [_pct(v) for v in row.initial])
    for name, values in zip(row.task_names, row.matrix):
        if not np.isnan(values).all():
            table.append([f"after {name}"] + [_pct(v) for v in values])
    return markdown(table, left=1)


def write_outputs(rows: List[RunRow], out: Path, command: str) -> List[Path]:
    out.mkdir(parents=True, exist_ok=True)
    table = table_rows(rows)
    md = [f"# Delta-tuning quality ({time.strftime('%Y-%m-%d %H:%M')})", "", f"`{command}`", "",
          "Accuracies in percent after the whole stream; ACC, BWT, FWT, forgetting in percent points.", ""]
    md += markdown(table)
    for r in rows:
        if not r.error:
            md += ["", f"## {r.label}: {r.strategy} (`{r.config}`)", ""] + matrix_markdown(r)
    md_path = out / "delta_quality.md"
    md_path.write_text("\n".join(md) + "\n")

    tasks = sorted({t for r in rows for t in r.task_names}, key=lambda t: min(
        r.task_names.index(t) for r in rows if t in r.task_names))
    csv_path = out / "delta_quality.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "config", "strategy", "status"] + [f"final_acc_{t}" for t in tasks] + [
            "acc", "bwt", "fwt", "forgetting", "trainable_params_per_task", "trainable_params_mean", "stored_params",
            "wall_time_s"])
        for r in rows:
            final = dict(zip(r.task_names, r.final_row)) if not r.error else {}
            number = lambda v: "" if v is None or not math.isfinite(float(v)) else repr(float(v))  # noqa: E731
            writer.writerow([r.label, r.config, r.strategy, r.error or "ok"] + [number(final.get(t)) for t in tasks] + [
                number(r.summary.get(k)) for k in ("acc", "bwt", "fwt", "forgetting")] + [
                ";".join(str(v) for v in r.trainable), number(np.mean(r.trainable)) if r.trainable else "",
                "" if r.stored is None else r.stored, f"{r.wall_time_s:.2f}"])
    return [md_path, csv_path]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from continual.cli import resolve_config
    from continual.config import ConfigError
    from continual.recipes.run import load_config

    for config in args.configs:  # fail on a bad preset or override before hours of runs
        try:
            load_config(resolve_config(config), overrides=args.overrides)
        except ConfigError as err:
            print(f"error: {config}: {err}", file=sys.stderr)
            return 2
    rows = []
    for i, (config, label) in enumerate(zip(args.configs, run_labels(args.configs))):
        print(f"=== run {i + 1}/{len(args.configs)}: {label} ({config})", flush=True)
        rows.append(run_one(config, label, args.overrides))
    command = " ".join(["python -m benchmarks.delta_quality", *args.configs] +
                       (["--set", *args.overrides] if args.overrides else []) + ["--out", args.out])
    paths = write_outputs(rows, Path(args.out), command)
    print()
    print("\n".join(markdown(table_rows(rows))))
    print(f"written: {', '.join(str(p) for p in paths)}")
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
