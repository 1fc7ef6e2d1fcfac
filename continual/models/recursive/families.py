"""What the recursive conversion needs to know about each supported architecture, written out per family.

A family names where the stack of layers lives, the linear projections of one layer (the relaxation targets) and
its normalisation modules; every parameter of a layer must be one of those, so an architecture change shows up as
a clear error instead of a silently untied tensor. For early exit and depth-wise batching it also says how to turn
token ids into the first hidden states, what the layers take besides them, and what the default exit head is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from continual.compat import bidirectional_mask, causal_mask


@dataclass(frozen=True)
class Family:
    """Module names of one architecture family (relative to a layer unless said otherwise).

    Attributes:
        name: "llama" or "bert".
        layer_lists: dotted paths, from the model root, where the ``nn.ModuleList`` of layers may live (the first that
            exists is used: ``model.layers`` in ``LlamaForCausalLM``, ``layers`` in a bare ``LlamaModel``).
        projections: the linear layers of one layer, in forward order.
        norms: the normalisation modules of one layer.
    """

    name: str
    layer_lists: Tuple[str, ...]
    projections: Tuple[str, ...]
    norms: Tuple[str, ...]


FAMILIES: Dict[str, Family] = {
    "llama": Family(
        name="llama",
        layer_lists=("model.layers", "layers"),
        projections=(
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
        ),
        norms=("input_layernorm", "post_attention_layernorm"),
    ),
    "bert": Family(
        name="bert",
        layer_lists=("encoder.layer", "bert.encoder.layer", "roberta.encoder.layer"),
        projections=(
            "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
            "intermediate.dense", "output.dense",
        ),
        norms=("attention.output.LayerNorm", "output.LayerNorm"),
    ),
}

# Hugging Face ``config.model_type`` -> family.
MODEL_TYPES: Dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "bert": "bert",
    "roberta": "bert",
}


def family_of(model: nn.Module) -> Family:
    """The family of a Hugging Face model, from ``model.config.model_type``.

    Raises:
        ValueError: an unsupported model type (the message lists the supported ones).
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"recursive conversion does not support model_type {model_type!r} ({type(model).__name__}); "
            f"supported: {', '.join(sorted(MODEL_TYPES))}"
        )
    return FAMILIES[MODEL_TYPES[model_type]]


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
