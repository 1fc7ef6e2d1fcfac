"""Cost of a batch as the number of tasks stored grows: one-task and mixed batches with K tasks loaded, per kind.

    python -m benchmarks.many_tasks --backbone minilm --tasks 1,10,100,1000,5000 --batch 50 --length 64 \
        --json many_tasks.json

For each module kind (LoRA, sequential adapter, prompt tuning, prefix tuning, and a task-routed experts layer: the
backbone's FFNs upcycled with ``n=2`` experts per task, isolated composition), one ``ContinualClassifier`` grows task
by task (allocated, given random values, frozen, as a stream leaves them) and is timed at every ``--tasks`` point K on
two inference batches of ``--batch x --length`` random tokens: a one-task batch (every sample on one task) and a
batch mixing ``min(K, --mix)`` tasks spread over the K stored (sample ``i`` on the ``i % M``-th of them). Both are
ratios to a one-task batch on a model of the same kind holding one task, timed in the same rounds (rounds alternate
between the three, so machine noise hits all alike; medians over ``--repeats`` rounds of ``--steps`` batches after
``--warmup`` discarded rounds; ``torch.inference_mode``; ``torch.cuda.synchronize`` around each round on GPU).

"bytes/task" is what one stored task adds: its modules' parameters at every site plus its head, at the model's
dtype. A K point whose tasks would not fit in ``--memory-budget`` (default: 60% of the memory available), or in 90% of
the memory free when its kind starts, is skipped and says so.

The experts layer runs a batch mixing tasks batched over its samples (each sample's task's experts gathered, then
``torch.bmm``); the same mixed batch through the token dispatch's loop over experts (``dispatch="loop"``) is timed
in the same rounds too ("mixed with the per-expert loop"). A floor is also timed: the same experts' matrices
multiplied by plain torch (each sample's tokens through its task's experts, one matmul per expert and role, no
routing, gathering or gating), for the mixed batch and for the one-task batch, and for the mixed batch also the
batched alternative (the batch's experts copied into one preallocated tensor, then ``torch.bmm``), when every task
of the batch has as many samples.
A mixed batch must read every one of its tasks' expert matrices (``--mix`` tasks x ``n`` experts, full FFN-sized
matrices, against ``n`` for a one-task batch), so this difference is what any implementation pays on that device;
"floor ratio" is ``(reference + min(floor mixed, gathered) - floor one) / reference``, the ratio the layer would reach
if routing and dispatch cost nothing.

Reference: PEFT LoRA's mixed-batch inference (``model(..., adapter_names=[...])``) over the same sites, rank and
alpha, with K adapters loaded, for K <= ``--peft-max`` only (PEFT keeps every adapter as its own modules and loops
over the adapters of a batch; loading thousands is beyond what it is built for): its mixed batch against its own
single active adapter, and ours against it (PEFT times the encoder only; ours includes pooling and heads).
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from typing import Callable, Dict, List, Sequence

import torch

from benchmarks._output import add_json_argument, write_json
from benchmarks.delta_speed import (  # one home for the timing helpers and the PEFT LoRA setup
    N_CLASSES,
    add_backbone_arguments,
    alternate,
    call_round,
    make_batches,
    median,
    parse_overrides,
    peft_lora,
)

KINDS = ("lora", "adapter", "prompt", "prefix", "experts")
TARGET = 1.10  # the bound on a mixed batch at the largest K, against a one-task batch with one task


# ---------------------------------------------------------------------------------------------------- setup
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_backbone_arguments(parser)
    parser.add_argument("--tasks", default="1,10,100,1000,5000", help="comma-separated K: tasks loaded")
    parser.add_argument("--mix", type=int, default=50, help="tasks mixed in the mixed batch (at most K)")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)}")
    parser.add_argument("--batch", type=int, default=50, help="samples per batch")
    parser.add_argument("--length", type=int, default=64, help="tokens per sample")
    parser.add_argument("--steps", type=int, default=5, help="batches per timed round")
    parser.add_argument("--warmup", type=int, default=1, help="discarded rounds before timing")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds; the median is reported")
    parser.add_argument("--peft-max", type=int, default=100, help="largest K at which PEFT's adapter_names is timed")
    parser.add_argument("--memory-budget", type=float, default=0.0,
                        help="GB the stored tasks may take (0: 60%% of the memory available on the device)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    add_json_argument(parser)
    args = parser.parse_args(argv)
    args.tasks = sorted({int(k) for k in args.tasks.split(",")})
    args.kinds = [k for k in args.kinds.split(",") if k]
    unknown = sorted(set(args.kinds) - set(KINDS))
    if unknown:
        parser.error(f"--kinds: unknown {unknown}; choose from {list(KINDS)}")
    if args.tasks[0] < 1:
        parser.error("--tasks must be >= 1")
    for name in ("mix", "batch", "length", "steps", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    return args


def release_memory(device: torch.device) -> None:
    """Hand the memory of a finished section back (a later kind's tasks need it): collect, empty the CUDA cache, and
    on glibc return the freed heap to the system (freed small blocks otherwise stay with the process)."""
    import ctypes
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


def available_bytes(device: torch.device) -> int:
    """Memory free for new tensors: the GPU's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


class Grower:
    """A classifier of one kind that stores more and more tasks (each allocated, given values, then frozen)."""

    def __init__(self, kind: str, backbone, n_tasks: int, device: torch.device, seed: int):
        from continual.expansion import TaskInfo
        from continual.models.classifier import ContinualClassifier

        self.kind, self.device = kind, device
        self.tasks = [TaskInfo(k, f"task{k}", tuple(f"c{c}" for c in range(N_CLASSES))) for k in range(n_tasks)]
        self.model = ContinualClassifier(copy.deepcopy(backbone), [t.labels for t in self.tasks])
        self.generator = torch.Generator().manual_seed(seed)
        if kind == "experts":  # the backbone's FFNs upcycled, every task routed to its own experts
            from continual.modules import ModuleBank
            from continual.modules.experts import upcycle

            self.strategy = None
            self.model.bank = ModuleBank("isolated")
            upcycle(self.model.backbone, self.model.bank, n=2, k=2)
            self.model.backbone.requires_grad_(False)
        else:
            from strategies.delta import DeltaStrategy

            self.strategy = DeltaStrategy(kinds=[kind], composition="isolated")
            self.strategy.setup(self.model, self.tasks)  # reserves room for every task's slots
        self.model.to(device).eval()

    @property
    def stored(self) -> int:
        return self.model.bank.n_tasks

    def grow(self, n: int, progress: bool = True) -> None:
        """Store tasks until there are ``n``."""
        from tqdm.auto import tqdm

        bank = self.model.bank
        for task in tqdm(self.tasks[self.stored:n], desc=f"  storing {self.kind} tasks", unit="task", leave=False,
                         file=sys.stderr, disable=not progress or n - self.stored < 50):
            if self.strategy is None:
                from continual.modules.experts import set_slot_enabled

                bank.add_task(task.index)
                set_slot_enabled(bank, task.index)
            else:
                self.strategy.before_task(self.model, task)
            with torch.no_grad():  # trained values: non-zero, so every kind's module acts
                for p in bank.task_parameters(task.index):
                    p.copy_(0.02 * torch.randn(p.shape, generator=self.generator))
            if self.strategy is None:
                bank.freeze_task(task.index)
            else:
                self.strategy.after_task(self.model, task)

    def bytes_per_task(self) -> int:
        """What one stored task adds: its modules' parameters at every site and its head."""
        size = next(self.model.backbone.parameters()).element_size()
        head = sum(p.numel() for p in self.model.heads.parameters_for(0))
        return (self.model.bank.parameter_count(0) + head) * size


def bare_expert_rounds(model, tasks: torch.Tensor, length: int, device: torch.device,
                       gathered: bool = False) -> Callable[[], None] | None:
    """A batch's expert matmuls in plain torch: sample ``i``'s ``length`` tokens through both roles of every expert
    of its task's group, at every experts site, with the stored weights; nothing else (the floor of the layer).

    ``gathered=False``: one matmul per expert and role, reading the weights where they are stored. ``True``: the
    batch's groups' weights copied into one preallocated tensor (the copy is timed; a fresh tensor would add page
    faults) and multiplied by ``torch.bmm``, one call per expert of a group and role; needs the same number of rows
    for every task of the batch (None otherwise)."""
    from continual.modules.experts import group_of_slot
    from continual.modules.experts.kind import ACTIVATIONS

    sites = [site.delta for site in model.bank.sites().values() if site.delta.kind == "experts"]
    d = sites[0].pool.d_model
    order = torch.argsort(tasks.cpu(), stable=True)
    groups, counts = torch.unique_consecutive(tasks.cpu()[order], return_counts=True)
    plan = [(group_of_slot(int(g)), int(c) * length) for g, c in zip(groups, counts)]
    x = torch.randn(int(tasks.numel()) * length, d, device=device)

    def run() -> None:
        for delta in sites:
            pool, act, row = delta.pool, ACTIVATIONS[delta.activation], 0
            for group, rows in plan:
                xs = x[row:row + rows]
                row += rows
                w_in, w_out = pool.groups[group].weight("w_in"), pool.groups[group].weight("w_out")
                for j in range(w_in.shape[0]):
                    act(xs @ w_in[j]) @ w_out[j]

    if not gathered:
        return run
    if len({rows for _, rows in plan}) != 1:
        return None
    first = sites[0].pool.groups[plan[0][0]]
    buf_in = first.weight("w_in").new_empty((len(plan),) + tuple(first.weight("w_in").shape))
    buf_out = first.weight("w_out").new_empty((len(plan),) + tuple(first.weight("w_out").shape))
    xb = x.view(len(plan), plan[0][1], d)

    def run_gathered() -> None:
        for delta in sites:
            pool, act = delta.pool, ACTIVATIONS[delta.activation]
            torch.stack([pool.groups[g].weight("w_in") for g, _ in plan], out=buf_in)
            torch.stack([pool.groups[g].weight("w_out") for g, _ in plan], out=buf_out)
            for j in range(buf_in.shape[1]):
                torch.bmm(act(torch.bmm(xb, buf_in[:, j])), buf_out[:, j])
    return run_gathered


def with_dispatch(model, dispatch: str, run: Callable[[], object]) -> object:
    """``run()`` with every experts site's matmul backend set to ``dispatch`` ("loop": one matmul per expert, the
    token dispatch even for a batch mixing tasks), then set back."""
    pools = [site.delta.pool for site in model.bank.sites().values() if site.delta.kind == "experts"]
    before = [pool.dispatch for pool in pools]
    for pool in pools:
        pool.dispatch = dispatch
    try:
        return run()
    finally:
        for pool, value in zip(pools, before):
            pool.dispatch = value


def spread(K: int, M: int, batch: int, device: torch.device) -> torch.Tensor:
    """``[batch]`` task of each sample: ``M`` tasks spread evenly over the ``K`` stored, sample ``i`` on the
    ``i % M``-th."""
    picked = torch.linspace(0, K - 1, M).round().long().unique()
    return picked[torch.arange(batch) % picked.numel()].to(device)


# ---------------------------------------------------------------------------------------------------- sections
def kind_section(args, kind: str, backbone, x: torch.Tensor, device: torch.device, budget: int) -> List[dict]:
    """One kind: the K sweep against the same kind holding one task."""
    reference = Grower(kind, backbone, 1, device, args.seed)
    reference.grow(1)
    per_task = reference.bytes_per_task()
    one_route = torch.zeros(args.batch, dtype=torch.long, device=device)
    # What this kind may take: the budget, and never more than 90% of what is free now (earlier kinds are gone).
    budget = min(budget, int(0.9 * available_bytes(device)))
    feasible = [K for K in args.tasks if K * per_task <= budget]
    rows: List[dict] = []
    grower = Grower(kind, backbone, max(feasible), device, args.seed) if feasible else None
    for K in args.tasks:
        row = {"kind": kind, "K": K, "bytes_per_task": per_task, "stored_MB": K * per_task / 2**20}
        if K not in feasible:
            row["skipped"] = f"needs {K * per_task / 2**30:.1f} GB for the tasks, budget {budget / 2**30:.1f} GB"
            rows.append(row)
            continue
        grower.grow(K)
        model, ref = grower.model, reference.model
        one = torch.full((args.batch,), K // 2, dtype=torch.long, device=device)
        mixed = spread(K, min(K, args.mix), args.batch, device)
        rounds: Dict[str, Callable[[], float]] = {
            "reference": lambda: call_round(lambda: ref(x, one_route), args.steps, device),
            "one": lambda: call_round(lambda: model(x, one), args.steps, device),
            "mixed": lambda: call_round(lambda: model(x, mixed), args.steps, device),
        }
        if kind == "experts":  # the token dispatch's loop over experts too, for the mixed batch
            rounds["mixed_loop"] = lambda: call_round(lambda: with_dispatch(model, "loop", lambda: model(x, mixed)),
                                                      args.steps, device)
            bare_one, bare_mixed = (bare_expert_rounds(model, t, x.shape[-1], device) for t in (one, mixed))
            rounds["floor_one"] = lambda: call_round(bare_one, args.steps, device)
            rounds["floor_mixed"] = lambda: call_round(bare_mixed, args.steps, device)
            bare_gathered = bare_expert_rounds(model, mixed, x.shape[-1], device, gathered=True)
            if bare_gathered is not None:
                rounds["floor_gathered"] = lambda: call_round(bare_gathered, args.steps, device)
        with torch.inference_mode():
            res = alternate(rounds, args.warmup, args.repeats, f"{kind} K={K}")
        t = {name: median(v) for name, v in res.items()}
        row.update(tasks_mixed=int(mixed.unique().numel()), ref_ms=1000 * t["reference"], one_ms=1000 * t["one"],
                   mixed_ms=1000 * t["mixed"], one_ratio=t["one"] / t["reference"],
                   mixed_ratio=t["mixed"] / t["reference"])
        if "mixed_loop" in t:
            row.update(mixed_loop_ms=1000 * t["mixed_loop"], mixed_loop_ratio=t["mixed_loop"] / t["reference"])
        if "floor_mixed" in t:
            best = min(t["floor_mixed"], t.get("floor_gathered", float("inf")))
            row.update(floor_one_ms=1000 * t["floor_one"], floor_mixed_ms=1000 * t["floor_mixed"],
                       floor_ratio=(t["reference"] + best - t["floor_one"]) / t["reference"])
            if "floor_gathered" in t:
                row["floor_gathered_ms"] = 1000 * t["floor_gathered"]
        rows.append(row)
    del grower
    return rows


def peft_section(args, backbone, x: torch.Tensor, device: torch.device, ours: List[dict]) -> List[dict]:
    """PEFT LoRA's adapter_names with K adapters (K <= --peft-max) against its single active adapter."""
    from continual.expansion import TaskInfo
    from continual.models.classifier import ContinualClassifier
    from strategies.delta import DeltaStrategy

    points = [K for K in args.tasks if K <= args.peft_max]
    if not points:
        return []
    probe = ContinualClassifier(copy.deepcopy(backbone), [tuple(f"c{c}" for c in range(N_CLASSES))])
    DeltaStrategy(kinds=["lora"]).setup(probe, [TaskInfo(0, "task0", tuple(f"c{c}" for c in range(N_CLASSES)))])
    sites = list(probe.bank.sites())  # the same modules as ours, rank 8, alpha 16 (the strategy's defaults)
    single, config = peft_lora(copy.deepcopy(backbone), sites, 8, 16.0, adapter="a0")
    single.to(device).eval()
    many, _ = peft_lora(copy.deepcopy(backbone), sites, 8, 16.0, adapter="a0")
    many.to(device).eval()
    ids, mask = x[:, 0], x[:, 1]
    ours_mixed = {row["K"]: row.get("mixed_ms") for row in ours if row["kind"] == "lora"}
    rows, loaded = [], 1
    for K in points:
        for k in range(loaded, K):
            many.add_adapter(f"a{k}", config)
        loaded = K
        many.to(device).eval()
        names = [f"a{int(t)}" for t in spread(K, min(K, args.mix), args.batch, torch.device("cpu"))]
        rounds = {
            "single": lambda: call_round(lambda: single(input_ids=ids, attention_mask=mask), args.steps, device),
            "mixed": lambda: call_round(lambda: many(input_ids=ids, attention_mask=mask, adapter_names=names),
                                        args.steps, device),
        }
        with torch.inference_mode():
            res = alternate(rounds, args.warmup, args.repeats, f"PEFT K={K}")
        t = {name: median(v) for name, v in res.items()}
        row = {"kind": "peft_lora", "K": K, "tasks_mixed": len(set(names)), "ref_ms": 1000 * t["single"],
               "mixed_ms": 1000 * t["mixed"], "mixed_ratio": t["mixed"] / t["single"]}
        if ours_mixed.get(K):
            row["ours_over_peft"] = ours_mixed[K] / row["mixed_ms"]
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------- main
def format_rows(rows: List[dict], largest: int) -> List[str]:
    header = ("kind", "K", "mixed", "one-task ms", "ratio", "mixed ms", "ratio", "bytes/task", "stored MB", "note")
    cells = [header]
    for r in rows:
        def ms(key):
            return f"{r[key]:.1f}" if key in r else "-"

        def ratio(key):
            return f"{r[key]:.3f}" if key in r else "-"

        note = r.get("skipped", "")
        if r["kind"] == "peft_lora":
            note = "PEFT adapter_names vs its single adapter" + (
                f"; ours / PEFT {r['ours_over_peft']:.3f}" if "ours_over_peft" in r else "")
        elif "mixed_ratio" in r and r["K"] == largest:
            note = f"target <= {TARGET:.2f}: {'ok' if r['mixed_ratio'] <= TARGET else 'MISSED'}"
        if "mixed_loop_ratio" in r:
            note = "; ".join(filter(None, [note, f"mixed with the per-expert loop {r['mixed_loop_ratio']:.3f}"]))
        if "floor_ratio" in r:
            gathered = f", mixed gathered + bmm {r['floor_gathered_ms']:.1f} ms" if "floor_gathered_ms" in r else ""
            note = "; ".join(filter(None, [note, f"floor ratio {r['floor_ratio']:.3f} (bare matmuls: one "
                                              f"{r['floor_one_ms']:.1f} ms, mixed {r['floor_mixed_ms']:.1f} ms"
                                              f"{gathered})"]))
        per_task = f"{r['bytes_per_task']:,}" if "bytes_per_task" in r else "-"
        stored = f"{r['stored_MB']:.1f}" if "stored_MB" in r else "-"
        cells.append((r["kind"], str(r["K"]), str(r.get("tasks_mixed", "-")), ms("one_ms"), ratio("one_ratio"),
                      ms("mixed_ms"), ratio("mixed_ratio"), per_task, stored, note))
    widths = [max(len(row[c]) for row in cells) for c in range(len(header))]
    lines = []
    for row in cells:
        left = [row[c].ljust(widths[c]) for c in (0,)]
        right = [row[c].rjust(widths[c]) for c in range(1, len(header) - 1)]
        lines.append("  ".join(left + right + [row[-1]]).rstrip())
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notices, hit by PEFT
    from continual.models.backbone import load_backbone
    from continual.training import resolve_device

    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    backbone, _ = load_backbone(args.backbone, random_init=args.random_init, config_overrides=parse_overrides(args.override))
    backbone.eval()
    x = make_batches(1, args.batch, args.length, backbone.config.vocab_size, args.seed)[0][0].to(device)
    budget = int(args.memory_budget * 2**30) if args.memory_budget else int(0.6 * available_bytes(device))

    rows: List[dict] = []
    for kind in args.kinds:
        rows += kind_section(args, kind, backbone, x, device, budget)
        release_memory(device)
    if "lora" in args.kinds and args.peft_max >= 1:
        rows += peft_section(args, backbone, x, device, rows)

    name = f"{type(backbone).__name__} ({args.backbone}{', random init' if args.random_init else ''})"
    import peft

    print(f"backbone={name} device={device} batch={args.batch}x{args.length} tasks mixed=min(K, {args.mix}) "
          f"steps={args.steps} warmup={args.warmup} repeats={args.repeats} (median) threads={torch.get_num_threads()} "
          f"torch={torch.__version__} peft={peft.__version__}")
    print("ratios: time per batch / a one-task batch on the same kind holding one task (measured in the same rounds)")
    print("\n".join(format_rows(rows, max(args.tasks))))
    if args.peft_max < max(args.tasks):
        print(f"note: PEFT is timed up to K={args.peft_max} adapters (--peft-max); it keeps each adapter as its own "
              "modules and loops over a batch's adapters")
    write_json(args.json, args, rows, device=device)


if __name__ == "__main__":
    main()
