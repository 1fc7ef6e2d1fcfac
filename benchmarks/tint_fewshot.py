"""Few-shot classification with TinT's one-step internal fine-tuning vs the plain model (Panigrahi et al. 2023,
arXiv 2307.01189, §4.2), on CL_Benchmark tasks with label words.

    python -m benchmarks.tint_fewshot --model smollm2 --tasks SST-2 agnews yelp --shots 32 --seeds 0 1 2 \\
        --layers 1 3 all --lrs 1e-3 5e-4 1e-4 1e-5 --losses context label_words --eval-examples 200

For every task and seed, ``--shots`` examples are drawn from the task's training split and packed into one
context (fewer when they do not fit in ``--max-context-tokens``); each of ``--eval-examples`` test examples is
answered after ``context + text + infix`` by the label word with the highest probability. "plain" is the unmodified
model on the same prompts (in-context learning only); every other setting first takes one SGD step on the context
(top ``layers`` blocks, inner learning rate ``lr``, loss on the whole context or on the label words only). Prints
accuracy mean ± std over seeds and the gain over plain (mean ± std of the per-seed differences), per task and on
average. ``--json`` keeps every accuracy (rewritten after each task x seed run, so an interrupted grid keeps what it
measured); shots are drawn by task name, so one process per task draws what a joint run draws, and
``--merge fs_SST-2.json fs_agnews.json ...`` prints the joint table from such per-task files. Smoke run on a tiny
random model:

    python -m benchmarks.tint_fewshot --model <folder with a tiny GPT-2 and its tokenizer> --random-init \\
        --shots 4 --seeds 0 1 --layers 1 all --lrs 1e-2 --eval-examples 16 --device cpu
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch


# The label words the CL_Benchmark sentiment tasks need (their 5 labels share first tokens such as " very").
DEFAULT_LABEL_WORDS = {
    "yelp": {"very negative": "terrible", "negative": "bad", "neutral": "okay", "positive": "good", "very positive": "great"},
    "amazon": {"very negative": "terrible", "negative": "bad", "neutral": "okay", "positive": "good", "very positive": "great"},
}


def _layers(value: str) -> Optional[int]:
    return None if value == "all" else int(value)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="short name, local folder or Hub id of a causal LM")
    parser.add_argument("--random-init", action="store_true", help="random weights from the model's config (smoke runs)")
    parser.add_argument("--config-overrides", default="{}", help='JSON, e.g. \'{"num_hidden_layers": 2}\'')
    parser.add_argument("--tasks", nargs="+", default=["SST-2", "agnews", "yelp"])
    parser.add_argument("--data-root", default=os.environ.get("CONTINUAL_DATA"))
    parser.add_argument("--shots", type=int, default=32)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--layers", nargs="+", default=["1", "3", "all"], help="top blocks updated; 'all' for every block")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 5e-4, 1e-4, 1e-5])
    parser.add_argument("--losses", nargs="+", default=["context", "label_words"], choices=["context", "label_words"])
    parser.add_argument("--exact-backward", action="store_true", help="exact norm/activation backward instead of TinT's first order")
    parser.add_argument("--eval-examples", type=int, default=200)
    parser.add_argument("--max-length", type=int, default=128, help="test text truncation (tokens)")
    parser.add_argument("--max-example-tokens", type=int, default=96)
    parser.add_argument("--max-context-tokens", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--label-words", default="{}", help='JSON {task: {label: word}} added to the built-in yelp/amazon words')
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1...")
    parser.add_argument("--json", default=None, help="also write every accuracy to this JSON file (rewritten after each run)")
    parser.add_argument("--plot", default=None, metavar="PNG",
                        help="also save the gains over plain (settings x inner learning rates) as a heatmap")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="print one table from the --json files of earlier runs (e.g. one per task) and exit")
    return parser.parse_args()


def merge(files: List[str], plot: Optional[str] = None) -> None:
    """One table from several ``--json`` files: same seeds and settings, tasks joined in the order given."""
    acc: Dict[str, Dict[str, List[float]]] = {}
    shots: Dict[str, List[int]] = {}
    first = None
    for file in files:
        try:
            saved = json.loads(Path(file).read_text())
        except (OSError, ValueError) as err:
            raise SystemExit(f"--merge: cannot read {file}: {err}")
        run_args = saved["args"]
        if first is None:
            first = run_args
        elif run_args["seeds"] != first["seeds"]:
            raise SystemExit(f"--merge: {file} has seeds {run_args['seeds']}, {files[0]} has {first['seeds']}")
        for setting, by_task in saved["accuracy"].items():
            acc.setdefault(setting, {}).update(by_task)
        shots.update(saved["shots"])
    tasks = list(shots)
    for setting, by_task in acc.items():
        missing = [t for t in tasks if len(by_task.get(t, [])) != len(first["seeds"])]
        if missing:
            raise SystemExit(f"--merge: setting {setting!r} lacks complete results for {missing}")
    report(argparse.Namespace(**{**first, "tasks": tasks, "plot": plot}), acc, shots)


def accuracy(model, x: torch.Tensor, y: torch.Tensor, task: int, batch_size: int) -> float:
    """Accuracy of ``model`` on ``x: [N, 2, L]`` (labels ``y: [N]``), one task, in batches."""
    correct = 0
    with torch.no_grad():
        for start in range(0, len(y), batch_size):
            logits = model(x[start : start + batch_size], task)
            correct += int((logits.argmax(1).cpu() == y[start : start + batch_size]).sum())
    return correct / len(y)


def main() -> None:
    args = parse_args()
    if args.merge:
        return merge(args.merge, args.plot)
    from tqdm.auto import tqdm

    from continual.models.backbone import load_causal_lm
    from continual.models.tint import InnerStep, PromptFormat, TinTClassifier, build_context, label_word_ids
    from continual.training import resolve_device, seed_everything
    from streams.build import load_task
    from streams.cl_benchmark import data_root_from
    from streams.sampling import cap_total

    device = resolve_device(args.device)
    seed_everything(0)  # a --random-init model is the same on every run
    lm, tokenizer = load_causal_lm(args.model, random_init=args.random_init, config_overrides=json.loads(args.config_overrides))
    lm.to(device)
    words = {**DEFAULT_LABEL_WORDS, **json.loads(args.label_words)}
    fmt = PromptFormat.from_tokenizer(tokenizer, max_example_tokens=args.max_example_tokens)
    positions = getattr(lm.config, "n_positions", None) or getattr(lm.config, "max_position_embeddings", None)
    budget = min(args.max_context_tokens, positions - args.max_length - len(fmt.infix) - 1) if positions else args.max_context_tokens

    root = data_root_from(args.data_root)
    data = [load_task(name, root, "test", skip_unknown_labels=True) for name in args.tasks]
    label_ids = [label_word_ids(tokenizer, d.labels, words.get(name), name) for name, d in zip(args.tasks, data)]
    tests: List[Tuple[torch.Tensor, torch.Tensor]] = []
    for d in data:
        split = cap_total(d.test, args.eval_examples, 0)
        enc = tokenizer(list(split.texts), padding="max_length", truncation=True, max_length=args.max_length, return_tensors="pt")
        tests.append((torch.stack([enc["input_ids"], enc["attention_mask"]], 1).to(device), torch.tensor(split.labels)))

    settings: List[Tuple[str, InnerStep, str]] = [("plain", InnerStep(lr=0.0), "context")]
    for loss in args.losses:
        for layers in args.layers:
            for lr in args.lrs:
                step = InnerStep(lr=lr, layers=_layers(layers), first_order=not args.exact_backward)
                settings.append((f"{loss} top-{layers} lr={lr:g}", step, loss))

    # acc[setting][task] = [accuracy per seed]
    acc: Dict[str, Dict[str, List[float]]] = {name: {t: [] for t in args.tasks} for name, _, _ in settings}
    shots_used: Dict[str, List[int]] = {t: [] for t in args.tasks}
    runs = [(s, i) for s in args.seeds for i in range(len(args.tasks))]
    for seed, index in tqdm(runs, desc="seed x task", unit="run"):
        name, d = args.tasks[index], data[index]
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])  # by name: a run of fewer tasks draws the same shots
        chosen = rng.permutation(len(d.train))[: args.shots].tolist()
        context = build_context(fmt, tokenizer, [d.train.texts[i] for i in chosen],
                                [label_ids[index][d.train.labels[i]] for i in chosen], budget)
        shots_used[name].append(context.shots)
        x, y = tests[index]
        for setting, step, loss in settings:
            model = TinTClassifier(lm, fmt, [label_ids[index]], step, loss=loss)
            model.set_context(0, context)
            acc[setting][name].append(accuracy(model, x, y, 0, args.batch_size))
        if args.json:  # after every run, so an interrupted grid keeps what it measured
            Path(args.json).write_text(json.dumps({"args": vars(args), "accuracy": acc, "shots": shots_used}, indent=2))

    report(args, acc, shots_used)


def _mean_std(values: List[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):5.1f} ± {100 * std:4.1f}"


def report(args, acc: Dict[str, Dict[str, List[float]]], shots_used: Dict[str, List[int]]) -> None:
    tasks = list(args.tasks)
    print(f"\nmodel {args.model}{' (random init)' if args.random_init else ''}; seeds {args.seeds}; "
          f"{args.eval_examples} test examples per task; shots used per seed: {shots_used}")
    print("accuracy % (mean ± std over seeds), gain = setting - plain per seed")
    header = f"{'setting':32s}" + "".join(f"{t:>16s}" for t in tasks) + f"{'average':>16s}{'gain':>16s}"
    print(header)
    plain_avg = [statistics.mean(acc["plain"][t][s] for t in tasks) for s in range(len(args.seeds))]
    gains: Dict[str, List[float]] = {}  # setting -> per-seed gain of the task average over plain
    for setting, by_task in acc.items():
        avg = [statistics.mean(by_task[t][s] for t in tasks) for s in range(len(args.seeds))]
        gain = [a - p for a, p in zip(avg, plain_avg)]
        if setting != "plain":
            gains[setting] = gain
        cells = "".join(f"{_mean_std(by_task[t]):>16s}" for t in tasks)
        print(f"{setting:32s}{cells}{_mean_std(avg):>16s}{'' if setting == 'plain' else _mean_std(gain):>16s}")
    if getattr(args, "plot", None):
        print(f"plot: {plot_gains(gains, tasks, len(args.seeds), args.plot, args.model)}")


def plot_gains(gains: Dict[str, List[float]], tasks: List[str], n_seeds: int, path: str, model: str) -> Path:
    """The per-seed gains of every ``"<loss> top-<layers> lr=<lr>"`` setting (as fractions) as a heatmap PNG of
    their mean and std in points."""
    from continual.report import plot_gain_grid

    cells: Dict[Tuple[str, str], List[float]] = {}
    for setting, gain in gains.items():
        row, lr = setting.rsplit(" lr=", 1)
        cells[row, lr] = [100 * g for g in gain]
    rows = list(dict.fromkeys(row for row, _ in cells))
    columns = list(dict.fromkeys(lr for _, lr in cells))
    mean = np.array([[statistics.mean(cells[r, c]) if (r, c) in cells else np.nan for c in columns] for r in rows])
    std = np.array([[statistics.stdev(cells[r, c]) if (r, c) in cells and n_seeds > 1 else np.nan for c in columns]
                    for r in rows])
    title = f"One internal step vs plain in-context learning ({model}; {', '.join(tasks)}; {n_seeds} seeds)"
    return plot_gain_grid(rows, [f"lr {c}" for c in columns], mean, std, path, title, "gain in average accuracy (points)",
                          xlabel="inner learning rate")


if __name__ == "__main__":
    main()
