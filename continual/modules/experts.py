"""Experts as module-bank modules: a dense feed-forward block upcycled into a routed expert layer that grows by a
group of experts per task, with usage-based pruning.

Papers: ModuleFormer (Shen et al. 2023, "ModuleFormer: Modularity Emerges from Mixture-of-Experts", arXiv
2306.04640) for the router (top-k, gates not renormalised), per-task expert expansion with the load-concentration
loss, and pruning by usage; sparse upcycling (Komatsuzaki et al. 2023, "Sparse Upcycling: Training
Mixture-of-Experts from Dense Checkpoints", ICLR) for turning the dense FFN into an expert; MoEfication (Zhang et al.
2022, "MoEfication: Transformer Feed-forward Layers are Mixtures of Experts", Findings of ACL) for splitting it into
equal slices of its hidden units.

**One abstraction.** The FFN of a block becomes one bank site (:class:`FeedForward`, made by
:func:`fuse_feed_forward`); the kind at that site (:class:`ExpertsDelta`) owns an
:class:`~continual.models.moduleformer.experts.ExpertPool`: group 0 holds the ``S`` *shared* experts made from the
frozen dense FFN (router rows only: their output is the FFN's), group ``1 + t`` holds the ``n`` experts of task
slot ``t`` (``W_out act(W_in x)``, no biases). The pool's gate is the router; it reads ``[x, 1]``, so every router
row ends with a bias (the shared rows are zeros, logit 0; a new expert's bias starts at ``start_logit``). For every
token ``x``::

    y(x) = sum over the top-k experts e of p_e(x) f_e(x),    p = softmax over the experts x may use

- ``upcycle="copy"``: ``S = 1``, the shared expert is the FFN itself;
- ``upcycle="slices"``: ``S`` experts, expert ``s = S * W_down[:, s] a_s(x) + b_down`` with ``a`` the FFN's hidden
  activation cut into ``S`` equal slices of units, so the mean of the slices is the FFN.

**Which experts a sample may use** is read from the bank's per-sample slot weights ``[B, K]``: the shared ones plus
the switched-on experts of every slot whose weight is non-zero. The bank's ``simultaneous`` composition allows every
slot (token-level routing over all experts, no task id needed); ``isolated`` allows the sample's own task only
(task-conditioned routing); ``sequential`` allows tasks up to its own.

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

Pruning: :func:`recording_usage` counts each expert's selections per task, :func:`prune_plan` (pure) keeps the
experts used by at least ``threshold`` of a deployed task's tokens, :func:`prune_unused` applies it. Removing an
expert that is switched on but never chosen keeps every choice but scales each gate by ``1 / (1 - p_removed)`` (the
softmax loses its share); removing one that a sample cannot use (switched off, or another task's under
task-conditioned routing) changes nothing for that sample.

The ModuleFormer package pulls in Hugging Face model code on import (slow), so it is imported on first use only.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, ClassVar, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from continual.modules.bank import ModuleBank, TaskModuleSite, _is_conv1d, _linear_dims, architecture_family
from continual.modules.deltas.registry import register_delta

if TYPE_CHECKING:  # pragma: no cover
    from continual.models.moduleformer.experts import ExpertPool, ExpertUsage, RouterOutput

UPCYCLING = ("copy", "slices")
GATES = ("linear", "mlp")


def _moduleformer():
    """The ModuleFormer expert module, imported on first use (its package imports transformers' model code)."""
    from continual.models.moduleformer import experts

    return experts


# ---------------------------------------------------------------------------------------------------- the FFN site
class FeedForward(nn.Module):
    """A transformer block's feed-forward network as one module: ``y = drop(down(hidden(x)))``.

    ``hidden(x) = act(up(x))``, or ``act(gate(x)) * up(x)`` for gated FFNs (Llama). The wrapped linears are the
    backbone's own (nothing is copied), and :meth:`forward` runs the same operations in the same order as the
    module it replaces, so fusing changes no output bit.

    Args:
        up: ``d_model -> d_ff`` linear (``nn.Linear`` or GPT-2 ``Conv1D``).
        down: ``d_ff -> d_model`` linear.
        act: the activation (module or function).
        gate: ``d_model -> d_ff`` gate projection of a gated FFN, else None.
        dropout: dropout applied to the output inside the original module (GPT-2), else None.
    """

    def __init__(
        self,
        up: nn.Module,
        down: nn.Module,
        act: Callable[[torch.Tensor], torch.Tensor],
        gate: Optional[nn.Module] = None,
        dropout: Optional[nn.Module] = None,
    ):
        super().__init__()
        self.d_model, self.d_ff, _ = _linear_dims(up)
        down_in, down_out, _ = _linear_dims(down)
        if (down_in, down_out) != (self.d_ff, self.d_model):
            raise ValueError(f"FeedForward: down maps {down_in} -> {down_out}, expected {self.d_ff} -> {self.d_model}")
        self.up, self.down, self.act, self.gate, self.dropout = up, down, act, gate, dropout

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., d_model] -> [..., d_ff]``: the hidden units."""
        if self.gate is None:
            return self.act(self.up(x))
        return self.act(self.gate(x)) * self.up(x)

    def project(self, a: torch.Tensor) -> torch.Tensor:
        """``[..., d_ff] -> [..., d_model]``: the output projection without its bias."""
        weight = self.down.weight
        return a @ weight if _is_conv1d(self.down) else F.linear(a, weight)  # Conv1D stores [in, out]

    @property
    def down_bias(self) -> Optional[torch.Tensor]:
        return getattr(self.down, "bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.down(self.hidden(x))
        return y if self.dropout is None else self.dropout(y)


def _is_fused(module: Optional[nn.Module]) -> bool:
    """A :class:`FeedForward`, possibly already wrapped by bank sites."""
    while isinstance(module, TaskModuleSite):
        module = module.base
    return isinstance(module, FeedForward)


def _fuse_bert(layer: nn.Module) -> Optional[str]:
    """BERT-like block: the FFN is ``intermediate`` (dense + act) then ``output.dense``; ``output`` also adds the
    residual and normalises. The FFN moves to ``intermediate`` (returning the d_model output) and ``output.dense``
    becomes an identity, so ``output`` still applies dropout, the residual and the LayerNorm."""
    inter, out = getattr(layer, "intermediate", None), getattr(layer, "output", None)
    if inter is None or out is None or not hasattr(out, "LayerNorm"):
        return None
    if _is_fused(inter):
        return "intermediate"
    layer.intermediate = FeedForward(up=inter.dense, down=out.dense, act=inter.intermediate_act_fn)
    out.dense = nn.Identity()
    return "intermediate"


def _fuse_llama(block: nn.Module) -> Optional[str]:
    """Llama-like block: ``mlp`` is ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``."""
    mlp = getattr(block, "mlp", None)
    if _is_fused(mlp):
        return "mlp"
    if mlp is None or not all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return None
    block.mlp = FeedForward(up=mlp.up_proj, down=mlp.down_proj, act=mlp.act_fn, gate=mlp.gate_proj)
    return "mlp"


def _fuse_gpt2(block: nn.Module) -> Optional[str]:
    """GPT-2 block: ``mlp`` is ``dropout(c_proj(act(c_fc(x))))``."""
    mlp = getattr(block, "mlp", None)
    if _is_fused(mlp):
        return "mlp"
    if mlp is None or not all(hasattr(mlp, a) for a in ("c_fc", "c_proj", "act", "dropout")):
        return None
    block.mlp = FeedForward(up=mlp.c_fc, down=mlp.c_proj, act=mlp.act, dropout=mlp.dropout)
    return "mlp"


# family -> fuse one block in place; returns the FFN's attribute name in that block, or None if it is not a block.
FUSERS: Dict[str, Callable[[nn.Module], Optional[str]]] = {"bert": _fuse_bert, "llama": _fuse_llama, "gpt2": _fuse_gpt2}


def fuse_feed_forward(model: nn.Module) -> List[str]:
    """Make every block's FFN one :class:`FeedForward` module, in place; outputs stay bit-identical.

    Idempotent: blocks already fused are left alone.

    Args:
        model: a Hugging Face BERT-like, GPT-2 or Llama-like model (with or without its task head).

    Returns:
        The FFN modules' names, in model order (e.g. ``encoder.layer.0.intermediate``, ``layers.0.mlp``).

    Raises:
        ValueError: an architecture without a fuser (e.g. T5), or no block found.
    """
    family = architecture_family(model)
    if family not in FUSERS:
        raise ValueError(f"experts: no feed-forward upcycling for the {family} family (supported: {sorted(FUSERS)})")
    names = []
    for name, module in list(model.named_modules()):
        child = FUSERS[family](module)
        if child is not None:
            names.append(f"{name}.{child}" if name else child)
    if not names:
        raise ValueError(f"experts: found no {family} feed-forward block in {type(model).__name__}")
    return names


# ---------------------------------------------------------------------------------------------------- routing math
def shared_gates(indices: torch.Tensor, gates: torch.Tensor, n_shared: int) -> torch.Tensor:
    """Each token's gate on each shared expert (0 where it was not chosen).

    Args:
        indices: ``[N, k]`` chosen experts (global indices; the shared ones are ``0..S-1``).
        gates: ``[N, k]`` their gates.
        n_shared: ``S``.

    Returns:
        ``[N, S]`` in the dtype of ``gates``.
    """
    chosen = indices < n_shared
    return gates.new_zeros(indices.shape[0], n_shared).scatter_add(
        1, indices.clamp(max=n_shared - 1), gates * chosen
    )


def shared_change(ffn: FeedForward, x: torch.Tensor, h: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """What routing the shared experts changes in the dense FFN's output: ``sum_s g_s f_s(x) - FFN(x)``.

    Args:
        ffn: the dense FFN (its shared experts are itself, or ``S`` equal slices of its hidden units).
        x: ``[N, d_model]`` tokens.
        h: ``[N, d_model]`` ``FFN(x)``.
        gates: ``[N, S]`` gates of the shared experts (:func:`shared_gates`).

    Returns:
        ``[N, d_model]``. One expert: ``(g_0 - 1) h``. ``S`` slices: ``W_down (a * (S g_unit - 1)) + b (sum g - 1)``
        with ``g_unit`` each hidden unit's slice gate; zero when every ``g_s == 1/S``.
    """
    S = gates.shape[1]
    if S == 1:
        return (gates - 1).to(h.dtype) * h
    a = ffn.hidden(x)  # [N, d_ff]
    unit = (S * gates - 1).repeat_interleave(a.shape[-1] // S, dim=-1).to(a.dtype)  # [N, d_ff]
    out = ffn.project(a * unit)
    bias = ffn.down_bias
    if bias is not None:
        out = out + (gates.sum(-1, keepdim=True) - 1).to(out.dtype) * bias
    return out


# ---------------------------------------------------------------------------------------------------- the kind
@register_delta
class ExpertsDelta(nn.Module):
    """Routed experts at one fused FFN: the shared experts made from it, and ``n`` new experts per task slot.

    Built by the bank from the :class:`FeedForward` it wraps (``from_base``). See the module docstring for the
    layer, the routing masks and why conversion is exact.

    Args:
        ffn: the fused dense FFN (the site's frozen base).
        n: experts appended per task slot.
        k: experts per token (at most ``S + n``, so task-conditioned routing always has ``k`` to choose from).
        expert_hidden: hidden width of each new expert; 0: ``d_model // 4``.
        gate: "linear" (a router row per expert over ``[x, 1]``, so each row has a bias) or "mlp" (a fixed random
            GELU layer of ``gate_hidden`` units first, whose last unit is the constant ``gelu(1)``; frozen with the
            shared experts so that later tasks never move earlier tasks' routing).
        gate_hidden: hidden width of the "mlp" gate.
        upcycle: "copy" (the FFN is the one shared expert) or "slices" (``slices`` equal slices of it).
        slices: number of shared experts for "slices" (must divide the FFN's hidden width).
        activation: activation of the new experts ("gelu", "gelu_tanh", "relu", "silu").
        start_logit: router logit a new expert starts with (its row's bias; the row's weights start at N(0, 0.02)),
            against 0 for the shared experts: at -4 switching a task on keeps about 96% of each token's
            probability on the FFN (n=2), so training starts next to the pretrained model.
        dispatch: expert matmul backend ("auto", "loop", "grouped").
    """

    kind: ClassVar[str] = "experts"
    wraps: ClassVar[str] = "module"
    options: ClassVar[Tuple[str, ...]] = (
        "n", "k", "expert_hidden", "gate", "gate_hidden", "upcycle", "slices", "activation", "start_logit", "dispatch",
    )
    default_targets: ClassVar[Dict[str, str]] = {"bert": r"intermediate", "gpt2": r"mlp", "llama": r"mlp"}
    mergeable: ClassVar[bool] = False

    def __init__(
        self,
        ffn: FeedForward,
        n: int = 2,
        k: int = 2,
        expert_hidden: int = 0,
        gate: str = "linear",
        gate_hidden: int = 64,
        upcycle: str = "copy",
        slices: int = 4,
        activation: str = "gelu",
        start_logit: float = -4.0,
        dispatch: str = "auto",
    ):
        super().__init__()
        experts = _moduleformer()
        if upcycle not in UPCYCLING:
            raise ValueError(f"experts: upcycle must be one of {list(UPCYCLING)}, got {upcycle!r}")
        if gate not in GATES:
            raise ValueError(f"experts: gate must be one of {list(GATES)}, got {gate!r}")
        if activation not in experts.ACTIVATIONS:
            raise ValueError(f"experts: activation must be one of {sorted(experts.ACTIVATIONS)}, got {activation!r}")
        n_shared = 1 if upcycle == "copy" else slices
        if upcycle == "slices" and (slices < 2 or ffn.d_ff % slices):
            raise ValueError(f"experts: slices must be >= 2 and divide the FFN width {ffn.d_ff}, got {slices}")
        for key, value, low in [("n", n, 1), ("k", k, 1), ("expert_hidden", expert_hidden, 0), ("gate_hidden", gate_hidden, 1)]:
            if value < low:
                raise ValueError(f"experts: {key} must be >= {low}, got {value}")
        if k > n_shared + n:
            raise ValueError(
                f"experts: k={k} exceeds the {n_shared} shared + {n} per-task experts a task-conditioned token can use"
            )
        d = ffn.d_model
        self.in_features = self.out_features = d
        self.n, self.n_shared, self.upcycle, self.activation = n, n_shared, upcycle, activation
        self.hidden = expert_hidden or max(1, d // 4)
        self._ffn = [ffn]  # a plain list: read, not owned (the site holds it as its base)
        self.start_logit = float(start_logit)
        # The router reads [x, 1]: the constant makes the last entry of every router row a bias. New experts start
        # at W_out = 0 (they output nothing until trained).
        pool = experts.ExpertPool(
            d + 1, {"w_in": (d, self.hidden), "w_out": (self.hidden, d)}, n_shared, min(k, n_shared),
            gate_hidden=gate_hidden if gate == "mlp" else 0, dispatch=dispatch, init_std={"w_out": 0.0},
        )
        self.bias_feature = 1.0  # value of the router input's last feature
        if pool.gate is not None:  # the (frozen, random) gate layer's last unit becomes the constant gelu(1)
            with torch.no_grad():
                pool.gate[0].weight[-1].zero_()
                pool.gate[0].bias[-1] = 1.0
            self.bias_feature = float(F.gelu(torch.tensor(1.0)))
        # Group 0: the shared experts hold router rows only (their output is the FFN's), zeros: logit 0, uniform
        # over the slices.
        pool.groups[0] = experts.ExpertGroup(n_shared, {}, pool.router_dim, {"router": 0.0})
        pool.k = k  # may exceed S: routing only runs when task experts are available (see forward)
        pool.freeze_group(0)
        self.pool: "ExpertPool" = pool
        self.token_mask: Optional[torch.Tensor] = None  # [B, T] attention mask of the current forward (TokenMaskFeed)
        self.last_routing: Optional["RouterOutput"] = None  # the last forward's routing, None if nothing routed

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
        return self.pool.n_groups - 1

    def add_slot(self, device: torch.device, dtype: torch.dtype) -> None:
        """Append the next task's ``n`` experts and router rows, switched off (no output changes)."""
        group = self.pool.add_experts(self.n, enabled=False)
        rows = self.pool.groups[group].router
        with torch.no_grad():
            rows[:, -1] = self.start_logit / self.bias_feature
        self.pool.groups[group].to(device=device, dtype=dtype)

    def slot_parameters(self, slot: int) -> Dict[str, nn.Parameter]:
        group = self.pool.groups[self._group(slot)]
        return {"w_in": group.w_in, "w_out": group.w_out, "router": group.router}

    def freeze_slot(self, slot: int) -> None:
        self.pool.freeze_group(self._group(slot))

    def set_slot_enabled(self, slot: int, on: bool = True) -> None:
        """Switch one task's experts on (selectable) or off (router rows at -inf, never evaluated)."""
        # Written directly: the pool refuses to leave fewer than k experts on, but this layer never routes a
        # sample that has fewer than k to choose from (it gets the dense FFN).
        self.pool.groups[self._group(slot)].enabled.fill_(bool(on))
        self.last_routing = None

    def _group(self, slot: int) -> int:
        if not 0 <= slot < self.n_slots:
            raise ValueError(f"experts: slot {slot} does not exist (slots: {self.n_slots})")
        return slot + 1

    def expert_slots(self) -> torch.Tensor:
        """``[E]`` long: the task slot of every expert, -1 for the shared ones."""
        sizes = torch.tensor(self.pool.group_sizes)
        return torch.repeat_interleave(torch.arange(len(sizes)) - 1, sizes)

    @staticmethod
    def slot_parameter_count(
        in_features: int, out_features: int, n: int = 2, expert_hidden: int = 0, gate: str = "linear",
        gate_hidden: int = 64, **_,
    ) -> int:
        """``n`` experts of ``W_in [d, hidden]``, ``W_out [hidden, d]`` and one router row each (``d + 1`` wide with
        the linear gate: the bias)."""
        hidden = expert_hidden or max(1, in_features // 4)
        router = gate_hidden if gate == "mlp" else in_features + 1
        return n * (2 * in_features * hidden + router)

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
        sizes = torch.tensor(self.pool.group_sizes[1:], device=weights.device)
        shared = torch.ones(weights.shape[0], self.n_shared, dtype=torch.bool, device=weights.device)
        per_slot = (weights != 0).repeat_interleave(sizes, dim=1)  # [B, E - S]
        return torch.cat([shared, per_slot], dim=1) & self.pool.enabled_mask().to(weights.device)[None, :]

    def forward(self, x: torch.Tensor, h: torch.Tensor, weights: torch.Tensor, exclusive: bool) -> torch.Tensor:
        """The change routing makes to the dense FFN's output.

        Args:
            x: ``[B, T, d]`` (or ``[B, d]``) input of the FFN.
            h: same shape, the FFN's output.
            weights: ``[B, K]`` slot weights (which tasks' experts each sample may use).
            exclusive: unused (the allowed experts are read from ``weights``).

        Returns:
            ``[B, T, d]``, or a zero scalar when no sample may use a task expert (the dense FFN exactly).
        """
        self.last_routing = None
        allowed = self.allowed_experts(weights)  # [B, E]
        S = self.n_shared
        routed = allowed[:, S:].any(dim=1) & (allowed.sum(dim=1) >= self.k)  # [B]
        if not bool(routed.any()):
            return h.new_zeros(())
        rows = None if bool(routed.all()) else routed.nonzero().flatten()
        token_mask = self._token_mask(x)
        if rows is not None:
            x, h, allowed = x[rows], h[rows], allowed[rows]
            token_mask = None if token_mask is None else token_mask[rows]
        masked = not bool((allowed == self.pool.enabled_mask().to(allowed.device)[None, :]).all())
        experts = _moduleformer()
        expert_mask = experts.expand_sample_mask(allowed, tuple(x.shape[:-1])) if masked else None
        flat, h_flat = x.reshape(-1, x.shape[-1]), h.reshape(-1, h.shape[-1])
        routing = self.pool.route(F.pad(flat, (0, 1), value=1.0), expert_mask, token_mask)  # router input [x, 1]
        change = self._task_experts(flat, routing)
        change = change + shared_change(self._ffn[0], flat, h_flat, shared_gates(routing.indices, routing.gates, S))
        self.last_routing = routing
        change = change.reshape(h.shape)
        if rows is None:
            return change
        return change.new_zeros((routed.shape[0],) + tuple(change.shape[1:])).index_copy(0, rows, change)

    def _task_experts(self, flat: torch.Tensor, routing: "RouterOutput") -> torch.Tensor:
        """``sum_{task e in top-k} p_e W_out_e act(W_in_e x)`` for every token: ``ExpertLayer.forward``'s dispatch
        over groups 1.. only (the shared experts' assignments sort first and are skipped)."""
        experts = _moduleformer()
        pool, S = self.pool, self.n_shared
        order, counts = experts.sort_by_expert(routing.indices, pool.n_experts)
        skip = sum(counts[:S])
        order, counts = order[skip:], counts[S:]
        out = flat.new_zeros(flat.shape)
        if order.numel() == 0:
            return out
        groups = list(pool.groups)[1:]
        token_of = torch.div(order, pool.k, rounding_mode="floor")  # [M] token of each sorted assignment
        z = experts.expert_matmul(flat.index_select(0, token_of), [g.w_in for g in groups], counts, pool.dispatch)
        z = experts.ACTIVATIONS[self.activation](z)
        y = experts.expert_matmul(z, [g.w_out for g in groups], counts, pool.dispatch)
        y = y * routing.gates.reshape(-1).index_select(0, order).to(y.dtype)[:, None]
        return out.index_add(0, token_of, y)

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


def routing_losses(deltas: Iterable[ExpertsDelta]) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """The routing losses of the forward just run, each averaged over the expert sites that routed tokens.

    Returns:
        ``(mutual-information loss H(e|x) - H(e), load concentration loss H(e))``, two scalars over real tokens
        (:mod:`continual.models.moduleformer.losses`); None when no site routed (no task's experts switched on).
    """
    from continual.models.moduleformer.losses import mean_routing_losses

    routings = [delta.last_routing for delta in deltas if delta.last_routing is not None]
    return mean_routing_losses(routings) if routings else None


def upcycle(backbone: nn.Module, bank: ModuleBank, targets: Optional[Sequence[str]] = None, **options) -> List[str]:
    """Fuse the backbone's FFNs, put an ``experts`` site at each targeted one, and feed them the attention mask.

    Outputs are unchanged (bit for bit) until a task's experts are switched on.

    Args:
        backbone: a Hugging Face BERT-like, GPT-2 or Llama-like model.
        bank: the module bank to attach to (its composition decides token-level or task-conditioned routing).
        targets: regexes naming the fused FFN modules; None: every block's.
        **options: :class:`ExpertsDelta` options.

    Returns:
        The names of the expert sites.
    """
    fuse_feed_forward(backbone)
    names = bank.attach(backbone, ExpertsDelta.kind, list(targets) if targets else None, **options)
    feed = TokenMaskFeed(list(expert_deltas(bank).values()))
    backbone.register_forward_pre_hook(feed.before, with_kwargs=True)
    backbone.register_forward_hook(feed.after, always_call=True)
    return names


# ---------------------------------------------------------------------------------------------------- usage, pruning
@contextmanager
def recording_usage(deltas: Mapping[str, ExpertsDelta]) -> Iterator[Dict[str, "ExpertUsage"]]:
    """Count each expert's selections (real tokens only) during the block; the yielded dict maps each site to its
    :class:`~continual.models.moduleformer.experts.ExpertUsage` once the block exits."""
    usage: Dict[str, "ExpertUsage"] = {}
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
    usage: Mapping[int, Mapping[str, "ExpertUsage"]],
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
