"""Pruning the experts that deployed tasks do not use (ModuleFormer, Shen et al. 2023, "ModuleFormer: Modularity
Emerges from Mixture-of-Experts", arXiv 2306.04640: experts a task does not choose can be removed).

:func:`recording_usage` counts each expert's selections per task, :func:`prune_plan` (pure) keeps the experts used by
at least ``threshold`` of a deployed task's tokens, :func:`prune_unused` applies it. Removing an expert that is
switched on but never chosen keeps every choice but scales each gate by ``1 / (1 - p_removed)`` (the softmax loses
its share); removing one that a sample cannot use (switched off, or another task's under task-conditioned routing)
changes nothing for that sample.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Mapping

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
    """What :func:`prune_unused` removed."""

    parameters_removed: int
    experts_removed: Dict[str, List[int]] = field(default_factory=dict)  # site -> expert indices before pruning
    experts_kept: Dict[str, int] = field(default_factory=dict)  # site -> experts left (shared included)


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
        usage: deployed task index -> site -> usage measured on that task's data (:func:`recording_usage`).
        threshold: minimum share of a task's tokens.
        protect_deployed: each deployed task's slot keeps at least ``k - S`` experts (its most used), so that
            task-conditioned routing still has ``k`` to choose from.
    """
    result = PruneResult(0)
    deployed = sorted(usage)
    for name, delta in deltas.items():
        frequency = torch.stack([usage[t][name].frequency.float().cpu() for t in deployed]) if deployed else (
            torch.zeros(0, delta.pool.n_experts)
        )
        minimum = max(delta.k - delta.n_shared, 0) if protect_deployed else 0
        protect = {t: minimum for t in deployed if t < delta.n_slots}
        keep = prune_plan(frequency, delta.expert_slots(), threshold, protect)
        result.experts_removed[name] = (~keep).nonzero().flatten().tolist()
        result.parameters_removed += delta.prune(keep) if not bool(keep.all()) else 0
        result.experts_kept[name] = delta.pool.n_experts
    return result
