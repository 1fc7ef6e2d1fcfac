"""The comparison recipe: a grid of runs (preset and overrides) x stream orders x seeds, each cell a normal
``continual run`` in its own process, summarised as one table with means and spreads, plots and one MLflow parent run.

Run: ``continual compare CONFIG.yaml [key=value ...] [--dry-run] [--jobs N]`` (presets in ``configs/compare/``).

Cells already finished (a ``summary.json`` not marked failed in the cell's folder, and a saved config equal to the
cell's as it would run now, but for where it writes and reports) are reused, so an interrupted grid continues where it
stopped, and a cell whose settings changed since (a preset's learning rate, say) runs again; a failed cell is
recorded with its error and the others still run. Every cell's config is loaded and checked before the first one
starts, so a typo fails at once, naming the run and the key.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
from omegaconf import MISSING, DictConfig, OmegaConf

from continual.config import ConfigError, TrackingConfig, check_folder_name, flatten, merge_layers, read_layers
from continual.training.experiment import load_run_config, resolve_preset
from continual.training.run_state import config_changes


@dataclass
class CompareRun:
    # Display name of the run (a row of the table).
    name: str = MISSING
    # Preset (path or name as `continual run` takes it); empty: the compare's `base`.
    preset: Optional[str] = None
    # key=value overrides of this run, on top of the preset.
    overrides: List[str] = field(default_factory=list)
    # Runs sharing a group are alternatives of one method (its learning rates, say): the table adds the best run of
    # each group by mean ACC. Empty: the run is in no group.
    group: Optional[str] = None


@dataclass
class CompareConfig:
    # Name of the comparison: its folder under output_dir and its MLflow experiment.
    name: str = "compare"
    # Preset every run starts from unless it names its own.
    base: str = "quickstart"
    runs: List[CompareRun] = field(default_factory=list)
    # Named stream for every cell ("standard", "long"); empty: each preset's own.
    stream: Optional[str] = None
    orders: List[int] = field(default_factory=lambda: [1])
    seeds: List[int] = field(default_factory=lambda: [0])
    # key=value overrides applied to every cell (a budget, a device), before each run's own.
    set: List[str] = field(default_factory=list)
    output_dir: str = "outputs/compare"
    # A markdown file with published numbers (e.g. ../shared/specs/continual_learning.md): its first table under a
    # line starting "Published" is printed under ours, labelled as not our measurement.
    references: Optional[str] = None
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def load_compare_config(path: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """The compare config, typed and checked (an unknown key or a wrong type names its full key)."""
    cfg = merge_layers(OmegaConf.structured(CompareConfig), read_layers(path, overrides))
    if not cfg.runs:
        raise ConfigError("runs: a comparison needs at least one run")
    names = [run.name for run in cfg.runs]
    if len(set(names)) != len(names):
        raise ConfigError(f"runs: names must be unique, got {names}")
    # The comparison's name and each run's name (in its cells' ids) become folder names under output_dir.
    check_folder_name("name", cfg.name, under="output_dir")
    for i, name in enumerate(names):
        check_folder_name(f"runs.{i}.name", name, under="output_dir")
    for key in ("orders", "seeds"):
        if not cfg[key]:
            raise ConfigError(f"{key}: give at least one")
    check_cell_keys("set", cfg.set)
    for i, run in enumerate(cfg.runs):
        check_cell_keys(f"runs.{i}.overrides", run.overrides)
    OmegaConf.set_readonly(cfg, True)
    return cfg


# Keys every cell's command line sets after `set` and the run's overrides (see plan_cells and cell_command), so an
# override of one of them would be silently lost; each with where to say it instead.
CELL_KEYS = {
    "stream.order": "the comparison's `orders`",
    "seed": "the comparison's `seeds`",
    "tracking.enabled": "the comparison's `tracking.enabled`",
    "tracking.uri": "the comparison's `tracking.uri`",
    "tracking.output_dir": "the comparison's `output_dir`",
    "tracking.experiment": "the comparison's `name`",
    "tracking.run_name": "the run's `name` (each cell is named <run>-o<order>-s<seed>)",
    "tracking.parent_run_id": "nothing: the comparison's MLflow run is every cell's parent",
}


def check_cell_keys(key: str, overrides: Sequence[str]) -> None:
    """Refuse an override the cell command line would overwrite.

    Raises:
        ConfigError: naming the override's key path (e.g. ``set.1``) and where to set that value instead.
    """
    for i, override in enumerate(overrides):
        name = override.split("=", 1)[0].strip()
        if name in CELL_KEYS:
            raise ConfigError(f"{key}.{i}: {name} is set for every cell by the comparison; use "
                              f"{CELL_KEYS[name]} instead of {override!r}")


# ---------------------------------------------------------------------------------------------------- cells
@dataclass
class Cell:
    run: str
    order: int
    seed: int
    preset: Path
    overrides: List[str]
    status: str = "todo"  # "done" (reused or finished), "failed", "stale" (finished under another config), "todo"
    folder: Optional[Path] = None
    error: str = ""
    summary: Dict[str, Any] = field(default_factory=dict)
    # The cell's config as it would run now, flattened; a finished folder is reused only if its config matches
    # (but for NOT_COMPARED).
    settings: Dict[str, Any] = field(default_factory=dict)
    # With status "stale": the keys whose values differ from the newest finished folder's, as (now, then).
    changed: Dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.run}-o{self.order}-s{self.seed}"


def plan_cells(cfg: DictConfig, cells_dir: Path) -> List[Cell]:
    """Every cell of the grid, each config loaded and checked (nothing runs), with its status from the folder.

    Raises:
        ConfigError: a cell's config is invalid; the message names the run, the order, the seed and the key.
    """
    cells = []
    for run in cfg.runs:
        preset = resolve_preset(run.preset or cfg.base)
        for order in cfg.orders:
            for seed in cfg.seeds:
                overrides = list(cfg.set) + list(run.overrides) + [f"stream.order={order}", f"seed={seed}"]
                if cfg.stream:
                    overrides.insert(0, f"stream.name={cfg.stream}")
                try:
                    settings = flatten(load_run_config(preset, overrides))
                except ConfigError as err:
                    raise ConfigError(f"run {run.name!r} (order {order}, seed {seed}, preset {preset}): {err}") from err
                cell = Cell(run.name, order, seed, preset, overrides, settings=settings)
                cell.folder, cell.summary, cell.changed = finished(cells_dir, cell.id, settings)
                cell.status = "done" if cell.folder is not None else "stale" if cell.changed else "todo"
                cells.append(cell)
    return cells


# Keys that name where a cell writes or how it reports, not what it measures: a finished cell is reused whatever
# they were (the comparison sets them per cell).
NOT_COMPARED = ("tracking.", "training.progress")


def finished(cells_dir: Path, cell_id: str, settings: Optional[Dict[str, Any]] = None):
    """(folder, summary, changed) for a cell's finished runs (``<id>``, ``<id>-2``...): the newest whose saved
    config matches ``settings`` (any, when None), else (None, {}, changed) where ``changed`` holds the keys in which
    the newest finished run differs, each as (now, then); (None, {}, {}) when none finished."""
    candidates = []
    for folder in cells_dir.glob(f"{cell_id}*"):
        suffix = folder.name[len(cell_id):]
        if not (folder / "summary.json").is_file() or (suffix and not (suffix[0] == "-" and suffix[1:].isdigit())):
            continue
        candidates.append((int(suffix[1:]) if suffix else 1, folder))
    changed: Dict[str, Any] = {}
    for _, folder in sorted(candidates, key=lambda c: c[0], reverse=True):
        payload = json.loads((folder / "summary.json").read_text())
        if payload.get("extra", {}).get("failed"):
            continue
        if settings is not None:
            saved = folder / "config.yaml"
            then = flatten(OmegaConf.load(saved)) if saved.is_file() else {}
            ignored = [k for k in set(settings) | set(then) if k.startswith(NOT_COMPARED)]
            diff = {k: (settings.get(k), then.get(k)) for k in config_changes(then, settings, allowed=ignored)}
            if diff:
                changed = changed or diff
                continue
        return folder, payload, {}
    return None, {}, changed


def breadth_first(cells: List[Cell], cfg: DictConfig) -> List[Cell]:
    """The cells in the order they run: every run on the first seed and order, then every run on the next order,
    and so on, so that a grid stopped part-way has its runs measured on the same orders and seeds."""
    runs = [r.name for r in cfg.runs]
    return sorted(cells, key=lambda c: (list(cfg.seeds).index(c.seed), list(cfg.orders).index(c.order),
                                        runs.index(c.run)))


def cell_command(cell: Cell, cfg: DictConfig, cells_root: Path, parent_run_id: Optional[str]) -> List[str]:
    tracking = [f"tracking.enabled={str(cfg.tracking.enabled).lower()}"]
    if cfg.tracking.uri:
        tracking.append(f"tracking.uri={cfg.tracking.uri}")
    if parent_run_id:
        tracking.append(f"tracking.parent_run_id={parent_run_id}")
    return [sys.executable, "-m", "continual", "run", str(cell.preset), *cell.overrides,
            f"tracking.output_dir={cells_root}", f"tracking.experiment={cfg.name}", f"tracking.run_name={cell.id}",
            "training.progress=false", *tracking]


def run_cells(todo: List[Cell], cfg: DictConfig, cells_root: Path, parent_run_id: Optional[str], jobs: int,
              echo: Callable[[str], None], threads: Optional[int] = None) -> None:
    """Run the cells, ``jobs`` processes at a time, CPU threads split between them unless ``threads`` (per cell)
    says otherwise (one GPU each, round robin)."""
    from tqdm.auto import tqdm

    cells_dir = cells_root / cfg.name
    cells_dir.mkdir(parents=True, exist_ok=True)
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    gpus = _gpu_count()
    pending, running = list(todo), []
    bar = tqdm(total=len(todo), desc="cells", unit="cell")
    slot = 0
    while pending or running:
        while pending and len(running) < jobs:
            cell = pending.pop(0)
            env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
            if gpus and jobs > 1:
                env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
            slot += 1
            log = (cells_dir / f"{cell.id}.log").open("w")
            process = subprocess.Popen(cell_command(cell, cfg, cells_root, parent_run_id), stdout=log,
                                       stderr=subprocess.STDOUT, env=env)
            running.append((cell, process, log, time.perf_counter()))
        time.sleep(0.2)
        for item in list(running):
            cell, process, log, started = item
            if process.poll() is None:
                continue
            running.remove(item)
            log.close()
            cell.folder, cell.summary, cell.changed = finished(cells_dir, cell.id, cell.settings or None)
            if process.returncode == 0 and cell.folder is not None:
                cell.status = "done"
            else:
                lines = (cells_dir / f"{cell.id}.log").read_text().strip().splitlines()
                cell.status, cell.error = "failed", (lines[-1] if lines else f"exit status {process.returncode}")
            bar.update(1)
            echo(f"  {cell.id}: {cell.status} in {time.perf_counter() - started:.0f} s" + (
                f" ({cell.error})" if cell.error else ""))
    bar.close()


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # no torch build with CUDA: CPU cells
        return 0


# ---------------------------------------------------------------------------------------------------- table
METRICS = ("acc", "bwt", "fwt", "forgetting", "acc_oracle", "routing_acc")


def cell_numbers(cell: Cell) -> Dict[str, Any]:
    """What the table needs from one finished cell's summary.json."""
    summary, result = cell.summary.get("summary", {}), cell.summary.get("result", {})
    records = result.get("records", [])
    matrix = np.array([[np.nan if v is None else v for v in row] for row in result.get("matrix", [])], dtype=float)
    stored = [r["stored_parameters"] for r in records]
    return {
        **{k: summary.get(k) for k in METRICS},
        "trained_per_task": float(np.mean([r["trainable_parameters"] for r in records])) if records else math.nan,
        "stored_end": stored[-1] if stored else math.nan,
        # What each task after the first adds to the store (its modules, head, router entries): the cost of one more
        # task, which the amortised figure (everything stored / tasks) hides behind the shared backbone.
        "added_per_task": (stored[-1] - stored[0]) / (len(stored) - 1) if len(stored) > 1 else math.nan,
        "stored_bytes": sum(r.get("stored_bytes", 0) + r.get("router_bytes", 0) for r in records),
        "wall_s": sum(r["wall_time_s"] for r in records),
        "peak_mb": max((r["peak_memory_mb"] for r in records), default=math.nan),
        "tasks": result.get("task_names", []),
        "matrix": matrix,
    }


def _mean_std(values: List[Optional[float]]):
    data = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not data:
        return math.nan, math.nan
    return float(np.mean(data)), float(np.std(data, ddof=1)) if len(data) > 1 else 0.0


def summarise(cells: List[Cell], runs: Sequence[str]) -> List[Dict[str, Any]]:
    """One row per run: mean and standard deviation over its finished cells, counts of cells and failures."""
    rows = []
    for run in runs:
        mine = [c for c in cells if c.run == run]
        done = [cell_numbers(c) for c in mine if c.status == "done"]
        row: Dict[str, Any] = {"run": run, "cells": len(done), "failed": sum(c.status == "failed" for c in mine),
                               "errors": sorted({c.error for c in mine if c.error})}
        for key in METRICS + ("trained_per_task", "stored_end", "added_per_task", "stored_bytes", "wall_s", "peak_mb"):
            row[key], row[f"{key}_std"] = _mean_std([d[key] for d in done])
        n_tasks = max((len(d["tasks"]) for d in done), default=0)
        row["stored_per_task"] = row["stored_end"] / n_tasks if n_tasks else math.nan
        row["final_by_task"] = _final_by_task(done)
        row["curve"] = _seen_curve(done)
        rows.append(row)
    return rows


def _final_by_task(done: List[Dict]) -> Dict[str, float]:
    """Mean final accuracy per task name over the cells (orders put tasks in other columns)."""
    values: Dict[str, List[float]] = {}
    for d in done:
        final = [row for row in d["matrix"] if not np.isnan(row).all()]
        if final:
            for name, v in zip(d["tasks"], final[-1]):
                values.setdefault(name, []).append(float(v))
    return {name: float(np.mean(v)) for name, v in values.items()}


def _seen_curve(done: List[Dict]) -> List[float]:
    """After each task: mean accuracy over the tasks seen so far, averaged over cells (NaN where not evaluated)."""
    curves = []
    for d in done:
        m = d["matrix"]
        curves.append([float(np.nanmean(m[i, : i + 1])) if not np.isnan(m[i, : i + 1]).all() else math.nan
                       for i in range(m.shape[0])])
    if not curves:
        return []
    width = max(len(c) for c in curves)
    padded = np.array([c + [math.nan] * (width - len(c)) for c in curves])
    return [float(np.nanmean(col)) if not np.isnan(col).all() else math.nan for col in padded.T]


def _pp(mean: float, std: float) -> str:
    return "-" if math.isnan(mean) else f"{100 * mean:.2f} ± {100 * std:.2f}"


def _count(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:,.0f}"


def format_compare(rows: List[Dict[str, Any]], cfg: DictConfig) -> str:
    """The comparison as a markdown table (percent points; mean ± standard deviation over orders x seeds)."""
    routed = any(not math.isnan(r["routing_acc"]) for r in rows)
    head = ["run", "cells", "ACC", "BWT", "FWT", "forgetting"] + (["ACC task id given", "routing acc"] if routed else [])
    head += ["trained params / task", "stored params / task", "added params / task", "stored bytes", "wall s / cell",
             "peak MB"]
    lines = [f"Comparison {cfg.name!r}: orders {list(cfg.orders)} x seeds {list(cfg.seeds)}; "
             "mean ± standard deviation over cells, accuracies in percent points.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = f"{r['cells']}" + (f" ({r['failed']} failed)" if r["failed"] else "")
        values = [r["run"], cells] + [_pp(r[k], r[f"{k}_std"]) for k in ("acc", "bwt", "fwt", "forgetting")]
        if routed:
            values += [_pp(r["acc_oracle"], r["acc_oracle_std"]), _pp(r["routing_acc"], r["routing_acc_std"])]
        values += [_count(r["trained_per_task"]), _count(r["stored_per_task"]), _count(r["added_per_task"]),
                   _count(r["stored_bytes"]),
                   "-" if math.isnan(r["wall_s"]) else f"{r['wall_s']:.0f}", _count(r["peak_mb"])]
        lines.append("| " + " | ".join(values) + " |")
    lines += ["", "Stored params / task: every parameter kept after the last task (backbone, modules, heads, regulariser "
              "state) over the number of tasks; added params / task: what each task after the first adds to that; "
              "stored bytes: task checkpoints and router state written (0 when checkpoints are off)."]
    errors = [f"- {r['run']}: {e}" for r in rows for e in r["errors"]]
    if errors:
        lines += ["", "Failed cells:"] + errors
    best = best_by_group(rows, cfg)
    if best:
        lines += ["", "Best run of each group (highest mean ACC over its finished cells):", "",
                  "| group | best run | ACC | every run of the group: ACC |", "|---|---|---|---|"]
        for b in best:
            choices = ", ".join(f"{run} {'-' if math.isnan(acc) else f'{100 * acc:.2f}'}"
                                for run, acc in b["runs"].items())
            lines.append(f"| {b['group']} | {b['best'] or '- (no finished cell)'} | {_pp(b['acc'], b['acc_std'])} "
                         f"| {choices} |")
    return "\n".join(lines)


def best_by_group(rows: List[Dict[str, Any]], cfg: DictConfig) -> List[Dict[str, Any]]:
    """For each ``group`` of the config's runs (in order of first appearance): the run with the highest mean ACC
    (the first of equals; None when no run of the group finished a cell) and every run's mean ACC."""
    by_run = {r["run"]: r for r in rows}
    groups: Dict[str, List[str]] = {}
    for run in cfg.runs:
        if run.get("group"):
            groups.setdefault(run.group, []).append(run.name)
    best = []
    for group, names in groups.items():
        scored = [n for n in names if n in by_run and not math.isnan(by_run[n]["acc"])]
        top = max(scored, key=lambda n: by_run[n]["acc"], default=None)
        best.append({"group": group, "best": top,
                     "acc": by_run[top]["acc"] if top else math.nan,
                     "acc_std": by_run[top]["acc_std"] if top else math.nan,
                     "runs": {n: by_run[n]["acc"] if n in by_run else math.nan for n in names}})
    return best


def published_block(path: Optional[str]) -> str:
    """The first markdown table under a line starting "Published" in ``path``, labelled as not our measurement."""
    if not path or not Path(path).is_file():
        return ""
    lines = Path(path).read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("Published"):
            table, started = [], False
            for row in lines[i + 1:]:
                if row.startswith("|"):
                    table.append(row)
                    started = True
                elif started:
                    break
            return "\n".join([f"Published reference numbers (not our measurements; from {path}): {line}", ""] + table)
    return ""


def json_ready(value: Any) -> Any:
    """``value`` with NaN (a metric no cell measured) as None, so that the file is strict JSON."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def save_compare(rows: List[Dict[str, Any]], cells: List[Cell], cfg: DictConfig, out: Path) -> List[Path]:
    """compare.md, compare.csv, compare.json (the table's rows, each with its per-task final accuracies and curve),
    cells.json and the plots; returns the paths written."""
    import csv

    from continual.report import plot_compare

    out.mkdir(parents=True, exist_ok=True)
    text = format_compare(rows, cfg)
    block = published_block(cfg.references)
    (out / "compare.md").write_text(text + ("\n\n" + block if block else "") + "\n")
    keys = ["run", "cells", "failed"] + [k for k in rows[0] if k not in ("run", "cells", "failed", "errors",
                                                                          "final_by_task", "curve")]
    with (out / "compare.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(keys)
        for r in rows:
            writer.writerow([r[k] for k in keys])
    (out / "compare.json").write_text(json.dumps(json_ready(
        {"name": cfg.name, "orders": list(cfg.orders), "seeds": list(cfg.seeds), "rows": rows,
         "best_by_group": best_by_group(rows, cfg)}), indent=2) + "\n")
    (out / "cells.json").write_text(json.dumps([
        {"id": c.id, "run": c.run, "order": c.order, "seed": c.seed, "status": c.status, "error": c.error,
         "folder": str(c.folder) if c.folder else None, "overrides": c.overrides} for c in cells], indent=2) + "\n")
    return [out / "compare.md", out / "compare.csv", out / "compare.json", out / "cells.json"] + plot_compare(rows, out)


# ---------------------------------------------------------------------------------------------------- recipe
def run_compare(cfg: DictConfig, dry_run: bool = False, jobs: int = 1,
                echo: Callable[[str], None] = print, threads: Optional[int] = None,
                report_only: bool = False, only: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    """Plan, run (or reuse) every cell, then write and print the comparison; returns the table's rows.

    ``only`` names the runs whose unfinished cells run this time (the others' cells are neither run nor dropped: the
    table still shows every run's finished cells), so two processes can share one grid by runs, or a run whose
    settings depend on another's result can wait for it.

    ``report_only`` runs no cell: the table, files and plots come from the cells finished so far (a grid still running
    in another process, or stopped part-way), with no MLflow parent run; the table's "cells" column says how many
    each run has.
    """
    from continual.tracking import ExperimentTracker

    if jobs < 1:
        raise ConfigError(f"--jobs: must be >= 1, got {jobs}")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads: must be >= 1, got {threads}")
    out = Path(cfg.output_dir) / cfg.name
    cells_root = out / "cells"
    names = [r.name for r in cfg.runs]
    unknown = [name for name in (only or ()) if name not in names]
    if unknown:
        raise ConfigError(f"--runs: no run named {', '.join(map(repr, unknown))} in {cfg.name!r}; its runs: "
                          f"{', '.join(names)}")
    cells = plan_cells(cfg, cells_root / cfg.name)
    todo = breadth_first([c for c in cells if c.status != "done" and (not only or c.run in only)], cfg)
    stale = sum(c.status == "stale" for c in todo)
    left = sum(c.status != "done" for c in cells) - len(todo)
    echo(f"compare {cfg.name!r}: {len(cells)} cells ({sum(c.status == 'done' for c in cells)} done, {len(todo)} to run"
         + (f", {stale} of them finished with other settings" if stale else "")
         + (f", {left} of runs not in --runs left for later" if left else "") + f") -> {out}")
    if dry_run:
        for cell in cells:
            changed = ", ".join(f"{k}: {then!r} -> {now!r}" for k, (now, then) in cell.changed.items())
            echo(f"  {cell.id:40s} {cell.status:5s} {cell.folder or ''}" + (
                f"(finished with other settings, runs again: {changed})" if cell.status == "stale" else ""))
        return []
    if report_only and todo:
        echo(f"report only: {len(todo)} cells not finished are left out (a stale cell's older result is not used)")
    # A report runs nothing, so it opens no MLflow parent run (the tracker is then a no-op).
    with ExperimentTracker(cfg.name, f"compare-{cfg.name}", uri=cfg.tracking.uri,
                           enabled=cfg.tracking.enabled and not report_only, tags={"kind": "compare"}) as tracker:
        tracker.log_params({"runs": ",".join(names), "orders": list(cfg.orders), "seeds": list(cfg.seeds),
                            "set": list(cfg.set)})
        if todo and not report_only:
            run_cells(todo, cfg, cells_root, tracker.run_id, jobs, echo, threads)
        rows = summarise(cells, names)
        for path in save_compare(rows, cells, cfg, out):
            tracker.log_artifact(path)
        for r in rows:
            tracker.log_metrics({f"{r['run']}/{k}": r[k] for k in METRICS if not math.isnan(r[k])})
    echo(format_compare(rows, cfg))
    block = published_block(cfg.references)
    if block:
        echo("\n" + block)
    echo(f"artifacts: {out}")
    return rows
