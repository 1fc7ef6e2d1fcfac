"""BitFit: bias-only fine-tuning (Ben Zaken et al. 2022, "BitFit: Simple Parameter-efficient Fine-tuning for
Transformer-based Masked Language-models"), one bias offset per task.

The backbone's own biases stay frozen and shared; each task gets a zero-initialised offset ``db: [out]`` added to
the wrapped linear's output, which is the same function as training that linear's bias (and also works for
linears built without one, as in Llama).
"""

from __future__ import annotations

from typing import ClassVar, Dict, Tuple

import torch
from torch import nn

from continual.modules.families import default_targets
from continual.modules.deltas.registry import register_delta
from continual.modules.deltas.stacking import SlotParameters, SlotSelection


@register_delta
class BitFitDelta(nn.Module):
    """Per-task output bias offsets at one linear.

    Args:
        in_features: input width of the wrapped linear (unused; part of the kind constructor contract).
        out_features: output width of the wrapped linear.
    """

    kind: ClassVar[str] = "bitfit"
    options: ClassVar[Tuple[str, ...]] = ()
    # Every linear of every block (the paper trains all biases; LayerNorm biases are not covered here).
    default_targets: ClassVar[Dict[str, str]] = default_targets("block_biases")
    mergeable: ClassVar[bool] = True

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.out_features = out_features
        self.offset = SlotParameters()  # slot k: [out]

    @property
    def n_slots(self) -> int:
        return len(self.offset)

    def add_slot(self, device: torch.device, dtype: torch.dtype) -> None:
        self.offset.append(nn.Parameter(torch.zeros(self.out_features, device=device, dtype=dtype)))

    def slot_parameters(self, slot: int) -> Dict[str, nn.Parameter]:
        return {"offset": self.offset[slot]}

    def forward(self, x: torch.Tensor, h: torch.Tensor, selection: SlotSelection) -> torch.Tensor:
        """The batch's U slots -> [B, 1, out] (one offset per sample, the same for every position)."""
        offsets = self.offset.rows(selection.slots, selection.ids)  # [U, out]
        return (selection.weights.to(offsets.dtype) @ offsets)[:, None, :]

    def forward_slot(self, x: torch.Tensor, h: torch.Tensor, slot: int) -> torch.Tensor:
        return self.offset[slot]

    def weight_delta(self, weights: torch.Tensor):
        """weights: [K] -> (None, db [out])."""
        offsets = torch.stack(tuple(self.offset))
        return None, weights.to(offsets.dtype) @ offsets

    @staticmethod
    def slot_parameter_count(in_features: int, out_features: int, **_) -> int:
        return out_features
