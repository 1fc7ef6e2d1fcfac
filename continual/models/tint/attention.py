"""Attention with stop-gradient probabilities, TinT's approximation of the attention backward pass
(Panigrahi et al. 2023, arXiv 2307.01189, §3.3).

TinT back-propagates through self-attention as if the attention probabilities were constants: the gradient reaches
the values (and, through them, the value projection and the layer input) but never the scores, so query and key
projections get no gradient. Here that is an attention function registered under :data:`DETACHED` through
transformers' ``AttentionInterface`` (no transformers source is edited): eager attention whose softmax output is
detached. :func:`detached_attention` switches a model to it for the duration of a ``with`` block.

A family whose attention does not use that interface gives its own ``stop_gradient`` context manager in its TinT
layout (:mod:`.layouts`); :func:`detached_attention` uses it: the native ModuleFormer (``moduleformer``), whose
stick-breaking attention weights and router gates become constants.

Supported through the interface: models whose attention modules dispatch through ``ALL_ATTENTION_FUNCTIONS`` with
``(module, query, key, value, attention_mask, scaling, dropout)`` and no extra score terms: GPT-2 (``gpt2``) and
Llama (``llama``, SmolLM2 included; grouped-query attention handled) in transformers 5. Any other ``model_type``, GPT-2
with ``reorder_and_upcast_attn``, and calls that ask for a sliding window or logit soft-capping fail with a clear
error rather than computing something else.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Tuple

import torch
from torch import nn

from continual.compat import attn_implementation, dispatches_attention_interface

DETACHED = "tint_detached_eager"
# config.model_type values whose attention this function reproduces exactly (apart from the detached softmax).
SUPPORTED_MODEL_TYPES = ("gpt2", "llama")


def detached_eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    **kwargs,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eager attention whose probabilities are constants to autograd.

    Args:
        module: the calling attention module (read for ``num_key_value_groups`` and ``training``).
        query: ``[B, H, T, d]``.
        key, value: ``[B, H_kv, S, d]`` (``H`` a multiple of ``H_kv``).
        attention_mask: additive ``[B, 1, T, S]`` mask (the eager mask), or None.
        scaling: score scale; ``d ** -0.5`` when None.
        dropout: attention dropout probability (applied only in training mode).

    Returns:
        ``([B, T, H, d] output, [B, H, T, S] detached probabilities)``.
    """
    if kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None:
        raise NotImplementedError(
            f"{DETACHED}: sliding-window and soft-capped attention are not supported (got "
            f"sliding_window={kwargs.get('sliding_window')}, softcap={kwargs.get('softcap')})"
        )
    groups = int(getattr(module, "num_key_value_groups", 1))
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype).detach()
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, probs


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(DETACHED, detached_eager_attention)
    AttentionMaskInterface.register(DETACHED, eager_mask)  # the additive float mask eager attention expects


_register()


def _own_stop_gradient(model: nn.Module):
    """The ``stop_gradient`` of ``model``'s TinT layout, or None when its attention uses the interface."""
    from continual.models.tint.layouts import LAYOUTS

    layout = LAYOUTS.get(getattr(getattr(model, "config", None), "model_type", None))
    return getattr(layout, "stop_gradient", None)


def check_supported(model: nn.Module) -> None:
    """Raise a ValueError naming the supported model types when ``model`` cannot use detached attention."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if _own_stop_gradient(model) is not None:
        return
    if model_type not in SUPPORTED_MODEL_TYPES:
        from continual.models.tint.layouts import LAYOUTS

        own = sorted(t for t, layout in LAYOUTS.items() if hasattr(layout, "stop_gradient"))
        raise ValueError(
            f"stop-gradient attention is implemented for model types {', '.join(SUPPORTED_MODEL_TYPES + tuple(own))}, "
            f"not {model_type!r}"
        )
    if getattr(config, "reorder_and_upcast_attn", False):
        raise ValueError("GPT-2 with reorder_and_upcast_attn=True bypasses the attention interface; set it to False")
    if not dispatches_attention_interface(model):
        raise ValueError(f"{type(model).__name__} does not dispatch attention through transformers' AttentionInterface")


@contextmanager
def detached_attention(model: nn.Module) -> Iterator[None]:
    """Run ``model`` with stop-gradient attention inside the block; its previous implementation is restored on exit
    (also after an exception)."""
    check_supported(model)
    own = _own_stop_gradient(model)
    if own is not None:
        with own(model):
            yield
        return
    previous = attn_implementation(model)
    model.set_attn_implementation(DETACHED)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
