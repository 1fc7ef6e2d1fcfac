"""The dense feed-forward block as the shared expert(s) of an upcycled expert layer: sparse upcycling (Komatsuzaki et
al. 2023, "Sparse Upcycling: Training Mixture-of-Experts from Dense Checkpoints", ICLR) and MoEfication (Zhang et al.
2022, "MoEfication: Transformer Feed-forward Layers are Mixtures of Experts", Findings of ACL), routed as in
ModuleFormer (Shen et al. 2023, arXiv 2306.04640).

:func:`fuse_feed_forward` makes every block's FFN one :class:`FeedForward` module (outputs bit-identical), the place
the ``experts`` bank kind attaches to. With ``upcycle="copy"`` the FFN is the one shared expert; with "slices" it is
``S`` experts, expert ``s = S * W_down[:, s] a_s(x) + b_down`` with ``a`` the FFN's hidden activation cut into ``S``
equal slices of units, so the mean of the slices is the FFN. :func:`shared_change` is what routing the shared experts
changes in the FFN's output, computed from one FFN pass (plus one pass through its hidden layer for slices).
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from continual.modules.bank import TaskModuleSite, architecture_family, is_conv1d, linear_dims
from continual.modules.families import FAMILIES as ARCHITECTURES
from continual.modules.families import ArchitectureFamily


# ---------------------------------------------------------------------------------------------------- the FFN site
class FeedForward(nn.Module):
    """A transformer block's feed-forward network as one module: ``y = drop(down(hidden(x)))``.

    ``hidden(x) = act(up(x))``, or ``act(gate(x)) * up(x)`` for gated FFNs (Llama). The wrapped linears are the
    backbone's own (nothing is copied), and :meth:`forward` runs the same operations in the same order as the
    module it replaces, so fusing changes no output bit.

    Args:
        up: ``d_model -> d_ff`` linear (``nn.Linear`` or GPT-2 ``Conv1D``).
        down: ``d_ff -> d_model`` linear.
        act: the activation (module or function).
        gate: ``d_model -> d_ff`` gate projection of a gated FFN, else None.
        dropout: dropout applied to the output inside the original module (GPT-2), else None.
    """

    def __init__(
        self,
        up: nn.Module,
        down: nn.Module,
        act: Callable[[torch.Tensor], torch.Tensor],
        gate: Optional[nn.Module] = None,
        dropout: Optional[nn.Module] = None,
    ):
        super().__init__()
        self.d_model, self.d_ff, _ = linear_dims(up)
        down_in, down_out, _ = linear_dims(down)
        if (down_in, down_out) != (self.d_ff, self.d_model):
            raise ValueError(f"FeedForward: down maps {down_in} -> {down_out}, expected {self.d_ff} -> {self.d_model}")
        self.up, self.down, self.act, self.gate, self.dropout = up, down, act, gate, dropout

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., d_model] -> [..., d_ff]``: the hidden units."""
        if self.gate is None:
            return self.act(self.up(x))
        return self.act(self.gate(x)) * self.up(x)

    def project(self, a: torch.Tensor) -> torch.Tensor:
        """``[..., d_ff] -> [..., d_model]``: the output projection without its bias."""
        weight = self.down.weight
        return a @ weight if is_conv1d(self.down) else F.linear(a, weight)  # Conv1D stores [in, out]

    @property
    def down_bias(self) -> Optional[torch.Tensor]:
        return getattr(self.down, "bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.down(self.hidden(x))
        return y if self.dropout is None else self.dropout(y)


def _is_fused(module: Optional[nn.Module]) -> bool:
    """A :class:`FeedForward`, possibly already wrapped by bank sites."""
    while isinstance(module, TaskModuleSite):
        module = module.base
    return isinstance(module, FeedForward)


def _submodule(module: nn.Module, path: str) -> Optional[nn.Module]:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _fuse_block(family: ArchitectureFamily, block: nn.Module) -> Optional[str]:
    """Fuse one block's FFN, named by the architecture table, into a :class:`FeedForward` in place.

    Returns the FFN's path in the block (``intermediate``, ``mlp``), or None when ``block`` is not a block of the
    family. Llama: ``mlp`` is ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``; GPT-2: ``dropout(c_proj(act(c_fc(x))))``.
    BERT's down projection sits outside the FFN module (``output.dense``, where ``output`` also adds the residual and
    normalises): the fused FFN returns the d_model output and ``output.dense`` becomes an identity, so ``output``
    still applies dropout, the residual and the LayerNorm.
    """
    ffn = _submodule(block, family.ffn)
    if _is_fused(ffn):
        return family.ffn
    names = [family.ffn_in, family.ffn_out, family.ffn_act, family.ffn_norm] + [family.ffn_gate] * bool(family.ffn_gate)
    parts = {name: _submodule(block, name) for name in names}
    if ffn is None or any(part is None for part in parts.values()):
        return None
    down_inside = family.ffn_out.startswith(family.ffn + ".")
    fused = FeedForward(
        up=parts[family.ffn_in], down=parts[family.ffn_out], act=parts[family.ffn_act],
        gate=parts[family.ffn_gate] if family.ffn_gate else None,
        dropout=getattr(ffn, "dropout", None) if down_inside else None,
    )
    parent, _, child = family.ffn.rpartition(".")
    setattr(block.get_submodule(parent) if parent else block, child, fused)
    if not down_inside:
        parent, _, child = family.ffn_out.rpartition(".")
        setattr(block.get_submodule(parent) if parent else block, child, nn.Identity())
    return family.ffn


# family -> fuse one block in place (the families whose table entry names an FFN target).
FUSERS: Dict[str, Callable[[nn.Module], Optional[str]]] = {
    name: partial(_fuse_block, family) for name, family in ARCHITECTURES.items() if "ffn" in family.targets
}


def fuse_feed_forward(model: nn.Module) -> List[str]:
    """Make every block's FFN one :class:`FeedForward` module, in place; outputs stay bit-identical.

    Idempotent: blocks already fused are left alone.

    Args:
        model: a Hugging Face BERT-like, GPT-2 or Llama-like model (with or without its task head).

    Returns:
        The FFN modules' names, in model order (e.g. ``encoder.layer.0.intermediate``, ``layers.0.mlp``).

    Raises:
        ValueError: an architecture without a fuser (e.g. T5), or no block found.
    """
    family = architecture_family(model)
    if family not in FUSERS:
        raise ValueError(f"experts: no feed-forward upcycling for the {family} family (supported: {sorted(FUSERS)})")
    names = []
    for name, module in list(model.named_modules()):
        child = FUSERS[family](module)
        if child is not None:
            names.append(f"{name}.{child}" if name else child)
    if not names:
        raise ValueError(f"experts: found no {family} feed-forward block in {type(model).__name__}")
    return names


# ---------------------------------------------------------------------------------------------------- the shared experts
def shared_gates(indices: torch.Tensor, gates: torch.Tensor, n_shared: int) -> torch.Tensor:
    """Each token's gate on each shared expert (0 where it was not chosen).

    Args:
        indices: ``[N, k]`` chosen experts (global indices; the shared ones are ``0..S-1``).
        gates: ``[N, k]`` their gates.
        n_shared: ``S``.

    Returns:
        ``[N, S]`` in the dtype of ``gates``.
    """
    chosen = indices < n_shared
    return gates.new_zeros(indices.shape[0], n_shared).scatter_add(
        1, indices.clamp(max=n_shared - 1), gates * chosen
    )


def shared_change(ffn: FeedForward, x: torch.Tensor, h: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """What routing the shared experts changes in the dense FFN's output: ``sum_s g_s f_s(x) - FFN(x)``.

    Args:
        ffn: the dense FFN (its shared experts are itself, or ``S`` equal slices of its hidden units).
        x: ``[N, d_model]`` tokens.
        h: ``[N, d_model]`` ``FFN(x)``.
        gates: ``[N, S]`` gates of the shared experts (:func:`shared_gates`).

    Returns:
        ``[N, d_model]``. One expert: ``(g_0 - 1) h``. ``S`` slices: ``W_down (a * (S g_unit - 1)) + b (sum g - 1)``
        with ``g_unit`` each hidden unit's slice gate; zero when every ``g_s == 1/S``.
    """
    S = gates.shape[1]
    if S == 1:
        return (gates - 1).to(h.dtype) * h
    a = ffn.hidden(x)  # [N, d_ff]
    unit = (S * gates - 1).repeat_interleave(a.shape[-1] // S, dim=-1).to(a.dtype)  # [N, d_ff]
    out = ffn.project(a * unit)
    bias = ffn.down_bias
    if bias is not None:
        out = out + (gates.sum(-1, keepdim=True) - 1).to(out.dtype) * bias
    return out
