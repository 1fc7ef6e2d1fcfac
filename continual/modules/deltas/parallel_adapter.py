"""Parallel adapter (He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning"), one adapter
per task.

Reads the wrapped linear's *input* and adds a scaled bottleneck beside it: ``h' = W x + b + s * up(act(down(x)))``.
He et al. place it beside a whole sub-layer (best: beside the FFN, ``s = 4``); here it sits beside one linear, by
default the attention output and FFN output projections. The up-projection is zero-initialised.
"""

from __future__ import annotations

from typing import ClassVar, Dict, Tuple

from continual.modules.deltas.adapter import BLOCK_OUTPUTS, AdapterDelta
from continual.modules.deltas.registry import register_delta


@register_delta
class ParallelAdapterDelta(AdapterDelta):
    """Per-task bottleneck adapters beside a linear: the sequential adapter's storage and math, reading ``x``.

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
    reads_input: ClassVar[bool] = True

    def __init__(
        self, in_features: int, out_features: int, bottleneck: int = 24, scale: float = 4.0, activation: str = "relu"
    ):
        super().__init__(in_features, out_features, bottleneck=bottleneck, activation=activation, scale=scale)

    @staticmethod
    def slot_parameter_count(in_features: int, out_features: int, bottleneck: int = 24, **_) -> int:
        return bottleneck * (in_features + out_features) + bottleneck + out_features
