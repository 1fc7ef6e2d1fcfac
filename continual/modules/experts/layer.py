"""The feed-forward expert layer of ModuleFormer (Shen et al. 2023, "ModuleFormer: Modularity Emerges from
Mixture-of-Experts", arXiv 2306.04640): ``y = sum_{e in topk(x)} p_e(x) W_out_e act(W_in_e x)``, no biases, experts
in growable groups (:class:`~continual.modules.experts.pool.ExpertPool`), tokens dispatched by
:func:`~continual.modules.experts.pool.feed_forward_experts`.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Dict, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from continual.modules.experts.pool import ExpertPool, expand_sample_mask, feed_forward_experts

ACTIVATIONS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


class Activation(nn.Module):
    """An elementwise activation of :data:`ACTIVATIONS` as a module (no parameters), so that hooks can reach it."""

    def __init__(self, name: str):
        super().__init__()
        if name not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ACTIVATIONS[self.name](x)

    def extra_repr(self) -> str:
        return self.name


class ExpertLayer(ExpertPool):
    """Feed-forward experts ``W_out_e act(W_in_e x)`` mixed by a top-k router (no biases).

    Args:
        d_model: input and output width.
        hidden: hidden width of each expert.
        n_experts: experts of group 0 (or every group's size, to rebuild a grown layer).
        k: experts per token.
        gate_hidden: hidden width of the MLP gate; 0 for a single linear gate.
        activation: "gelu", "gelu_tanh", "relu" or "silu".
        dispatch: "auto", "loop" or "grouped".
        init_std: optional initial standard deviations for "w_in", "w_out", "router".
    """

    def __init__(
        self,
        d_model: int,
        hidden: int,
        n_experts: Union[int, Sequence[int]],
        k: int,
        gate_hidden: int = 256,
        activation: str = "gelu",
        dispatch: str = "auto",
        init_std: Optional[Mapping[str, float]] = None,
    ):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        super().__init__(
            d_model, {"w_in": (d_model, hidden), "w_out": (hidden, d_model)}, n_experts, k, gate_hidden, dispatch,
            init_std,
        )
        self.hidden, self.activation = hidden, activation
        self.act = Activation(activation)

    def forward(
        self,
        x: torch.Tensor,
        expert_mask: Optional[torch.Tensor] = None,
        token_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Mix the chosen experts of every token.

        Args:
            x: ``[B, ..., d_model]`` (e.g. ``[B, T, d]``; a 2-D ``[N, d]`` is one token per sample).
            expert_mask: ``[B, E]`` bool: the experts each sample may route to.
            token_mask: ``x.shape[:-1]`` bool: tokens counted in usage and losses (padding false).

        Returns:
            ``[B, ..., d_model]``.
        """
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        routing = self.route(flat, expand_sample_mask(expert_mask, tuple(shape[:-1])), token_mask)
        return feed_forward_experts(self, flat, routing, self.act).reshape(shape)
