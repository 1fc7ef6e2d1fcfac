"""Human-facing reports of a run: a text table, a CSV of the accuracy matrix, two plots and a JSON summary.

Everything here writes or formats; the numbers come from :mod:`continual.metrics`. Matplotlib is imported inside the
plotting functions so that importing this module (and the CLI) stays cheap, and figures are drawn on a standalone
Agg canvas: nothing touches pyplot's global figure list or the process-wide backend, so there is nothing to leak.
"""

from __future__ import annotations

import csv
import json
import math
import textwrap
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from continual.results import RunResult

PathLike = Union[str, Path]

_MISSING = "-"  # how a value that was not measured (NaN) is shown in text


def fresh_run_dir(parent: PathLike, name: str) -> Path:
    """A new, empty folder ``parent/name`` for a run's artifacts, created now.

    Runs that share a name (two presets of one strategy, backbone and seed, say) would otherwise overwrite each
    other's plots and summaries: when ``parent/name`` already holds files, the next free ``name-2``, ``name-3``... is
    taken instead, and the caller reports the folder it got.
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    candidate, k = parent / name, 1
    while True:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            if candidate.is_dir() and not any(candidate.iterdir()):
                return candidate
        k += 1
        candidate = parent / f"{name}-{k}"


def _pct(value: float, fmt: str = ".1f") -> str:
    """Formats a 0..1 accuracy (or difference) in percent, ``-`` for NaN/None."""
    if value is None or not math.isfinite(float(value)):
        return _MISSING
    return format(100.0 * float(value), fmt)


def _grid(rows: Sequence[Sequence[str]]) -> List[str]:
    """Aligns rows of cells: the first column left-aligned, the others right-aligned, two spaces apart."""
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
    return lines


def _labelled_rows(result: RunResult) -> List[tuple]:
    """``(label, [T] accuracies)`` for the initial row (when present) and every row of the matrix."""
    matrix = np.asarray(result.matrix, dtype=float)
    rows = []
    if result.initial is not None:
        rows.append(("initial", np.asarray(result.initial, dtype=float)))
    for name, row in zip(result.task_names, matrix):
        rows.append((f"after {name}", row))
    return rows


def format_table(result: RunResult, summary: Dict[str, float]) -> str:
    """Renders a run as plain text.

    Three blocks: the accuracy matrix in percent (columns = tasks evaluated, rows = "after <task>" trained, plus an
    "initial" row when measured; ``-`` where not evaluated), one line of stream metrics in percent points, and a
    per-task table of costs taken from ``result.records``.

    Args:
        result: the run.
        summary: stream metrics as returned by :func:`continual.metrics.summarize` (0..1 scale).

    Returns:
        The table, lines joined by newlines, without a trailing newline.
    """
    header = ["accuracy (%)"] + list(result.task_names)
    rows = [header] + [[label] + [_pct(v) for v in values] for label, values in _labelled_rows(result)]
    lines = _grid(rows)

    names = (("acc", "ACC"), ("bwt", "BWT"), ("fwt", "FWT"), ("forgetting", "forgetting"))
    metrics = "  ".join(f"{label} {_pct(summary.get(key), '.2f')}" for key, label in names)
    lines += ["", f"{metrics}  (percent points)"]
    if "routing_acc" in summary:
        seconds = result.eval_seconds or {}
        ratio = seconds.get("routed", math.nan) / seconds["oracle"] if seconds.get("oracle") else math.nan
        lines.append(
            f"task inferred by the router (the figures above); with the task id given: ACC "
            f"{_pct(summary.get('acc_oracle'), '.2f')}  BWT {_pct(summary.get('bwt_oracle'), '.2f')};  routing accuracy "
            f"{_pct(summary.get('routing_acc'), '.2f')};  evaluation time routed / oracle {ratio:.2f}"
        )

    if result.records:
        routed = result.routing_matrix is not None
        cost_rows = [["task", "trainable params", "stored params", "wall time s", "peak memory MB", "train loss",
                      "stored bytes"] + (["router bytes"] if routed else [])]
        for rec in result.records:
            loss = _MISSING if not math.isfinite(rec.train_loss) else f"{rec.train_loss:.4f}"
            cost_rows.append([
                rec.task,
                f"{rec.trainable_parameters:,}",
                f"{rec.stored_parameters:,}",
                f"{rec.wall_time_s:.2f}",
                f"{rec.peak_memory_mb:.1f}",
                loss,
                f"{rec.stored_bytes:,}",
            ] + ([f"{rec.router_bytes:,}"] if routed else []))
        lines += [""] + _grid(cost_rows)
    return "\n".join(lines)


def save_matrix_csv(result: RunResult, path: PathLike) -> Path:
    """Writes the accuracy matrix (0..1, empty cell where not evaluated) as CSV.

    The header is ``after_task,<task names...>``; an ``initial`` row comes first when measured, then one row per
    trained task named by that task. Floats are written with ``repr`` so they read back exactly.

    Args:
        result: the run.
        path: file to write; parent folders are created.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    if result.initial is not None:
        rows.append(("initial", np.asarray(result.initial, dtype=float)))
    rows += list(zip(result.task_names, np.asarray(result.matrix, dtype=float)))
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["after_task"] + list(result.task_names))
        for label, values in rows:
            writer.writerow([label] + ["" if math.isnan(v) else repr(float(v)) for v in values])
    return path


def new_figure(width: float, height: float):
    """A figure on its own Agg canvas, outside pyplot (no global state, nothing to close)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _set_step_ticks(set_ticks, labels: List[str]) -> None:
    """Labels ticks 0..n-1, slanted when they would collide (many of them, or long names)."""
    slanted = len(labels) > 4 or max((len(label) for label in labels), default=0) * len(labels) > 20
    set_ticks(range(len(labels)), labels=labels, rotation=45 if slanted else 0, ha="right" if slanted else "center")


def plot_accuracy_matrix(result: RunResult, path: PathLike, title: str = "Accuracy matrix (%)") -> Path:
    """Saves the accuracy matrix as an annotated heatmap PNG (percent; cells not evaluated are left blank).

    Args:
        result: the run.
        path: PNG file to write; parent folders are created.

    Returns:
        The path written.
    """
    import matplotlib

    labelled = _labelled_rows(result)
    data = np.ma.masked_invalid(100.0 * np.stack([values for _, values in labelled]))  # [rows, T]
    n_rows, n_cols = data.shape
    fig = new_figure(max(4.0, 1.0 + 0.7 * n_cols), max(3.0, 1.0 + 0.5 * n_rows))
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    image = ax.imshow(data, cmap=cmap, vmin=0.0, vmax=100.0, aspect="auto")
    fontsize = 8 if n_cols > 8 else 10
    for i in range(n_rows):
        for j in range(n_cols):
            if data.mask is np.ma.nomask or not data.mask[i, j]:
                value = float(data[i, j])
                color = "white" if value < 60.0 else "black"  # viridis is dark at the low end
                ax.text(j, i, f"{value:.1f}", ha="center", va="center", color=color, fontsize=fontsize)
    _set_step_ticks(ax.set_xticks, list(result.task_names))
    ax.set_yticks(range(n_rows), labels=[label for label, _ in labelled])
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("model state")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="percent")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def plot_routing_confusion(counts: np.ndarray, names: Sequence[str], path: PathLike,
                           csv_path: Optional[PathLike] = None) -> Path:
    """Saves the final routing confusion (row: true task, column: task routed to; percent of the row) as a heatmap,
    and its raw counts as CSV when ``csv_path`` is given.

    Args:
        counts: ``[T, T]`` counts of test samples of task i routed to task j.
        names: the T task names.
    """
    import matplotlib

    counts = np.asarray(counts, dtype=float)
    if csv_path is not None:
        csv_path = Path(csv_path)
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        with csv_path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["true_task"] + [f"routed_to_{n}" for n in names])
            for name, row in zip(names, counts):
                writer.writerow([name] + [int(v) for v in row])
    share = 100.0 * counts / np.maximum(counts.sum(1, keepdims=True), 1)
    n = len(names)
    fig = new_figure(max(5.0, 1.5 + 0.6 * n), max(3.5, 1.0 + 0.5 * n))
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap=matplotlib.colormaps["magma_r"], vmin=0.0, vmax=100.0, aspect="auto")
    for i in range(n):
        for j in range(n):
            if counts[i, j]:
                text = f"{share[i, j]:.0f}" if float(share[i, j]).is_integer() else f"{share[i, j]:.1f}"
                ax.text(j, i, text, ha="center", va="center", fontsize=8 if n > 8 else 10,
                        color="white" if share[i, j] > 60.0 else "black")
    _set_step_ticks(ax.set_xticks, list(names))
    ax.set_yticks(range(n), labels=list(names))
    ax.set_xlabel("routed to task")
    ax.set_ylabel("true task")
    ax.set_title("Routing confusion (% of row)")
    fig.colorbar(image, ax=ax, label="percent")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def plot_gain_grid(
    rows: Sequence[str],
    columns: Sequence[str],
    mean: np.ndarray,
    std: Optional[np.ndarray],
    path: PathLike,
    title: str,
    unit: str,
    xlabel: str = "",
) -> Path:
    """Saves a grid of gains over a baseline (e.g. settings x learning rates) as an annotated heatmap PNG.

    Diverging colours centred on zero (red: worse than the baseline, blue: better); each cell shows the mean and,
    with ``std``, its spread. NaN cells are left blank.

    Args:
        rows, columns: labels of ``mean``'s rows and columns.
        mean: ``[len(rows), len(columns)]`` gains.
        std: the same shape, or None.
        path: PNG file to write; parent folders are created.
        title: the figure's title.
        unit: the colour bar's label (e.g. "gain (points)").
        xlabel: the columns' axis label.

    Returns:
        The path written.
    """
    import matplotlib

    data = np.ma.masked_invalid(np.asarray(mean, dtype=float))
    if data.shape != (len(rows), len(columns)):
        raise ValueError(f"mean has shape {data.shape}, expected {(len(rows), len(columns))} (rows x columns)")
    span = float(np.abs(data).max()) if data.count() else 1.0
    span = span or 1.0
    fig = new_figure(max(4.0, 2.0 + 1.1 * len(columns)), max(3.0, 1.0 + 0.5 * len(rows)))
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["RdBu"].with_extremes(bad="white")
    image = ax.imshow(data, cmap=cmap, vmin=-span, vmax=span, aspect="auto")
    for i in range(len(rows)):
        for j in range(len(columns)):
            if data.mask is np.ma.nomask or not data.mask[i, j]:
                value = float(data[i, j])
                text = f"{value:+.2g}" if std is None or not np.isfinite(std[i, j]) else f"{value:+.2g}\n± {float(std[i, j]):.2g}"
                color = "white" if abs(value) > 0.6 * span else "black"
                ax.text(j, i, text, ha="center", va="center", color=color, fontsize=8)
    _set_step_ticks(ax.set_xticks, list(columns))
    ax.set_yticks(range(len(rows)), labels=list(rows))
    ax.set_xlabel(xlabel)
    ax.set_title(textwrap.fill(title, width=max(40, int(9 * fig.get_figwidth()))), fontsize=10)
    fig.colorbar(image, ax=ax, label=unit)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def plot_forgetting_curves(result: RunResult, path: PathLike) -> Path:
    """Saves one accuracy curve per task along the stream as a PNG.

    The curve of task j starts at the step that trained it (``R[j, j]``) and follows ``R[i, j]`` for ``i >= j``;
    when initial accuracies were measured, a dotted segment joins ``b[j]`` at the "initial" step to ``R[j, j]``.

    Args:
        result: the run.
        path: PNG file to write; parent folders are created.

    Returns:
        The path written.
    """
    import matplotlib

    matrix = 100.0 * np.asarray(result.matrix, dtype=float)  # [T, T]
    t = matrix.shape[0]
    offset = 0 if result.initial is None else 1  # x position of the first trained step
    steps = (["initial"] if offset else []) + list(result.task_names)
    colors = matplotlib.colormaps["tab10" if t <= 10 else "tab20"].colors

    fig = new_figure(max(5.0, 1.5 + 0.6 * len(steps)), 4.0)
    ax = fig.add_subplot()
    for j, name in enumerate(result.task_names):
        color = colors[j % len(colors)]
        xs = np.arange(j, t) + offset
        ax.plot(xs, matrix[j:, j], marker="o", color=color, label=name)
        if result.initial is not None:
            b = 100.0 * float(result.initial[j])
            ax.plot([0, j + offset], [b, matrix[j, j]], linestyle=":", marker="o", markerfacecolor="none",
                    color=color)
    _set_step_ticks(ax.set_xticks, steps)
    ax.set_ylim(-2.0, 102.0)
    ax.set_xlabel("after training on")
    ax.set_ylabel("accuracy on task (%)")
    ax.set_title("Accuracy on each task along the stream")
    ax.grid(alpha=0.3)
    ax.legend(title="task", fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _jsonable(value: Any) -> Any:
    """Converts numpy values, paths and non-finite floats (-> null) into plain JSON values."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value


def write_summary_json(result: RunResult, summary: Dict[str, float], path: PathLike,
                       extra: Optional[Dict[str, Any]] = None) -> Path:
    """Writes ``{"summary": ..., "result": ..., "extra": ...}`` as JSON (NaN written as null).

    Args:
        result: the run, stored via :meth:`RunResult.to_dict`.
        summary: stream metrics (0..1 scale).
        path: file to write; parent folders are created.
        extra: anything else worth keeping next to the numbers (config, run id); values that JSON cannot hold are
            written as strings.

    Returns:
        The path written.
    """
    payload = {"summary": summary, "result": result.to_dict(), "extra": dict(extra or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(payload), indent=2, allow_nan=False, default=str) + "\n")
    return path


def plot_compare(rows: Sequence[Dict[str, Any]], out: PathLike) -> List[Path]:
    """The comparison's plots (one point, bar, row or curve per run; error bars are standard deviations over cells):

    - ``acc_vs_stored.png``: ACC against the parameters each further task stores (log scale); runs that store
      nothing per task are dashed lines at their ACC;
    - ``bwt.png``: BWT per run;
    - ``final_accuracy.png``: final accuracy of every run on every task (mean over cells), one heatmap;
    - ``forgetting_curves.png``: mean accuracy over the tasks seen so far after each task, every run overlaid.

    Args:
        rows: the rows of ``continual.recipes.compare.summarise``.
        out: folder to write into.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [r for r in rows if r["cells"]]
    written: List[Path] = []
    if not rows:
        return written
    names = [r["run"] for r in rows]

    # x: the parameters each further task adds to the store (the shared backbone, which every run keeps once, would
    # put every run near the same amortised figure). Runs that add nothing per task (one model for every task, or
    # one training experience) are horizontal lines at their ACC. A legend rather than labels, which overlap.
    import matplotlib

    colours = matplotlib.colormaps["tab20"]
    fig = new_figure(8.5, 4.8)
    ax = fig.add_subplot()
    markers, flat = "osD^v<>ph*", []
    for i, r in enumerate(rows):
        x = r.get("added_per_task", math.nan)
        if math.isnan(r["acc"]):
            continue
        if math.isnan(x) or x <= 0:
            flat.append((i, r))
            continue
        ax.errorbar([x], [100 * r["acc"]], yerr=[100 * r["acc_std"]], fmt=markers[i % len(markers)], capsize=3,
                    color=colours(i % 20), label=r["run"])
    for i, r in flat:
        ax.axhline(100 * r["acc"], color=colours(i % 20), linestyle="--", linewidth=1.0,
                   label=f"{r['run']} (adds nothing per task)")
    if len(flat) < sum(not math.isnan(r["acc"]) for r in rows):  # a log axis needs a point on it
        ax.set_xscale("log")
    ax.set_xlabel("parameters stored per added task (log)")
    ax.set_ylabel("ACC (%)")
    ax.set_title("Accuracy against what each task adds")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    written.append(out / "acc_vs_stored.png")
    fig.savefig(written[-1], dpi=120, bbox_inches="tight")

    fig = new_figure(max(4.0, 1.0 + 0.6 * len(rows)), 3.5)
    ax = fig.add_subplot()
    ax.bar(range(len(rows)), [100 * r["bwt"] for r in rows], yerr=[100 * r["bwt_std"] for r in rows], capsize=3)
    ax.axhline(0.0, color="black", linewidth=0.8)
    _set_step_ticks(ax.set_xticks, names)
    ax.set_ylabel("BWT (percent points)")
    ax.set_title("Backward transfer per run")
    written.append(out / "bwt.png")
    fig.savefig(written[-1], dpi=120)

    tasks = sorted({t for r in rows for t in r["final_by_task"]})
    if tasks:
        data = np.ma.masked_invalid(np.array([[100 * r["final_by_task"].get(t, math.nan) for t in tasks] for r in rows]))
        fig = new_figure(max(4.0, 1.5 + 0.7 * len(tasks)), max(3.0, 1.0 + 0.45 * len(rows)))
        ax = fig.add_subplot()
        image = ax.imshow(data, cmap=matplotlib.colormaps["viridis"].with_extremes(bad="white"), vmin=0, vmax=100,
                          aspect="auto")
        for i in range(len(rows)):
            for j in range(len(tasks)):
                if data.mask is np.ma.nomask or not data.mask[i, j]:
                    ax.text(j, i, f"{float(data[i, j]):.1f}", ha="center", va="center", fontsize=8,
                            color="white" if float(data[i, j]) < 60 else "black")
        _set_step_ticks(ax.set_xticks, tasks)
        ax.set_yticks(range(len(rows)), labels=names)
        ax.set_title("Final accuracy per task (%)")
        fig.colorbar(image, ax=ax, label="percent")
        written.append(out / "final_accuracy.png")
        fig.savefig(written[-1], dpi=120)

    # The same colour and marker per run as in acc_vs_stored; whole task counts on x; the legend beside the axes.
    fig = new_figure(8.5, 4.5)
    ax = fig.add_subplot()
    longest = 0
    for i, r in enumerate(rows):
        if r["curve"]:
            longest = max(longest, len(r["curve"]))
            ax.plot(range(1, len(r["curve"]) + 1), [100 * v for v in r["curve"]], marker=markers[i % len(markers)],
                    color=colours(i % 20), label=r["run"])
    if longest:
        ax.set_xticks(range(1, longest + 1))
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_xlabel("tasks learnt")
    ax.set_ylabel("mean accuracy over tasks seen (%)")
    ax.set_title("Forgetting curves")
    written.append(out / "forgetting_curves.png")
    fig.savefig(written[-1], dpi=120, bbox_inches="tight")
    return written
