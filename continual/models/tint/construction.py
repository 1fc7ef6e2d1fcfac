"""The pieces of TinT's construction (Panigrahi et al. 2023, "Trainable Transformer in Transformer",
arXiv 2307.01189, §2-3): an auxiliary model's weights live in *prefix tokens*, and its forward pass, backward pass
and gradient step are computed by attention heads that read those prefix tokens.

- **Packing** (:func:`pack_linear` / :func:`unpack_linear`): a linear layer ``W [dout, din], b [dout]`` is stored in
  ``S`` prefix tokens of width ``D``; prefix ``s`` holds rows ``s*r .. s*r + r - 1`` (``r = dout / S``), each row
  followed by its bias entry, in ``r`` slots of ``din + 1`` numbers. Lossless.
- **LinearForward** ``y_t = W x_t + b``: ``r`` linear-attention heads; head ``i``'s query is ``[x_t, 1]``, its key
  at prefix ``s`` is slot ``i`` (row ``s*r + i`` and its bias), its value the one-hot position of prefix ``s``; so
  head ``i`` returns the ``S`` outputs of the rows in slot ``i``.
- **LinearBackward** ``g_x = W^T g_y``: head ``i``'s query is the gradient entries of the slot-``i`` rows, keys are
  the prefixes' one-hot positions, values the rows themselves; the heads' outputs add up to ``sum_j g_j W_j``.
- **LinearDescent** ``W <- W - eta sum_t g_y,t x_t^T`` (and ``b <- b - eta sum_t g_y,t``): the prefix tokens attend
  to the sequence; head ``i`` at prefix ``s`` scores token ``t`` by ``g_y,t[s*r + i]`` and reads the value
  ``[x_t, 1]``; the result is subtracted from the slot. Gradients are **summed** over tokens.
- A layer norm's affine part is a linear layer with ``W = diag(gamma)``; TinT descends on its bias only.
- **First-order layer-norm / activation backward** ``N (f(x + g/N) - f(x))`` (:mod:`.first_order`).
- **Stop-gradient attention backward** ``g_v = A^T g_o`` per head with the forward's attention probabilities ``A``
  held constant: an attention whose fixed weights are the transposed forward ones.

These are modules over explicit prefix and token tensors (``prefix: [B, S, D]``, tokens ``[B, T, .]``) rather than
gated sub-spaces of one wide residual stream as in the paper; the arithmetic each head performs is the paper's.
:mod:`.simulated` chains them into a whole one-step fine-tuning of a GPT-2 model.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import nn

from continual.models.tint.first_order import DEFAULT_N, first_order_vjp, normalizer


# ---------------------------------------------------------------------------------------------------- packing
def rows_per_prefix(dout: int, num_prefixes: int) -> int:
    """``r = dout / S``; ValueError when the rows do not spread evenly over the prefixes."""
    if num_prefixes < 1 or dout % num_prefixes:
        raise ValueError(f"{dout} output rows do not spread evenly over {num_prefixes} prefix tokens")
    return dout // num_prefixes


def packed_width(din: int, dout: int, num_prefixes: int) -> int:
    """Prefix-token width needed to hold a ``[dout, din]`` linear layer with its bias: ``r * (din + 1)``."""
    return rows_per_prefix(dout, num_prefixes) * (din + 1)


def pack_linear(weight: torch.Tensor, bias: Optional[torch.Tensor], num_prefixes: int, width: int) -> torch.Tensor:
    """Store a linear layer in prefix tokens.

    Args:
        weight: ``[dout, din]``.
        bias: ``[dout]`` or None (stored as zeros).
        num_prefixes: ``S``.
        width: ``D``, at least :func:`packed_width`; the rest of each token is zero.

    Returns:
        ``[S, D]`` prefix tokens.
    """
    dout, din = weight.shape
    need = packed_width(din, dout, num_prefixes)
    if width < need:
        raise ValueError(f"prefix width {width} cannot hold a [{dout}, {din}] linear layer over {num_prefixes} prefixes; need {need}")
    bias = torch.zeros(dout, dtype=weight.dtype, device=weight.device) if bias is None else bias
    rows = torch.cat([weight, bias[:, None].to(weight.dtype)], dim=1)  # [dout, din + 1]
    out = torch.zeros(num_prefixes, width, dtype=weight.dtype, device=weight.device)
    out[:, :need] = rows.reshape(num_prefixes, need)
    return out


def unpack_linear(prefix: torch.Tensor, din: int, dout: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_linear`: ``[..., S, D]`` -> ``(weight [..., dout, din], bias [..., dout])``."""
    S = prefix.shape[-2]
    r = rows_per_prefix(dout, S)
    rows = prefix[..., : r * (din + 1)].reshape(*prefix.shape[:-2], dout, din + 1)
    return rows[..., :din], rows[..., din]


def _slots(prefix: torch.Tensor, din: int, r: int) -> torch.Tensor:
    """``[B, S, D]`` -> ``[B, r, S, din + 1]``: slot ``i`` of every prefix, per head."""
    B, S, _ = prefix.shape
    return prefix[..., : r * (din + 1)].reshape(B, S, r, din + 1).permute(0, 2, 1, 3)


def linear_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Attention without softmax, per head: ``(q k^T) v``.

    Args:
        query: ``[B, H, Tq, dk]``; key: ``[B, H, Tk, dk]``; value: ``[B, H, Tk, dv]``.

    Returns:
        ``[B, H, Tq, dv]``.
    """
    return torch.matmul(torch.matmul(query, key.transpose(-1, -2)), value)


def _one_hot_positions(B: int, heads: int, S: int, like: torch.Tensor) -> torch.Tensor:
    """The prefix tokens' one-hot position embeddings, ``[B, heads, S, S]``."""
    return torch.eye(S, dtype=like.dtype, device=like.device).expand(B, heads, S, S)


def _with_one(x: torch.Tensor) -> torch.Tensor:
    """``[..., d]`` -> ``[..., d + 1]`` with a trailing constant 1 (reads a stored bias)."""
    return torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)


# ---------------------------------------------------------------------------------------------------- linear
class LinearForward(nn.Module):
    """``y_t = W x_t + b`` for every token, by ``r`` linear-attention heads over the prefix tokens.

    Args:
        din, dout: the simulated layer's input and output widths.
        num_prefixes: ``S`` (must divide ``dout``).
    """

    def __init__(self, din: int, dout: int, num_prefixes: int):
        super().__init__()
        self.din, self.dout, self.S = din, dout, num_prefixes
        self.r = rows_per_prefix(dout, num_prefixes)

    def forward(self, prefix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """prefix: ``[B, S, D]``; x: ``[B, T, din]`` -> ``[B, T, dout]``."""
        B, T, _ = x.shape
        query = _with_one(x)[:, None].expand(B, self.r, T, self.din + 1)
        key = _slots(prefix, self.din, self.r)  # [B, r, S, din + 1]
        value = _one_hot_positions(B, self.r, self.S, x)
        heads = linear_attention(query, key, value)  # [B, r, T, S]: head i, prefix s -> row s*r + i
        return heads.permute(0, 2, 3, 1).reshape(B, T, self.dout)


class LinearBackward(nn.Module):
    """``g_x = W^T g_y`` for every token, by ``r`` linear-attention heads over the prefix tokens."""

    def __init__(self, din: int, dout: int, num_prefixes: int):
        super().__init__()
        self.din, self.dout, self.S = din, dout, num_prefixes
        self.r = rows_per_prefix(dout, num_prefixes)

    def forward(self, prefix: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
        """prefix: ``[B, S, D]``; grad_out: ``[B, T, dout]`` -> ``[B, T, din]``."""
        B, T, _ = grad_out.shape
        query = grad_out.reshape(B, T, self.S, self.r).permute(0, 3, 1, 2)  # head i: g of rows s*r + i
        key = _one_hot_positions(B, self.r, self.S, grad_out)
        value = _slots(prefix, self.din, self.r)[..., : self.din]  # the rows, without their bias
        return linear_attention(query, key, value).sum(dim=1)  # heads add up: sum_j g_j W_j


class LinearDescent(nn.Module):
    """One gradient step on the prefix tokens: ``W <- W - eta sum_t g_t x_t^T``, ``b <- b - eta sum_t g_t``.

    Args:
        din, dout, num_prefixes: as for :class:`LinearForward`.
        update_weight: False keeps ``W`` (TinT's layer norms descend on their bias only).
        update_bias: False keeps ``b``.
    """

    def __init__(self, din: int, dout: int, num_prefixes: int, update_weight: bool = True, update_bias: bool = True):
        super().__init__()
        self.din, self.dout, self.S = din, dout, num_prefixes
        self.r = rows_per_prefix(dout, num_prefixes)
        self.update_weight, self.update_bias = update_weight, update_bias

    def forward(
        self,
        prefix: torch.Tensor,
        x: torch.Tensor,
        grad_out: torch.Tensor,
        lr: float,
        token_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """New prefix tokens.

        Args:
            prefix: ``[B, S, D]``.
            x: ``[B, T, din]`` the layer's inputs in the forward pass.
            grad_out: ``[B, T, dout]`` the gradient at its outputs.
            lr: step size ``eta``.
            token_mask: ``[B, T]``, tokens whose gradient counts (None: all).

        Returns:
            ``[B, S, D]``; each batch row descends on its own tokens only.
        """
        B, T, _ = x.shape
        if token_mask is not None:
            grad_out = grad_out * token_mask[..., None].to(grad_out.dtype)
        query = _one_hot_positions(B, self.r, self.S, x)  # prefix s asks for its own rows
        key = grad_out.reshape(B, T, self.S, self.r).permute(0, 3, 1, 2)  # head i, token t: g_t of rows s*r + i
        value = _with_one(x)[:, None].expand(B, self.r, T, self.din + 1)
        grads = linear_attention(query, key, value)  # [B, r, S, din + 1] = [dW_row, db_row]
        if not self.update_weight:
            grads = torch.cat([torch.zeros_like(grads[..., : self.din]), grads[..., self.din :]], dim=-1)
        if not self.update_bias:
            grads = torch.cat([grads[..., : self.din], torch.zeros_like(grads[..., self.din :])], dim=-1)
        step = grads.permute(0, 2, 1, 3).reshape(B, self.S, self.r * (self.din + 1))
        out = prefix.clone()
        out[..., : step.shape[-1]] = prefix[..., : step.shape[-1]] - lr * step
        return out


# ---------------------------------------------------------------------------------------------------- first order
class FirstOrderNormBackward(nn.Module):
    """Layer-norm / RMS-norm backward (normalisation part) as ``N (f(x + g/N) - f(x))``.

    Args:
        kind: ``"layernorm"`` or ``"rmsnorm"``.
        eps: the norm's epsilon.
        n: ``N``.
    """

    def __init__(self, kind: str = "layernorm", eps: float = 1e-5, n: float = DEFAULT_N):
        super().__init__()
        self.normalize = normalizer(kind, eps)
        self.n = n

    def forward(self, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
        """x, grad_out: ``[..., d]`` -> ``[..., d]``."""
        return first_order_vjp(self.normalize, x, grad_out, self.n)


class FirstOrderActivationBackward(nn.Module):
    """Elementwise activation backward as ``N (act(x + g/N) - act(x))``."""

    def __init__(self, activation: Callable[[torch.Tensor], torch.Tensor], n: float = DEFAULT_N):
        super().__init__()
        self.activation = activation
        self.n = n

    def forward(self, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
        return first_order_vjp(self.activation, x, grad_out, self.n)


# ---------------------------------------------------------------------------------------------------- attention
def softmax_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, attention_mask: torch.Tensor, scale: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Causal softmax attention of the simulated model.

    Args:
        q, k, v: ``[B, T, heads * dh]``.
        heads: number of heads.
        attention_mask: ``[B, T]`` 1 for real tokens (keys at 0 are ignored).
        scale: score scale.

    Returns:
        ``(out [B, T, heads * dh], probs [B, heads, T, T])``.
    """
    B, T, width = q.shape
    split = lambda t: t.view(B, T, heads, width // heads).transpose(1, 2)  # noqa: E731
    scores = torch.matmul(split(q), split(k).transpose(-1, -2)) * scale
    allowed = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()[None, None] & attention_mask.bool()[:, None, None, :]
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, split(v)).transpose(1, 2).reshape(B, T, width)
    return out, probs


class StopGradAttentionBackward(nn.Module):
    """Backward through ``o = A v`` with ``A`` held constant: ``g_v = A^T g_o`` per head (nothing reaches the scores,
    hence the query and key projections)."""

    def __init__(self, heads: int):
        super().__init__()
        self.heads = heads

    def forward(self, probs: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
        """probs: ``[B, H, T, S]`` forward attention; grad_out: ``[B, T, H * dh]`` -> ``[B, S, H * dh]``."""
        B, T, width = grad_out.shape
        g = grad_out.view(B, T, self.heads, width // self.heads).transpose(1, 2)  # [B, H, T, dh]
        g_v = torch.matmul(probs.transpose(-1, -2), g)  # key positions attend back with the transposed weights
        return g_v.transpose(1, 2).reshape(B, probs.shape[-1], width)
