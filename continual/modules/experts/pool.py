"""Top-k routed experts stored in growable groups, and the one token dispatch every expert layer uses (ModuleFormer,
Shen et al. 2023, "ModuleFormer: Modularity Emerges from Mixture-of-Experts", arXiv 2306.04640).

Routing. Gate logits come from ``Linear(d, h) -> GELU -> Linear(h, E, bias=False)`` (``gate_hidden = h > 0``) or
from a single ``Linear(d, E, bias=False)`` (``gate_hidden = 0``); ``p = softmax(logits)`` over all experts, each
token keeps its top ``k`` experts with their probabilities as gates (NOT renormalised, no noise). With
``router_bias`` the router reads ``[x, 1]``, so the last entry of every router row is a bias.

Dispatch. The ``N * k`` (token, choice) assignments are sorted by expert so each expert's tokens are contiguous
(:class:`Dispatch`); every expert that received tokens multiplies its slice once (or a grouped matmul does all of a
group in one kernel), and the gated results are summed back per token with ``index_add``. The work is ``N * k`` rows
whatever the number of experts ``E``; only the gate's last layer grows with ``E``. :func:`feed_forward_experts` is
that dispatch for feed-forward experts ``y = sum_{e in topk(x)} p_e(x) W_out_e act(W_in_e x)`` (no biases), shared by
:class:`~continual.modules.experts.layer.ExpertLayer` and the ``experts`` bank kind. A batch whose samples each use
one group (task-conditioned routing of a batch mixing tasks) can instead be routed per sample
(:meth:`ExpertPool.route_own`) and run batched over its samples (:func:`own_group_experts`: each task's experts
gathered once, ``torch.bmm``), which costs less than a loop over the batch's many experts.

Growth. Experts live in **groups** (:class:`ExpertGroup`): group 0 holds the initial experts, every
:meth:`ExpertPool.add_experts` appends a group with its own stacked weights ``[n, d_in, d_out]`` per role, its own
router rows ``[n, h]`` and its own on/off flags, so one group can be frozen, switched off, saved or pruned on its own.
Group 0 also owns the parameters every expert shares (the gate's hidden layer; in attention, the key and value
projections). A switched-off expert is never selected and its router row is not even evaluated, so adding a group
switched off leaves every output bit-identical; :meth:`ExpertPool.prune` removes experts with their router rows.
A group may also hold router rows only (no role weights): experts whose output the caller computes itself, such as
the dense FFN that the ``experts`` bank kind upcycles. (The bank calls a task's group its *slot*; see
:func:`continual.modules.experts.kind.group_of_slot`.)
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from itertools import accumulate
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

# "loop": one matmul per expert that received tokens; "grouped": one torch grouped matmul per group (bf16 or fp16,
# widths divisible by 8, on a device of GROUPED_DEVICE_TYPES); "auto": grouped where supported, else loop (and, in
# the experts bank kind, a batch mixing tasks batched over its samples: own_group_experts).
DISPATCH_BACKENDS = ("auto", "loop", "grouped")
# Device types on which "grouped" runs torch's grouped matmul (and "auto" picks it). Recent torch also runs it on
# CPU, slower than the loop; the tests add "cpu" here to check the grouped path without a GPU.
GROUPED_DEVICE_TYPES: Tuple[str, ...] = ("cuda",)


# ---------------------------------------------------------------------------------------------------- routing math
@dataclass
class RouterOutput:
    """The routing of one forward pass over ``N`` tokens and ``E`` experts.

    A routing among some groups only (:meth:`ExpertPool.route_among`) has ``probs`` over those groups' experts: column
    ``c`` is expert ``columns[c]``; every other expert has probability 0 (the routing losses are the same either way).
    """

    probs: torch.Tensor  # [N, E] float32 softmax over all experts (or [N, C], see columns); exactly 0 for experts
    #                      switched off or masked out
    indices: torch.Tensor  # [N, k] chosen experts (global index over all groups), most probable first
    gates: torch.Tensor  # [N, k] float32 probabilities of the chosen experts (not renormalised)
    token_mask: Optional[torch.Tensor] = None  # [N] bool: tokens that count (not padding); None: all
    groups: Optional[Tuple[int, ...]] = None  # the groups routed among (ascending); None: all
    columns: Optional[torch.Tensor] = None  # [C] long: the global expert of each probs column; None: all E


@dataclass(frozen=True)
class GroupColumns:
    """The experts of some groups (ascending), as the columns of a routing among them (:meth:`ExpertPool.columns_of`)."""

    groups: Tuple[int, ...]
    columns: torch.Tensor  # [C] long: global expert index of each column, ascending
    column_group: torch.Tensor  # [C] long: the position in ``groups`` of each column's group
    enabled: torch.Tensor  # [C] bool: the column's expert is switched on


@dataclass
class ExpertUsage:
    """How often each expert was selected since the counters were last reset (tokens in ``token_mask`` only)."""

    counts: torch.Tensor  # [E] float64 number of tokens that selected the expert
    gate_sums: torch.Tensor  # [E] float64 sum of the expert's gates over those tokens
    tokens: int  # tokens counted

    @property
    def frequency(self) -> torch.Tensor:
        """``[E]`` share of counted tokens that selected each expert (sums to ``k``)."""
        return self.counts / max(self.tokens, 1)


def top_k_gating(
    logits: torch.Tensor, k: int, allowed: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax over experts, then keep the ``k`` most probable without renormalising.

    Args:
        logits: ``[N, E]`` gate logits.
        k: experts per token.
        allowed: ``[N, E]`` bool; false entries get probability 0 and are never chosen. Each row must allow at
            least ``k`` experts.

    Returns:
        ``(probs [N, E] float32, gates [N, k] float32, indices [N, k] long)``.
    """
    if allowed is not None:
        if bool((allowed.sum(-1) < k).any()):
            raise ValueError(f"expert_mask allows fewer than k={k} experts for some token(s)")
        logits = logits.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits.float(), dim=-1)
    gates, indices = probs.topk(k, dim=-1)
    return probs, gates, indices


def sort_by_expert(indices: torch.Tensor, n_experts: int) -> Tuple[torch.Tensor, List[int]]:
    """Order the ``N * k`` (token, choice) assignments so that each expert's are contiguous.

    Args:
        indices: ``[N, k]`` chosen expert of each token and choice.
        n_experts: ``E``.

    Returns:
        ``order [N * k]``: positions into ``indices.reshape(-1)`` sorted by expert (stable, so deterministic), and
        ``counts``: the number of assignments of each expert (a Python list of length ``E``; one device sync).
    """
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_experts).tolist()
    return order, counts


def grouped_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the "grouped" backend can multiply rows ``x [M, d_in]`` by a group's ``weight [n, d_in, d_out]``."""
    return (
        hasattr(F, "grouped_mm")
        and x.device.type in GROUPED_DEVICE_TYPES
        and x.dtype in (torch.bfloat16, torch.float16)
        and weight.dtype == x.dtype
        and x.shape[-1] % 8 == 0
        and weight.shape[-1] % 8 == 0
    )


def expert_matmul(
    x_sorted: torch.Tensor, weights: Sequence[torch.Tensor], counts: Sequence[int], backend: str = "auto"
) -> torch.Tensor:
    """Multiply each expert's contiguous rows by that expert's matrix.

    Args:
        x_sorted: ``[M, d_in]`` rows sorted by expert (``M == sum(counts)``).
        weights: one ``[n_g, d_in, d_out]`` tensor per group; experts are numbered through the groups in order.
        counts: rows of each expert, ``sum_g n_g`` entries.
        backend: "loop", "grouped" or "auto" (see :data:`DISPATCH_BACKENDS`).

    Returns:
        ``[M, d_out]``: row ``i`` times the matrix of the expert it belongs to.
    """
    if backend not in DISPATCH_BACKENDS:
        raise ValueError(f"dispatch backend must be one of {list(DISPATCH_BACKENDS)}, got {backend!r}")
    n_total = sum(w.shape[0] for w in weights)
    if len(counts) != n_total:
        raise ValueError(f"counts has {len(counts)} entries but the groups hold {n_total} experts")
    d_out = weights[0].shape[-1]
    outs: List[torch.Tensor] = []
    row = expert = 0
    for w in weights:
        group_counts = counts[expert : expert + w.shape[0]]
        expert += w.shape[0]
        total = sum(group_counts)
        if total == 0:
            continue
        xs = x_sorted[row : row + total]
        row += total
        grouped = backend == "grouped" or (backend == "auto" and grouped_supported(xs, w))
        if grouped:
            if not grouped_supported(xs, w):
                raise ValueError(
                    "dispatch='grouped' needs torch.nn.functional.grouped_mm, tensors in bf16/fp16 on "
                    f"{'/'.join(GROUPED_DEVICE_TYPES)} and widths divisible by 8; got {xs.device.type} {xs.dtype}, "
                    f"widths {xs.shape[-1]} -> {w.shape[-1]}"
                )
            offs = torch.tensor(list(accumulate(group_counts)), dtype=torch.int32, device=xs.device)
            outs.append(F.grouped_mm(xs, w, offs=offs))
            continue
        # unbind, not w[j]: its backward stacks all experts' gradients once instead of one full-size tensor each.
        for w_j, x_j in zip(w.unbind(0), xs.split(group_counts)):
            if x_j.shape[0]:
                outs.append(x_j @ w_j)
    if row != x_sorted.shape[0]:
        raise ValueError(f"counts sum to {row} rows but x_sorted has {x_sorted.shape[0]}")
    if not outs:
        return x_sorted.new_zeros(0, d_out)
    return outs[0] if len(outs) == 1 else torch.cat(outs)


@dataclass
class Dispatch:
    """A routing's (token, choice) assignments ordered by expert: gather the rows, multiply, scatter them back.

    ``order`` indexes ``indices.reshape(-1)``, whose row ``n * k + j`` is token ``n``'s ``j``-th choice.
    """

    order: torch.Tensor  # [M] assignments sorted by expert (stable), those of the first `skip` experts left out
    token_of: torch.Tensor  # [M] the token of each sorted assignment
    counts: List[int]  # assignments of each dispatched expert (E - skip entries)

    @classmethod
    def of(cls, indices: torch.Tensor, n_experts: int, skip: int = 0) -> "Dispatch":
        """Sort ``indices [N, k]`` (global expert numbers below ``n_experts``) by expert; with ``skip``, the
        assignments of experts ``0..skip-1`` (which sort first) are left out."""
        order, counts = sort_by_expert(indices, n_experts)
        if skip:
            order, counts = order[sum(counts[:skip]):], counts[skip:]
        return cls(order, torch.div(order, indices.shape[1], rounding_mode="floor"), counts)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, d]`` tokens -> ``[M, d]`` one row per sorted assignment."""
        return x.index_select(0, self.token_of)

    def combine(self, y_sorted: torch.Tensor, gates: torch.Tensor, n_tokens: int) -> torch.Tensor:
        """``[M, d]`` expert outputs and ``gates [N, k]`` -> ``[n_tokens, d]`` each token's gated sum."""
        y_sorted = y_sorted * gates.reshape(-1).index_select(0, self.order).to(y_sorted.dtype)[:, None]
        return y_sorted.new_zeros(n_tokens, y_sorted.shape[-1]).index_add(0, self.token_of, y_sorted)


# ---------------------------------------------------------------------------------------------------- storage
class ExpertGroup(nn.Module):
    """``n`` experts added together: one stacked weight per role, their router rows and their on/off flags.

    Args:
        n: experts in the group (0 is allowed: a placeholder that keeps group numbers aligned across layers).
        shapes: role -> ``(d_in, d_out)``; each role becomes a parameter ``[n, d_in, d_out]`` named after it. Empty:
            router rows only (experts whose output the caller computes).
        router_dim: width of a router row (the gate's hidden size, or the router input's width for a linear gate).
        init_std: role (and "router") -> standard deviation of the normal initialisation.
        enabled: whether the new experts can be selected.
    """

    def __init__(
        self,
        n: int,
        shapes: Mapping[str, Tuple[int, int]],
        router_dim: int,
        init_std: Mapping[str, float],
        enabled: bool = True,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        if n < 0:
            raise ValueError(f"an expert group needs n >= 0 experts, got {n}")
        self.roles = tuple(shapes)
        self.init_std = dict(init_std)
        for role, (d_in, d_out) in shapes.items():
            self.register_parameter(role, nn.Parameter(torch.empty(n, d_in, d_out, device=device, dtype=dtype)))
        self.router = nn.Parameter(torch.empty(n, router_dim, device=device, dtype=dtype))  # [n, h]
        self.register_buffer("enabled", torch.full((n,), bool(enabled), dtype=torch.bool, device=device))
        self.reset_parameters()

    @property
    def n(self) -> int:
        return self.router.shape[0]

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for name, param in self.named_parameters(recurse=False):
                nn.init.normal_(param, mean=0.0, std=self.init_std[name])

    def weight(self, role: str) -> torch.Tensor:
        """``[n, d_in, d_out]`` stacked weights of one role."""
        return getattr(self, role)

    def keep(self, mask: torch.Tensor) -> int:
        """Keep only the experts where ``mask [n]`` is true; returns the number of parameters removed."""
        before = sum(p.numel() for p in self.parameters(recurse=False))
        idx = mask.nonzero().flatten().to(self.router.device)
        for name, param in list(self.named_parameters(recurse=False)):
            kept = nn.Parameter(param.detach().index_select(0, idx).clone(), requires_grad=param.requires_grad)
            setattr(self, name, kept)
        self.enabled = self.enabled.index_select(0, idx)
        return before - sum(p.numel() for p in self.parameters(recurse=False))

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{r}={tuple(self.weight(r).shape)}" for r in self.roles)
        return f"n={self.n}, {shapes}, router={tuple(self.router.shape)}, enabled={int(self.enabled.sum())}"


class ExpertPool(nn.Module):
    """A top-k router over experts kept in groups, with growth, pruning, usage counters and the last routing.

    Subclasses add a ``forward`` that uses :meth:`route`, :class:`Dispatch` and :meth:`expert_matmul`
    (:class:`~continual.modules.experts.layer.ExpertLayer` for feed-forward experts, ModuleFormer's
    ``MixtureOfAttentionHeads`` for attention experts); the ``experts`` bank kind uses a plain pool.

    Args:
        d_model: width of the tokens the router reads.
        shapes: role -> ``(d_in, d_out)`` of every expert's matrices.
        n_experts: experts of group 0, or the size of every group (to rebuild a grown pool).
        k: experts per token (see :meth:`set_top_k` to change it).
        gate_hidden: hidden width of the MLP gate; 0 makes the gate one linear layer.
        dispatch: "auto", "loop" or "grouped" (see :data:`DISPATCH_BACKENDS`).
        init_std: role (and "router") -> initial standard deviation; roles default to ``1/sqrt(d_in)``, the router
            to 0.02.
        router_bias: the router reads ``[x, 1]``, so every router row ends with a bias (with the MLP gate, the
            gate's last hidden unit is made the constant ``gelu(1)``: zero weights, bias 1).
    """

    def __init__(
        self,
        d_model: int,
        shapes: Mapping[str, Tuple[int, int]],
        n_experts: Union[int, Sequence[int]],
        k: int,
        gate_hidden: int = 256,
        dispatch: str = "auto",
        init_std: Optional[Mapping[str, float]] = None,
        router_bias: bool = False,
    ):
        super().__init__()
        sizes = [n_experts] if isinstance(n_experts, int) else [int(n) for n in n_experts]
        if not sizes or sum(sizes) < 1 or any(n < 0 for n in sizes):
            raise ValueError(f"n_experts must be >= 1 (or group sizes >= 0 with a total >= 1), got {n_experts!r}")
        if not 1 <= k <= sum(sizes):
            raise ValueError(f"k must be in [1, {sum(sizes)}] (the number of experts), got {k}")
        if gate_hidden < 0:
            raise ValueError(f"gate_hidden must be >= 0 (0 = linear gate), got {gate_hidden}")
        if dispatch not in DISPATCH_BACKENDS:
            raise ValueError(f"dispatch must be one of {list(DISPATCH_BACKENDS)}, got {dispatch!r}")
        unknown = sorted(set(init_std or {}) - set(shapes) - {"router"})
        if unknown:
            raise ValueError(f"init_std: unknown role(s) {unknown}; roles are {sorted(shapes)} and 'router'")
        self.d_model, self.k, self.dispatch = d_model, k, dispatch
        # False: at least k experts stay switched on (see set_top_k).
        self.allow_fewer_enabled = False
        self.shapes = {role: (int(i), int(o)) for role, (i, o) in shapes.items()}
        self.init_std = {role: 1.0 / math.sqrt(i) for role, (i, _) in self.shapes.items()}
        self.init_std["router"] = 0.02
        self.init_std.update(init_std or {})
        router_in = d_model + 1 if router_bias else d_model
        # The gate's hidden layer is shared by all experts (owned by group 0); the rows of its last layer are per group.
        self.gate = nn.Sequential(nn.Linear(router_in, gate_hidden), nn.GELU()) if gate_hidden else None
        self.router_dim = gate_hidden or router_in
        self.groups = nn.ModuleList(ExpertGroup(n, self.shapes, self.router_dim, self.init_std) for n in sizes)
        self.router_bias = router_bias
        self.bias_feature = 1.0  # the value the last entry of every router row multiplies (router_bias only)
        if router_bias and self.gate is not None:
            with torch.no_grad():
                self.gate[0].weight[-1].zero_()
                self.gate[0].bias[-1] = 1.0
            self.bias_feature = float(F.gelu(torch.tensor(1.0)))
        # Opt-in usage counters (not saved with the model) and the last forward's routing (kept for the losses).
        self.record_usage = False
        # True: the gates are constants to autograd (TinT's stop-gradient approximation, continual.models.tint); the
        # forward values are unchanged.
        self.stop_gradient_mixing = False
        self._usage: Optional[ExpertUsage] = None
        self.last_routing: Optional[RouterOutput] = None
        self._offsets: Optional[List[int]] = None  # first global expert of every group, then E (see group_offsets)

    # ------------------------------------------------------------------ layout
    @property
    def n_experts(self) -> int:
        """``E``: experts over all groups."""
        return sum(g.n for g in self.groups)

    @property
    def n_groups(self) -> int:
        return len(self.groups)

    @property
    def group_sizes(self) -> List[int]:
        return [g.n for g in self.groups]

    def group_slice(self, group: int) -> slice:
        """The global expert indices of one group."""
        self._check_group(group)
        offsets = self.group_offsets()
        return slice(offsets[group], offsets[group + 1])

    def group_offsets(self) -> List[int]:
        """``[G + 1]``: the first global expert index of every group, then ``E``. Kept between calls (groups change
        size only through :meth:`add_experts`, :meth:`prune` and :meth:`replace_group`), so reading a few groups'
        experts costs nothing per stored group."""
        offsets = getattr(self, "_offsets", None)
        if offsets is None or len(offsets) != len(self.groups) + 1:
            self._offsets = offsets = [0, *accumulate(g.n for g in self.groups)]
        return offsets

    def columns_of(self, groups: Sequence[int]) -> GroupColumns:
        """Every expert of ``groups`` (ascending group indices), switched on or not: the columns of
        :meth:`route_among`. Work and memory grow with those groups' experts, not with the pool's."""
        groups = tuple(int(g) for g in groups)
        if any(b <= a for a, b in zip(groups, groups[1:])):
            raise ValueError(f"groups must be ascending and distinct, got {list(groups)}")
        for g in groups:
            self._check_group(g)
        offsets = self.group_offsets()
        columns = [e for g in groups for e in range(offsets[g], offsets[g + 1])]
        sizes = [offsets[g + 1] - offsets[g] for g in groups]
        device = self.groups[0].router.device
        column_group = torch.repeat_interleave(torch.arange(len(groups)), torch.tensor(sizes, dtype=torch.long))
        enabled = torch.cat([self.groups[g].enabled for g in groups]) if groups else torch.zeros(0, dtype=torch.bool)
        return GroupColumns(groups, torch.tensor(columns, dtype=torch.long).to(device), column_group.to(device),
                            enabled.to(device))

    def enabled_mask(self) -> torch.Tensor:
        """``[E]`` bool: experts that can be selected."""
        return torch.cat([g.enabled for g in self.groups])

    def group_expert_mask(self, groups: torch.Tensor) -> torch.Tensor:
        """Per-sample allowed groups -> per-sample allowed experts, the ``expert_mask`` of :meth:`route`.

        Task-conditioned routing through the pool's own gate: a sample's tokens choose their top-k among the experts
        of its allowed groups only (the others get probability 0), so no second router is needed.

        Args:
            groups: ``[B, G]`` bool, ``G`` = :attr:`n_groups`: the groups each sample may route to.

        Returns:
            ``[B, E]`` bool (switched-off experts stay unselectable whatever the mask says).
        """
        if groups.dim() != 2 or groups.shape[1] != self.n_groups:
            raise ValueError(f"allowed groups must have shape [B, {self.n_groups}], got {tuple(groups.shape)}")
        sizes = torch.tensor(self.group_sizes, device=groups.device)
        return groups.bool().repeat_interleave(sizes, dim=1)

    def set_top_k(self, k: int, allow_fewer_enabled: bool = False) -> None:
        """Route every token to its ``k`` most probable experts.

        Args:
            k: experts per token, >= 1.
            allow_fewer_enabled: False: at least ``k`` experts must be switched on now, and :meth:`set_enabled`
                refuses to leave fewer. True: fewer may be on (the pool may even hold fewer than ``k``) and
                :meth:`route` refuses to route then; for a caller that routes only tokens with ``k`` experts to
                choose from (the ``experts`` bank kind, whose other tokens get the dense FFN).
        """
        on = int(self.enabled_mask().sum())
        if k < 1 or (not allow_fewer_enabled and k > on):
            bound = "" if allow_fewer_enabled else f", at most the {on} experts switched on"
            raise ValueError(f"k must be >= 1{bound}; got {k}")
        self.k, self.allow_fewer_enabled = k, allow_fewer_enabled

    def set_enabled(self, experts: torch.Tensor, value: bool = True) -> None:
        """Switch experts on (or off): ``experts`` is an ``[E]`` bool mask or a tensor of global indices."""
        mask = self._as_mask(experts, "experts")
        if not value and not self.allow_fewer_enabled:
            if int((self.enabled_mask() & ~mask.to(self.groups[0].enabled.device)).sum()) < self.k:
                raise ValueError(f"switching these experts off would leave fewer than k={self.k} experts on")
        for g, group in enumerate(self.groups):
            sub = mask[self.group_slice(g)].to(group.enabled.device)
            group.enabled[sub] = bool(value)

    def set_group_enabled(self, group: int, value: bool = True) -> None:
        """Switch every expert of one group on (or off); see :meth:`set_enabled`."""
        if value:  # nothing to check: touch this group only, whatever the number of groups
            self._check_group(group)
            self.groups[group].enabled.fill_(True)
            return
        span = self.group_slice(group)
        self.set_enabled(torch.arange(span.start, span.stop), value)

    def add_experts(self, n: int, enabled: bool = True, router_bias: Optional[float] = None) -> int:
        """Append a group of ``n`` new experts (and their router rows); returns its group index.

        Args:
            n: experts to add (0 appends an empty group, which keeps group numbers aligned across layers).
            enabled: False adds them switched off: they are never selected (outputs stay bit-identical) until
                :meth:`set_enabled` turns them on.
            router_bias: with a ``router_bias`` pool, the logit each new expert's row adds (its bias; its other
                entries start at N(0, init_std["router"])).
        """
        if n < 0:
            raise ValueError(f"add_experts needs n >= 0, got {n}")
        if router_bias is not None and not self.router_bias:
            raise ValueError("router_bias needs a pool built with router_bias=True (router rows with a bias)")
        ref = self.groups[0].router
        group = ExpertGroup(n, self.shapes, self.router_dim, self.init_std, enabled, device=ref.device, dtype=ref.dtype)
        if router_bias is not None:
            with torch.no_grad():
                group.router[:, -1] = router_bias / self.bias_feature
        self.groups.append(group)
        self._offsets = None
        if self._usage is not None:
            self._usage = _pad_usage(self._usage, n)
        self.last_routing = None
        return len(self.groups) - 1

    def replace_group(self, index: int, group: ExpertGroup) -> None:
        """Put ``group`` in place of group ``index``, with as many experts, so every expert keeps its global index.

        The new group holds the pool's roles with the pool's shapes, or no roles at all (router rows only: experts
        whose output the caller computes; :meth:`expert_matmul` then skips that group by ``first_group``).
        """
        self._check_group(index)
        if group.n != self.groups[index].n:
            raise ValueError(f"group {index} holds {self.groups[index].n} experts; its replacement has {group.n}")
        if group.router.shape[1] != self.router_dim:
            raise ValueError(f"router rows must be {self.router_dim} wide, got {group.router.shape[1]}")
        if group.roles and {r: tuple(group.weight(r).shape[1:]) for r in group.roles} != self.shapes:
            raise ValueError(f"a group holds the roles {self.shapes} or none; got {list(group.roles)}")
        self.groups[index] = group
        self._offsets = None
        self.last_routing = None

    def prune(self, keep: torch.Tensor) -> int:
        """Remove the experts where ``keep [E]`` (bool) is false, with their router rows.

        Groups keep their numbers (a group may become empty). Parameters are replaced by smaller ones, so rebuild
        any optimizer afterwards. At least ``k`` switched-on experts must remain (whatever ``allow_fewer_enabled``).

        Returns:
            The number of parameters removed.
        """
        keep = self._as_mask(keep, "keep")
        if int((keep & self.enabled_mask().to(keep.device)).sum()) < self.k:
            raise ValueError(f"pruning must keep at least k={self.k} switched-on experts")
        slices = [self.group_slice(g) for g in range(len(self.groups))]  # before any group shrinks
        removed = sum(group.keep(keep[s]) for group, s in zip(self.groups, slices))
        self._offsets = None
        if self._usage is not None:
            idx = keep.nonzero().flatten().to(self._usage.counts.device)
            self._usage = ExpertUsage(
                self._usage.counts.index_select(0, idx), self._usage.gate_sums.index_select(0, idx), self._usage.tokens
            )
        self.last_routing = None
        return removed

    def shared_parameters(self) -> Dict[str, nn.Parameter]:
        """Parameters used by every expert (gate hidden layer, and whatever a subclass adds outside the groups)."""
        return {name: p for name, p in self.named_parameters() if not name.startswith("groups.")}

    def group_parameters(self, group: int) -> Dict[str, nn.Parameter]:
        """One group's parameters by name; group 0 also owns the shared ones (see :meth:`shared_parameters`)."""
        self._check_group(group)
        params = {f"groups.{group}.{n}": p for n, p in self.groups[group].named_parameters()}
        if group == 0:
            params.update(self.shared_parameters())
        return params

    def freeze_group(self, group: int) -> None:
        """Stop one group's parameters (and, for group 0, the shared ones) from training."""
        for param in self.group_parameters(group).values():
            param.requires_grad_(False)

    def parameters_per_expert(self) -> int:
        """Parameters one expert adds: its matrices of every role plus its router row."""
        return sum(i * o for i, o in self.shapes.values()) + self.router_dim

    # ------------------------------------------------------------------ routing
    def route(
        self,
        x: torch.Tensor,
        expert_mask: Optional[torch.Tensor] = None,
        token_mask: Optional[torch.Tensor] = None,
    ) -> RouterOutput:
        """Choose ``k`` experts per token; the result is also kept as :attr:`last_routing`.

        Args:
            x: ``[N, d_model]`` tokens.
            expert_mask: ``[N, E]`` bool, experts each token may use (false -> probability 0).
            token_mask: ``[N]`` bool, tokens that count for usage and losses (padding false).

        Returns:
            The :class:`RouterOutput`.
        """
        if x.dim() != 2 or x.shape[-1] != self.d_model:
            raise ValueError(f"route expects [N, {self.d_model}] tokens, got {tuple(x.shape)}")
        E = self.n_experts
        if self.router_bias:
            x = F.pad(x, (0, 1), value=1.0)  # [N, d_model + 1]: the constant feature of every row's bias
        h = self.gate(x) if self.gate is not None else x  # [N, router_dim]
        flags = self.enabled_mask().tolist()
        parts: List[torch.Tensor] = []
        columns: List[int] = []
        start = 0
        for group in self.groups:
            on = flags[start : start + group.n]
            if any(on):
                # Only switched-on rows are evaluated: adding or pruning switched-off experts changes nothing here.
                rows = group.router if all(on) else group.router[[i for i, f in enumerate(on) if f]]
                parts.append(F.linear(h, rows))
                columns.extend(start + i for i, f in enumerate(on) if f)
            start += group.n
        if len(columns) < self.k:
            raise ValueError(f"only {len(columns)} experts are switched on, fewer than k={self.k}")
        logits = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)  # [N, E_on]
        compact = len(columns) < E
        col = torch.tensor(columns, device=x.device) if compact else None
        allowed = None
        if expert_mask is not None:
            if expert_mask.shape != (x.shape[0], E):
                raise ValueError(f"expert_mask must have shape [{x.shape[0]}, {E}], got {tuple(expert_mask.shape)}")
            allowed = expert_mask.bool()
            allowed = allowed.index_select(1, col) if compact else allowed
        probs, gates, indices = top_k_gating(logits, self.k, allowed)
        if compact:
            indices = col[indices]
            probs = probs.new_zeros(x.shape[0], E).index_copy(1, col, probs)
        return self._routed(RouterOutput(probs=probs, indices=indices, gates=gates), token_mask)

    def route_among(
        self,
        x: torch.Tensor,
        among: GroupColumns,
        expert_mask: Optional[torch.Tensor] = None,
        token_mask: Optional[torch.Tensor] = None,
    ) -> RouterOutput:
        """Choose ``k`` experts per token among the experts of some groups only (task-conditioned routing of a batch
        that uses a few of many stored groups); kept as :attr:`last_routing` like :meth:`route`.

        Only those groups' router rows are evaluated, so the work grows with the experts of ``among``, not with the
        pool. Switched-off experts are never chosen.

        Args:
            x: ``[N, d_model]`` tokens.
            among: :meth:`columns_of` the groups to route among.
            expert_mask: ``[N, C]`` bool over ``among``'s columns (false -> probability 0).
            token_mask: ``[N]`` bool, tokens that count for usage and losses (padding false).

        Returns:
            A :class:`RouterOutput` with global ``indices`` and ``probs [N, C]`` over ``among.columns``.
        """
        if x.dim() != 2 or x.shape[-1] != self.d_model:
            raise ValueError(f"route expects [N, {self.d_model}] tokens, got {tuple(x.shape)}")
        C = among.columns.shape[0]
        if self.router_bias:
            x = F.pad(x, (0, 1), value=1.0)
        h = self.gate(x) if self.gate is not None else x  # [N, router_dim]
        rows = torch.cat([self.groups[g].router for g in among.groups])  # [C, router_dim]
        allowed = among.enabled[None, :].expand(x.shape[0], C)
        if expert_mask is not None:
            if expert_mask.shape != (x.shape[0], C):
                raise ValueError(f"expert_mask must have shape [{x.shape[0]}, {C}], got {tuple(expert_mask.shape)}")
            allowed = allowed & expert_mask.bool()
        probs, gates, local = top_k_gating(F.linear(h, rows), self.k, allowed)
        out = RouterOutput(probs=probs, indices=among.columns[local], gates=gates, groups=among.groups,
                           columns=among.columns)
        return self._routed(out, token_mask)

    def route_own(
        self,
        x: torch.Tensor,
        among: GroupColumns,
        sample_group: torch.Tensor,
        token_mask: Optional[torch.Tensor] = None,
    ) -> RouterOutput:
        """Route every token among the first group of ``among`` (shared by every sample) and its own sample's group
        only: :meth:`route_among` with each sample allowed one group besides the first, computed per sample.

        Each token's logits are those of its ``S + n`` candidate experts (its sample's router rows gathered, one
        batched matmul), not of every column of ``among``: a batch mixing many tasks pays for its tasks' router rows
        once, not once per token. The result is :meth:`route_among`'s with that mask (``probs`` over ``among``'s
        columns, exactly 0 outside each token's candidates).

        Args:
            x: ``[B * T, d_model]`` tokens, sample after sample (``T`` tokens each).
            among: :meth:`columns_of` the groups; every group after the first holds the same number ``n`` of experts.
            sample_group: ``[B]`` long, each sample's group as a position in ``among.groups`` (>= 1).
            token_mask: ``[B * T]`` bool, tokens that count for usage and losses.

        Returns:
            A :class:`RouterOutput` with global ``indices`` and ``probs [B * T, C]`` over ``among.columns``.
        """
        B = sample_group.shape[0]
        if x.dim() != 2 or x.shape[-1] != self.d_model or x.shape[0] % max(B, 1):
            raise ValueError(
                f"route_own expects [B * T, {self.d_model}] tokens for B={B} samples, got {tuple(x.shape)}"
            )
        T = x.shape[0] // B
        first, own = among.groups[0], among.groups[1:]
        S, n = self.groups[first].n, self.groups[own[0]].n
        if any(self.groups[g].n != n for g in own):
            sizes = [self.groups[g].n for g in own]
            raise ValueError(f"route_own needs groups of equal size after the first; got {sizes}")
        if self.router_bias:
            x = F.pad(x, (0, 1), value=1.0)
        h = self.gate(x) if self.gate is not None else x  # [N, router_dim]
        position = sample_group - 1  # [B] position among the groups after the first
        rows = torch.stack([self.groups[g].router for g in own]).index_select(0, position)  # [B, n, router_dim]
        own_logits = torch.bmm(h.view(B, T, -1), rows.transpose(1, 2)).reshape(B * T, n)
        logits = torch.cat([F.linear(h, self.groups[first].router), own_logits], dim=1)  # [N, S + n]
        on = torch.stack([self.groups[g].enabled for g in own]).index_select(0, position)  # [B, n]
        allowed = torch.cat([self.groups[first].enabled[None, :].expand(B, S), on], dim=1)  # [B, S + n]
        allowed = allowed.repeat_interleave(T, dim=0)  # [N, S + n]
        probs_local, gates, local = top_k_gating(logits, self.k, allowed)
        # Column of every candidate: the first group's S columns, then the sample's own n.
        own_first = (S + position * n).repeat_interleave(T)  # [N]
        candidate = torch.arange(S + n, device=x.device)
        column = torch.where(candidate[None, :] < S, candidate[None, :], own_first[:, None] + candidate[None, :] - S)
        C = among.columns.shape[0]
        probs = probs_local.new_zeros(x.shape[0], C).scatter(1, column, probs_local)
        out = RouterOutput(probs=probs, indices=among.columns[column.gather(1, local)], gates=gates,
                           groups=among.groups, columns=among.columns)
        return self._routed(out, token_mask)

    def _routed(self, out: RouterOutput, token_mask: Optional[torch.Tensor]) -> RouterOutput:
        """Finish a routing: attach the token mask, stop the gates' gradient if asked, count usage, keep it."""
        if token_mask is not None:
            token_mask = token_mask.reshape(-1).bool()
            if token_mask.shape[0] != out.indices.shape[0]:
                raise ValueError(f"token_mask has {token_mask.shape[0]} tokens but x has {out.indices.shape[0]}")
        out.token_mask = token_mask
        if self.stop_gradient_mixing:
            out.gates = out.gates.detach()
        if self.record_usage:
            self._record(out)
        self.last_routing = out
        return out

    def expert_matmul(
        self, role: str, x_sorted: torch.Tensor, counts: Sequence[int], first_group: int = 0,
        groups: Optional[Sequence[int]] = None,
    ) -> torch.Tensor:
        """``[M, d_in]`` rows sorted by expert -> ``[M, d_out]`` through the ``role`` matrices of the experts of
        groups ``first_group..`` (or of ``groups``, in that order); ``counts`` has one entry per expert of those
        groups."""
        chosen = list(self.groups)[first_group:] if groups is None else [self.groups[g] for g in groups]
        return expert_matmul(x_sorted, [g.weight(role) for g in chosen], counts, self.dispatch)

    # ------------------------------------------------------------------ usage
    def usage(self) -> ExpertUsage:
        """Selections per expert since the last :meth:`reset_usage` (zeros if nothing was recorded)."""
        if self._usage is None:
            self._usage = self._empty_usage()
        return ExpertUsage(self._usage.counts.clone(), self._usage.gate_sums.clone(), self._usage.tokens)

    def reset_usage(self) -> None:
        self._usage = None

    def _empty_usage(self) -> ExpertUsage:
        device = self.groups[0].router.device
        zeros = torch.zeros(self.n_experts, dtype=torch.float64, device=device)
        return ExpertUsage(zeros, zeros.clone(), 0)

    @torch.no_grad()
    def _record(self, out: RouterOutput) -> None:
        if self._usage is None or self._usage.counts.device != out.indices.device:
            self._usage = self._empty_usage() if self._usage is None else _to_device(self._usage, out.indices.device)
        indices, gates = out.indices, out.gates
        if out.token_mask is not None:
            indices, gates = indices[out.token_mask], gates[out.token_mask]
        flat = indices.reshape(-1)
        self._usage.counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.float64))
        self._usage.gate_sums.index_add_(0, flat, gates.reshape(-1).double())
        self._usage.tokens += int(indices.shape[0])

    # ------------------------------------------------------------------ helpers
    def _check_group(self, group: int) -> None:
        if not 0 <= group < len(self.groups):
            raise ValueError(f"group {group} does not exist (groups: {len(self.groups)})")

    def _as_mask(self, experts: torch.Tensor, name: str) -> torch.Tensor:
        experts = torch.as_tensor(experts)
        E = self.n_experts
        if experts.dtype == torch.bool:
            if experts.shape != (E,):
                raise ValueError(f"{name} must be a bool mask of shape [{E}], got {tuple(experts.shape)}")
            return experts.cpu()
        idx = experts.reshape(-1).long().cpu()
        if idx.numel() and (idx.min() < 0 or idx.max() >= E):
            raise ValueError(f"{name}: expert indices must be in [0, {E}), got {idx.tolist()}")
        mask = torch.zeros(E, dtype=torch.bool)
        mask[idx] = True
        return mask

    def extra_repr(self) -> str:
        gate = f"mlp({self.router_dim})" if self.gate is not None else "linear"
        return f"k={self.k}, experts={self.group_sizes}, gate={gate}, dispatch={self.dispatch}"


def _pad_usage(usage: ExpertUsage, n: int) -> ExpertUsage:
    pad = usage.counts.new_zeros(n)
    return ExpertUsage(torch.cat([usage.counts, pad]), torch.cat([usage.gate_sums, pad]), usage.tokens)


def _to_device(usage: ExpertUsage, device: torch.device) -> ExpertUsage:
    return ExpertUsage(usage.counts.to(device), usage.gate_sums.to(device), usage.tokens)


def expand_sample_mask(expert_mask: Optional[torch.Tensor], leading: Tuple[int, ...]) -> Optional[torch.Tensor]:
    """``[B, E]`` per-sample expert mask -> ``[N, E]`` per token for inputs of leading shape ``(B, ...)``."""
    if expert_mask is None:
        return None
    if expert_mask.dim() != 2 or expert_mask.shape[0] != leading[0]:
        raise ValueError(f"expert_mask must have shape [B={leading[0]}, E], got {tuple(expert_mask.shape)}")
    per_sample = math.prod(leading[1:])
    return expert_mask[:, None, :].expand(-1, per_sample, -1).reshape(-1, expert_mask.shape[-1])


# ---------------------------------------------------------------------------------------------------- FFN dispatch
# Tensors a mixed batch's expert weights are gathered into, kept between forwards per (device, dtype, inference
# mode, thread): on a CPU a fresh tensor of that size costs more in page faults than the copy itself (on CUDA the
# caching allocator would keep the block anyway). Used without autograd only; :func:`release_gather_buffers` frees
# them. Per thread, so that two threads serving mixed batches never write into one buffer.
_GATHER_BUFFERS: Dict[Tuple[torch.device, torch.dtype, bool, int], torch.Tensor] = {}


def release_gather_buffers() -> None:
    """Free the buffers :func:`own_group_experts` gathers weights into (they are rebuilt on the next mixed batch)."""
    _GATHER_BUFFERS.clear()


def _gather_buffer(numel: int, like: torch.Tensor) -> torch.Tensor:
    key = (like.device, like.dtype, torch.is_inference_mode_enabled(), threading.get_ident())
    buf = _GATHER_BUFFERS.get(key)
    if buf is None or buf.numel() < numel:
        _GATHER_BUFFERS.pop(key, None)
        buf = _GATHER_BUFFERS[key] = torch.empty(numel, device=like.device, dtype=like.dtype)
    return buf[:numel]


@dataclass(frozen=True)
class ChunkPlan:
    """Samples laid out in ``chunks`` of ``size`` samples each, every chunk holding samples of one group only (padded
    with zero rows): the layout of :func:`own_group_experts`."""

    size: int
    chunks: Tuple[int, ...]  # the group position each chunk serves, on the host
    position: torch.Tensor  # [B] long: each sample's row in the padded [len(chunks) * size] layout


# A copied weight element costs about this many multiply-adds (measured on a CPU: ~0.2 ns per fp32 element copied,
# ~0.006 ns per multiply-add of a batched matmul); chunk_plan weighs padding against copies with it.
COPY_COST = 32


def chunk_plan(sample_group: torch.Tensor, n_groups: int, tokens: int) -> ChunkPlan:
    """Lay ``B`` samples (``sample_group [B]``, a position below ``n_groups`` each) out in chunks of one group each,
    of the size that costs least: a chunk of ``size`` samples pads its group's count up to a multiple of ``size``
    (the experts then multiply zero rows) and copies its group's weights once (:data:`COPY_COST` multiply-adds per
    element against ``tokens`` per sample). A batch with as many samples of every task gets one chunk per task and no
    padding. One device-to-host copy (the counts)."""
    order, counts = sort_by_expert(sample_group[:, None], n_groups)  # samples by group, and each group's count
    used = [g for g, c in enumerate(counts) if c]
    largest = max(counts[g] for g in used)
    best: Optional[Tuple[int, int]] = None
    size = 1
    while True:
        cost = sum(-(-counts[g] // size) for g in used) * (size * tokens + COPY_COST)
        if best is None or cost < best[0]:
            best = (cost, size)
        if size >= largest:
            break
        size = min(2 * size, largest)
    size = best[1]
    per_group = [-(-counts[g] // size) for g in used]
    first_row = [0] * n_groups
    row = 0
    for g, m in zip(used, per_group):
        first_row[g] = row
        row += m * size
    device = sample_group.device
    starts = torch.tensor(list(accumulate([0] + counts[:-1])), dtype=torch.long, device=device)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.shape[0], device=device) - starts[sample_group[order]]
    position = torch.tensor(first_row, dtype=torch.long, device=device)[sample_group] + rank
    chunks = tuple(g for g, m in zip(used, per_group) for _ in range(m))
    return ChunkPlan(size, chunks, position)


def own_group_experts(
    pool: "ExpertPool",
    x: torch.Tensor,
    groups: Sequence[int],
    sample_group: torch.Tensor,
    gates: torch.Tensor,
    act: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Feed-forward experts of a batch whose samples each use one group's experts (task-conditioned routing of a batch
    mixing tasks), as batched matmuls over the samples instead of one matmul per expert.

    The samples are laid out in chunks of one group each (:func:`chunk_plan`), each chunk's weights are gathered
    once into one tensor, and every token goes through all ``n`` experts of its group, each output scaled by the
    token's gate of that expert (0 where the token did not choose it): the token dispatch's
    ``sum_e p_e W_out_e act(W_in_e x)``, with ``2 n`` calls of ``torch.bmm`` whatever the number of tasks. The work
    follows the groups in the batch, never the groups stored.

    Args:
        pool: experts with roles ``w_in [n, d, hidden]`` and ``w_out [n, hidden, d]``.
        x: ``[B, T, d]`` tokens.
        groups: the pool groups the samples use, all of ``n`` experts.
        sample_group: ``[B]`` long, each sample's position in ``groups``.
        gates: ``[B, T, n]`` each token's gate of each expert of its group (0: not chosen).
        act: the experts' activation.

    Returns:
        ``[B, T, d]``.
    """
    B, T, d = x.shape
    n = gates.shape[-1]
    plan = chunk_plan(sample_group, len(groups), T)
    chunk_groups = [pool.groups[groups[g]] for g in plan.chunks]
    V = len(chunk_groups)
    w_in = [g.weight("w_in") for g in chunk_groups]
    w_out = [g.weight("w_out") for g in chunk_groups]
    if torch.is_grad_enabled() and any(w.requires_grad for w in w_in + w_out):
        w_in, w_out = torch.stack(w_in), torch.stack(w_out)  # gradients reach the trainable group
    else:
        size_in, size_out = w_in[0].numel(), w_out[0].numel()
        buf = _gather_buffer(V * (size_in + size_out), w_in[0])
        w_in = torch.stack(w_in, out=buf[: V * size_in].view(V, *w_in[0].shape))
        w_out = torch.stack(w_out, out=buf[V * size_in:].view(V, *w_out[0].shape))
    rows = V * plan.size
    padded = x.new_zeros(rows, T, d).index_copy(0, plan.position, x).view(V, plan.size * T, d)
    gates = gates.to(x.dtype)
    gate = gates.new_zeros(rows, T, n).index_copy(0, plan.position, gates).view(V, plan.size * T, n)
    y: Optional[torch.Tensor] = None
    for j in range(n):
        hidden = act(torch.bmm(padded, w_in[:, j])) * gate[..., j : j + 1]
        out = torch.bmm(hidden, w_out[:, j])
        y = out if y is None else y + out
    return y.view(rows, T, d).index_select(0, plan.position)


def feed_forward_experts(
    pool: ExpertPool,
    x: torch.Tensor,
    routing: RouterOutput,
    act: Callable[[torch.Tensor], torch.Tensor],
    first_group: int = 0,
) -> torch.Tensor:
    """Every token's gated sum over its chosen feed-forward experts: ``sum_e p_e W_out_e act(W_in_e x)``.

    The one token dispatch of feed-forward experts (the native layer and the ``experts`` bank kind both call it).

    Args:
        pool: experts with roles ``w_in [d, hidden]`` and ``w_out [hidden, d]`` in groups ``first_group..``.
        x: ``[N, d]`` tokens (the experts' input; the router may have read something else).
        routing: the pool's routing of those ``N`` tokens.
        act: the experts' activation.
        first_group: groups before it are left out: their experts' assignments add nothing (their output is the
            caller's, e.g. the dense FFN of an upcycled layer).

    Returns:
        ``[N, d]``; zeros for a token none of whose chosen experts is dispatched.
    """
    if routing.groups is None:
        groups = list(range(first_group, pool.n_groups))
        plan = Dispatch.of(routing.indices, pool.n_experts, skip=pool.group_offsets()[first_group])
    else:  # a routing among some groups: dispatch over their experts only (its columns)
        offsets = pool.group_offsets()
        sizes = [offsets[g + 1] - offsets[g] for g in routing.groups]
        local = torch.searchsorted(routing.columns, routing.indices)  # column of each choice
        skip = sum(n for g, n in zip(routing.groups, sizes) if g < first_group)
        plan = Dispatch.of(local, sum(sizes), skip=skip)
        groups = [g for g in routing.groups if g >= first_group]
    if plan.order.numel() == 0:
        return x.new_zeros(x.shape)
    h = act(pool.expert_matmul("w_in", plan.gather(x), plan.counts, groups=groups))
    y_sorted = pool.expert_matmul("w_out", h, plan.counts, groups=groups)
    return plan.combine(y_sorted, routing.gates, x.shape[0])
