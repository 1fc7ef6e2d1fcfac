"""``training.precision=bf16`` against float32: training step and inference time of the same model, side by side.

    python -m benchmarks.precision_speed --backbone minilm --kinds full lora prompt intrinsic --batch 16 --length 64 \
        --json precision_speed.json

For each kind (``full``: full fine-tuning, no bank; otherwise one task's delta of that kind through the delta
strategy), one ``ContinualClassifier`` is timed with ``compute_dtype`` None (float32) and ``torch.bfloat16`` in
alternating rounds (medians over ``--repeats`` rounds of ``--steps`` iterations after ``--warmup`` discarded
rounds): a training step (forward, cross-entropy, backward, AdamW over the task's trainable parameters) and an
inference batch under ``torch.inference_mode``. "max |logit diff|" compares the two precisions' logits on the same
batch with the same weights. The speed-up depends on the device: CPUs with AMX or AVX512-BF16 and GPUs from Ampere
on run bfloat16 matmuls natively; elsewhere bf16 may be slower.
"""

from __future__ import annotations

import argparse
import copy
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

from benchmarks._output import add_json_argument, write_json
from benchmarks.delta_speed import (N_CLASSES, add_backbone_arguments, alternate, call_round, make_batches, median,
                                    parse_overrides, sync)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_backbone_arguments(parser)
    parser.add_argument("--kinds", nargs="+", default=["full", "lora", "prompt", "intrinsic"],
                        help="'full' (full fine-tuning) and/or delta kinds")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="iterations per timed round")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    add_json_argument(parser)
    return parser.parse_args(argv)


def build(kind: str, backbone, device):
    from continual.expansion import TaskInfo
    from continual.models.classifier import ContinualClassifier
    from continual.training import set_trainable
    from strategies.delta import DeltaStrategy

    task = TaskInfo(0, "task", tuple(str(i) for i in range(N_CLASSES)))
    model = ContinualClassifier(copy.deepcopy(backbone), [task.labels])
    if kind == "full":
        params = set_trainable(model, list(model.parameters()))
    else:
        strategy = DeltaStrategy(kinds=[kind])
        strategy.setup(model, [task])
        strategy.before_task(model, task)
        params = set_trainable(model, strategy.trainable_parameters(model, task))
    model.heads.activate(0)
    return model.to(device), torch.optim.AdamW(params, lr=1e-5)


def time_kind(kind: str, backbone, batches, args, device) -> Dict:
    from continual.training.environment import PRECISION_DTYPES

    model, optimizer = build(kind, backbone, device)
    x, y = (t.to(device) for t in batches[0])

    def train(dtype):
        def run():
            model.compute_dtype = dtype
            model.train()
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x, 0), y).backward()
            optimizer.step()
        return lambda: call_round(run, args.steps, device)

    def infer(dtype):
        def run():
            model.compute_dtype = dtype
            model.eval()
            with torch.inference_mode():
                model(x, 0)
        return lambda: call_round(run, args.steps, device)

    rounds = {f"{way}_{name}": (train if way == "train" else infer)(dtype)
              for way in ("train", "infer") for name, dtype in PRECISION_DTYPES.items()}
    times = {name: median(values) for name, values in alternate(rounds, args.warmup, args.repeats, kind).items()}
    model.eval()
    with torch.inference_mode():
        model.compute_dtype = None
        exact = model(x, 0)
        model.compute_dtype = torch.bfloat16
        low = model(x, 0)
    sync(device)
    return {
        "kind": kind, "train_fp32_ms": 1000 * times["train_fp32"], "train_bf16_ms": 1000 * times["train_bf16"],
        "train_speedup": times["train_fp32"] / times["train_bf16"],
        "infer_fp32_ms": 1000 * times["infer_fp32"], "infer_bf16_ms": 1000 * times["infer_bf16"],
        "infer_speedup": times["infer_fp32"] / times["infer_bf16"],
        "max_logit_diff": float((low - exact).abs().max()),
    }


def main(argv: Sequence[str] | None = None) -> int:
    from continual.models.backbone import load_backbone

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    backbone, _ = load_backbone(args.backbone, random_init=args.random_init,
                                config_overrides=parse_overrides(args.override))
    batches = make_batches(1, args.batch, args.length, backbone.config.vocab_size, seed=0)
    rows: List[Dict] = [time_kind(kind, backbone, batches, args, device) for kind in args.kinds]
    print(f"{args.backbone}, batch {args.batch} x {args.length}, {device}, {torch.get_num_threads()} threads")
    print("| kind | train fp32 ms | train bf16 ms | speed-up | infer fp32 ms | infer bf16 ms | speed-up | max |logit diff| |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['kind']} | {r['train_fp32_ms']:.1f} | {r['train_bf16_ms']:.1f} | {r['train_speedup']:.2f}x "
              f"| {r['infer_fp32_ms']:.1f} | {r['infer_bf16_ms']:.1f} | {r['infer_speedup']:.2f}x "
              f"| {r['max_logit_diff']:.4f} |")
    write_json(args.json, args, rows, device=f"{device}, {torch.get_num_threads()} threads")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
