"""LoRA: low-rank adaptation of a linear layer (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language
Models"), one ``(A, B)`` pair per task.

``y = W x + b + (alpha / r) * B A x`` with ``A: [r, in]`` Kaiming-initialised and ``B: [out, r]`` zero-initialised,
so a new task starts exactly at the frozen backbone.
"""

from __future__ import annotations

import math
from typing import ClassVar, Dict, Tuple

import torch
from torch import nn

from continual.modules.families import default_targets
from continual.modules.deltas.mixing import mixed_bottleneck
from continual.modules.deltas.registry import register_delta
from continual.modules.deltas.stacking import SlotParameters, SlotSelection


@register_delta
class LoRADelta(nn.Module):
    """Per-task LoRA matrices at one linear.

    Args:
        in_features: input width of the wrapped linear.
        out_features: output width of the wrapped linear.
        r: rank of the update.
        alpha: scale numerator; the update is multiplied by ``alpha / r``.
        dropout: dropout on the LoRA branch's input (0 disables).
    """

    kind: ClassVar[str] = "lora"
    options: ClassVar[Tuple[str, ...]] = ("r", "alpha", "dropout")
    default_targets: ClassVar[Dict[str, str]] = default_targets("query_value")
    mergeable: ClassVar[bool] = True

    def __init__(self, in_features: int, out_features: int, r: int = 8, alpha: float = 16.0, dropout: float = 0.0):
        super().__init__()
        if r < 1:
            raise ValueError(f"lora: r must be >= 1, got {r}")
        if alpha <= 0:
            raise ValueError(f"lora: alpha must be > 0, got {alpha}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"lora: dropout must be in [0, 1), got {dropout}")
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.scale = alpha / r
        self.dropout = nn.Dropout(dropout)
        self.lora_A = SlotParameters()  # slot k: [r, in]
        self.lora_B = SlotParameters()  # slot k: [out, r]

    @property
    def n_slots(self) -> int:
        return len(self.lora_A)

    def add_slot(self, device: torch.device, dtype: torch.dtype) -> None:
        A = torch.empty(self.r, self.in_features, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # nn.Linear's default init, as in the paper's code
        self.lora_A.append(nn.Parameter(A))
        self.lora_B.append(nn.Parameter(torch.zeros(self.out_features, self.r, device=device, dtype=dtype)))

    def slot_parameters(self, slot: int) -> Dict[str, nn.Parameter]:
        return {"lora_A": self.lora_A[slot], "lora_B": self.lora_B[slot]}

    def forward(self, x: torch.Tensor, h: torch.Tensor, selection: SlotSelection) -> torch.Tensor:
        """x: [B, T, in]; the batch's U slots -> [B, T, out]."""
        A = self.lora_A.rows(selection.slots, selection.ids)  # [U, r, in]
        B = self.lora_B.rows(selection.slots, selection.ids)  # [U, out, r]
        return self.scale * mixed_bottleneck(self.dropout(x), A, B, selection.weights, exclusive=selection.exclusive)

    def forward_slot(self, x: torch.Tensor, h: torch.Tensor, slot: int) -> torch.Tensor:
        return self.scale * ((self.dropout(x) @ self.lora_A[slot].T) @ self.lora_B[slot].T)

    def weight_delta(self, weights: torch.Tensor):
        """weights: [K] -> (dW [out, in], None)."""
        A, B = torch.stack(tuple(self.lora_A)), torch.stack(tuple(self.lora_B))
        return self.scale * torch.einsum("k,kor,kri->oi", weights.to(A.dtype), B, A), None

    @staticmethod
    def slot_parameter_count(in_features: int, out_features: int, r: int = 8, **_) -> int:
        return r * (in_features + out_features)
