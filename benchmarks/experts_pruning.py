"""Prune unused experts after a stream: per-task routing usage, parameters removed, accuracy before and after
(ModuleFormer, Shen et al. 2023: experts a deployed task does not use can be removed).

    python -m benchmarks.experts_pruning configs/experts/order1.yaml --thresholds 0.01 0.05 --device auto \
        --json experts_pruning.json

1. The preset runs through ``continual.recipes.run.run_experiment`` with per-task checkpoints (or ``--checkpoints DIR``
   reuses those of a finished run of the same preset and overrides).
2. The model is rebuilt from the checkpoints (``strategy.load_task_state``) and every deployed task's training split
   runs through it with usage recording on: how often each expert is chosen, per task and site (real tokens only).
3. For each threshold, on a fresh copy: experts that no deployed task chooses for at least that share of its tokens
   are removed (``continual.modules.experts.prune_unused``; each deployed task keeps at least ``k - S`` of its own),
   and every deployed task's test split is evaluated again.

Printed (and written to ``--out`` as ``experts_pruning.md``): each task's routing (share of choices going to the
shared FFN, to its own experts and to other tasks' experts, averaged over sites), then per threshold the experts and
parameters removed and the accuracy per task before and after pruning. ``--json`` (default
``<--out>/experts_pruning.json``) holds one row per threshold, with the routing and the run's figures beside them.

This prunes once, after the stream, by every deployed task's usage on the final model. To prune during the run,
after each task, set ``strategy.prune_threshold`` (``--set strategy.prune_threshold=0.05``); the checkpoints of such
a run rebuild the pruned model here as well.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

import torch

from benchmarks._output import add_json_argument, write_json


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="an experts preset (YAML path, or a preset name as `continual run` takes it)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.01, 0.05],
                        help="minimum share of a deployed task's tokens that keeps an expert (one pruning per value)")
    parser.add_argument("--deploy", nargs="+", default=None, metavar="TASK",
                        help="task names (or indices) that stay deployed; default: every task of the stream")
    parser.add_argument("--checkpoints", default=None,
                        help="per-task checkpoints of a finished run of the same preset (skips training)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:0 ...")
    parser.add_argument("--train-per-class", type=int, default=None, help="stream.train_per_class")
    parser.add_argument("--test-per-task", type=int, default=None, help="stream.test_per_task")
    parser.add_argument("--epochs", type=int, default=None, help="training.epochs")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size of usage recording and evaluation")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. --set stream.order=2 strategy.task_conditioned=true")
    parser.add_argument("--out", default="outputs/experts_pruning", help="folder for the report and checkpoints")
    add_json_argument(parser)
    args = parser.parse_args(argv)
    args.json = args.json or str(Path(args.out) / "experts_pruning.json")
    return args


def overrides_from(args: argparse.Namespace, checkpoint_dir: Path) -> List[str]:
    sizes = [("stream.train_per_class", args.train_per_class), ("stream.test_per_task", args.test_per_task),
             ("training.epochs", args.epochs)]
    return [f"training.device={args.device}", f"training.checkpoint_dir={checkpoint_dir}",
            f"tracking.output_dir={Path(args.out) / 'runs'}"] + [
        f"{key}={value}" for key, value in sizes if value is not None] + list(args.overrides)


# ---------------------------------------------------------------------------------------------------- model
def rebuild(cfg, checkpoint_dir: Path, device: torch.device):
    """The trained model, from the run's per-task checkpoints: (model, stream, strategy)."""
    from continual.checkpoint import load_task_state
    from continual.models.backbone import load_backbone
    from continual.models.classifier import ContinualClassifier
    from continual.training import seed_everything
    from streams.build import build_stream
    from strategies.registry import build_strategy

    seed_everything(cfg.seed)
    strategy = build_strategy(cfg.strategy)
    backbone, tokenizer = load_backbone(cfg.backbone.name, random_init=cfg.backbone.random_init,
                                        config_overrides=dict(cfg.backbone.config_overrides),
                                        trust_remote_code=cfg.backbone.trust_remote_code)
    stream = build_stream(cfg.stream, tokenizer, progress=cfg.training.progress)
    tasks = stream.task_infos
    model = ContinualClassifier(backbone, [t.labels for t in tasks], head=cfg.backbone.head, pooling=cfg.backbone.pooling)
    strategy.setup(model, tasks)
    for task in tasks:
        state, _ = load_task_state(checkpoint_dir, task.name)
        strategy.load_task_state(model, task, state)
        model.heads.activate(task.index)
    return model.to(device).eval(), stream, strategy


def batches(split, batch_size: int, device: torch.device):
    """(x [B, 2, L], labels [B]) of a tokenized split, in order."""
    columns = split.with_format("torch", columns=["input_ids", "attention_mask", "label"])[:]
    x = torch.stack([columns["input_ids"].long(), columns["attention_mask"].long()], dim=1)
    for start in range(0, x.shape[0], batch_size):
        yield x[start:start + batch_size].to(device), columns["label"][start:start + batch_size].to(device)


@torch.no_grad()
def accuracy(model, stream, task: int, batch_size: int, device: torch.device) -> float:
    mapping = torch.tensor(model.heads.target_index(task), device=device)
    correct = total = 0
    for x, labels in batches(stream.tasks[task].test, batch_size, device):
        predicted = model(x, task).argmax(dim=-1)
        correct += int((predicted == mapping[labels]).sum())
        total += labels.shape[0]
    return correct / max(total, 1)


@torch.no_grad()
def task_usage(model, stream, tasks: Sequence[int], batch_size: int, device: torch.device):
    """Deployed task -> site -> ExpertUsage on that task's training split."""
    from tqdm.auto import tqdm

    from continual.modules.experts import expert_deltas, recording_usage

    deltas = expert_deltas(model.bank)
    usage = {}
    for task in tqdm(tasks, desc="usage", unit="task", leave=False, file=sys.stderr):
        with recording_usage(deltas) as recorded:
            for x, _ in batches(stream.tasks[task].train, batch_size, device):
                model(x, task)
        usage[task] = recorded
    return usage


def routing_shares(model, usage) -> Dict[int, Dict[str, float]]:
    """Per task: share of its routed choices on the shared experts, its own experts and other tasks' (mean over sites)."""
    from continual.modules.experts import expert_deltas

    deltas = expert_deltas(model.bank)
    shares = {}
    for task, per_site in usage.items():
        parts = {"shared": [], "own": [], "other": []}
        for name, delta in deltas.items():
            counts, slots = per_site[name].counts.cpu(), delta.expert_slots()
            total = float(counts.sum()) or 1.0
            parts["shared"].append(float(counts[slots < 0].sum()) / total)
            parts["own"].append(float(counts[slots == task].sum()) / total)
            parts["other"].append(float(counts[(slots >= 0) & (slots != task)].sum()) / total)
        shares[task] = {k: sum(v) / len(v) for k, v in parts.items()}
    return shares


# ---------------------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from tqdm.auto import tqdm

    from continual.cli import resolve_config
    from continual.modules.experts import expert_deltas, prune_unused
    from continual.recipes.run import load_config, run_experiment
    from continual.training import resolve_device

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint_dir = Path(args.checkpoints) if args.checkpoints else out / "checkpoints"
    cfg = load_config(resolve_config(args.config), overrides=overrides_from(args, checkpoint_dir))
    if cfg.strategy.name != "experts":
        raise SystemExit(f"{args.config}: strategy.name is {cfg.strategy.name!r}; this benchmark prunes 'experts'")
    device = resolve_device(cfg.training.device)
    start = time.perf_counter()
    stream_result = None
    if not args.checkpoints:
        stream_result = run_experiment(cfg)

    model, stream, strategy = rebuild(cfg, checkpoint_dir, device)
    names = [t.name for t in stream.task_infos]
    deploy = deployed_tasks(args.deploy, names)
    before = {t: accuracy(model, stream, t, args.batch_size, device) for t in deploy}
    usage = task_usage(model, stream, deploy, args.batch_size, device)
    shares = routing_shares(model, usage)
    expert_total = model.bank.parameter_count()
    stored_before = strategy.stored_parameters(model, stream.task_infos)

    report = {"config": args.config, "device": str(device), "deployed": [names[t] for t in deploy],
              "expert_parameters": expert_total, "stored_parameters": stored_before,
              "accuracy_before": {names[t]: before[t] for t in deploy},
              "routing": {names[t]: shares[t] for t in deploy}, "thresholds": []}
    if stream_result is not None:
        report["run_final_row"] = {n: float(a) for n, a in zip(names, stream_result.matrix[-1])}
    for threshold in tqdm(args.thresholds, desc="thresholds", unit="threshold", leave=False, file=sys.stderr):
        pruned = copy.deepcopy(model)
        result = prune_unused(expert_deltas(pruned.bank), usage, threshold)
        after = {t: accuracy(pruned, stream, t, args.batch_size, device) for t in deploy}
        report["thresholds"].append({
            "threshold": threshold,
            "experts_removed": sum(len(v) for v in result.experts_removed.values()),
            "experts_left": sum(result.experts_kept.values()),
            "parameters_removed": result.parameters_removed,
            "stored_parameters": strategy.stored_parameters(pruned, stream.task_infos),
            "accuracy_after": {names[t]: after[t] for t in deploy},
            "mean_accuracy_before": sum(before.values()) / len(before),
            "mean_accuracy_after": sum(after.values()) / len(after),
        })
    report["wall_time_s"] = time.perf_counter() - start

    lines = format_report(report)
    print("\n".join(lines))
    (out / "experts_pruning.md").write_text("\n".join(lines) + "\n")
    print(f"written: {out / 'experts_pruning.md'}")
    extra = {key: value for key, value in report.items() if key not in ("device", "thresholds")}
    write_json(args.json, args, report["thresholds"], device=device, **extra)
    return 0


def deployed_tasks(wanted: Sequence[str] | None, names: Sequence[str]) -> List[int]:
    """Task indices from ``--deploy`` names or indices (all tasks when not given)."""
    if not wanted:
        return list(range(len(names)))
    out = []
    for task in wanted:
        if task in names:
            out.append(names.index(task))
        elif task.isdigit() and int(task) < len(names):
            out.append(int(task))
        else:
            raise SystemExit(f"--deploy: unknown task {task!r}; the stream has {', '.join(names)}")
    return sorted(set(out))


def _pct(value: float) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.1f}"


def format_report(report: dict) -> List[str]:
    tasks = report["deployed"]
    lines = [f"# Expert pruning: {report['config']} on {report['device']} ({report['wall_time_s']:.0f} s)", "",
             f"expert parameters (all tasks) {report['expert_parameters']:,}; stored parameters "
             f"{report['stored_parameters']:,}", "", "routing of each task's training tokens (mean over sites, % of "
             "choices):", "", "| task | shared FFN | own experts | other tasks' experts |", "|---|---:|---:|---:|"]
    for task in tasks:
        r = report["routing"][task]
        lines.append(f"| {task} | {_pct(r['shared'])} | {_pct(r['own'])} | {_pct(r['other'])} |")
    lines += ["", "| threshold | experts removed | parameters removed | stored after | "
              + " | ".join(f"{t} % before/after" for t in tasks) + " | mean before/after |",
              "|---:|---:|---:|---:|" + "---:|" * (len(tasks) + 1)]
    before = report["accuracy_before"]
    for row in report["thresholds"]:
        after = row["accuracy_after"]
        cells = [f"{_pct(before[t])} / {_pct(after[t])}" for t in tasks]
        means = f"{_pct(row['mean_accuracy_before'])} / {_pct(row['mean_accuracy_after'])}"
        lines.append(f"| {row['threshold']:g} | {row['experts_removed']} | {row['parameters_removed']:,} | "
                     f"{row['stored_parameters']:,} | " + " | ".join(cells) + f" | {means} |")
    if "run_final_row" in report:
        lines += ["", "accuracy after the stream as the run measured it (the rebuilt model must agree): "
                  + ", ".join(f"{t} {_pct(v)}" for t, v in report["run_final_row"].items())]
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
