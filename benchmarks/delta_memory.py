"""Peak training memory of every delta kind against full fine-tuning on the same backbone (Ding et al. 2023 report
that delta tuning saves up to 3/4 of GPU memory at small batches and at least 1/3 at large ones).

    python -m benchmarks.delta_memory --backbone minilm --batch 32 --length 128 --device auto --json delta_memory.json

Every kind registered in ``continual.modules.DELTA_KINDS`` when the script runs is measured with its default targets
and the delta strategy's default options, plus full fine-tuning; each configuration runs in a fresh subprocess so
that nothing allocated by one is seen by the next. A measurement covers ``--steps`` training steps (forward,
backward, AdamW step: the optimizer state is allocated in the first) on one batch of random token ids.

- CUDA: ``torch.cuda.max_memory_allocated`` over the steps (model, batch, activations, gradients, optimizer state);
  "training MB" is that peak minus the memory allocated once the model and batch were in place.
- CPU: the peak resident set size of the subprocess during the steps (the kernel's high-water mark, reset just
  before them; sampled every millisecond where it cannot be reset) minus the resident size of the loaded model.
  Only "training MB" and its ratio compare kinds there: the process baseline includes the Python runtime.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Dict, List, Sequence

import torch


from benchmarks._output import add_json_argument, write_json
from benchmarks.delta_speed import add_backbone_arguments, parse_overrides  # the same backbone options

FULL = "full_finetune"
N_CLASSES = 4


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_backbone_arguments(parser)
    parser.add_argument("--batch", type=int, default=32, help="samples per batch")
    parser.add_argument("--length", type=int, default=128, help="tokens per sample")
    parser.add_argument("--steps", type=int, default=2, help="training steps measured (>= 2 sees the optimizer state)")
    parser.add_argument("--kinds", default="", help="comma-separated subset of the registered kinds (default: all)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--seed", type=int, default=0)
    add_json_argument(parser)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one configuration, in a subprocess
    args = parser.parse_args(argv)
    for name in ("batch", "length", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    return args


# ---------------------------------------------------------------------------------------------------- CPU memory
def _status_kb(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if match is None:
        raise OSError(f"/proc/self/status has no {field}")
    return int(match.group(1))


class PeakRSS:
    """Peak resident set size of this process inside a ``with`` block, in bytes.

    Resets the kernel's high-water mark (``/proc/self/clear_refs``, Linux >= 4.0) on entry and reads ``VmHWM`` on
    exit; where that is not possible, a thread samples the resident size every millisecond instead.
    """

    def __init__(self):
        self.method = ""
        self.peak = 0
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self) -> "PeakRSS":
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.method = "VmHWM reset"
        except OSError:
            import psutil

            process = psutil.Process()
            self.method = "RSS sampled every 1 ms"
            self.peak = process.memory_info().rss

            def sample():
                while not self._stop.is_set():
                    self.peak = max(self.peak, process.memory_info().rss)
                    self._stop.wait(0.001)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is None:
            self.peak = _status_kb("VmHWM") * 1024
        else:
            self._stop.set()
            self._thread.join()


def current_rss() -> int:
    try:
        return _status_kb("VmRSS") * 1024
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss


# ---------------------------------------------------------------------------------------------------- worker
def measure(args: argparse.Namespace) -> dict:
    """Train one configuration for ``args.steps`` steps and return its memory numbers (bytes)."""
    import torch.nn.functional as F

    from continual.expansion import TaskInfo
    from continual.models.backbone import load_backbone
    from continual.models.classifier import ContinualClassifier
    from continual.training import resolve_device, set_trainable
    from strategies.delta import DeltaStrategy
    from strategies.full_finetune import FullFinetune

    warnings.filterwarnings("ignore", category=FutureWarning)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    overrides = parse_overrides(args.override)
    backbone, _ = load_backbone(args.backbone, random_init=args.random_init, config_overrides=overrides)
    task = TaskInfo(0, "task0", tuple(f"c{c}" for c in range(N_CLASSES)))
    model = ContinualClassifier(backbone, [task.labels])
    strategy = FullFinetune() if args.worker == FULL else DeltaStrategy(kinds=[args.worker])
    strategy.setup(model, [task])
    strategy.before_task(model, task)
    params = set_trainable(model, strategy.trainable_parameters(model, task))
    model.to(device).train()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(1, backbone.config.vocab_size, (args.batch, args.length), generator=gen)
    x = torch.stack([ids, torch.ones_like(ids)], dim=1).to(device)
    y = torch.randint(0, N_CLASSES, (args.batch,), generator=gen).to(device)

    def steps() -> None:
        for _ in range(args.steps):
            optimizer.zero_grad()
            F.cross_entropy(model(x, 0), y).backward()
            optimizer.step()

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        loaded = torch.cuda.memory_allocated(device)
        steps()
        torch.cuda.synchronize(device)
        peak, method = torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    else:
        loaded = current_rss()
        with PeakRSS() as monitor:
            steps()
        peak, method = monitor.peak, f"peak RSS of a fresh subprocess ({monitor.method})"
    return {
        "config": args.worker,
        "trainable": sum(p.numel() for p in params),
        "loaded": loaded,
        "peak": peak,
        "method": method,
        "device": str(device),
    }


# ---------------------------------------------------------------------------------------------------- parent
def run_worker(config: str, argv: Sequence[str]) -> dict:
    command = [sys.executable, "-m", "benchmarks.delta_memory", *argv, "--worker", config]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        return {"config": config, "error": lines[-1] if lines else f"exit status {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table_rows(results: List[dict]) -> List[dict]:
    """One row per configuration: its memory in MB and its ratios to full fine-tuning (None without a full FT row)."""
    mb = 2.0**20
    full = next((r for r in results if r["config"] == FULL and "error" not in r), None)

    def ratio(a: float, b: float):
        return a / b if full and b > 0 else None

    rows = []
    for r in results:
        if "error" in r:
            rows.append({"kind": r["config"], "error": r["error"]})
            continue
        training = r["peak"] - r["loaded"]
        rows.append({
            "kind": r["config"],
            "trainable": r["trainable"],
            "loaded_MB": r["loaded"] / mb,
            "peak_MB": r["peak"] / mb,
            "training_MB": training / mb,
            "peak_over_full": ratio(r["peak"], full["peak"]) if full else None,
            "training_over_full": ratio(training, full["peak"] - full["loaded"]) if full else None,
        })
    return rows


def format_table(table: List[dict]) -> List[str]:
    header = ["kind", "trainable params", "loaded MB", "peak MB", "training MB", "peak / full FT", "training / full FT"]
    rows = [header]
    for r in table:
        name = "full fine-tuning" if r["kind"] == FULL else r["kind"]
        if "error" in r:
            rows.append([name, "failed (below)", "", "", "", "", ""])
            continue
        ratio = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        rows.append([
            name,
            f"{r['trainable']:,}",
            f"{r['loaded_MB']:.1f}",
            f"{r['peak_MB']:.1f}",
            f"{r['training_MB']:.1f}",
            ratio(r["peak_over_full"]),
            ratio(r["training_over_full"]),
        ])
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    return ["  ".join([row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])]).rstrip()
            for row in rows]


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(measure(args)))
        return

    from tqdm.auto import tqdm

    from continual.modules import DELTA_KINDS
    from continual.training import resolve_device

    # read at run time: newly registered kinds are measured with no change here; block kinds (experts) need an
    # upcycled backbone and are measured through their own strategy
    kinds = sorted(k for k in DELTA_KINDS if getattr(DELTA_KINDS[k], "wraps", "linear") != "module")
    if args.kinds:
        wanted = [k.strip() for k in args.kinds.split(",") if k.strip()]
        unknown = sorted(set(wanted) - set(kinds))
        if unknown:
            raise SystemExit(f"--kinds: unknown kind(s) {unknown}; registered: {', '.join(kinds)}")
        kinds = [k for k in kinds if k in wanted]
    results = []
    start = time.perf_counter()
    for config in tqdm([FULL] + kinds, desc="configurations", unit="run", leave=False, file=sys.stderr):
        results.append(run_worker(config, argv))
    method = next((r["method"] for r in results if "method" in r), "none succeeded")
    device, seconds = resolve_device(args.device), time.perf_counter() - start
    print(f"backbone={args.backbone}{' (random init)' if args.random_init else ''} device={device} "
          f"batch={args.batch}x{args.length} steps={args.steps} (forward + backward + AdamW step), "
          f"one fresh subprocess per row, {seconds:.0f} s")
    print(f"memory measured with: {method}; training MB = peak - loaded (model, optimizer object, batch in place)")
    table = table_rows(results)
    print("\n".join(format_table(table)))
    for r in results:
        if "error" in r:
            print(f"{r['config']} failed: {r['error']}")
    write_json(args.json, args, table, device=device, method=method, seconds=seconds)
    if any("error" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
