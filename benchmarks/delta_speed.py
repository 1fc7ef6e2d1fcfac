"""Speed of per-task LoRA in the module bank against PEFT, measured side by side in one process.

    python -m benchmarks.delta_speed --backbone minilm --batch 50 --length 64 --steps 20 --device auto \
        --json delta_speed.json

Three measurements, each a ratio of two timings taken in the same run (rounds alternate between the two sides so
that machine noise hits both alike; medians over ``--repeats`` rounds after ``--warmup`` discarded rounds of
``--steps`` iterations; inference under ``torch.inference_mode``; ``torch.cuda.synchronize`` around every timed
interval on GPU):

1. Training step on one task. Ours: the real path, ``ContinualClassifier`` + the delta strategy's bank LoRA (r=8,
   alpha=16 on the backbone's default LoRA targets, query/value for BERT) trained by ``ContinualLearner`` (AdamW
   over the task's LoRA and head, gradient clipping 1.0). Reference: a hand-written PyTorch loop over a PEFT LoRA
   model of the same modules, rank and alpha, with the same mean pooling, head, optimizer, batches and data. Full
   fine-tuning through our learner against a raw loop over the same plain model is measured the same way.
2. Inference on a mixed batch whose sample ``i`` belongs to task ``i % T``, with ``--tasks`` LoRA slots allocated
   (random non-zero ``B``): our time(T) / time(T=1); PEFT's ``model(..., adapter_names=[...])`` with ``--tasks``
   loaded adapters (holding the same tensors) against its single active adapter; ours / PEFT at the largest T.
3. A training step on a batch spanning several tasks, all their slots training jointly, against a one-task batch.
   PEFT cannot do this (``adapter_names`` is refused in training mode); the table shows PEFT's own message.

Per-step times of the learner run from the start of one iteration to the start of the next (its data loading,
loss check and plugin callbacks included); "whole train() call" adds the per-task setup (optimizer, data loader).
Random token ids of full length stand in for text: the cost depends on the shape only.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks._output import add_json_argument, write_json


N_CLASSES = 4  # labels per synthetic task
TARGET = 1.05  # the bound on our overheads


# ---------------------------------------------------------------------------------------------------- setup
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_backbone_arguments(parser)
    parser.add_argument("--batch", type=int, default=50, help="samples per batch")
    parser.add_argument("--length", type=int, default=64, help="tokens per sample")
    parser.add_argument("--steps", type=int, default=20, help="iterations per timed round")
    parser.add_argument("--warmup", type=int, default=1, help="discarded rounds of --steps iterations before timing")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds; the median is reported")
    parser.add_argument("--tasks", type=int, default=50, help="LoRA slots (and PEFT adapters) loaded for inference")
    parser.add_argument("--inference-tasks", default="1,10,50", help="comma-separated T of the mixed batches")
    parser.add_argument("--mixed-train-tasks", type=int, default=10, help="tasks spanned by the mixed training batch")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--seed", type=int, default=0)
    add_json_argument(parser)
    args = parser.parse_args(argv)
    args.inference_tasks = sorted({int(t) for t in args.inference_tasks.split(",")})
    for name in ("batch", "length", "steps", "repeats", "tasks", "mixed_train_tasks", "rank"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.inference_tasks[0] != 1 or args.inference_tasks[-1] > args.tasks:
        parser.error(f"--inference-tasks must start at 1 and stay <= --tasks ({args.tasks}), got {args.inference_tasks}")
    if args.mixed_train_tasks > args.batch:
        parser.error("--mixed-train-tasks cannot exceed --batch")
    return args


def add_backbone_arguments(parser: argparse.ArgumentParser) -> None:
    """``--backbone``, ``--random-init`` and ``--override KEY=VALUE`` (read with :func:`parse_overrides`)."""
    parser.add_argument("--backbone", default="minilm", help="short name, local folder or Hub id")
    parser.add_argument("--random-init", action="store_true", help="random weights from the backbone's config")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="backbone config override (int/float/str), repeatable: --override num_hidden_layers=2")


def parse_overrides(items: Sequence[str]) -> Dict[str, object]:
    out: Dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--override {item!r} is not of the form key=value")
        for cast in (int, float):
            try:
                out[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            out[key] = value
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_batches(n_batches: int, batch: int, length: int, vocab: int, seed: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """``(x [B, 2, L] ids stacked on a full mask, y [B])`` on the CPU, as a data loader would hand them over."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(1, vocab, (batch, length), generator=gen)
        out.append((torch.stack([ids, torch.ones_like(ids)], dim=1), torch.randint(0, N_CLASSES, (batch,), generator=gen)))
    return out


def experience_of(batches, task_index: int = 0):
    """One Avalanche training experience holding the batches' samples in order (task label ``task_index``)."""
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
    from avalanche.benchmarks.scenarios.task_aware import with_task_labels
    from avalanche.benchmarks.utils import _make_taskaware_classification_dataset

    from streams.avalanche import TokenizedClassificationData

    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches]).tolist()
    data = TokenizedClassificationData(x[:, 0], x[:, 1], y)
    dataset = _make_taskaware_classification_dataset(data, task_labels=task_index, targets=y)
    return with_classes_timeline(with_task_labels(benchmark_from_datasets(train=[dataset]))).train_stream[0]


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def peft_lora(backbone: nn.Module, site_names: Sequence[str], rank: int, alpha: float, adapter: str = "a0"):
    """A PEFT LoRA model over ``backbone`` adapting exactly the modules our bank adapts."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    conv = isinstance(backbone.get_submodule(site_names[0]), Conv1D)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(site_names), lora_dropout=0.0, bias="none",
                        fan_in_fan_out=conv)
    return get_peft_model(backbone, config, adapter_name=adapter), config


# ---------------------------------------------------------------------------------------------------- timing
class IterationClock:
    """Avalanche plugin: a synchronised timestamp at the start of every training iteration and at the epoch's end."""

    def __init__(self, device: torch.device):
        from avalanche.core import SupervisedPlugin

        self.device = device
        self.stamps: List[float] = []
        clock = self

        class Plugin(SupervisedPlugin):
            def before_training_iteration(self, strategy, *args, **kwargs):
                sync(clock.device)
                clock.stamps.append(time.perf_counter())

            def after_training_epoch(self, strategy, *args, **kwargs):
                sync(clock.device)
                clock.stamps.append(time.perf_counter())

        self.plugin = Plugin()

    def per_step(self) -> float:
        """Mean seconds per iteration of the last epoch (start of the first iteration to the epoch's end)."""
        return (self.stamps[-1] - self.stamps[0]) / (len(self.stamps) - 1)


def learner_round(learner, experience, clock: IterationClock, device: torch.device) -> Tuple[float, float]:
    """One epoch through the learner: (seconds per step, seconds of the whole train() call per step)."""
    clock.stamps.clear()
    sync(device)
    start = time.perf_counter()
    learner.train(experience, shuffle=False)
    sync(device)
    whole = time.perf_counter() - start
    return clock.per_step(), whole / (len(clock.stamps) - 1)


def raw_round(step: Callable[[torch.Tensor, torch.Tensor], None], batches, device: torch.device) -> float:
    """Seconds per step of a hand-written loop over the batches (moved to the device each step, as a loader would)."""
    sync(device)
    start = time.perf_counter()
    for x, y in batches:
        step(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
    sync(device)
    return (time.perf_counter() - start) / len(batches)


def call_round(fn: Callable[[], object], n: int, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - start) / n


def alternate(rounds: Dict[str, Callable[[], object]], warmup: int, repeats: int, desc: str) -> Dict[str, List]:
    """Run every named round once per repeat, in turn; the first ``warmup`` passes are discarded."""
    from tqdm.auto import tqdm

    results: Dict[str, List] = {name: [] for name in rounds}
    for i in tqdm(range(warmup + repeats), desc=desc, unit="round", leave=False, file=sys.stderr):
        for name, fn in rounds.items():
            value = fn()
            if i >= warmup:
                results[name].append(value)
    return results


def median(values: List) -> float:
    return statistics.median(values)


# ---------------------------------------------------------------------------------------------------- sections
def train_step_section(args, backbone, tasks, batches, device) -> List[tuple]:
    """Single-task training: our learner (LoRA, full FT) vs hand-written loops (PEFT LoRA, plain model)."""
    from continual.learner import ContinualLearner
    from continual.models.classifier import ContinualClassifier
    from strategies.delta import DeltaStrategy
    from strategies.full_finetune import FullFinetune

    experience = experience_of(batches)
    labels = [t.labels for t in tasks]
    hidden = backbone.config.hidden_size

    def learner_for(strategy, lr):
        model = ContinualClassifier(copy.deepcopy(backbone), labels)
        strategy.setup(model, tasks)
        clock = IterationClock(device)
        learner = ContinualLearner(model=model, strategy=strategy, tasks=tasks, lr=lr, max_grad_norm=1.0,
                                   train_mb_size=args.batch, device=device, progress=False, plugins=[clock.plugin])
        return learner, clock, model

    lora_strategy = DeltaStrategy(kinds=["lora"], rank=args.rank, alpha=args.alpha)
    lora_learner, lora_clock, lora_model = learner_for(lora_strategy, 1e-3)
    site_names = list(lora_model.bank.sites())
    full_learner, full_clock, _ = learner_for(FullFinetune(), 5e-5)

    def raw_step_fn(encoder: nn.Module, lr: float, trainable: Callable[[nn.Module], List[nn.Parameter]]):
        encoder = encoder.to(device).train()
        head = nn.Linear(hidden, N_CLASSES).to(device)
        params = trainable(encoder) + list(head.parameters())
        optimizer = torch.optim.AdamW(params, lr=lr)

        def step(x, y):
            ids, mask = x[:, 0], x[:, 1]
            optimizer.zero_grad()
            logits = head(mean_pool(encoder(input_ids=ids, attention_mask=mask).last_hidden_state, mask))
            F.cross_entropy(logits, y).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()

        return step

    peft_model, _ = peft_lora(copy.deepcopy(backbone), site_names, args.rank, args.alpha)
    peft_step = raw_step_fn(peft_model, 1e-3, lambda m: [p for p in m.parameters() if p.requires_grad])
    plain_step = raw_step_fn(copy.deepcopy(backbone), 5e-5, lambda m: list(m.parameters()))

    res = alternate(
        {
            "peft": lambda: raw_round(peft_step, batches, device),
            "lora": lambda: learner_round(lora_learner, experience, lora_clock, device),
            "plain": lambda: raw_round(plain_step, batches, device),
            "full": lambda: learner_round(full_learner, experience, full_clock, device),
        },
        args.warmup, args.repeats, "train step",
    )
    peft, plain = median(res["peft"]), median(res["plain"])
    lora_step, lora_whole = median([r[0] for r in res["lora"]]), median([r[1] for r in res["lora"]])
    full_step, full_whole = median([r[0] for r in res["full"]]), median([r[1] for r in res["full"]])
    return [
        ("train, 1 task", "PEFT LoRA, hand-written loop", peft, 1.0, "reference", ""),
        ("", "ours LoRA, ContinualLearner, per step", lora_step, lora_step / peft, "ours / PEFT", TARGET),
        ("", "ours LoRA, whole train() call", lora_whole, lora_whole / peft, "ours / PEFT", ""),
        ("", "full FT, hand-written loop", plain, 1.0, "reference", ""),
        ("", "full FT, ContinualLearner, per step", full_step, full_step / plain, "ours / raw", TARGET),
        ("", "full FT, whole train() call", full_whole, full_whole / plain, "ours / raw", ""),
    ]


def inference_section(args, backbone, batches, device) -> Tuple[List[tuple], float]:
    """Mixed-batch inference over T tasks' LoRA: ours vs PEFT's adapter_names, both holding the same tensors."""
    from continual.expansion import TaskInfo
    from continual.models.classifier import ContinualClassifier
    from strategies.delta import DeltaStrategy

    K = args.tasks
    tasks = [TaskInfo(k, f"task{k}", tuple(f"c{c}" for c in range(N_CLASSES))) for k in range(K)]
    model = ContinualClassifier(copy.deepcopy(backbone), [t.labels for t in tasks])
    strategy = DeltaStrategy(kinds=["lora"], rank=args.rank, alpha=args.alpha)
    strategy.setup(model, tasks)
    for task in tasks:
        strategy.before_task(model, task)
    gen = torch.Generator().manual_seed(args.seed + 1)
    sites = model.bank.sites()
    with torch.no_grad():
        for site in sites.values():
            for B in site.delta.lora_B:
                B.copy_(0.02 * torch.randn(B.shape, generator=gen))
    model.to(device).eval()

    peft_model, config = peft_lora(copy.deepcopy(backbone), list(sites), args.rank, args.alpha, adapter="a0")
    for k in range(1, K):
        peft_model.add_adapter(f"a{k}", config)
    with torch.no_grad():  # the same tensors, so both sides compute the same outputs
        for name, site in sites.items():
            layer = peft_model.base_model.model.get_submodule(name)
            for k in range(K):
                layer.lora_A[f"a{k}"].weight.copy_(site.delta.lora_A[k])
                layer.lora_B[f"a{k}"].weight.copy_(site.delta.lora_B[k])
    peft_model.set_adapter("a0")
    peft_model.to(device).eval()

    x = batches[0][0].to(device)
    ids, mask = x[:, 0], x[:, 1]
    routes = {T: torch.arange(args.batch, device=device) % T for T in args.inference_tasks}
    names = {T: [f"a{int(t)}" for t in routes[T]] for T in args.inference_tasks}

    def ours_encoder(T):
        with model.bank.route(routes[T]):
            return model.backbone(input_ids=ids, attention_mask=mask).last_hidden_state

    def theirs(T):
        return peft_model(input_ids=ids, attention_mask=mask, adapter_names=names[T]).last_hidden_state

    rounds: Dict[str, Callable[[], float]] = {}
    for T in args.inference_tasks:
        rounds[f"ours {T}"] = lambda T=T: call_round(lambda: ours_encoder(T), args.steps, device)
        rounds[f"classifier {T}"] = lambda T=T: call_round(lambda: model(x, routes[T]), args.steps, device)
        rounds[f"peft {T}"] = lambda T=T: call_round(lambda: theirs(T), args.steps, device)
    rounds["peft single"] = lambda: call_round(
        lambda: peft_model(input_ids=ids, attention_mask=mask).last_hidden_state, args.steps, device)
    with torch.inference_mode():
        top = args.inference_tasks[-1]
        agreement = float((ours_encoder(top) - theirs(top)).abs().max())
        res = alternate(rounds, args.warmup, args.repeats, "inference")
    t = {name: median(v) for name, v in res.items()}

    rows = []
    for i, T in enumerate(args.inference_tasks):
        rows.append(("inference" if i == 0 else "", f"ours encoder, T={T}", t[f"ours {T}"], t[f"ours {T}"] / t["ours 1"],
                     "time(T) / time(1)", TARGET if T == top and T > 1 else ""))
    for T in args.inference_tasks:
        rows.append(("", f"ours classifier (+ per-task heads), T={T}", t[f"classifier {T}"],
                     t[f"classifier {T}"] / t["classifier 1"], "time(T) / time(1)", ""))
    rows.append(("", "PEFT, one active adapter", t["peft single"], 1.0, "reference", ""))
    for T in args.inference_tasks:
        rows.append(("", f"PEFT adapter_names, T={T}", t[f"peft {T}"], t[f"peft {T}"] / t["peft single"],
                     "time(T) / single", "issue: 1.11" if T == 50 else ""))
    rows.append(("", f"ours / PEFT at T={top}", t[f"ours {top}"], t[f"ours {top}"] / t[f"peft {top}"], "ours / PEFT",
                 1.0))
    return rows, agreement


def mixed_training_section(args, backbone, batches, device) -> Tuple[List[tuple], str]:
    """One step on a batch spanning several tasks (all their slots train) vs a one-task batch (one slot trains)."""
    from continual.expansion import TaskInfo
    from continual.models.classifier import ContinualClassifier
    from continual.training import set_trainable
    from strategies.delta import DeltaStrategy

    M = args.mixed_train_tasks
    tasks = [TaskInfo(k, f"task{k}", tuple(f"c{c}" for c in range(N_CLASSES))) for k in range(M)]

    def step_fn(trained: Sequence[int], route: torch.Tensor):
        """A model with M tasks' slots allocated of which ``trained`` train, on batches routed by ``route``."""
        model = ContinualClassifier(copy.deepcopy(backbone), [t.labels for t in tasks])
        strategy = DeltaStrategy(kinds=["lora"], rank=args.rank, alpha=args.alpha)
        strategy.setup(model, tasks)
        for task in tasks:
            strategy.before_task(model, task)
        model.to(device).train()
        params = set_trainable(model, [p for k in trained for p in strategy.trainable_parameters(model, tasks[k])])
        optimizer = torch.optim.AdamW(params, lr=1e-3)

        def step(x, y):
            optimizer.zero_grad()
            F.cross_entropy(model(x, route), y).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()

        return step, model

    one, _ = step_fn([0], torch.zeros(args.batch, dtype=torch.long, device=device))
    mixed, model = step_fn(range(M), torch.arange(args.batch, device=device) % M)
    res = alternate({"one": lambda: raw_round(one, batches, device), "mixed": lambda: raw_round(mixed, batches, device)},
                    args.warmup, args.repeats, "mixed training")
    t_one, t_mixed = median(res["one"]), median(res["mixed"])

    peft_model, config = peft_lora(copy.deepcopy(backbone), list(model.bank.sites()), args.rank, args.alpha)
    peft_model.add_adapter("a1", config)
    peft_model.train()
    x = batches[0][0]
    try:  # PEFT's mixed-batch path exists for inference only; ask it rather than assume
        peft_model(input_ids=x[:2, 0], attention_mask=x[:2, 1], adapter_names=["a0", "a1"])
        peft_verdict, peft_note = "PEFT accepted it", "PEFT accepted adapter_names in training mode"
    except ValueError as err:
        peft_verdict, peft_note = "PEFT cannot", f"PEFT, mixed-batch training step: {err}"
    rows = [
        ("train, mixed batch", "ours, one-task batch (1 slot trains)", t_one, 1.0, "reference", ""),
        ("", f"ours, batch over {M} tasks ({M} slots train jointly)", t_mixed, t_mixed / t_one, "mixed / one-task", ""),
        ("", f"PEFT, batch over {M} adapters", float("nan"), float("nan"), peft_verdict, "see note"),
    ]
    return rows, peft_note


# ---------------------------------------------------------------------------------------------------- main
def target_cell(ratio: float, target) -> str:
    """The target column: a bound and whether the ratio meets it (``target`` a float), or a note as given."""
    if not isinstance(target, float):
        return str(target)
    if target == 1.0:
        return f"< 1.00 {'ok' if ratio < 1.0 else 'MISSED'}"
    return f"<= {target:.2f} {'ok' if ratio <= target else 'MISSED'}"


def row_dicts(rows: List[tuple]) -> List[dict]:
    """The table as data: every row names its section; ``ms`` and ``ratio`` are None where the table shows "-"."""
    out, section = [], ""
    for part, what, seconds, ratio, of, target in rows:
        section = part or section
        out.append({"section": section, "measurement": what,
                    "ms": None if seconds != seconds else 1000 * seconds,
                    "ratio": None if ratio != ratio else ratio, "ratio_of": of, "target": target_cell(ratio, target)})
    return out


def format_rows(rows: List[tuple]) -> List[str]:
    header = ("section", "measurement", "ms", "ratio", "ratio of", "target")
    cells = [header]
    for section, what, seconds, ratio, of, target in rows:
        ms = "-" if seconds != seconds else f"{1000 * seconds:.2f}"
        r = "-" if ratio != ratio else f"{ratio:.3f}"
        cells.append((section, what, ms, r, of, target_cell(ratio, target)))
    widths = [max(len(str(row[c])) for row in cells) for c in range(len(header))]
    lines = []
    for row in cells:
        left = [str(row[c]).ljust(widths[c]) for c in (0, 1)]
        right = [str(row[c]).rjust(widths[c]) for c in (2, 3)]
        lines.append("  ".join(left + right + [str(row[4]).ljust(widths[4]), str(row[5])]).rstrip())
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notices, hit by PEFT
    import peft

    from continual.expansion import TaskInfo
    from continual.models.backbone import load_backbone
    from continual.training import resolve_device

    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    overrides = parse_overrides(args.override)
    backbone, _ = load_backbone(args.backbone, random_init=args.random_init, config_overrides=overrides)
    backbone.eval()
    tasks = [TaskInfo(0, "task0", tuple(f"c{c}" for c in range(N_CLASSES)))]
    batches = make_batches(args.steps, args.batch, args.length, backbone.config.vocab_size, args.seed)

    rows = train_step_section(args, backbone, tasks, batches, device)
    inference_rows, agreement = inference_section(args, backbone, batches, device)
    mixed_rows, peft_note = mixed_training_section(args, backbone, batches, device)
    rows += inference_rows + mixed_rows

    name = f"{type(backbone).__name__} ({args.backbone}{', random init' if args.random_init else ''})"
    print(f"backbone={name} device={device} batch={args.batch}x{args.length} LoRA r={args.rank} alpha={args.alpha:g} "
          f"steps={args.steps} warmup={args.warmup} repeats={args.repeats} (median) threads={torch.get_num_threads()} "
          f"torch={torch.__version__} peft={peft.__version__}")
    print(f"inference: {args.tasks} LoRA slots / PEFT adapters loaded; max |ours - PEFT| at T="
          f"{args.inference_tasks[-1]}: {agreement:.2e}")
    print("\n".join(format_rows(rows)))
    print(f"note: {peft_note}")
    write_json(args.json, args, row_dicts(rows), device=device, backbone=name, threads=torch.get_num_threads(),
               torch=torch.__version__, peft=peft.__version__, max_abs_diff_ours_peft=agreement, note=peft_note)


if __name__ == "__main__":
    main()
