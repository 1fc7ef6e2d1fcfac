"""ModuleFormer extendability (Shen et al. 2023, "ModuleFormer: Modularity Emerges from Mixture-of-Experts", arXiv
2306.04640): a pretrained ModuleFormer learns a stream of new text domains by adding experts per domain, against the
same model fine-tuned densely on each domain in turn.

    python -m benchmarks.moduleformer_extendability --device auto                      # configs/lm pair, full size
    python -m benchmarks.moduleformer_extendability --size tiny --pretrain-steps 20 --steps-per-domain 10 \\
        --max-sentences 200 --eval-blocks 8 --no-tracking                             # smoke run, seconds

One model is built and pretrained once on the general text (``pretrain.tasks``); both modes then start from a copy of
those weights (the printed checksum is the same for both) and run the continual-LM recipe (``continual.recipes.lm``) on the
same domains with the same steps, learning rate and objective. Experts mode adds ``experts_per_domain`` FFN and
``att_experts_per_domain`` attention experts per layer for each domain and trains only them; dense mode trains every
weight. Printed side by side: held-back perplexity of every domain (and of the general text) after each domain,
forgetting ``P[last, j] - P[j, j]`` (perplexity increase on an earlier domain by the end; lower is better),
plasticity ``P[j, j]`` (perplexity a domain reaches when learnt; lower is better), and the parameters each domain
added and trained. Each mode is also an MLflow run (unless ``--no-tracking``).

Any ``key=value`` after the flags overrides the config (see ``continual/lm.py``), e.g. ``training.lr=2e-3``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np


from continual.recipes.lm import LMResult, build_lm, load_lm_config, pretrain, run_continual_lm, weights_checksum
from continual.training import resolve_device, text_blocks

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "lm" / "moduleformer_experts.yaml"
MODES = ("experts", "dense")

# flag -> config key; flags left unset keep the config's value
FLAG_KEYS = {
    "device": "training.device",
    "size": "model.size",
    "tokenizer": "model.tokenizer",
    "pretrain_steps": "pretrain.steps",
    "steps_per_domain": "training.steps_per_domain",
    "batch_size": "training.batch_size",
    "block_size": "data.block_size",
    "lr": "training.lr",
    "max_sentences": "data.max_sentences",
    "eval_blocks": "data.eval_blocks",
    "experts_per_domain": "expansion.experts_per_domain",
    "att_experts_per_domain": "expansion.att_experts_per_domain",
    "threads": "training.threads",
    "seed": "seed",
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="LM config (YAML) both modes start from")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--size", help="ModuleFormer size: tiny, small, base")
    parser.add_argument("--tokenizer", help="byte, or a backbone name/folder whose tokenizer to use (smollm2, ...)")
    parser.add_argument("--domains", help="comma-separated CL_Benchmark task folders, in stream order")
    parser.add_argument("--pretrain-tasks", help="comma-separated general-domain task folders")
    parser.add_argument("--pretrain-steps", type=int)
    parser.add_argument("--steps-per-domain", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--block-size", type=int)
    parser.add_argument("--lr", type=float, help="learning rate on every domain (both modes)")
    parser.add_argument("--max-sentences", type=int, help="sentences read per task")
    parser.add_argument("--eval-blocks", type=int, help="held-back blocks evaluated per domain")
    parser.add_argument("--experts-per-domain", type=int, help="FFN experts added per layer and domain")
    parser.add_argument("--att-experts-per-domain", type=int, help="attention experts added per layer and domain")
    parser.add_argument("--threads", type=int, help="CPU threads for torch")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--no-tracking", action="store_true", help="no MLflow runs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--json", help="also write both results to this JSON file")
    parser.add_argument("overrides", nargs="*", help="config key=value overrides, applied to both modes")
    return parser.parse_args()


def overrides_from(args: argparse.Namespace) -> List[str]:
    out = [f"{key}={getattr(args, flag)}" for flag, key in FLAG_KEYS.items() if getattr(args, flag) is not None]
    if args.domains:
        out.append(f"data.domains=[{args.domains}]")
    if args.pretrain_tasks:
        out.append(f"pretrain.tasks=[{args.pretrain_tasks}]")
    if args.no_tracking:
        out.append("tracking.enabled=false")
    if args.no_progress:
        out.append("training.progress=false")
    return out + list(args.overrides)


def _grid(rows: List[List[str]]) -> str:
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]).rstrip()
                     for row in rows)


def side_by_side(results: Dict[str, LMResult]) -> str:
    """Perplexity after each domain, forgetting, plasticity and parameters, one block of columns per mode."""
    first = next(iter(results.values()))
    names, general = first.domains, first.general is not None
    cols = names + (["general"] if general else [])
    width = len(cols)
    header = ["perplexity"]
    modes = [""]
    for mode in results:
        modes += ["|", f"{mode}:"] + [""] * (width - 1)
        header += ["|"] + cols
    rows = [modes, header]

    def block(values_of) -> List[str]:
        cells: List[str] = []
        for result in results.values():
            cells += ["|"] + values_of(result)
        return cells

    fmt = lambda v: f"{v:.3f}"
    for i, label in enumerate(["initial"] + [f"after {n}" for n in names]):
        rows.append([label] + block(lambda r: [fmt(v) for v in (r.initial if i == 0 else r.matrix[i - 1])]
                                    + ([fmt(r.general[i])] if general else [])))
    rows.append(["forgetting"] + block(lambda r: [f"{v:+.3f}" for v in r.forgetting] + ["-"] + ([""] if general else [])))
    rows.append(["plasticity"] + block(lambda r: [fmt(v) for v in r.plasticity] + ([""] if general else [])))
    rows.append(["added params"] + block(lambda r: [f"{rec.added_parameters:,}" for rec in r.records] + ([""] if general else [])))
    rows.append(["trained params"] + block(lambda r: [f"{rec.trainable_parameters:,}" for rec in r.records] + ([""] if general else [])))
    rows.append(["train time s"] + block(lambda r: [f"{rec.wall_time_s:.1f}" for rec in r.records] + ([""] if general else [])))
    lines = [_grid(rows), ""]
    summary = [["summary"] + list(results)]
    for key in first.summary():
        summary.append([key] + [f"{r.summary()[key]:.3f}" for r in results.values()])
    summary.append(["total params at the end"] + [f"{r.records[-1].total_parameters:,}" for r in results.values()])
    return "\n".join(lines) + _grid(summary)


def run_name(cfg, mode: str) -> str:
    """The benchmark names its runs ``extendability-<model>-<mode>-seed<seed>`` (whatever tracking.run_name says)."""
    model = f"moduleformer-{cfg.model.size}" if cfg.model.kind == "moduleformer" else Path(cfg.model.name).name
    return f"extendability-{model}-{mode}-seed{cfg.seed}"


def main() -> int:
    args = parse_args()
    overrides = overrides_from(args)
    base = load_lm_config(args.config, overrides)
    import torch

    if base.training.threads:
        torch.set_num_threads(base.training.threads)
    torch.manual_seed(base.seed)
    device = resolve_device(base.training.device)
    started = time.perf_counter()

    # ------------------------------------------------------------------ one pretrained starting point
    model, tokenizer = build_lm(base.model)
    model = model.to(device)
    if base.pretrain.steps:
        general = text_blocks(base.data, tokenizer, base.pretrain.tasks)
        clock = time.perf_counter()
        losses = pretrain(model, general.train, base, device)
        print(f"pretrained {base.pretrain.steps} steps on {', '.join(base.pretrain.tasks)} in "
              f"{time.perf_counter() - clock:.1f} s (last loss {np.mean(losses[-base.training.log_every:]):.4f})")
    start = weights_checksum(model)

    # ------------------------------------------------------------------ both modes from a copy of it
    results: Dict[str, LMResult] = {}
    for mode in MODES:
        cfg = load_lm_config(args.config, overrides + [f"expansion.mode={mode}", "pretrain.steps=0",
                                                       f"tracking.run_name={run_name(base, mode)}"])
        print(f"\n=== {mode} ===")
        copied, _ = build_lm(base.model)  # a fresh instance holding the pretrained weights (nothing else shared)
        copied.load_state_dict(model.state_dict())
        results[mode] = run_continual_lm(cfg, model=copied, tokenizer=tokenizer)
        if results[mode].start_checksum != start:
            raise RuntimeError(f"{mode} mode did not start from the pretrained weights ({results[mode].start_checksum} != {start})")

    m = base.model
    described = f"ModuleFormer {m.size}, {m.tokenizer} tokenizer" if m.kind == "moduleformer" else m.name
    print(f"\n=== extendability: {' -> '.join(base.data.domains)} ({described}, {base.training.steps_per_domain} "
          f"steps per domain, device {device}; both modes start from weights {start}) ===")
    print("forgetting = P[last, j] - P[j, j] (lower is better); plasticity = P[j, j] (lower is better)\n")
    print(side_by_side(results))
    print(f"\ntotal wall time {time.perf_counter() - started:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({m: r.to_dict() for m, r in results.items()}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
