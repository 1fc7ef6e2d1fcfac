"""Language modelling with TinT's one-step internal fine-tuning vs the plain model (Panigrahi et al. 2023,
arXiv 2307.01189, §4.1) on held-back CL_Benchmark text.

    python -m benchmarks.tint_lm --model smollm2 --tasks agnews yelp dbpedia yahoo --chunk-length 512 --chunks 64 \\
        --layers 1 3 all --lrs 1e-3 5e-4 1e-4 1e-5

The test splits of ``--tasks`` (text the classification runs never train on) are joined with blank lines,
tokenized and cut into ``--chunks`` chunks of ``--chunk-length`` tokens. For each chunk the model takes one SGD step
on the next-token loss of the first half (summed, TinT's approximations) and its mean loss on the second half is
measured with the whole chunk as input; "plain" is the unmodified model on the same tokens. Prints loss and
perplexity of each, and the gain (plain - one-step loss) with its std over chunks. Smoke run on a tiny random model:

    python -m benchmarks.tint_lm --model <folder with a tiny GPT-2 and its tokenizer> --random-init \\
        --chunk-length 64 --chunks 4 --layers 1 all --lrs 1e-2 --device cpu
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Optional


def _layers(value: str) -> Optional[int]:
    return None if value == "all" else int(value)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="short name, local folder or Hub id of a causal LM")
    parser.add_argument("--random-init", action="store_true", help="random weights from the model's config (smoke runs)")
    parser.add_argument("--config-overrides", default="{}", help='JSON, e.g. \'{"num_hidden_layers": 2}\'')
    parser.add_argument("--tasks", nargs="+", default=["agnews", "yelp", "dbpedia", "yahoo"])
    parser.add_argument("--data-root", default=os.environ.get("CONTINUAL_DATA"))
    parser.add_argument("--chunk-length", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=64)
    parser.add_argument("--layers", nargs="+", default=["1", "3", "all"], help="top blocks updated; 'all' for every block")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 5e-4, 1e-4, 1e-5])
    parser.add_argument("--exact-backward", action="store_true", help="exact norm/activation backward instead of TinT's first order")
    parser.add_argument("--batch-size", type=int, default=8, help="chunks per batch for the plain losses")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1...")
    parser.add_argument("--plot", default=None, metavar="PNG", help="also save the gains (layers x learning rates) as a heatmap")
    parser.add_argument("--json", default=None, help="also write every result to this JSON file (rewritten after each setting)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    from continual.models.backbone import load_causal_lm
    from continual.models.tint import InnerStep, chunk_tokens, evaluate_lm
    from continual.training import resolve_device, seed_everything
    from streams.build import load_task
    from streams.cl_benchmark import data_root_from

    device = resolve_device(args.device)
    seed_everything(0)  # a --random-init model is the same on every run
    lm, tokenizer = load_causal_lm(args.model, random_init=args.random_init, config_overrides=json.loads(args.config_overrides))
    lm.to(device)
    root = data_root_from(args.data_root)
    # Interleave the tasks' texts so every chunk budget covers all of them, not just the first task.
    splits = [load_task(name, root, "test", skip_unknown_labels=True).test.texts for name in args.tasks]
    texts = [t for group in zip(*splits) for t in group]
    needed = args.chunk_length * args.chunks
    ids: list = []
    for start in range(0, len(texts), 256):  # tokenize only as much text as the chunks need
        for row in tokenizer(texts[start : start + 256], add_special_tokens=False)["input_ids"]:
            ids += row
        if len(ids) >= needed:
            break
    chunks = chunk_tokens(ids, args.chunk_length, args.chunks).to(device)
    print(f"model {args.model}{' (random init)' if args.random_init else ''}: {chunks.shape[0]} chunks x "
          f"{args.chunk_length} tokens from {', '.join(args.tasks)} (test splits); first half trains, loss on the rest")
    rows = []
    print(f"{'setting':24s}{'plain loss':>12s}{'step loss':>12s}{'plain ppl':>12s}{'step ppl':>12s}{'gain ± std':>20s}")
    for layers in args.layers:
        for lr in args.lrs:
            step = InnerStep(lr=lr, layers=_layers(layers), first_order=not args.exact_backward)
            result = evaluate_lm(lm, chunks, step, batch_size=args.batch_size)
            gain = result.plain - result.tint
            std = float(gain.std()) if gain.numel() > 1 else 0.0
            print(f"{f'top-{layers} lr={lr:g}':24s}{result.plain_loss:12.4f}{result.tint_loss:12.4f}"
                  f"{math.exp(result.plain_loss):12.2f}{math.exp(result.tint_loss):12.2f}"
                  f"{f'{float(gain.mean()):+.4f} ± {std:.4f}':>20s}", flush=True)
            rows.append({"layers": layers, "lr": lr, "plain_loss": result.plain_loss, "step_loss": result.tint_loss,
                         "gain": float(gain.mean()), "gain_std": std, "chunks": int(gain.numel())})
            if args.json:
                Path(args.json).write_text(json.dumps({"args": vars(args), "results": rows}, indent=2))
    if args.plot:
        import numpy as np

        from continual.report import plot_gain_grid

        shape = (len(args.layers), len(args.lrs))  # rows were appended layers-major, lrs-minor
        mean = np.array([r["gain"] for r in rows]).reshape(shape)
        std = np.array([r["gain_std"] for r in rows]).reshape(shape)
        path = plot_gain_grid([f"top {layers}" for layers in args.layers], [f"lr {lr:g}" for lr in args.lrs], mean, std, args.plot,
                              f"One-step LM gain on the second half of each chunk ({args.model}, {chunks.shape[0]} chunks)",
                              "loss decrease (nats per token)", xlabel="inner learning rate")
        print(f"plot: {path}")


if __name__ == "__main__":
    main()
