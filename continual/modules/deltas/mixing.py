"""Batched per-sample mixing of per-task low-rank maps: the shared math of LoRA and the adapters.

LoRA, the sequential adapter and the parallel adapter are all ``up_k(act(down_k(u) + c_k)) + d_k`` for task slot
``k``; a batch mixes slots with per-sample weights ``w[b, k]``. Nothing here loops over tasks: an exclusive routing
(at most one slot per sample) gathers each sample's matrices and runs one batched matmul; any other mix
concatenates the slots along the rank axis, which computes ``sum_k w[b, k] * map_k(u_b)`` in two matmuls.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

ACTIVATIONS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "relu": F.relu,
    "tanh": torch.tanh,
    "identity": lambda z: z,
}


def mixed_bottleneck(
    u: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    weights: torch.Tensor,
    *,
    exclusive: bool,
    activation: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    down_bias: Optional[torch.Tensor] = None,
    up_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``sum_k weights[b, k] * (up_k @ act(down_k @ u_b + down_bias_k) + up_bias_k)`` for every sample ``b``.

    Args:
        u: ``[B, T, D]`` input.
        down: ``[K, R, D]`` stacked down-projections (LoRA ``A``).
        up: ``[K, O, R]`` stacked up-projections (LoRA ``B``).
        weights: ``[B, K]`` slot weights per sample.
        exclusive: every row of ``weights`` has at most one non-zero entry; gather instead of mixing.
        activation: element-wise function between the projections (None: identity).
        down_bias: ``[K, R]`` or None.
        up_bias: ``[K, O]`` or None.

    Returns:
        ``[B, T, O]``; exactly zero for samples whose weights are all zero.
    """
    weights = weights.to(u.dtype)
    if exclusive:
        slot = weights.abs().argmax(dim=1)  # [B]; an all-zero row picks slot 0 and is gated to zero below
        gate = weights.gather(1, slot[:, None])  # [B, 1]
        z = torch.bmm(u, down[slot].transpose(1, 2))  # [B, T, R]
        if down_bias is not None:
            z = z + down_bias[slot][:, None, :]
        if activation is not None:
            z = activation(z)
        out = torch.bmm(z, up[slot].transpose(1, 2))  # [B, T, O]
        if up_bias is not None:
            out = out + up_bias[slot][:, None, :]
        return out * gate[:, :, None]
    K, R, D = down.shape
    z = u @ down.reshape(K * R, D).T  # [B, T, K*R]: every slot's down-projection at once
    if down_bias is not None:
        z = z + down_bias.reshape(K * R)
    if activation is not None:
        z = activation(z)
    z = z * weights.repeat_interleave(R, dim=1)[:, None, :]  # weight each slot's rank block per sample
    out = z @ up.permute(1, 0, 2).reshape(up.shape[1], K * R).T  # [B, T, O]: the sum over slots
    if up_bias is not None:
        out = out + (weights @ up_bias)[:, None, :]
    return out
