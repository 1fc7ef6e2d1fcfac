"""Per-slot tensors kept stacked on the device, and the slots one forward uses, so that a mixed batch costs what its
own tasks need whatever the number of tasks stored (the multi-adapter serving of S-LoRA, Sheng et al. 2024, and
Punica, Chen et al. 2024: adapters stay resident as one batch, a request gathers its own).

- :class:`SlotSelection`: which slots some sample of the batch uses and each sample's weights over those only,
  found once per forward (:func:`select_slots`, one device-to-host copy) and shared by every site.
- :class:`SlotParameters`: a ``ParameterList`` whose slot ``k`` is a view of row ``k`` of one stacked tensor
  ``[capacity, *shape]``. Reading the slots a batch uses is one ``index_select`` (:meth:`SlotParameters.rows`), not a
  ``torch.stack`` of every stored slot. The slots stay separate Parameters (state-dict keys ``"<role>.<k>"``, one
  ``requires_grad`` per slot), and in-place writes to one (an optimizer step, ``copy_`` from a checkpoint or a run
  state) land in the stack, so it never goes stale. A trainable slot that a batch uses is read as its live Parameter
  (gradients reach it); the others come from the stack without autograd.
- :func:`stack_as_views`, :func:`are_views_of`: the storage trick itself, also used by the task heads (tensors of
  different sizes padded in their rows).

An appended slot takes the next free row (the capacity grows by :data:`GROWTH`, or is reserved up front with
:meth:`SlotParameters.reserve`, e.g. for the tasks of a stream: then no slot is ever copied twice); a replaced slot
is copied into its row; a conversion (``.to(device)``, ``.half()``) converts the stack as one tensor and keeps the
views. The stack is rebuilt, lazily at the next read, when the views break otherwise:
``load_state_dict(assign=True)``, a copy or unpickling (the copy rebuilds its own).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple

import torch
from torch import nn

# Capacity factor when an appended slot finds the stack full (amortised O(1) per slot, at most 25% spare rows).
GROWTH = 1.25


# ---------------------------------------------------------------------------------------------------- selection
@dataclass(frozen=True)
class SlotSelection:
    """The slots one forward's samples use, and each sample's weights over those slots only.

    Attributes:
        slots: ``[U]`` long on the weights' device: every slot with a non-zero weight for some sample, ascending.
        ids: the same ``U`` slots on the host.
        weights: ``[B, U]`` each sample's weight of those slots (column ``u`` is slot ``ids[u]``).
        exclusive: every sample has at most one non-zero weight (kinds may gather instead of mixing).
        single: the slot when every sample uses exactly that one slot with weight 1 (a one-task batch), else None.
        every: ``[B, K]`` the weights over all ``K`` slots (for kinds whose routing reads every slot).
    """

    slots: torch.Tensor
    ids: Tuple[int, ...]
    weights: torch.Tensor
    exclusive: bool
    single: Optional[int]
    every: torch.Tensor

    @classmethod
    def of_all(cls, weights: torch.Tensor, exclusive: bool) -> "SlotSelection":
        """Every slot, without looking at the weights (no device sync): ``weights [B, K]`` as they are."""
        K = weights.shape[1]
        slots = torch.arange(K, device=weights.device)
        return cls(slots, tuple(range(K)), weights, exclusive, None, weights)


def select_slots(
    weights: torch.Tensor, exclusive: bool, extra: Optional[torch.Tensor] = None
) -> Tuple[SlotSelection, Optional[torch.Tensor]]:
    """The slots a batch uses, with one device-to-host copy.

    Args:
        weights: ``[B, K]`` slot weights of the batch.
        exclusive: whether every row has at most one non-zero weight (the router says so).
        extra: a small integer tensor the caller also needs on the host (e.g. the longest sample, to trim padding):
            it travels in the same copy, so the forward syncs once for both.

    Returns:
        ``(selection, extra on the host or None)``.
    """
    B, K = weights.shape
    active = (weights != 0).any(dim=0)  # [K]
    ones = (weights == 1).all(dim=0)  # [K]
    payload = torch.cat([active, ones]).long()
    if extra is not None:
        payload = torch.cat([payload, extra.reshape(-1).long()])
    host = payload.cpu()  # the forward's one device sync
    ids = tuple(host[:K].nonzero().flatten().tolist())
    single = ids[0] if B and len(ids) == 1 and bool(host[K + ids[0]]) else None
    slots = torch.tensor(ids, dtype=torch.long).to(weights.device, non_blocking=True)
    selection = SlotSelection(slots, ids, weights.index_select(1, slots), exclusive, single, weights)
    return selection, (host[2 * K:] if extra is not None else None)


# ---------------------------------------------------------------------------------------------------- storage
def stack_as_views(tensors: Sequence[torch.Tensor], fill: float = 0.0, capacity: Optional[int] = None) -> torch.Tensor:
    """Copy each tensor into its row of one new stacked tensor and make it a view of that row.

    Tensors must share dtype, device and number of dimensions; a smaller one fills the leading corner of its row
    (``row[:n0, :n1, ...]``) and the rest of the row holds ``fill``.

    Args:
        tensors: ``K`` tensors (Parameters keep their identity; only their ``.data`` moves).
        fill: value of the padding (and of a padded stack's spare rows; a uniform stack leaves them uninitialised).
        capacity: rows to allocate (at least ``K``); the spare rows take later tensors.

    Returns:
        ``[capacity, *max_shape]``.
    """
    if not tensors:
        raise ValueError("stack_as_views needs at least one tensor")
    first = tensors[0]
    shape = tuple(max(t.shape[d] for t in tensors) for d in range(first.dim()))
    rows = max(capacity or 0, len(tensors))
    uniform = all(tuple(t.shape) == shape for t in tensors)
    # Spare rows of a uniform stack stay uninitialised (never read; untouched pages cost no memory until used).
    stack = first.new_empty((rows, *shape)) if uniform else first.new_full((rows, *shape), fill)
    with torch.no_grad():
        if uniform:
            torch.stack([t.detach() for t in tensors], out=stack[: len(tensors)])
        else:
            for k, t in enumerate(tensors):
                stack[k][tuple(slice(0, n) for n in t.shape)].copy_(t.detach())
    for k, t in enumerate(tensors):
        t.data = stack[k][tuple(slice(0, n) for n in t.shape)]
    return stack


def are_views_of(tensors: Sequence[torch.Tensor], stack: torch.Tensor) -> bool:
    """Whether tensor ``k`` still starts row ``k`` of ``stack`` (no conversion or reassignment replaced it)."""
    if len(tensors) > stack.shape[0]:
        return False
    base, step = stack.data_ptr(), stack.stride(0) * stack.element_size()
    return all(t.device == stack.device and t.data_ptr() == base + k * step for k, t in enumerate(tensors))


class SlotParameters(nn.ParameterList):
    """One role's per-slot parameters (the same shape for every slot), stored as rows of one stacked tensor.

    Used like ``nn.ParameterList`` (``append``, ``[k]``, iteration, state-dict keys ``"<k>"``); see the module
    docstring for how the stack is kept and when it is rebuilt.
    """

    def __init__(self, values: Optional[Sequence[Any]] = None):
        super().__init__()
        self._stack: Optional[torch.Tensor] = None  # [capacity, *shape]; None: rebuild at the next read
        self._bound = 0  # slots 0.._bound-1 are views of their rows
        self._reserved = 0  # rows to allocate at least (reserve)
        if values is not None:
            self.extend(values)

    def __getitem__(self, idx):
        if isinstance(idx, slice):  # a plain list: its Parameters must stay views of this stack
            return nn.ParameterList([self[i] for i in range(*idx.indices(len(self)))])
        return super().__getitem__(idx)

    def __setitem__(self, idx: int, param: Any) -> None:
        super().__setitem__(idx, param)  # append() lands here too
        k = operator.index(idx) % len(self)
        stack = self._stack
        if stack is None:
            if len(self) == 1:  # the first slot starts the stack
                self._rebuild()
            return
        p = self._parameters[str(k)]
        if k > self._bound or p.shape != stack.shape[1:] or p.dtype != stack.dtype or p.device != stack.device:
            self._invalidate()
        elif k >= stack.shape[0]:  # full: grow (one copy of every slot, amortised by the growth factor)
            self._rebuild(max(k + 1, math.ceil(stack.shape[0] * GROWTH), 4))
        else:
            with torch.no_grad():
                stack[k].copy_(p.detach())
            p.data = stack[k]
            self._bound = max(self._bound, k + 1)

    def reserve(self, n: int) -> None:
        """Keep room for ``n`` slots, so that appending up to ``n`` never copies the stack (memory is committed as
        rows are written)."""
        self._reserved = max(self._reserved, int(n))
        if self._stack is not None and self._stack.shape[0] < n:
            self._rebuild(n)

    # ------------------------------------------------------------------ reads
    def stacked(self) -> torch.Tensor:
        """``[K, *shape]`` every slot's current values (not tracked by autograd)."""
        return self._ensure()[: len(self)]

    def rows(self, slots: torch.Tensor, ids: Sequence[int]) -> torch.Tensor:
        """``[U, *shape]`` the slots ``slots`` (``ids`` on the host); under autograd, a slot whose Parameter requires
        grad is its live Parameter, so the gradient reaches it."""
        out = self._ensure().index_select(0, slots)
        if torch.is_grad_enabled():
            params = self._parameters
            live = [(u, params[str(k)]) for u, k in enumerate(ids) if params[str(k)].requires_grad]
            if live:
                where = torch.tensor([u for u, _ in live], device=out.device)
                out = out.index_copy(0, where, torch.stack([p for _, p in live]).to(out.dtype))
        return out

    # ------------------------------------------------------------------ upkeep
    def _ensure(self) -> torch.Tensor:
        if self._stack is None or self._bound != len(self):
            self._rebuild()
        return self._stack

    def _rebuild(self, capacity: Optional[int] = None) -> None:
        if not len(self):
            raise ValueError("no slots allocated")
        params = [self._parameters[str(k)] for k in range(len(self))]
        self._stack = None  # the old stack's memory can go as soon as no slot is a view of it
        self._stack = stack_as_views(params, capacity=max(capacity or 0, self._reserved))
        self._bound = len(params)

    def _invalidate(self) -> None:
        self._stack, self._bound = None, 0

    def _check_views(self) -> None:
        stack = self._stack
        if stack is not None and not are_views_of([self._parameters[str(k)] for k in range(self._bound)], stack):
            self._invalidate()

    def _apply(self, fn, recurse: bool = True):
        stack, params = self._stack, [self._parameters[str(k)] for k in range(len(self))]
        if stack is None or self._bound != len(params) or not are_views_of(params, stack):
            out = super()._apply(fn, recurse)
            self._check_views()
            return out
        # Convert the stack as one tensor (no second copy of every slot on the target device) and keep the views.
        converted = fn(stack)
        if converted is not stack:
            for k, p in enumerate(params):
                p.data = converted[k]
                if p.grad is not None:
                    p.grad = fn(p.grad)
            self._stack = converted
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._check_views()  # copy_ keeps them; assign=True replaces the Parameters

    def __getstate__(self):
        # A copy (deepcopy, pickle) gets independent Parameters; it rebuilds a stack of its own.
        state = dict(super().__getstate__())
        state["_stack"], state["_bound"] = None, 0
        return state
