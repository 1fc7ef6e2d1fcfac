"""Specification-based delta tuning (Ding et al. 2023): a chosen subset of the backbone's own weights is tuned.

Per task, each chosen linear gets a full-rank, zero-initialised offset ``(dW [out, in], db [out])``, which is the
same function as fine-tuning that linear while keeping the shared weights frozen (so earlier tasks keep theirs):

- ``selective``: any subset of linears across layers (targets, or ``select=n`` random ones of the matches);
- ``last_layer``: every linear of the last transformer layer.
"""

from __future__ import annotations

from typing import ClassVar, Dict, Tuple

import torch
from torch import nn

from continual.modules.families import default_targets
from continual.modules.deltas.registry import register_delta
from continual.modules.deltas.stacking import SlotParameters, SlotSelection

ALL_BLOCK_LINEARS: Dict[str, str] = default_targets("block_linears")


@register_delta
class SelectiveDelta(nn.Module):
    """Per-task full-rank offsets of one linear's weight and bias.

    Args:
        in_features: input width of the wrapped linear.
        out_features: output width of the wrapped linear.
    """

    kind: ClassVar[str] = "selective"
    options: ClassVar[Tuple[str, ...]] = ()
    default_targets: ClassVar[Dict[str, str]] = ALL_BLOCK_LINEARS
    mergeable: ClassVar[bool] = True

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = SlotParameters()  # slot k: [out, in]
        self.bias = SlotParameters()  # slot k: [out]

    @property
    def n_slots(self) -> int:
        return len(self.weight)

    def add_slot(self, device: torch.device, dtype: torch.dtype) -> None:
        self.weight.append(nn.Parameter(torch.zeros(self.out_features, self.in_features, device=device, dtype=dtype)))
        self.bias.append(nn.Parameter(torch.zeros(self.out_features, device=device, dtype=dtype)))

    def slot_parameters(self, slot: int) -> Dict[str, nn.Parameter]:
        return {"weight": self.weight[slot], "bias": self.bias[slot]}

    def forward(self, x: torch.Tensor, h: torch.Tensor, selection: SlotSelection) -> torch.Tensor:
        """x: [B, T, in]; the batch's U slots -> [B, T, out], one batched matmul with each sample's (mixed)
        offset."""
        W = self.weight.rows(selection.slots, selection.ids)  # [U, out, in]
        b = self.bias.rows(selection.slots, selection.ids)  # [U, out]
        weights = selection.weights.to(W.dtype)
        if selection.exclusive:
            slot = weights.abs().argmax(dim=1)  # [B]
            gate = weights.gather(1, slot[:, None])[:, :, None]  # [B, 1, 1]
            return (torch.bmm(x, W[slot].transpose(1, 2)) + b[slot][:, None, :]) * gate
        W_mix = torch.einsum("bk,koi->boi", weights, W)  # [B, out, in]
        return torch.bmm(x, W_mix.transpose(1, 2)) + (weights @ b)[:, None, :]

    def forward_slot(self, x: torch.Tensor, h: torch.Tensor, slot: int) -> torch.Tensor:
        return x @ self.weight[slot].T + self.bias[slot]

    def weight_delta(self, weights: torch.Tensor):
        """weights: [K] -> (dW [out, in], db [out])."""
        w = weights.to(self.weight[0].dtype)
        return torch.einsum("k,koi->oi", w, torch.stack(tuple(self.weight))), w @ torch.stack(tuple(self.bias))

    @staticmethod
    def slot_parameter_count(in_features: int, out_features: int, **_) -> int:
        return out_features * in_features + out_features


@register_delta
class LastLayerDelta(SelectiveDelta):
    """Per-task offsets of every linear of the last transformer layer (last-layer tuning)."""

    kind: ClassVar[str] = "last_layer"
    default_targets: ClassVar[Dict[str, str]] = default_targets("last_block_linears")
