"""Experts as module-bank modules: a dense feed-forward block upcycled into a routed expert layer that grows by a
slot of experts per task.

Papers: ModuleFormer (Shen et al. 2023, "ModuleFormer: Modularity Emerges from Mixture-of-Experts", arXiv
2306.04640) for the router (top-k, gates not renormalised) and per-task expert expansion with the load-concentration
loss; sparse upcycling (Komatsuzaki et al. 2023, "Sparse Upcycling: Training Mixture-of-Experts from Dense
Checkpoints", ICLR) for turning the dense FFN into an expert; MoEfication (Zhang et al. 2022, Findings of ACL) for
splitting it into equal slices of its hidden units (:mod:`continual.modules.experts.upcycling`).

**One abstraction.** The FFN of a block becomes one bank site (:class:`~continual.modules.experts.upcycling.FeedForward`,
made by :func:`~continual.modules.experts.upcycling.fuse_feed_forward`); the kind at that site (:class:`ExpertsDelta`)
owns an :class:`~continual.modules.experts.pool.ExpertPool` whose router reads ``[x, 1]`` (every router row ends with
a bias). **Slots and groups**: the bank calls one task's modules a *slot*, the pool calls a set of experts added
together a *group*; here group 0 (:data:`SHARED_GROUP`) holds the ``S`` *shared* experts made from the frozen dense
FFN (router rows only, zeros: logit 0; their output is the FFN's) and task slot ``t`` is group ``t + 1``
(:func:`group_of_slot`, :func:`slot_of_group`: the one place this mapping is written), holding ``n`` experts
``W_out act(W_in x)`` (no biases). For every token ``x``::

    y(x) = sum over the top-k experts e of p_e(x) f_e(x),    p = softmax over the experts x may use

**Which experts a sample may use** is read from the bank's per-sample slot weights (the forward's
:class:`~continual.modules.deltas.stacking.SlotSelection`): the shared ones plus the switched-on experts of every slot
whose weight is non-zero. The bank's ``simultaneous`` composition allows every slot (token-level routing over all
experts, no task id needed); ``isolated`` allows the sample's own task only (task-conditioned routing: the batch's
tokens route among the shared experts and the experts of the batch's own slots only, so a batch costs what its own
tasks need however many are stored; :meth:`~continual.modules.experts.pool.ExpertPool.route_among`, and for a batch
mixing tasks :meth:`~continual.modules.experts.pool.ExpertPool.route_own`, which scores each token against the shared
experts and its own task's router rows only); ``sequential``
allows tasks up to its own.

**Exactness.** The site computes ``h = FFN(x)`` and adds ``y - h``:

- a sample that may use no task expert (before any slot is switched on; under task-conditioned routing, a task
  without experts) gets ``y - h = 0`` exactly: the layer *is* the dense FFN. This is what makes upcycling exact at
  conversion, for "copy" and "slices" alike and whatever ``k``;
- a new slot's experts are added switched off (their router rows act as ``-inf`` and are not even evaluated), so
  allocating a task changes no output bit; the strategy switches them on when the task starts. They start with
  ``W_out = 0``, so switching on changes outputs only through the shared experts' gates dropping below 1, by little
  with the default ``start_logit = -4`` (the FFN keeps about 96% of each token's probability with n = 2);
- copy: ``y - h = (g_0 - 1) h + task experts``, ``g_0`` the gate of the FFN (0 when not chosen): no second FFN pass;
- slices: ``y - h = W_down (a * (S g_unit - 1)) + b_down (sum_s g_s - 1) + task experts`` (one more pass through the
  FFN's hidden layer); the routed slices equal the FFN exactly when every slice is chosen with gate ``1/S``, i.e.
  ``k >= S``, no probability on task experts, and uniform shared router rows — they are zeros and stay frozen (with
  ``S`` a power of two, ``S * (1/S) == 1`` in floating point). Equal slice rows tie, so take ``k = S + 1``: every
  slice is chosen, plus one task expert. (GPT-2 in training mode: ``h`` carries the FFN's output dropout, the slice
  term does not.)

The task experts are dispatched by :func:`~continual.modules.experts.pool.feed_forward_experts`, the same function as
ModuleFormer's feed-forward layer, over the slot groups only; a batch mixing tasks under task-conditioned routing
runs batched over its samples instead (:func:`~continual.modules.experts.pool.own_group_experts`, the same sum; the
``dispatch`` option ``loop`` keeps the token dispatch). Usage counting and pruning:
:mod:`continual.modules.experts.pruning`.
"""

from __future__ import annotations

from dataclasses import fields
from typing import ClassVar, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from continual.modules.families import default_targets
from continual.modules.bank import ModuleBank
from continual.modules.deltas.registry import register_delta
from continual.modules.deltas.stacking import SlotSelection
from continual.modules.experts.layer import ACTIVATIONS
from continual.modules.experts.losses import mean_routing_losses
from continual.modules.experts.options import ExpertOptions
from continual.modules.experts.pool import (
    ExpertGroup,
    ExpertPool,
    GroupColumns,
    RouterOutput,
    expand_sample_mask,
    feed_forward_experts,
    own_group_experts,
)
from continual.modules.experts.upcycling import FeedForward, fuse_feed_forward, shared_change, shared_gates

# The pool group of the shared experts (the dense FFN); task slots follow it.
SHARED_GROUP = 0


def group_of_slot(slot: int) -> int:
    """The pool group holding task slot ``slot``'s experts: ``slot + 1`` (group 0 is :data:`SHARED_GROUP`).

    Works on ints and on tensors of slots alike.
    """
    return slot + 1


def slot_of_group(group: int) -> int:
    """Inverse of :func:`group_of_slot`: the task slot of pool group ``group`` (-1 for :data:`SHARED_GROUP`)."""
    return group - 1


# ---------------------------------------------------------------------------------------------------- the kind
@register_delta
class ExpertsDelta(nn.Module):
    """Routed experts at one fused FFN: the shared experts made from it, and ``n`` new experts per task slot.

    Built by the bank from the :class:`~continual.modules.experts.upcycling.FeedForward` it wraps (``from_base``).
    See the module docstring for the layer, the routing masks and why conversion is exact.

    Args:
        ffn: the fused dense FFN (the site's frozen base).
        **options: :class:`~continual.modules.experts.options.ExpertOptions` (``n``, ``k``, ``expert_hidden``,
            ``gate``, ``gate_hidden``, ``upcycle``, ``slices``, ``activation``, ``start_logit``, ``dispatch``), with
            its defaults; ``slices`` must also divide the FFN's hidden width.
    """

    kind: ClassVar[str] = "experts"
    wraps: ClassVar[str] = "module"
    options: ClassVar[Tuple[str, ...]] = tuple(f.name for f in fields(ExpertOptions))
    default_targets: ClassVar[Dict[str, str]] = default_targets("ffn")
    mergeable: ClassVar[bool] = False

    def __init__(self, ffn: FeedForward, **options):
        super().__init__()
        opts = ExpertOptions(**options).check()
        if opts.upcycle == "slices" and ffn.d_ff % opts.slices:
            raise ValueError(f"experts: slices must be >= 2 and divide the FFN width {ffn.d_ff}, got {opts.slices}")
        d = ffn.d_model
        self.in_features = self.out_features = d
        self.n, self.n_shared, self.upcycle, self.activation = opts.n, opts.shared, opts.upcycle, opts.activation
        self.hidden = opts.expert_hidden or max(1, d // 4)
        self._ffn = [ffn]  # a plain list: read, not owned (the site holds it as its base)
        self.start_logit = opts.start_logit
        # New experts start at W_out = 0 (they output nothing until trained).
        pool = ExpertPool(
            d, {"w_in": (d, self.hidden), "w_out": (self.hidden, d)}, opts.shared, min(opts.k, opts.shared),
            gate_hidden=opts.gate_hidden if opts.gate == "mlp" else 0, dispatch=opts.dispatch,
            init_std={"w_out": 0.0}, router_bias=True,
        )
        # The shared experts hold router rows only (their output is the FFN's), zeros: logit 0, uniform over slices.
        pool.replace_group(SHARED_GROUP, ExpertGroup(opts.shared, {}, pool.router_dim, {"router": 0.0}))
        # k may exceed S: routing only runs where task experts are available (see forward).
        pool.set_top_k(opts.k, allow_fewer_enabled=True)
        pool.freeze_group(SHARED_GROUP)
        self.pool = pool
        self.token_mask: Optional[torch.Tensor] = None  # [B, T] attention mask of the current forward (TokenMaskFeed)
        self.last_routing: Optional[RouterOutput] = None  # the last forward's routing, None if nothing routed

    @classmethod
    def from_base(cls, base: nn.Module, **options) -> "ExpertsDelta":
        if not isinstance(base, FeedForward):
            raise TypeError(
                f"experts: {type(base).__name__} is not a fused feed-forward block; run "
                "continual.modules.experts.fuse_feed_forward(model) first (upcycle(...) does both)"
            )
        return cls(base, **options)

    # ------------------------------------------------------------------ slots
    @property
    def k(self) -> int:
        return self.pool.k

    @property
    def n_slots(self) -> int:
        return self.pool.n_groups - group_of_slot(0)

    def add_slot(self, device: torch.device, dtype: torch.dtype) -> None:
        """Append the next task's ``n`` experts and router rows, switched off (no output changes).

        They are created where the pool lives, which is where the site's weights live (``device``, ``dtype``).
        """
        self.pool.add_experts(self.n, enabled=False, router_bias=self.start_logit)

    def slot_parameters(self, slot: int) -> Dict[str, nn.Parameter]:
        """``{"w_in": [n, d, hidden], "w_out": [n, hidden, d], "router": [n, h]}`` of one slot."""
        return dict(self.pool.groups[self._group(slot)].named_parameters())

    def freeze_slot(self, slot: int) -> None:
        self.pool.freeze_group(self._group(slot))

    def set_slot_enabled(self, slot: int, on: bool = True) -> None:
        """Switch one task's experts on (selectable) or off (router rows at -inf, never evaluated)."""
        self.pool.set_group_enabled(self._group(slot), on)
        self.last_routing = None

    def _group(self, slot: int) -> int:
        if not 0 <= slot < self.n_slots:
            raise ValueError(f"experts: slot {slot} does not exist (slots: {self.n_slots})")
        return group_of_slot(slot)

    def expert_slots(self) -> torch.Tensor:
        """``[E]`` long: the task slot of every expert, -1 for the shared ones."""
        sizes = torch.tensor(self.pool.group_sizes)
        return slot_of_group(torch.repeat_interleave(torch.arange(len(sizes)), sizes))

    @staticmethod
    def slot_parameter_count(in_features: int, out_features: int, **options) -> int:
        """``n`` experts of ``W_in [d, hidden]``, ``W_out [hidden, d]`` and one router row each (``d + 1`` wide with
        the linear gate: the bias)."""
        opts = ExpertOptions(**options)
        hidden = opts.expert_hidden or max(1, in_features // 4)
        router = opts.gate_hidden if opts.gate == "mlp" else in_features + 1
        return opts.n * (2 * in_features * hidden + router)

    def weight_delta(self, weights: torch.Tensor):
        raise ValueError("experts are routed per token and cannot be merged into the FFN's weights")

    # ------------------------------------------------------------------ pruning
    def prune(self, keep: torch.Tensor) -> int:
        """Remove the task experts where ``keep [E]`` is false (with their router rows); returns parameters removed.

        Slots keep their numbers (a slot may become empty). Rebuild any optimizer afterwards.
        """
        keep = torch.as_tensor(keep, dtype=torch.bool).cpu()
        if keep.shape != (self.pool.n_experts,):
            raise ValueError(f"experts: keep must be a bool mask of shape [{self.pool.n_experts}], got {tuple(keep.shape)}")
        if not bool(keep[: self.n_shared].all()):
            raise ValueError("experts: the shared experts are the dense FFN and cannot be pruned")
        self.last_routing = None
        return self.pool.prune(keep)

    # ------------------------------------------------------------------ forward
    def allowed_experts(self, weights: torch.Tensor) -> torch.Tensor:
        """``[B, K]`` slot weights -> ``[B, E]`` bool: the shared experts and the switched-on experts of every slot
        with a non-zero weight."""
        sizes = torch.tensor(self.pool.group_sizes[group_of_slot(0):], device=weights.device)
        shared = torch.ones(weights.shape[0], self.n_shared, dtype=torch.bool, device=weights.device)
        per_slot = (weights != 0).repeat_interleave(sizes, dim=1)  # [B, E - S]
        return torch.cat([shared, per_slot], dim=1) & self.pool.enabled_mask().to(weights.device)[None, :]

    def forward(self, x: torch.Tensor, h: torch.Tensor, selection: SlotSelection) -> torch.Tensor:
        """The change routing makes to the dense FFN's output.

        Task-conditioned (exclusive) routing routes every token among the shared experts and its own task's only,
        so only the batch's slots are read: their router rows, their experts (:meth:`ExpertPool.route_among`, or
        :meth:`ExpertPool.route_own` for a batch mixing tasks, which scores each token against its own task's router
        rows only), never the other stored slots'. Any other composition lets a token use every allowed slot's
        experts (token-level routing over the whole pool).

        Args:
            x: ``[B, T, d]`` (or ``[B, d]``) input of the FFN.
            h: same shape, the FFN's output.
            selection: the slots the batch uses and each sample's weights (which tasks' experts it may use).

        Returns:
            ``[B, T, d]``, or a zero scalar when no sample may use a task expert (the dense FFN exactly).
        """
        self.last_routing = None
        S = self.n_shared
        if selection.exclusive:
            if not selection.ids:
                return h.new_zeros(())
            among = self.pool.columns_of([SHARED_GROUP] + [group_of_slot(k) for k in selection.ids])
            own = selection.weights != 0  # [B, U]: at most one slot per sample
            groups = torch.cat([own.new_ones(own.shape[0], 1), own], dim=1)  # [B, 1 + U]: the shared ones and its own
            allowed = groups[:, among.column_group] & among.enabled[None, :]  # [B, C]
        else:
            among = None
            allowed = self.allowed_experts(selection.every)  # [B, E]
        routed = allowed[:, S:].any(dim=1) & (allowed.sum(dim=1) >= self.k)  # [B]
        n_routed = int(routed.sum())
        if not n_routed:
            return h.new_zeros(())
        rows = None if n_routed == routed.shape[0] else routed.nonzero().flatten()
        token_mask = self._token_mask(x)
        if rows is not None:
            x, h, allowed = x[rows], h[rows], allowed[rows]
            token_mask = None if token_mask is None else token_mask[rows]
        flat, h_flat = x.reshape(-1, x.shape[-1]), h.reshape(-1, h.shape[-1])
        own_routing = among is not None and self._routes_own(among)
        if own_routing:  # a batch mixing tasks: each token's own router rows
            sample_group = (own if rows is None else own[rows]).long().argmax(dim=1) + 1  # [B]: in among.groups
            routing = self.pool.route_own(flat, among, sample_group, token_mask)
        elif among is not None:
            expert_mask = expand_sample_mask(allowed, tuple(x.shape[:-1]))
            routing = self.pool.route_among(flat, among, expert_mask, token_mask)  # the router reads [x, 1]
        else:
            masked = not bool((allowed == self.pool.enabled_mask().to(allowed.device)[None, :]).all())
            expert_mask = expand_sample_mask(allowed, tuple(x.shape[:-1])) if masked else None
            routing = self.pool.route(flat, expert_mask, token_mask)
        act = ACTIVATIONS[self.activation]
        if own_routing and x.dim() == 3 and self.pool.dispatch == "auto":
            change = self._own_experts(x, among, sample_group, routing, act)  # batched over the samples
        else:
            change = feed_forward_experts(self.pool, flat, routing, act, first_group=group_of_slot(0))  # task experts
        change = change + shared_change(self._ffn[0], flat, h_flat, shared_gates(routing.indices, routing.gates, S))
        self.last_routing = routing
        change = change.reshape(h.shape)
        if rows is None:
            return change
        return change.new_zeros((routed.shape[0],) + tuple(change.shape[1:])).index_copy(0, rows, change)

    def _routes_own(self, among: GroupColumns) -> bool:
        """Whether a task-conditioned batch is routed per sample (:meth:`ExpertPool.route_own`: each token scores the
        shared experts and its own task's only): when it mixes at least two tasks whose groups all hold ``n`` experts
        (none pruned). Otherwise :meth:`ExpertPool.route_among` masks the batch's columns (the same routing)."""
        task_groups = among.groups[1:]  # after the shared group
        return len(task_groups) >= 2 and all(self.pool.groups[g].n == self.n for g in task_groups)

    def _own_experts(
        self, x: torch.Tensor, among: GroupColumns, sample_group: torch.Tensor, routing: RouterOutput, act
    ) -> torch.Tensor:
        """``[B * T, d]`` the task experts' output for a batch mixing tasks (:func:`own_group_experts`): each token's
        gates of its own task's ``n`` experts read off the routing, then every sample through its task's experts."""
        B, T, _ = x.shape
        n = self.n
        own_first = (self.n_shared + (sample_group - 1) * n).repeat_interleave(T)  # [N] column of each token's first
        rel = torch.searchsorted(among.columns, routing.indices) - own_first[:, None]  # [N, k]
        inside = (rel >= 0) & (rel < n)  # the choices among the token's own experts (the rest are shared)
        gates = routing.gates.new_zeros(B * T, n).scatter_add(1, rel.clamp(0, n - 1), routing.gates * inside)
        y = own_group_experts(self.pool, x, among.groups[1:], sample_group - 1, gates.view(B, T, n), act)
        return y.reshape(B * T, -1)

    def _token_mask(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """``[B, T]`` bool tokens that count for usage and losses (the last ``T`` columns of the attention mask)."""
        mask = self.token_mask
        if mask is None or x.dim() != 3 or mask.dim() != 2 or mask.shape[0] != x.shape[0] or mask.shape[1] < x.shape[1]:
            return None
        return mask[:, mask.shape[1] - x.shape[1]:].bool()

    def extra_repr(self) -> str:
        return (f"upcycle={self.upcycle}, shared={self.n_shared}, n={self.n}, k={self.k}, hidden={self.hidden}, "
                f"activation={self.activation}, slots={self.n_slots}")


# ---------------------------------------------------------------------------------------------------- wiring
class TokenMaskFeed:
    """Hands each backbone forward's attention mask ``[B, T]`` to the expert sites (padding is not counted in
    usage or in the routing losses), and clears it afterwards.

    Registered by :func:`upcycle` as a forward pre-hook and a forward hook of the backbone.
    """

    def __init__(self, deltas: Sequence[ExpertsDelta]):
        self.deltas = list(deltas)

    def before(self, module: nn.Module, args: tuple, kwargs: dict):
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1:
            mask = args[1]
        for delta in self.deltas:
            delta.token_mask = mask if torch.is_tensor(mask) and mask.dim() == 2 else None
        return None

    def after(self, module: nn.Module, args: tuple, output):
        for delta in self.deltas:
            delta.token_mask = None
        return None


def expert_deltas(bank: ModuleBank) -> Dict[str, ExpertsDelta]:
    """Site name -> the :class:`ExpertsDelta` at that site, in model order."""
    return {name: site.delta for name, site in bank.sites().items() if isinstance(site.delta, ExpertsDelta)}


def set_slot_enabled(bank: ModuleBank, slot: int, on: bool = True) -> None:
    """Switch one task slot's experts on (or off) at every expert site of ``bank``."""
    for delta in expert_deltas(bank).values():
        delta.set_slot_enabled(slot, on)


def routing_losses(deltas: Iterable[ExpertsDelta]) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """The routing losses of the forward just run, each averaged over the expert sites that routed tokens.

    Returns:
        ``(mutual-information loss H(e|x) - H(e), load concentration loss H(e))``, two scalars over real tokens
        (:mod:`continual.modules.experts.losses`); None when no site routed (no task's experts switched on).
    """
    routings = [delta.last_routing for delta in deltas if delta.last_routing is not None]
    return mean_routing_losses(routings) if routings else None


def upcycle(backbone: nn.Module, bank: ModuleBank, targets: Optional[Sequence[str]] = None, **options) -> List[str]:
    """Fuse the backbone's FFNs, put an ``experts`` site at each targeted one, and feed them the attention mask.

    Outputs are unchanged (bit for bit) until a task's experts are switched on.

    Args:
        backbone: a Hugging Face BERT-like, GPT-2 or Llama-like model.
        bank: the module bank to attach to (its composition decides token-level or task-conditioned routing).
        targets: regexes naming the fused FFN modules; None: every block's.
        **options: :class:`~continual.modules.experts.options.ExpertOptions`.

    Returns:
        The names of the expert sites.
    """
    fuse_feed_forward(backbone)
    names = bank.attach(backbone, ExpertsDelta.kind, list(targets) if targets else None, **options)
    feed = TokenMaskFeed(list(expert_deltas(bank).values()))
    backbone.register_forward_pre_hook(feed.before, with_kwargs=True)
    backbone.register_forward_hook(feed.after, always_call=True)
    return names
