"""Parallel adapter (He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning"), one adapter
per task.

Reads the wrapped linear's *input* and adds a scaled bottleneck beside it: ``h' = W x + b + s * up(act(down(x)))``.
He et al. place it beside a whole sub-layer (best: beside the FFN, ``s = 4``); here it sits beside one linear, by
default the attention output and FFN output projections. The up-projection is zero-initialised.
"""

from __future__ import annotations

from typing import ClassVar, Dict, Tuple

import torch
from torch import nn

from continual.modules.deltas.adapter import BLOCK_OUTPUTS, init_bottleneck
from continual.modules.deltas.mixing import ACTIVATIONS, mixed_bottleneck
from continual.modules.deltas.registry import register_delta


@register_delta
class ParallelAdapterDelta(nn.Module):
    """Per-task bottleneck adapters beside a linear.

    Args:
        in_features: input width of the wrapped linear (the adapter's input width).
        out_features: output width of the wrapped linear (the adapter's output width).
        bottleneck: hidden width of the adapter.
        scale: ``s``, the factor on the adapter's output.
        activation: "relu" (the paper's), "gelu", "tanh" or "identity".
    """

    kind: ClassVar[str] = "parallel_adapter"
    options: ClassVar[Tuple[str, ...]] = ("bottleneck", "scale", "activation")
    default_targets: ClassVar[Dict[str, str]] = BLOCK_OUTPUTS
    mergeable: ClassVar[bool] = False

    def __init__(
        self, in_features: int, out_features: int, bottleneck: int = 24, scale: float = 4.0, activation: str = "relu"
    ):
        super().__init__()
        if bottleneck < 1:
            raise ValueError(f"parallel_adapter: bottleneck must be >= 1, got {bottleneck}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"parallel_adapter: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.in_features, self.out_features = in_features, out_features
        self.bottleneck, self.scale, self.activation = bottleneck, scale, activation
        self.down = nn.ParameterList()  # slot k: [bottleneck, in]
        self.down_bias = nn.ParameterList()  # slot k: [bottleneck]
        self.up = nn.ParameterList()  # slot k: [out, bottleneck], zero-initialised
        self.up_bias = nn.ParameterList()  # slot k: [out], zero-initialised

    @property
    def n_slots(self) -> int:
        return len(self.down)

    def add_slot(self, device: torch.device, dtype: torch.dtype) -> None:
        n = self.bottleneck
        self.down.append(nn.Parameter(init_bottleneck(n, self.in_features, device, dtype)))
        self.down_bias.append(nn.Parameter(torch.zeros(n, device=device, dtype=dtype)))
        self.up.append(nn.Parameter(torch.zeros(self.out_features, n, device=device, dtype=dtype)))
        self.up_bias.append(nn.Parameter(torch.zeros(self.out_features, device=device, dtype=dtype)))

    def slot_parameters(self, slot: int) -> Dict[str, nn.Parameter]:
        return {"down": self.down[slot], "down_bias": self.down_bias[slot], "up": self.up[slot], "up_bias": self.up_bias[slot]}

    def forward(self, x: torch.Tensor, h: torch.Tensor, weights: torch.Tensor, exclusive: bool) -> torch.Tensor:
        """x: [B, T, in]; weights: [B, K] -> [B, T, out]."""
        return self.scale * mixed_bottleneck(
            x,
            torch.stack(tuple(self.down)),
            torch.stack(tuple(self.up)),
            weights,
            exclusive=exclusive,
            activation=ACTIVATIONS[self.activation],
            down_bias=torch.stack(tuple(self.down_bias)),
            up_bias=torch.stack(tuple(self.up_bias)),
        )

    def weight_delta(self, weights: torch.Tensor):
        raise ValueError("parallel_adapter deltas cannot be merged into the base weights: the adapter is non-linear")

    @staticmethod
    def slot_parameter_count(in_features: int, out_features: int, bottleneck: int = 24, **_) -> int:
        return bottleneck * (in_features + out_features) + bottleneck + out_features
