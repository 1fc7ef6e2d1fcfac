"""Stick-breaking attention and the mixture of attention heads of ModuleFormer (Shen et al. 2023, "ModuleFormer:
Modularity Emerges from Mixture-of-Experts", arXiv 2306.04640; stick-breaking attention as in Tan et al. 2024,
"Scaling Stick-Breaking Attention").

Stick-breaking replaces the softmax and needs no position embeddings. For query ``i`` and an earlier key ``j``,
``beta_ij = sigmoid(q_i . k_j / sqrt(d))`` and ``A_ij = beta_ij * prod_{j < m < i} (1 - beta_im)``: the nearest
earlier token takes its share of the "stick" first and passes the rest further back, so each row sums to
``1 - prod_j (1 - beta_ij) <= 1``. It is computed in log space: ``log A_ij = logsigmoid(z_ij) + sum_{j<m<i}
logsigmoid(-z_im)``, the sum being a reversed cumulative sum. ``attend_current=True`` also lets a token attend to
itself (``j <= i``, products over ``j < m <= i``), which is what the released MoLM checkpoints compute.

Attention experts (MoA): each expert owns a query projection and an output projection; a top-k router picks ``k``
experts per token; keys and values are shared by all experts. Every chosen expert attends with all its heads, and the
token's output is the gate-weighted sum of the chosen experts' projected outputs.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from continual.modules.experts import Dispatch, ExpertPool, expand_sample_mask


def stick_breaking_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    key_mask: Optional[torch.Tensor] = None,
    attend_current: bool = False,
) -> torch.Tensor:
    """Causal stick-breaking attention weights.

    The last ``Tq`` of the ``Tk`` key positions are the queries' own positions (``Tq == Tk`` without a cache).

    Args:
        q: ``[B, ..., Tq, d]`` queries.
        k: ``[B, ..., Tk, d]`` keys (leading dimensions broadcast against ``q``'s).
        key_mask: ``[B, Tk]`` true/1 for real keys, false/0 for padding (padding takes no share of the stick).
        attend_current: also attend to the query's own position.

    Returns:
        ``[B, ..., Tq, Tk]`` float32 weights; zero above the diagonal and on masked keys; rows sum to at most 1.
    """
    Tq, Tk = q.shape[-2], k.shape[-2]
    if Tq > Tk:
        raise ValueError(f"more queries ({Tq}) than keys ({Tk})")
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])  # [B, ..., Tq, Tk]
    # Query i sits at key position Tk - Tq + i; it sees keys j < that (j <= with attend_current).
    shift = Tk - Tq - (0 if attend_current else 1)
    allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=shift)
    if key_mask is not None:
        if key_mask.shape != (logits.shape[0], Tk):
            raise ValueError(f"key_mask must have shape [{logits.shape[0]}, {Tk}], got {tuple(key_mask.shape)}")
        view = (key_mask.shape[0],) + (1,) * (logits.dim() - 2) + (Tk,)
        allowed = allowed & key_mask.bool().reshape(view)
    log_keep = torch.where(allowed, F.logsigmoid(-logits), 0.0)  # log(1 - beta), 0 where not allowed
    # sum_{m > j} log(1 - beta_im): a reversed inclusive cumulative sum, shifted one key to the right (no cancellation).
    suffix = log_keep.flip(-1).cumsum(-1).flip(-1)
    later = F.pad(suffix[..., 1:], (0, 1))
    return torch.where(allowed, torch.exp(F.logsigmoid(logits) + later), 0.0)


def stick_breaking_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: Optional[torch.Tensor] = None,
    attend_current: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Stick-breaking attention ``A @ v``.

    Args:
        q: ``[B, ..., Tq, d]``; k: ``[B, ..., Tk, d]``; v: ``[B, ..., Tk, dv]`` (leading dimensions broadcast).
        key_mask: ``[B, Tk]`` real keys (see :func:`stick_breaking_weights`).
        attend_current: also attend to the query's own position.

    Returns:
        ``(out [B, ..., Tq, dv] in v's dtype, weights [B, ..., Tq, Tk] float32)``.
    """
    weights = stick_breaking_weights(q, k, key_mask, attend_current)
    return torch.matmul(weights.to(v.dtype), v), weights


class MixtureOfAttentionHeads(ExpertPool):
    """Attention experts: per-expert query and output projections, shared keys and values, stick-breaking attention.

    Args:
        d_model: model width.
        n_head: heads of each attention expert.
        head_dim: width of a head.
        n_experts: attention experts of group 0 (or every group's size).
        k: experts per token.
        gate_hidden: hidden width of the MLP router; 0 for a linear router.
        attend_current: stick-breaking also attends to the token itself.
        dropout: dropout on the attention weights.
        dispatch: "auto", "loop" or "grouped" (see ``continual.modules.experts.DISPATCH_BACKENDS``).
        init_std: optional initial standard deviations for "w_q", "w_o", "router".
    """

    def __init__(
        self,
        d_model: int,
        n_head: int,
        head_dim: int,
        n_experts: Union[int, Sequence[int]],
        k: int,
        gate_hidden: int = 256,
        attend_current: bool = False,
        dropout: float = 0.0,
        dispatch: str = "auto",
        init_std: Optional[Mapping[str, float]] = None,
    ):
        if n_head < 1 or head_dim < 1:
            raise ValueError(f"n_head and head_dim must be >= 1, got {n_head} and {head_dim}")
        inner = n_head * head_dim
        super().__init__(
            d_model, {"w_q": (d_model, inner), "w_o": (inner, d_model)}, n_experts, k, gate_hidden, dispatch, init_std
        )
        self.n_head, self.head_dim, self.attend_current = n_head, head_dim, attend_current
        # Shared by every expert, hence owned by group 0 (see ExpertPool.shared_parameters).
        self.k_proj = nn.Linear(d_model, inner, bias=False)
        self.v_proj = nn.Linear(d_model, inner, bias=False)
        self.attn_dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        expert_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Causal attention through each token's ``k`` chosen experts.

        Args:
            x: ``[B, T, d_model]``.
            attention_mask: ``[B, T]`` 1 for real tokens, 0 for padding (padded keys are ignored; padded queries are
                left out of usage and losses).
            expert_mask: ``[B, E]`` bool: the experts each sample may route to.

        Returns:
            ``[B, T, d_model]``.
        """
        B, T, d = x.shape
        K, H, hd = self.k, self.n_head, self.head_dim
        flat = x.reshape(B * T, d)
        routing = self.route(flat, expand_sample_mask(expert_mask, (B, T)), attention_mask)
        plan = Dispatch.of(routing.indices, self.n_experts)

        q_sorted = self.expert_matmul("w_q", plan.gather(flat), plan.counts)  # [N*K, H*hd]
        inverse = torch.empty_like(plan.order)
        inverse[plan.order] = torch.arange(plan.order.numel(), device=plan.order.device)
        q = q_sorted.index_select(0, inverse).view(B, T, K, H, hd).permute(0, 2, 3, 1, 4)  # [B, K, H, T, hd]
        keys = self.k_proj(x).view(B, T, H, hd).transpose(1, 2).unsqueeze(1)  # [B, 1, H, T, hd]
        values = self.v_proj(x).view(B, T, H, hd).transpose(1, 2).unsqueeze(1)
        weights = stick_breaking_weights(q, keys, attention_mask, self.attend_current)  # [B, K, H, T, T]
        if self.stop_gradient_mixing:  # TinT's stop-gradient attention: no gradient reaches queries or keys
            weights = weights.detach()
        out = torch.matmul(self.attn_dropout(weights).to(values.dtype), values)  # [B, K, H, T, hd]

        out = out.permute(0, 3, 1, 2, 4).reshape(B * T * K, H * hd)  # row token * K + choice, like indices.flatten()
        y_sorted = self.expert_matmul("w_o", out.index_select(0, plan.order), plan.counts)
        return plan.combine(y_sorted, routing.gates, B * T).reshape(B, T, d)
