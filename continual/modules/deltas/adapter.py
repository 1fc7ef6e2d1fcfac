"""Sequential bottleneck adapter (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP"), one
adapter per task.

Placed on a linear's output (by default the attention output and FFN output projections, before the residual add
and LayerNorm): ``h' = h + up(act(down(h)))``. The up-projection is zero-initialised, so a new task starts exactly
at the frozen backbone.
"""

from __future__ import annotations

import math
from typing import ClassVar, Dict, Tuple

import torch
from torch import nn

from continual.modules.families import default_targets
from continual.modules.deltas.mixing import ACTIVATIONS, mixed_bottleneck
from continual.modules.deltas.registry import register_delta
from continual.modules.deltas.stacking import SlotParameters, SlotSelection

# Attention output and FFN output projections, per architecture family.
BLOCK_OUTPUTS: Dict[str, str] = default_targets("block_outputs")


def init_bottleneck(rows: int, cols: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A ``[rows, cols]`` down-projection with nn.Linear's default (Kaiming-uniform) initialisation."""
    weight = torch.empty(rows, cols, device=device, dtype=dtype)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    return weight


@register_delta
class AdapterDelta(nn.Module):
    """Per-task bottleneck adapters on a linear's output.

    Args:
        in_features: input width of the wrapped linear (unused: the adapter reads the output).
        out_features: output width of the wrapped linear (the adapter's input and output width).
        bottleneck: hidden width of the adapter.
        activation: "gelu", "relu", "tanh" or "identity".
        scale: factor on the adapter's output (1 for the sequential adapter; not a user option of this kind).
    """

    kind: ClassVar[str] = "adapter"
    options: ClassVar[Tuple[str, ...]] = ("bottleneck", "activation")
    default_targets: ClassVar[Dict[str, str]] = BLOCK_OUTPUTS
    mergeable: ClassVar[bool] = False  # the activation makes it non-linear

    # Which tensor the bottleneck reads: the linear's output h (sequential) or its input x (parallel adapter).
    reads_input: ClassVar[bool] = False

    def __init__(
        self, in_features: int, out_features: int, bottleneck: int = 24, activation: str = "gelu", scale: float = 1.0
    ):
        super().__init__()
        if bottleneck < 1:
            raise ValueError(f"{self.kind}: bottleneck must be >= 1, got {bottleneck}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"{self.kind}: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.in_width = in_features if self.reads_input else out_features
        self.out_features, self.bottleneck, self.activation, self.scale = out_features, bottleneck, activation, scale
        self.down = SlotParameters()  # slot k: [bottleneck, in_width]
        self.down_bias = SlotParameters()  # slot k: [bottleneck]
        self.up = SlotParameters()  # slot k: [out, bottleneck], zero-initialised
        self.up_bias = SlotParameters()  # slot k: [out], zero-initialised

    @property
    def n_slots(self) -> int:
        return len(self.down)

    def add_slot(self, device: torch.device, dtype: torch.dtype) -> None:
        n, d = self.bottleneck, self.out_features
        self.down.append(nn.Parameter(init_bottleneck(n, self.in_width, device, dtype)))
        self.down_bias.append(nn.Parameter(torch.zeros(n, device=device, dtype=dtype)))
        self.up.append(nn.Parameter(torch.zeros(d, n, device=device, dtype=dtype)))
        self.up_bias.append(nn.Parameter(torch.zeros(d, device=device, dtype=dtype)))

    def slot_parameters(self, slot: int) -> Dict[str, nn.Parameter]:
        return {"down": self.down[slot], "down_bias": self.down_bias[slot], "up": self.up[slot], "up_bias": self.up_bias[slot]}

    def forward(self, x: torch.Tensor, h: torch.Tensor, selection: SlotSelection) -> torch.Tensor:
        """x: [B, T, in]; h: [B, T, out]; the batch's U slots -> [B, T, out]."""
        slots, ids = selection.slots, selection.ids
        return self.scale * mixed_bottleneck(
            x if self.reads_input else h,
            self.down.rows(slots, ids),
            self.up.rows(slots, ids),
            selection.weights,
            exclusive=selection.exclusive,
            activation=ACTIVATIONS[self.activation],
            down_bias=self.down_bias.rows(slots, ids),
            up_bias=self.up_bias.rows(slots, ids),
        )

    def forward_slot(self, x: torch.Tensor, h: torch.Tensor, slot: int) -> torch.Tensor:
        u = x if self.reads_input else h
        z = ACTIVATIONS[self.activation](u @ self.down[slot].T + self.down_bias[slot])
        return self.scale * (z @ self.up[slot].T + self.up_bias[slot])

    def weight_delta(self, weights: torch.Tensor):
        raise ValueError(f"{self.kind} deltas cannot be merged into the base weights: the adapter is non-linear")

    @staticmethod
    def slot_parameter_count(in_features: int, out_features: int, bottleneck: int = 24, **_) -> int:
        return 2 * bottleneck * out_features + bottleneck + out_features
