"""Throughput of early exit with continuous depth-wise batching vs the unconverted model, on the same inputs
(Relaxed Recursive Transformers, Bae et al. 2024, arXiv 2410.20672, section 4).

    python -m benchmarks.recursive_throughput --model smollm2 --loops 2 --rank 32 --thresholds 0.3,0.5,0.8 \
        --device cuda --json recursive_throughput.json

The task is next-token prediction at the end of held-back CL_Benchmark text (each sample: ``--seq-len`` tokens,
scored at its last position). Rows:

- ``unconverted``: the original model, fixed batches of ``--slots`` samples through all ``L`` layers (its own
  forward), the LM head at the last token;
- ``recursive, no exit``: the recursive model through the depth-wise scheduler with exits disabled (all ``R`` loops);
- ``early exit t``: exits after the first loop whose maximum next-token probability reaches ``t``; finished samples
  are replaced at once, so samples at different loops share each block call.

Reported: samples/s, speed-up over the unconverted model, mean loops run, the share of block calls that mixed loop
depths, and top-1 agreement with the unconverted model and with the recursive model's own full-depth prediction.
Use ``--recursive FOLDER`` for an uptrained model (``continual uptrain``; ``training.loop_loss_weight`` trains the
early exits); otherwise the model is converted here without training. Smoke run on CPU:

    python -m benchmarks.recursive_throughput --random-init --config-overrides '{"num_hidden_layers": 4,
        "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}'
        --samples 32 --seq-len 32 --slots 8 --thresholds 0.00003,0.0001 --max-sentences 300 --repeats 1
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from typing import Sequence

import torch

from benchmarks._output import add_json_argument, write_json


def timed(fn, device: torch.device, repeats: int):
    """(result of the last call, median seconds over ``repeats`` calls after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="causal LM short name, folder or Hub id")
    parser.add_argument("--random-init", action="store_true")
    parser.add_argument("--config-overrides", default="{}", help="JSON dict (smoke runs)")
    parser.add_argument("--recursive", default=None, help="folder of a saved (uptrained) recursive model")
    parser.add_argument("--loops", type=int, default=2)
    parser.add_argument("--init", default="average")
    parser.add_argument("--rank", type=int, default=32, help="relaxation rank (SVD init; 0: plain recursive)")
    parser.add_argument("--thresholds", default="0.3,0.5,0.8")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--slots", type=int, default=64, help="samples in flight (batch size of every call)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--tasks", default="agnews,dbpedia,amazon,yahoo")
    parser.add_argument("--data-root", default=os.environ.get("CONTINUAL_DATA"))
    parser.add_argument("--max-sentences", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    add_json_argument(parser)
    args = parser.parse_args(argv)

    from continual.models.backbone import load_causal_lm
    from continual.models.recursive import convert_to_recursive, depthwise_early_exit, load_recursive, parameter_breakdown
    from continual.models.recursive.families import last_token
    from continual.training import resolve_device
    from streams.text import build_text_blocks

    torch.manual_seed(args.seed)
    device, dtype = resolve_device(args.device), getattr(torch, args.dtype)
    original, tokenizer = load_causal_lm(args.model, random_init=args.random_init, config_overrides=json.loads(args.config_overrides))
    if args.recursive:
        recursive = load_recursive(args.recursive)
    else:
        recursive = convert_to_recursive(copy.deepcopy(original), num_loops=args.loops, init=args.init, rank=args.rank)
    original, recursive = original.to(device, dtype).eval(), recursive.to(device, dtype).eval()
    blocks = build_text_blocks(args.tasks.split(","), tokenizer, block_size=args.seq_len, heldout_fraction=0.1,
                               seed=args.seed, data_root=args.data_root, max_sentences=args.max_sentences)
    inputs = torch.cat([blocks.heldout, blocks.train])[: args.samples].to(device)
    mask = torch.ones_like(inputs)
    n = inputs.shape[0]
    print(f"{args.model}: {original.config.num_hidden_layers} layers; recursive R={recursive.config.recursion['num_loops']}, "
          f"ranks {sorted(set(recursive.config.recursion['ranks'].values()))}; {n} samples x {args.seq_len} tokens, "
          f"{args.slots} slots, {args.dtype} on {device}", flush=True)

    @torch.no_grad()
    def unconverted():
        out = []
        for start in range(0, n, args.slots):
            ids, m = inputs[start:start + args.slots], mask[start:start + args.slots]
            hidden = original.model(input_ids=ids, attention_mask=m).last_hidden_state
            out.append(original.lm_head(last_token(hidden, m)))
        return torch.cat(out)

    base_logits, base_s = timed(unconverted, device, args.repeats)
    base_top = base_logits.argmax(-1)
    full, full_s = timed(lambda: depthwise_early_exit(recursive, inputs, mask, 2.0, slots=args.slots), device, args.repeats)
    full_top = full.logits.argmax(-1)
    rows = [
        {"run": "unconverted", "parameters": sum(p.numel() for p in original.parameters()), "seconds": base_s,
         "mean_loops": None, "mixed_calls": None, "agree_unconverted": 1.0, "agree_full_depth": None},
        {"run": "recursive, no exit", "parameters": parameter_breakdown(recursive)["total"], "seconds": full_s,
         "mean_loops": full.mean_loops, "mixed_calls": 0.0, "agree_unconverted": float((full_top == base_top).float().mean()),
         "agree_full_depth": 1.0},
    ]
    for threshold in [float(t) for t in args.thresholds.split(",") if t]:
        result, seconds = timed(lambda: depthwise_early_exit(recursive, inputs, mask, threshold, slots=args.slots), device, args.repeats)
        top = result.logits.argmax(-1)
        rows.append({
            "run": f"early exit {threshold:g}", "parameters": rows[1]["parameters"], "seconds": seconds,
            "mean_loops": result.mean_loops, "mixed_calls": result.mixed_calls / max(result.block_calls, 1),
            "agree_unconverted": float((top == base_top).float().mean()), "agree_full_depth": float((top == full_top).float().mean()),
        })

    print(f"\n{'run':22s} {'parameters':>12s} {'samples/s':>10s} {'speed-up':>9s} {'loops':>6s} {'mixed':>6s} "
          f"{'=unconv':>8s} {'=full':>6s}")
    fmt = lambda v, spec: format(v, spec) if v is not None else format("-", ">" + spec.split(".")[0])
    for row in rows:
        row["samples_per_s"] = n / row["seconds"]
        row["speedup"] = base_s / row["seconds"]
        print(f"{row['run']:22s} {row['parameters']:>12,} {row['samples_per_s']:>10.1f} {row['speedup']:>8.2f}x "
              f"{fmt(row['mean_loops'], '6.2f')} {fmt(row['mixed_calls'], '6.2f')} {row['agree_unconverted']:>8.3f} "
              f"{fmt(row['agree_full_depth'], '6.3f')}")
    write_json(args.json, args, rows, device=device, samples=n)


if __name__ == "__main__":
    main()
