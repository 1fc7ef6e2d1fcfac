"""Held-back perplexity of a causal LM, its plain recursive conversions and its relaxed (SVD-LoRA) ones, before and
after a short uptraining, side by side (Relaxed Recursive Transformers, Bae et al. 2024, arXiv 2410.20672).

    python -m benchmarks.recursive_perplexity --model smollm2 --loops 2 --uptrain-steps 200 --device cuda \
        --json recursive_perplexity.json

Rows: the original model (and the original uptrained the same way: the text is CL_Benchmark sentences, so part of
any gain is domain adaptation, which this row measures), the plain recursive model for each ``--inits``, and the
relaxed model at each ``--ranks`` with SVD init from ``--relaxed-init``. Every row starts from the same pretrained
weights, is evaluated on the same held-back blocks (sentences never used for training), uptrained with the same
steps, batches and learning rate, and shown with its parameter count. Smoke run on CPU:

    python -m benchmarks.recursive_perplexity --random-init --config-overrides '{"num_hidden_layers": 4,
        "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}'
        --ranks 8 --inits stepwise --uptrain-steps 5 --block-size 64 --max-sentences 300 --eval-blocks 8
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from typing import Sequence

import torch

from benchmarks._output import add_json_argument, write_json


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="causal LM short name, folder or Hub id")
    parser.add_argument("--random-init", action="store_true", help="random weights (smoke runs)")
    parser.add_argument("--config-overrides", default="{}", help="JSON dict of config overrides (smoke runs)")
    parser.add_argument("--loops", type=int, default=2, help="R")
    parser.add_argument("--sharing", default="cycle", choices=["cycle", "sequence"])
    parser.add_argument("--inits", default="stepwise,average,lower", help="inits of the plain recursive rows")
    parser.add_argument("--ranks", default="8,32,128", help="relaxation ranks (SVD init)")
    parser.add_argument("--relaxed-init", default="average", help="shared-block init of the relaxed rows")
    parser.add_argument("--uptrain-steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--tasks", default="agnews,dbpedia,amazon,yahoo", help="CL_Benchmark task folders")
    parser.add_argument("--data-root", default=os.environ.get("CONTINUAL_DATA"))
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--heldout-fraction", type=float, default=0.1)
    parser.add_argument("--max-sentences", type=int, default=None, help="cap per task")
    parser.add_argument("--eval-blocks", type=int, default=200)
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:0 or auto")
    parser.add_argument("--seed", type=int, default=0)
    add_json_argument(parser)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from continual.models.backbone import load_causal_lm
    from continual.models.recursive import convert_to_recursive, parameter_breakdown
    from continual.recipes.uptrain import evaluate, uptrain
    from continual.training import resolve_device
    from streams.text import build_text_blocks

    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    progress = not args.no_progress
    original, tokenizer = load_causal_lm(args.model, random_init=args.random_init, config_overrides=json.loads(args.config_overrides))
    original.eval()
    blocks = build_text_blocks(
        args.tasks.split(","), tokenizer, block_size=args.block_size, heldout_fraction=args.heldout_fraction,
        seed=args.seed, data_root=args.data_root, max_sentences=args.max_sentences,
    )
    heldout = blocks.heldout[: args.eval_blocks]
    print(f"{args.model}: {original.config.num_hidden_layers} layers, R={args.loops} ({args.sharing}); "
          f"{blocks.train.shape[0]} training and {heldout.shape[0]} held-back blocks of {args.block_size} tokens "
          f"from {args.tasks}; {args.uptrain_steps} uptraining steps of {args.batch_size} blocks, lr {args.lr}; {device}",
          flush=True)

    variants = [("original", None)]
    variants += [(f"recursive {init}", dict(init=init)) for init in args.inits.split(",") if init]
    variants += [(f"relaxed {args.relaxed_init} svd r{r}", dict(init=args.relaxed_init, rank=int(r), lora_init="svd"))
                 for r in args.ranks.split(",") if r]
    rows = []
    for name, options in variants:
        start = time.perf_counter()
        model = copy.deepcopy(original).to(device)
        if options is not None:
            convert_to_recursive(model, num_loops=args.loops, sharing=args.sharing, **options)
        params = parameter_breakdown(model)
        before = evaluate(model, heldout, args.eval_batch_size, device)
        after = None
        if args.uptrain_steps:
            uptrain(model, blocks.train, args.uptrain_steps, args.batch_size, args.lr, warmup_steps=args.warmup_steps,
                    device=device, seed=args.seed, progress=progress)
            after = evaluate(model, heldout, args.eval_batch_size, device)
        rows.append({"model": name, "parameters": params["total"], "relaxation": params["relaxation"],
                     "ppl_before": before, "ppl_after": after, "seconds": time.perf_counter() - start})
        shown = f"{after:.2f}" if after is not None else "-"
        print(f"  {name:28s} {params['total']:>13,} params  ppl {before:10.2f} -> {shown}", flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print()
    print(f"{'model':28s} {'parameters':>13s} {'of which LoRA':>13s} {'ppl before':>11s} {'ppl after':>10s}")
    for row in rows:
        after = f"{row['ppl_after']:.2f}" if row["ppl_after"] is not None else "-"
        print(f"{row['model']:28s} {row['parameters']:>13,} {row['relaxation']:>13,} {row['ppl_before']:>11.2f} {after:>10s}")
    write_json(args.json, args, rows, device=device)


if __name__ == "__main__":
    main()
