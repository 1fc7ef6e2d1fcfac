"""Routers against the oracle: per-task modules answering without a task id, next to baselines that never had one.

    python -m benchmarks.routers --orders 1 --json outputs/routers/order1.json \
        --runs lora_prototype=configs/routers/lora_prototype.yaml lora_entropy=configs/routers/lora_entropy.yaml \
               full_ft_shared=configs/quickstart.yaml:backbone.head=shared

Each run is ``LABEL=PRESET[:key=value,key=value...]``; every run is repeated for every ``--orders`` value of
``--stream`` (standard: 1-3, long: 4-6) with the ``--set`` overrides applied to all. A routed run is evaluated
both ways in the same run (routed: its matrix; task id given: ``acc_oracle``). Columns: ACC and BWT (routed),
ACC with the task id given, routing accuracy (final row: the fraction of each task's test samples routed to that
task), the router's stored bytes per task (mean), the modules' stored parameters per task, and the evaluation time
of the routed pass relative to the oracle pass. The table is printed and written with ``--json``; every run also
keeps its own folder (matrices, routing confusion PNG) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import traceback
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True, metavar="LABEL=PRESET[:k=v,...]")
    parser.add_argument("--stream", default="standard", choices=["standard", "long"])
    parser.add_argument("--orders", nargs="+", type=int, default=[1])
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default="outputs/routers", help="folder for the runs' artifacts")
    parser.add_argument("--json", default=None, help="write the table (and every run's matrices) as JSON here")
    return parser.parse_args(argv)


def parse_run(spec: str) -> tuple:
    label, _, rest = spec.partition("=")
    preset, _, extra = rest.partition(":")
    if not label or not preset:
        raise SystemExit(f"--runs: {spec!r} is not LABEL=PRESET[:key=value,...]")
    return label, preset, [kv for kv in extra.split(",") if kv]


def run_one(label: str, preset: str, extra: List[str], stream: str, order: int, args) -> Dict:
    from continual.cli import resolve_config
    from continual.metrics import summarize
    from continual.recipes.run import load_config, run_experiment

    overrides = [f"stream.name={stream}", f"stream.order={order}", *extra, *args.overrides,
                 f"tracking.output_dir={args.out}", f"tracking.run_name={label}-order{order}"]
    row: Dict = {"run": label, "order": order, "preset": preset, "overrides": overrides}
    started = time.perf_counter()
    try:
        result = run_experiment(load_config(resolve_config(preset), overrides), echo=lambda *_: None)
    except Exception as err:  # one failed run does not stop the others
        traceback.print_exc()
        row["error"] = f"{type(err).__name__}: {err}"
        return row
    summary = summarize(result)
    records = result.records
    seconds = result.eval_seconds or {}
    row.update({
        "acc": summary["acc"], "bwt": summary["bwt"],
        "acc_oracle": summary.get("acc_oracle", math.nan), "routing_acc": summary.get("routing_acc", math.nan),
        "router_bytes_per_task": float(np.mean([r.router_bytes for r in records])) if records else math.nan,
        "stored_params_end": records[-1].stored_parameters if records else None,
        "eval_time_ratio": seconds["routed"] / seconds["oracle"] if seconds.get("oracle") else math.nan,
        "wall_s": time.perf_counter() - started,
        "task_names": result.task_names,
        "final_row": [float(v) for v in result.matrix[-1]],
        "routing_confusion": None if result.routing_confusion is None else result.routing_confusion.tolist(),
        "output_dir": str(result.output_dir),
    })
    return row


def table(rows: List[Dict]) -> str:
    def pct(v):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"

    head = ["run", "order", "ACC", "BWT", "ACC task id given", "routing acc", "router bytes/task",
            "stored params (end)", "eval time routed/oracle", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['run']} | {r['order']} | failed: {r['error']} |")
            continue
        ratio = r["eval_time_ratio"]
        lines.append("| " + " | ".join([
            r["run"], str(r["order"]), pct(r["acc"]), pct(r["bwt"]), pct(r["acc_oracle"]), pct(r["routing_acc"]),
            "-" if math.isnan(r["router_bytes_per_task"]) else f"{r['router_bytes_per_task']:,.0f}",
            f"{r['stored_params_end']:,}", "-" if math.isnan(ratio) else f"{ratio:.2f}", f"{r['wall_s']:.0f}",
        ]) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    runs = [parse_run(spec) for spec in args.runs]
    rows: List[Dict] = []
    for order in args.orders:
        for label, preset, extra in runs:
            rows.append(run_one(label, preset, extra, args.stream, order, args))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
            if args.json:  # rewritten after every run, so an interrupted grid keeps what finished
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps(rows, indent=2, default=str, allow_nan=True) + "\n")
    print()
    print(table(rows))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
