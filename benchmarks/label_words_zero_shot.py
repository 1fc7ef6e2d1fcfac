"""Zero-shot accuracy of label-word classification (nothing trained): how well a causal LM names each task's labels
after the prompt, with the task's labels competing ("task") and with every label of the stream competing ("seen").

    python -m benchmarks.label_words_zero_shot --backbone smollm2 --test-per-task 100 --threads 1 \
        --json label_words_zero_shot.json

Uses the stream and label-word settings of a preset (``configs/peers/olora.yaml`` by default, standard order 1) and
evaluates its test split once per label space, in batches of ``--batch``; prints one accuracy per task and the mean
(one row per label space; ``--json`` writes the rows with the settings).
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks._output import add_json_argument, write_json


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="configs/peers/olora.yaml")
    parser.add_argument("--backbone", default=None, help="backbone.name (default: the preset's)")
    parser.add_argument("--test-per-task", type=int, default=100)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    add_json_argument(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from continual.models.backbone import load_causal_lm
    from continual.models.label_word_classifier import build_label_word_classifier
    from continual.recipes.run import load_config
    from streams.build import build_stream

    overrides = [f"stream.test_per_task={args.test_per_task}"] + ([f"backbone.name={args.backbone}"] if args.backbone else [])
    cfg = load_config(args.preset, overrides)
    lm, tokenizer = load_causal_lm(cfg.backbone.name)
    stream = build_stream(cfg.stream, tokenizer, progress=False)
    names = [t.name for t in stream.task_infos]
    rows = []
    for space in ("task", "seen"):
        model = build_label_word_classifier(
            lm, tokenizer, names, [t.labels for t in stream.task_infos], name=cfg.backbone.name, label_space=space,
            template=cfg.backbone.template,
        ).to(args.device).eval()
        for task in stream.task_infos:
            model.heads.activate(task.index)  # every task counts as seen: all the stream's labels compete
        accs, started = [], time.perf_counter()
        for task in stream.tasks:
            ids, mask = task.test["input_ids"], task.test["attention_mask"]
            labels = torch.as_tensor(task.test["label"])
            right = 0
            with torch.no_grad():
                for start in range(0, len(labels), args.batch):
                    x = torch.stack([ids[start:start + args.batch], mask[start:start + args.batch]], 1).to(args.device)
                    gold = torch.full((x.shape[0],), task.info.index, device=args.device)
                    right += int((model(x, gold).argmax(1).cpu() == labels[start:start + args.batch]).sum())
            accs.append(100.0 * right / len(labels))
        rows.append({"backbone": cfg.backbone.name, "label_space": space, "accuracy": dict(zip(names, accs)),
                     "mean": sum(accs) / len(accs), "seconds": time.perf_counter() - started})
        shown = "  ".join(f"{n} {a:5.1f}" for n, a in zip(names, accs))
        print(f"{cfg.backbone.name} label_space={space}: {shown}  mean {rows[-1]['mean']:5.2f}  "
              f"({rows[-1]['seconds']:.0f} s)", flush=True)
    write_json(args.json, args, rows, device=args.device, preset=args.preset)


if __name__ == "__main__":
    main()
