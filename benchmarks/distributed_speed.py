"""Training speed of one task on several processes (data parallel, gloo on CPU) against one process.

    python -m benchmarks.distributed_speed --backbone minilm --layouts 1x2 2x1 --json distributed_speed.json

A layout ``PxT`` is P processes of T intra-op threads each (``1x2``: one process with two threads; ``2x1``: two
processes with one thread each, as ``torchrun --nproc_per_node=2`` starts them). Every layout trains the same task
(``--task``, ``--per-class`` training samples per class) from the same initial weights with the run's learner
(``continual.training.classification.make_learner``) and the global batch ``--batch-size``; the processes are started
as torchrun would (``torch.multiprocessing``, ``$RANK``/``$WORLD_SIZE``), so the code path is the one of
``torchrun -m continual run``. The first epoch warms up; samples/s is measured over the others (data loading, the
gradient all-reduce and the loss check included; process start, model build and evaluation excluded).

Columns: samples/s (global), speed-up over the first layout, efficiency (the speed-up per core: speed-up divided by
the ratio of cores, P x T, to the first layout's; 1.0 is perfect scaling), the trainable parameters and the bytes
each process sends and receives per step in a ring all-reduce of their gradients (``2 (P-1)/P x 4 bytes x
trainable``).

    python -m benchmarks.distributed_speed --tiny --per-class 8 --epochs 2     # a seconds-long check of the script
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Sequence

TINY_OVERRIDES = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="minilm")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer, 32-wide random-weight backbone")
    parser.add_argument("--task", default="agnews")
    parser.add_argument("--per-class", type=int, default=64, help="training samples per class")
    parser.add_argument("--batch-size", type=int, default=16, help="the global batch")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3, help="the first one warms up")
    parser.add_argument("--strategies", nargs="+", default=["full_finetune", "delta"])
    parser.add_argument("--layouts", nargs="+", default=["1x2", "2x1"], help="PROCESSESxTHREADS")
    parser.add_argument("--data-root", default=os.environ.get("CONTINUAL_DATA"))
    parser.add_argument("--json", default=None, help="write the rows as JSON here")
    return parser.parse_args(argv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, processes: int, threads: int, port: int, cfg_dict: dict, out: str) -> None:
    """One process of a layout (started by torch.multiprocessing with the environment torchrun gives)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(processes), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    import torch
    from avalanche.training.plugins import SupervisedPlugin

    from continual.recipes.run import load_config
    from continual.training.classification import build_parts, make_learner
    from continual.training.distributed import data_parallel

    torch.set_num_threads(threads)

    class EpochClock(SupervisedPlugin):
        def __init__(self):
            super().__init__()
            self.seconds: List[float] = []

        def before_training_epoch(self, strategy, **kwargs):
            self.started = time.perf_counter()

        def after_training_epoch(self, strategy, **kwargs):
            self.seconds.append(time.perf_counter() - self.started)

    cfg = load_config(None, extra=cfg_dict)
    with data_parallel() as parallel:
        with parallel.main_first():
            parts = build_parts(cfg, device=parallel.device("cpu"))
        learner = make_learner(parts, parallel)
        clock = EpochClock()
        learner.plugins.append(clock)  # a benchmark's stopwatch, added after the learner's own hooks
        parallel.barrier()
        learner.train(parts.train_exps[0])
        if parallel.is_main:
            samples = len(parts.train_exps[0].dataset)
            Path(out).write_text(json.dumps({"epoch_seconds": clock.seconds, "samples": samples,
                                             "trainable": int(learner.trainable_count)}))


def measure(args: argparse.Namespace, strategy: str, processes: int, threads: int, cache: str) -> Dict:
    import torch.multiprocessing as mp

    backbone = {"name": args.backbone}
    if args.tiny:
        backbone.update(random_init=True, config_overrides=dict(TINY_OVERRIDES))
    cfg = {
        "stream": {"name": "custom", "tasks": [args.task], "data_root": args.data_root,
                   "train_per_class": args.per_class, "test_per_task": 8, "max_length": args.max_length,
                   "cache_dir": cache},
        "backbone": backbone,
        "strategy": {"name": strategy},
        "training": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": 1e-4, "progress": False,
                     "device": "cpu", "eval_before_training": False},
    }
    with tempfile.TemporaryDirectory() as folder:
        out = str(Path(folder) / "rank0.json")
        mp.spawn(_worker, args=(processes, threads, _free_port(), cfg, out), nprocs=processes, join=True)
        found = json.loads(Path(out).read_text())
    timed = found["epoch_seconds"][1:] or found["epoch_seconds"]
    per_second = found["samples"] * len(timed) / sum(timed)
    return {"strategy": strategy, "layout": f"{processes}x{threads}", "processes": processes, "threads": threads,
            "samples_per_s": per_second, "trainable": found["trainable"],
            "allreduce_mb_per_step": 2 * (processes - 1) / processes * 4 * found["trainable"] / 1e6}


def main(argv: Sequence[str] | None = None) -> List[Dict]:
    args = parse_args(argv)
    layouts = [tuple(int(v) for v in layout.lower().split("x")) for layout in args.layouts]
    rows: List[Dict] = []
    with tempfile.TemporaryDirectory() as cache:
        for strategy in args.strategies:
            first = None
            for processes, threads in layouts:
                row = measure(args, strategy, processes, threads, cache)
                first = first or row
                row["speedup"] = row["samples_per_s"] / first["samples_per_s"]
                cores = (row["processes"] * row["threads"]) / (first["processes"] * first["threads"])
                row["efficiency"] = row["speedup"] / cores
                rows.append(row)
    print(f"backbone {args.backbone}{' (tiny)' if args.tiny else ''}, task {args.task}, "
          f"{args.per_class} samples per class, global batch {args.batch_size}, length {args.max_length}, "
          f"{os.cpu_count()} CPUs")
    print(f"{'strategy':15s}{'layout':>8s}{'samples/s':>12s}{'speed-up':>10s}{'efficiency':>12s}"
          f"{'trainable':>12s}{'all-reduce MB/step':>20s}")
    for row in rows:
        print(f"{row['strategy']:15s}{row['layout']:>8s}{row['samples_per_s']:12.1f}{row['speedup']:10.2f}"
              f"{row['efficiency']:12.2f}{row['trainable']:12,d}{row['allreduce_mb_per_step']:20.3f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
