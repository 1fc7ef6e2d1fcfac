"""Training speed of the Avalanche learner vs a hand-written PyTorch loop, same model, data and batches.

    python -m benchmarks.learner_overhead --backbone minilm --batches 20 --batch-size 16 --max-length 64 \
        --json learner_overhead.json

Both sides fine-tune the same backbone (full fine-tuning, AdamW) on the same pre-tokenized batches of one real task,
alternating the two measurements so machine noise hits both alike. Prints samples/s of each and their ratio
(learner time / raw time; 1.00 means no overhead).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from typing import Sequence

import torch

from benchmarks._output import add_json_argument, write_json


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="minilm")
    parser.add_argument("--task", default="agnews")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-root", default=os.environ.get("CONTINUAL_DATA"))
    add_json_argument(parser)
    args = parser.parse_args(argv)

    from continual.learner import ContinualLearner
    from continual.models.backbone import load_backbone
    from continual.models.classifier import ContinualClassifier
    from continual.recipes.run import load_config
    from streams.avalanche import to_avalanche_benchmark
    from streams.build import build_stream
    from strategies.full_finetune import FullFinetune

    torch.manual_seed(0)
    n = args.batches * args.batch_size
    cfg = load_config(None, extra={"stream": {"name": "custom", "tasks": [args.task], "data_root": args.data_root,
                                              "max_length": args.max_length}})
    backbone, tokenizer = load_backbone(args.backbone)
    stream = build_stream(cfg.stream, tokenizer, progress=False)
    stream.tasks[0].train = stream.tasks[0].train.select(range(min(n, len(stream.tasks[0].train))))
    tasks = stream.task_infos
    base_model = ContinualClassifier(backbone, [t.labels for t in tasks])
    benchmark = to_avalanche_benchmark(stream, base_model.heads.target_index)
    experience = benchmark.train_stream[0]
    x = torch.stack([experience.dataset[i][0] for i in range(len(experience.dataset))])
    y = torch.tensor([experience.dataset[i][1] for i in range(len(experience.dataset))])

    def learner_run() -> float:
        model = copy.deepcopy(base_model)
        learner = ContinualLearner(model=model, strategy=FullFinetune(), tasks=tasks, lr=5e-5, max_grad_norm=1.0,
                                   train_mb_size=args.batch_size, progress=False)
        learner.strategy.setup(model, tasks)
        # Same sample order as the raw loop: no shuffling.
        start = time.perf_counter()
        learner.train(experience, shuffle=False)
        return time.perf_counter() - start

    def raw_run() -> float:
        model = copy.deepcopy(base_model)
        model.train()
        params = list(model.backbone.parameters()) + model.heads.parameters_for(0)
        optimizer = torch.optim.AdamW(params, lr=5e-5)
        loss_fn = torch.nn.CrossEntropyLoss()
        task = torch.zeros(args.batch_size, dtype=torch.long)
        start = time.perf_counter()
        for i in range(0, len(y), args.batch_size):
            xb, yb = x[i : i + args.batch_size], y[i : i + args.batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(xb, task[: len(yb)]), yb)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
        return time.perf_counter() - start

    learner_times, raw_times = [], []
    for _ in range(args.repeats):
        raw_times.append(raw_run())
        learner_times.append(learner_run())
    raw, ours = statistics.median(raw_times), statistics.median(learner_times)
    rows = [{"loop": "raw PyTorch", "seconds": raw, "samples_per_s": len(y) / raw},
            {"loop": "continual learner", "seconds": ours, "samples_per_s": len(y) / ours}]
    print(f"backbone={args.backbone} task={args.task} samples={len(y)} batch={args.batch_size}x{args.max_length} "
          f"threads={torch.get_num_threads()} repeats={args.repeats} (median)")
    print(f"{'loop':<22}{'seconds':>10}{'samples/s':>12}")
    for row in rows:
        print(f"{row['loop']:<22}{row['seconds']:>10.2f}{row['samples_per_s']:>12.1f}")
    print(f"ratio learner/raw: {ours / raw:.3f}")
    write_json(args.json, args, rows, device="cpu", samples=len(y), threads=torch.get_num_threads(),
               ratio_learner_over_raw=ours / raw)


if __name__ == "__main__":
    main()
