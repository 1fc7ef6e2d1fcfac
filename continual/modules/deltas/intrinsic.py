"""Intrinsic-subspace updates (Aghajanyan et al. 2021, "Intrinsic Dimensionality Explains the Effectiveness of
Language Model Fine-Tuning"), one small trainable vector per task and site.

The update of a linear's weight is a fixed random projection of a ``d``-dimensional vector ``z``:
``vec(dW) = P z``. Storing a dense ``P`` of shape ``[out*in, d]`` per site is what the paper avoids with the
Fastfood transform; here ``P``'s columns are fixed random rank-one matrices ``u_j v_j^T``, so
``dW = U diag(z) V^T`` with ``U: [out, d]`` and ``V: [in, d]`` drawn from a per-site seed (never trained, never
stored: they are regenerated from the seed). Only ``z`` is trained and stored per task, and ``z = 0`` is the
frozen backbone. The map is linear in ``z``, so a mix of slots is the update of the mixed vector.
"""

from __future__ import annotations

import math
from typing import ClassVar, Dict, Tuple

import torch
from torch import nn

from continual.modules.deltas.lora import LoRADelta
from continual.modules.deltas.registry import register_delta
from continual.modules.deltas.stacking import SlotParameters, SlotSelection


@register_delta
class IntrinsicDelta(nn.Module):
    """Per-task intrinsic vectors ``z: [d]`` at one linear.

    Args:
        in_features: input width of the wrapped linear.
        out_features: output width of the wrapped linear.
        dim: ``d``, the dimension of the trainable subspace per site.
        seed: seed of this site's fixed projection (the bank gives each site its own).
    """

    kind: ClassVar[str] = "intrinsic"
    options: ClassVar[Tuple[str, ...]] = ("dim", "seed")
    default_targets: ClassVar[Dict[str, str]] = LoRADelta.default_targets
    mergeable: ClassVar[bool] = True

    def __init__(self, in_features: int, out_features: int, dim: int = 32, seed: int = 0):
        super().__init__()
        if dim < 1:
            raise ValueError(f"intrinsic: dim must be >= 1, got {dim}")
        self.in_features, self.out_features, self.dim, self.seed = in_features, out_features, dim, seed
        generator = torch.Generator().manual_seed(seed)
        # V x has unit-scale entries for unit-scale x; U spreads each coordinate of z over the output.
        self.register_buffer("proj_in", torch.randn(in_features, dim, generator=generator) / math.sqrt(in_features), persistent=False)
        self.register_buffer("proj_out", torch.randn(out_features, dim, generator=generator) / math.sqrt(dim), persistent=False)
        self.z = SlotParameters()  # slot k: [d], zero-initialised

    @property
    def n_slots(self) -> int:
        return len(self.z)

    def add_slot(self, device: torch.device, dtype: torch.dtype) -> None:
        self.proj_in = self.proj_in.to(device=device, dtype=dtype)
        self.proj_out = self.proj_out.to(device=device, dtype=dtype)
        self.z.append(nn.Parameter(torch.zeros(self.dim, device=device, dtype=dtype)))

    def slot_parameters(self, slot: int) -> Dict[str, nn.Parameter]:
        return {"z": self.z[slot]}

    def forward(self, x: torch.Tensor, h: torch.Tensor, selection: SlotSelection) -> torch.Tensor:
        """x: [B, T, in]; the batch's U slots -> [B, T, out]: ``U diag(sum_k w_bk z_k) V^T x_b``."""
        Z = self.z.rows(selection.slots, selection.ids)  # [U, d]
        mixed = selection.weights.to(Z.dtype) @ Z  # [B, d]
        return ((x @ self.proj_in) * mixed[:, None, :]) @ self.proj_out.T

    def forward_slot(self, x: torch.Tensor, h: torch.Tensor, slot: int) -> torch.Tensor:
        return ((x @ self.proj_in) * self.z[slot]) @ self.proj_out.T

    def weight_delta(self, weights: torch.Tensor):
        """weights: [K] -> (dW [out, in], None)."""
        mixed = weights.to(self.proj_in.dtype) @ torch.stack(tuple(self.z))  # [d]
        return (self.proj_out * mixed) @ self.proj_in.T, None

    @staticmethod
    def slot_parameter_count(in_features: int, out_features: int, dim: int = 32, **_) -> int:
        return dim
