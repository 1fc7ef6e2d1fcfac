"""Pruning the experts that deployed tasks do not use (ModuleFormer, Shen et al. 2023, "ModuleFormer: Modularity
Emerges from Mixture-of-Experts", arXiv 2306.04640: experts a task does not choose can be removed).

:func:`recording_usage` counts each expert's selections per task, :func:`prune_plan` (pure) keeps the experts used by
at least ``threshold`` of a deployed task's tokens, :func:`prune_unused` applies it (through :func:`prune_experts`,
which also replays a stored plan). Removing an expert that is switched on but never chosen keeps every choice but
scales each gate by ``1 / (1 - p_removed)`` (the softmax loses its share); removing one that a sample cannot use
(switched off, or another task's under task-conditioned routing) changes nothing for that sample.

Pruning after every task of a stream (:class:`PruningHistory`): each task's usage is recorded once, right after it
trained, and kept as it was (frozen history); :func:`carry_usage` re-indexes it over the experts of a later moment
(experts are only appended, a slot at a time at the end, or pruned by a keep mask).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Mapping, Optional, Sequence

import torch

from continual.modules.experts.kind import ExpertsDelta
from continual.modules.experts.pool import ExpertUsage


@contextmanager
def recording_usage(deltas: Mapping[str, ExpertsDelta]) -> Iterator[Dict[str, ExpertUsage]]:
    """Count each expert's selections (real tokens only) during the block; the yielded dict maps each site to its
    :class:`~continual.modules.experts.pool.ExpertUsage` once the block exits."""
    usage: Dict[str, ExpertUsage] = {}
    for delta in deltas.values():
        delta.pool.reset_usage()
        delta.pool.record_usage = True
    try:
        yield usage
    finally:
        for name, delta in deltas.items():
            delta.pool.record_usage = False
            usage[name] = delta.pool.usage()
            delta.pool.reset_usage()


def prune_plan(
    frequency: torch.Tensor, expert_slots: torch.Tensor, threshold: float, protect: Mapping[int, int] | None = None
) -> torch.Tensor:
    """Which experts to keep: the shared ones, and those chosen by at least ``threshold`` of some deployed task's
    tokens.

    Args:
        frequency: ``[D, E]`` share of each deployed task's tokens that chose each expert (each row sums to k).
        expert_slots: ``[E]`` task slot of each expert, -1 for shared experts (always kept).
        threshold: minimum share.
        protect: slot -> minimum experts that slot keeps (its most used ones), e.g. ``k - S`` for a deployed task
            under task-conditioned routing, which needs ``k`` experts to choose from.

    Returns:
        ``[E]`` bool.
    """
    if frequency.dim() != 2 or frequency.shape[1] != expert_slots.shape[0]:
        raise ValueError(f"frequency must be [D, E={expert_slots.shape[0]}], got {tuple(frequency.shape)}")
    best = frequency.max(dim=0).values if frequency.shape[0] else torch.zeros(expert_slots.shape[0], dtype=frequency.dtype)
    keep = (expert_slots < 0) | (best >= threshold)
    for slot, minimum in (protect or {}).items():
        members = (expert_slots == slot).nonzero().flatten()
        ranked = members[torch.argsort(best[members], descending=True, stable=True)]
        keep[ranked[:minimum]] = True
    return keep


@dataclass
class PruneResult:
    """What :func:`prune_unused` (or :func:`prune_experts`) removed."""

    parameters_removed: int
    experts_removed: Dict[str, List[int]] = field(default_factory=dict)  # site -> expert indices before pruning
    experts_kept: Dict[str, int] = field(default_factory=dict)  # site -> experts left (shared included)
    keep: Dict[str, torch.Tensor] = field(default_factory=dict)  # site -> [E] bool mask applied (E before pruning)


def prune_unused(
    deltas: Mapping[str, ExpertsDelta],
    usage: Mapping[int, Mapping[str, ExpertUsage]],
    threshold: float,
    protect_deployed: bool = True,
) -> PruneResult:
    """Prune, at every site, the task experts that no deployed task chooses for at least ``threshold`` of its
    tokens.

    Args:
        deltas: site -> expert kind (:func:`expert_deltas`).
        usage: deployed task index -> site -> usage measured on that task's data (:func:`recording_usage`), over
            the sites' current experts.
        threshold: minimum share of a task's tokens.
        protect_deployed: each deployed task's slot keeps at least ``k - S`` experts (its most used), so that
            task-conditioned routing still has ``k`` to choose from.
    """
    deployed = sorted(usage)
    plan = {}
    for name, delta in deltas.items():
        frequency = torch.stack([usage[t][name].frequency.float().cpu() for t in deployed]) if deployed else (
            torch.zeros(0, delta.pool.n_experts)
        )
        minimum = max(delta.k - delta.n_shared, 0) if protect_deployed else 0
        protect = {t: minimum for t in deployed if t < delta.n_slots}
        plan[name] = prune_plan(frequency, delta.expert_slots(), threshold, protect)
    return prune_experts(deltas, plan)


def prune_experts(deltas: Mapping[str, ExpertsDelta], keep: Mapping[str, torch.Tensor]) -> PruneResult:
    """Remove, at every site, the experts whose ``keep`` entry is false: a plan of :func:`prune_unused`, or one
    stored with a run (replayed on the same structure, it gives the same model).

    Args:
        deltas: site -> expert kind (:func:`expert_deltas`).
        keep: site -> ``[E]`` bool over the site's current experts; one entry per site.
    """
    if set(keep) != set(deltas):
        missing, unknown = sorted(set(deltas) - set(keep)), sorted(set(keep) - set(deltas))
        raise ValueError(f"prune_experts: keep masks must name every expert site; missing {missing[:3]}, "
                         f"unknown {unknown[:3]}")
    result = PruneResult(0)
    for name, delta in deltas.items():
        mask = torch.as_tensor(keep[name], dtype=torch.bool).cpu()
        result.keep[name] = mask
        result.experts_removed[name] = (~mask).nonzero().flatten().tolist()
        result.parameters_removed += delta.prune(mask) if not bool(mask.all()) else 0
        result.experts_kept[name] = delta.pool.n_experts
    return result


# ---------------------------------------------------------------------------------------------------- along a stream
def carry_usage(usage: ExpertUsage, keeps: Sequence[torch.Tensor], n_experts: int) -> ExpertUsage:
    """Usage recorded over the experts of one moment, re-indexed over the experts of a later one.

    Between the two, experts were only appended at the end (new task slots) or pruned. Each pruning since the
    recording is given by its keep mask ``[E_i]``, in order (over the experts of that moment, appended ones
    included); an expert appended after the recording was chosen by none of its tokens (zero).

    Args:
        usage: ``[E_0]`` counters as recorded.
        keeps: the keep masks of the prunings since, oldest first.
        n_experts: experts now (at least those left by the last pruning).
    """
    counts, gate_sums = usage.counts, usage.gate_sums
    for keep in keeps:
        keep = torch.as_tensor(keep, dtype=torch.bool).cpu()
        idx = keep.nonzero().flatten().to(counts.device)
        counts, gate_sums = _zero_pad(counts, keep.shape[0])[idx], _zero_pad(gate_sums, keep.shape[0])[idx]
    return ExpertUsage(_zero_pad(counts, n_experts), _zero_pad(gate_sums, n_experts), usage.tokens)


def _zero_pad(values: torch.Tensor, n: int) -> torch.Tensor:
    if values.shape[0] > n:
        raise ValueError(f"usage over {values.shape[0]} experts cannot be carried to {n}: experts are only appended "
                         "or pruned (a keep mask or the expert count does not belong to this history)")
    return torch.cat([values, values.new_zeros(n - values.shape[0])])


class PruningHistory:
    """What pruning after each task of a stream remembers: every finished task's usage, recorded on its own training
    data right after it trained and then kept as it was, and the keep masks of the pruning that followed.

    Only tensors, so the history saves and loads as a flat dict (:meth:`state_dict`), and replaying its keep masks
    task by task rebuilds the pruned structure.
    """

    def __init__(self):
        self.usage: Dict[int, Dict[str, ExpertUsage]] = {}  # task -> site -> usage as recorded ([E] of that moment)
        self.keep: Dict[int, Dict[str, torch.Tensor]] = {}  # task -> site -> [E] bool applied after it

    def prune(
        self, deltas: Mapping[str, ExpertsDelta], task: int, usage: Mapping[str, ExpertUsage], threshold: float
    ) -> PruneResult:
        """Keep ``task``'s usage (just recorded, over the current experts), then prune the experts that no task
        recorded so far chooses for at least ``threshold`` of its tokens (:func:`prune_unused`)."""
        if task in self.usage:
            raise ValueError(f"task {task} has already been pruned after")
        self.usage[task] = {name: ExpertUsage(u.counts.detach().cpu().double(), u.gate_sums.detach().cpu().double(),
                                              int(u.tokens)) for name, u in usage.items()}
        result = prune_unused(deltas, self.usage_now(deltas), threshold)
        self.keep[task] = result.keep
        return result

    def usage_now(self, deltas: Mapping[str, ExpertsDelta]) -> Dict[int, Dict[str, ExpertUsage]]:
        """Task -> site -> its recorded usage over the sites' current experts (:func:`carry_usage`)."""
        out = {}
        for task, per_site in self.usage.items():
            since = [self.keep[t] for t in sorted(self.keep) if t >= task]
            out[task] = {name: carry_usage(per_site[name], [keep[name] for keep in since], delta.pool.n_experts)
                         for name, delta in deltas.items()}
        return out

    def state_dict(self, tasks: Optional[Sequence[int]] = None) -> Dict[str, torch.Tensor]:
        """``usage.<task>.<site>.{counts,gate_sums,tokens}`` and ``keep.<task>.<site>`` (of ``tasks``, or all)."""
        state: Dict[str, torch.Tensor] = {}
        for task in sorted(self.usage) if tasks is None else tasks:
            for name, u in self.usage[task].items():
                state[f"usage.{task}.{name}.counts"] = u.counts
                state[f"usage.{task}.{name}.gate_sums"] = u.gate_sums
                state[f"usage.{task}.{name}.tokens"] = torch.tensor(u.tokens, dtype=torch.int64)
            for name, mask in self.keep.get(task, {}).items():
                state[f"keep.{task}.{name}"] = mask
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace the history by the one :meth:`state_dict` wrote.

        Raises:
            KeyError: a key :meth:`state_dict` does not write, or a usage record without all its counters.
            ValueError: a task with usage but no keep masks, or the other way round.
        """
        fields: Dict[int, Dict[str, Dict[str, torch.Tensor]]] = {}
        keep: Dict[int, Dict[str, torch.Tensor]] = {}
        for key, value in state.items():
            kind, _, rest = key.partition(".")
            task, _, rest = rest.partition(".")
            if kind == "usage" and task.isdigit() and rest.rpartition(".")[2] in ("counts", "gate_sums", "tokens"):
                name, _, part = rest.rpartition(".")
                fields.setdefault(int(task), {}).setdefault(name, {})[part] = value
            elif kind == "keep" and task.isdigit() and rest:
                keep.setdefault(int(task), {})[rest] = torch.as_tensor(value, dtype=torch.bool).cpu()
            else:
                raise KeyError(f"pruning history: unexpected key {key!r}")
        usage: Dict[int, Dict[str, ExpertUsage]] = {}
        for task, per_site in fields.items():
            for name, parts in per_site.items():
                if set(parts) != {"counts", "gate_sums", "tokens"}:
                    raise KeyError(f"pruning history: usage of task {task} at {name!r} lacks "
                                   f"{sorted({'counts', 'gate_sums', 'tokens'} - set(parts))}")
                usage.setdefault(task, {})[name] = ExpertUsage(
                    parts["counts"].cpu().double(), parts["gate_sums"].cpu().double(), int(parts["tokens"]))
        if set(usage) != set(keep):
            raise ValueError(f"pruning history: tasks with usage {sorted(usage)} and with keep masks {sorted(keep)} "
                             "differ")
        self.usage, self.keep = usage, keep
