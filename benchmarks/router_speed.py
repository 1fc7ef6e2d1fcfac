"""Inference time of a routed model against the same model given the task id, side by side on the same batches.

    python -m benchmarks.router_speed outputs/routers/standard-order2/lora_prototype-order2 \
        --samples 400 --repeats 5 --json router_speed.json

Each argument is a finished run folder of a routed run (``router.name`` other than ``oracle``). Its model is rebuilt
from the folder as ``continual predict`` does, and up to ``--samples`` test samples per learnt task (in the run's
evaluation batches, each batch from one task as in the run's evaluation) are answered three ways in the same rounds:

- **oracle**: the task id given, the modules and head of that task (``model(x, task)`` with inference off);
- **routed**: the task inferred from the input (the router's feature pass, then the routed task's modules and head);
- **router only**: the router's feature pass and scores alone (what routing adds).

Rounds alternate the order of the three ways, so machine noise and caches hit them alike; a figure is the median
over ``--repeats`` rounds after ``--warmup`` discarded rounds, in milliseconds per sample, under
``torch.inference_mode``. "routed / oracle" is the ratio the routers issue bounds at 2x; the run's own
``eval_time_ratio`` (``benchmarks/routers.py``) times whole Avalanche evaluations instead, one after the other.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Dict, List, Sequence

import torch

from benchmarks._output import add_json_argument, write_json


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="finished routed run folders")
    parser.add_argument("--samples", type=int, default=400, help="test samples per learnt task (at most)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median)")
    parser.add_argument("--warmup", type=int, default=1, help="discarded rounds first")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: the run's eval_batch_size)")
    add_json_argument(parser)
    return parser.parse_args(argv)


def test_batches(loaded, samples: int, batch: int) -> List[tuple]:
    """``[(x [B, 2, L], task [B])]``: each learnt task's first ``samples`` test samples, in batches of one task."""
    out = []
    for index, task in enumerate(loaded.parts.stream.tasks[: loaded.finished]):
        test = task.test.with_format("torch", columns=["input_ids", "attention_mask"])[:samples]
        x_all = torch.stack([test["input_ids"].long(), test["attention_mask"].long()], dim=1)
        for start in range(0, len(x_all), batch):
            x = x_all[start:start + batch].to(loaded.parts.device)
            out.append((x, torch.full((x.shape[0],), index, dtype=torch.long, device=x.device)))
    return out


def time_run(run_dir: str, args: argparse.Namespace) -> Dict:
    from continual.recipes.saved import load_run

    loaded = load_run(run_dir)
    if not loaded.routed:
        raise SystemExit(f"{run_dir}: not a routed run (router.name=oracle); nothing to compare")
    model = loaded.model
    batch = args.batch or loaded.parts.cfg.training.eval_batch_size
    batches = test_batches(loaded, args.samples, batch)
    n_samples = sum(int(x.shape[0]) for x, _ in batches)
    sync = torch.cuda.synchronize if loaded.parts.device.type == "cuda" else (lambda: None)

    def oracle():
        model.route_inferred = False
        try:
            for x, task in batches:
                model(x, task)
        finally:
            model.route_inferred = True

    def routed():
        for x, task in batches:
            model(x, task)
        model.routing_log.clear()

    def router_only():
        for x, _ in batches:
            model.task_scores(x)

    ways = {"oracle": oracle, "routed": routed, "router_only": router_only}
    times: Dict[str, List[float]] = {name: [] for name in ways}
    names = list(ways)
    with torch.inference_mode():
        for round_ in range(args.warmup + args.repeats):
            order = names if round_ % 2 == 0 else names[::-1]
            for name in order:
                sync()
                started = time.perf_counter()
                ways[name]()
                sync()
                if round_ >= args.warmup:
                    times[name].append(time.perf_counter() - started)
    ms = {name: 1000 * statistics.median(values) / n_samples for name, values in times.items()}
    cfg = loaded.parts.cfg
    return {
        "run": str(run_dir), "strategy": cfg.strategy.name, "router": cfg.router.name,
        "kinds": list(getattr(cfg.strategy, "kinds", []) or []), "tasks": loaded.finished, "samples": n_samples,
        "batch": batch, "oracle_ms": ms["oracle"], "routed_ms": ms["routed"], "router_ms": ms["router_only"],
        "routed_over_oracle": ms["routed"] / ms["oracle"], "router_over_oracle": ms["router_only"] / ms["oracle"],
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    rows = [time_run(run, args) for run in args.runs]
    print("| run | tasks | samples | oracle ms/sample | routed ms/sample | router pass ms/sample | routed / oracle |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {Path(r['run']).name} | {r['tasks']} | {r['samples']} | {r['oracle_ms']:.2f} | {r['routed_ms']:.2f} "
              f"| {r['router_ms']:.2f} | {r['routed_over_oracle']:.2f} |")
    device = "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name()
    write_json(args.json, args, rows, device=f"{device}, {torch.get_num_threads()} threads")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
