"""Routed experts, the building block of ModuleFormer (Shen et al. 2023, "ModuleFormer: Modularity Emerges from
Mixture-of-Experts", arXiv 2306.04640) and of the ``experts`` bank kind (sparse upcycling, Komatsuzaki et al. 2023).

- :mod:`~continual.modules.experts.pool`: experts in growable groups with a top-k router (:class:`ExpertPool`), the
  routing math, usage counters and the one token dispatch (:class:`Dispatch`, :func:`expert_matmul`,
  :func:`feed_forward_experts`);
- :mod:`~continual.modules.experts.layer`: feed-forward experts (:class:`ExpertLayer`, ModuleFormer's FFN);
- :mod:`~continual.modules.experts.losses`: the routing losses (mutual information, load concentration);
- :mod:`~continual.modules.experts.options`: the options of an upcycled expert site, validated in one place;
- :mod:`~continual.modules.experts.upcycling`: a dense FFN as one module and as the shared expert(s);
- :mod:`~continual.modules.experts.kind`: the ``experts`` bank kind (:class:`ExpertsDelta`; importing this package
  registers it), the slot/group mapping, :func:`upcycle`;
- :mod:`~continual.modules.experts.pruning`: usage per task and pruning of unused experts (once, or after every task
  of a stream with its history).

Nothing here imports Hugging Face model code (``transformers`` only for GPT-2's ``Conv1D``, when present).
"""

from continual.modules.experts.layer import ACTIVATIONS, Activation, ExpertLayer
from continual.modules.experts.losses import (
    load_concentration_loss,
    mean_routing_losses,
    mutual_information_loss,
    routing_entropies,
)
from continual.modules.experts.options import GATES, UPCYCLING, ExpertOptions
from continual.modules.experts.pool import (
    DISPATCH_BACKENDS,
    Dispatch,
    ExpertGroup,
    ExpertPool,
    ExpertUsage,
    RouterOutput,
    expand_sample_mask,
    expert_matmul,
    feed_forward_experts,
    own_group_experts,
    release_gather_buffers,
    sort_by_expert,
    top_k_gating,
)
from continual.modules.experts.upcycling import FUSERS, FeedForward, fuse_feed_forward, shared_change, shared_gates
from continual.modules.experts.kind import (
    SHARED_GROUP,
    ExpertsDelta,
    TokenMaskFeed,
    expert_deltas,
    group_of_slot,
    routing_losses,
    set_slot_enabled,
    slot_of_group,
    upcycle,
)
from continual.modules.experts.pruning import (
    PruneResult,
    PruningHistory,
    carry_usage,
    prune_experts,
    prune_plan,
    prune_unused,
    recording_usage,
)

__all__ = [
    "ACTIVATIONS",
    "DISPATCH_BACKENDS",
    "FUSERS",
    "GATES",
    "SHARED_GROUP",
    "UPCYCLING",
    "Activation",
    "Dispatch",
    "ExpertGroup",
    "ExpertLayer",
    "ExpertOptions",
    "ExpertPool",
    "ExpertUsage",
    "ExpertsDelta",
    "FeedForward",
    "PruneResult",
    "PruningHistory",
    "RouterOutput",
    "TokenMaskFeed",
    "carry_usage",
    "expand_sample_mask",
    "expert_deltas",
    "expert_matmul",
    "feed_forward_experts",
    "own_group_experts",
    "release_gather_buffers",
    "fuse_feed_forward",
    "group_of_slot",
    "load_concentration_loss",
    "mean_routing_losses",
    "mutual_information_loss",
    "prune_experts",
    "prune_plan",
    "prune_unused",
    "recording_usage",
    "routing_entropies",
    "routing_losses",
    "set_slot_enabled",
    "shared_change",
    "shared_gates",
    "slot_of_group",
    "sort_by_expert",
    "top_k_gating",
    "upcycle",
]
