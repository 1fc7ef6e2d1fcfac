"""What the recursive conversion needs to know about each supported architecture, written out per family.

The module names come from the one architecture table (:mod:`continual.modules.families`): where the stack of
layers lives, the linear projections of one layer (the relaxation targets) and its normalisation modules; every
parameter of a layer must be one of those, so an architecture change shows up as a clear error instead of a
silently untied tensor. For early exit and depth-wise batching it also says how to turn
token ids into the first hidden states, what the layers take besides them, and what the default exit head is.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
from torch import nn

from continual.compat import bidirectional_mask, causal_mask
from continual.modules.families import FAMILIES as ARCHITECTURES
from continual.modules.families import MODEL_TYPES as ARCHITECTURE_MODEL_TYPES
from continual.modules.families import ArchitectureFamily as Family
from continual.modules.families import family_of as architecture_family
from continual.modules.families import model_type_of


# Recursive conversion also needs each family's embedding and per-layer arguments (below); these have them.
RECURSIVE_FAMILIES = ("llama", "bert")
FAMILIES: Dict[str, Family] = {name: ARCHITECTURES[name] for name in RECURSIVE_FAMILIES}
MODEL_TYPES: Dict[str, str] = {t: f for t, f in ARCHITECTURE_MODEL_TYPES.items() if f in RECURSIVE_FAMILIES}


def family_of(model: nn.Module) -> Family:
    """The family of a Hugging Face model, from ``model.config.model_type``.

    Raises:
        ValueError: an unsupported model type (the message lists the supported ones).
    """
    family = architecture_family(model, "recursive conversion")
    if family.name not in FAMILIES:
        raise ValueError(
            f"recursive conversion does not support model_type {model_type_of(model)!r} ({type(model).__name__}); "
            f"supported: {', '.join(sorted(MODEL_TYPES))}"
        )
    return family


def layer_list_path(model: nn.Module, family: Family) -> str:
    """The dotted path of the model's ``nn.ModuleList`` of layers."""
    for path in family.layer_lists:
        try:
            found = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(found, nn.ModuleList):
            return path
    raise ValueError(
        f"{type(model).__name__} has none of the {family.name} layer lists {list(family.layer_lists)}"
    )


def base_model(model: nn.Module, family: Family) -> nn.Module:
    """The module that owns the embeddings and the layer stack (``model.model`` of a causal LM, else ``model``)."""
    path = layer_list_path(model, family).rpartition(".")[0]  # "model.layers" -> "model"; "encoder.layer" -> "encoder"
    if family.name == "bert":
        path = path.rpartition(".")[0]  # "bert.encoder" -> "bert"; "encoder" -> ""
    return model.get_submodule(path) if path else model


# ---------------------------------------------------------------------------------------------------- running
def embed(model: nn.Module, family: Family, input_ids: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` token ids -> ``[B, T, H]`` hidden states entering the first layer."""
    base = base_model(model, family)
    if family.name == "llama":
        return base.embed_tokens(input_ids)
    return base.embeddings(input_ids=input_ids)


def layer_kwargs(model: nn.Module, family: Family, hidden: torch.Tensor, attention_mask: torch.Tensor) -> dict:
    """The keyword arguments every layer of the family takes besides the hidden states, for one batch.

    Args:
        hidden: ``[B, T, H]`` (only its shape, dtype and device are read).
        attention_mask: ``[B, T]`` 1 for tokens, 0 for right padding.
    """
    base = base_model(model, family)
    if family.name == "llama":
        position_ids = torch.arange(hidden.shape[1], device=hidden.device)[None, :]
        return {
            "attention_mask": causal_mask(base.config, hidden, attention_mask, position_ids),
            "position_ids": position_ids,
            "position_embeddings": base.rotary_emb(hidden, position_ids=position_ids),
        }
    return {"attention_mask": bidirectional_mask(base, hidden, attention_mask)}


def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """One layer's forward; returns the new ``[B, T, H]`` hidden states whatever the layer returns."""
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def last_token(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, T, H]`` -> ``[B, H]`` at each sample's last non-padding position (right padding)."""
    last = attention_mask.sum(1).long().clamp_min(1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


ExitHead = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def default_exit_head(model: nn.Module, family: Family) -> Optional[ExitHead]:
    """The exit head shared by every loop: a causal LM's final norm and LM head on the last token.

    Returns:
        ``head(hidden [B, T, H], attention_mask [B, T]) -> [B, V]`` logits, or None when the model has no LM head
        (an encoder: pass your own head).
    """
    lm_head = getattr(model, "lm_head", None)
    if family.name != "llama" or lm_head is None:
        return None
    norm = base_model(model, family).norm

    def head(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return lm_head(norm(last_token(hidden, attention_mask)))

    return head
