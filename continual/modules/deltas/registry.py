"""What a delta kind is to the module bank, and the one table that names every kind.

A *delta kind* (LoRA, adapter, ...) lives inside one :class:`~continual.modules.bank.TaskModuleSite` and keeps one
*slot* of parameters per task. Given the slots a batch uses and each sample's weights over them (a
:class:`~continual.modules.deltas.stacking.SlotSelection`), it returns the change it makes to the wrapped linear's
output for every sample of a batch at once, reading only those slots (kinds keep their slots stacked in
:class:`~continual.modules.deltas.stacking.SlotParameters`, so a mixed batch costs what its own tasks need). Mixture-of-experts layers are meant to
be kinds as well: an expert is a slot, a gate is a router.
"""

from __future__ import annotations

from typing import ClassVar, Dict, Optional, Protocol, Tuple, runtime_checkable

import torch
from torch import nn

from continual.modules.deltas.stacking import SlotSelection

# name -> kind class; filled by ``@register_delta`` in each kind's own module, nowhere else.
DELTA_KINDS: Dict[str, type] = {}


@runtime_checkable
class TaskDelta(Protocol):
    """Per-task delta modules of one kind at one site.

    Constructed as ``Kind(in_features, out_features, **options)``; starts with no slots.
    """

    kind: ClassVar[str]
    # Keyword options the constructor accepts (validated by the bank before construction).
    options: ClassVar[Tuple[str, ...]]
    # Architecture family ("bert", "gpt2", "llama", "t5") -> regex of the module names the kind attaches to.
    default_targets: ClassVar[Dict[str, str]]
    # Whether one task's delta can be folded into the wrapped linear's weight and bias (see ``weight_delta``).
    mergeable: ClassVar[bool]

    # Optional class attributes, read with defaults by the bank:
    #   wraps: "linear" (default: sites on linears, built as ``Kind(in_features, out_features, **options)``),
    #          "embedding" (one site on the input token embedding) or "module" (any block matched by the
    #          targets); both built as ``Kind.from_base(module, **options)``.
    #   virtual_tokens: True for kinds that add positions to the sequence (prompt and prefix tuning). Each slot
    #          owns ``tokens_per_slot`` virtual positions that the bank prepends to the input; the kind's
    #          ``place(h, selection, span)`` writes the used slots' vectors there and returns the whole output.
    #   identity_at_init: False for kinds whose new slot changes outputs (virtual tokens add attention mass).
    #   freeze_slot(slot): called when a task is frozen (e.g. fold a reparameterisation into plain vectors).
    #   forward_slot(x, h, slot): the change made by one slot for a batch that is all one task (x: [..., in],
    #          h: [..., out]); equal to ``forward`` with a one-hot weight row, without gathering or stacking.

    @property
    def n_slots(self) -> int:
        """Number of tasks allocated so far."""

    def add_slot(self, device: torch.device, dtype: torch.dtype) -> None:
        """Allocate the next task's parameters, initialised so that the delta is zero."""

    def slot_parameters(self, slot: int) -> Dict[str, nn.Parameter]:
        """One task's parameters by role name (``{"lora_A": ..., "lora_B": ...}``)."""

    def forward(self, x: torch.Tensor, h: torch.Tensor, selection: SlotSelection) -> torch.Tensor:
        """The change to the linear's output.

        Args:
            x: ``[B, T, in]`` input of the wrapped linear.
            h: ``[B, T, out]`` output of the wrapped linear.
            selection: the ``U`` slots some sample uses (``selection.slots``, ``selection.ids``) and each sample's
                weights over them, ``selection.weights [B, U]``; ``selection.exclusive``: every row has at most one
                non-zero entry (a kind may then gather). ``SlotSelection.of_all(weights [B, K], exclusive)`` asks
                for every slot.

        Returns:
            A tensor broadcastable to ``[B, T, out]``; rows whose weights are all zero are exactly zero.
        """

    def weight_delta(self, weights: torch.Tensor) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """For mergeable kinds: ``(dW [out, in] or None, db [out] or None)`` of the mix ``weights: [K]``."""

    @staticmethod
    def slot_parameter_count(in_features: int, out_features: int, **options) -> int:
        """Parameters one task adds at one site, by formula (what the tests count by hand)."""


def register_delta(cls: type) -> type:
    """Class decorator: add a delta kind to :data:`DELTA_KINDS` under its ``kind`` name."""
    name = getattr(cls, "kind", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__qualname__} needs a class attribute `kind` (str) to be registered")
    existing = DELTA_KINDS.get(name)
    if existing is not None and existing is not cls:
        raise ValueError(f"delta kind {name!r} is already registered by {existing.__module__}.{existing.__qualname__}")
    DELTA_KINDS[name] = cls
    return cls


def get_delta_kind(name: str) -> type:
    """The registered kind class called ``name``; ValueError listing the known kinds otherwise."""
    try:
        return DELTA_KINDS[name]
    except KeyError:
        raise ValueError(f"unknown delta kind {name!r}; known kinds: {', '.join(sorted(DELTA_KINDS))}") from None
