"""The models of the continual language-modelling recipe: building one from its config, upcycling a dense causal LM
into one that grows experts, and what each domain adds and trains.

A ModuleFormer (Shen et al. 2023, arXiv 2306.04640) grows its own expert layers; any other causal LM is upcycled
first (sparse upcycling, Komatsuzaki et al. 2023): every FFN becomes a routed expert layer whose shared expert is the
FFN itself (:class:`continual.models.upcycled_lm.UpcycledExpertsLM`).
"""

from __future__ import annotations

import hashlib
from typing import Any, Dict, List, Optional, Protocol, Tuple, runtime_checkable

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from continual.config import ConfigError
from continual.recipes.lm.config import BYTE_TOKENIZER, LMExpansionConfig, LMModelConfig

_EXPERTS_HINT = ("use a ModuleFormer (model.kind=moduleformer, or a saved ModuleFormer folder), a Llama-like or GPT-2 "
                 "causal LM (upcycled), or expansion.mode=dense")


@runtime_checkable
class ExpandableLM(Protocol):
    """A causal LM that can grow groups of routed experts (``ModuleFormerForCausalLM``, ``UpcycledExpertsLM``).

    Its forward also takes ``expert_groups``, ``[B, G]`` bool: the groups each sample's tokens may route to (a domain
    router's restriction, :mod:`continual.recipes.lm.routing`); None routes over every group.
    """

    def add_experts(self, n: int, n_att: int = 0, enabled: bool = True) -> int: ...

    def expert_group_parameters(self, group: int) -> Dict[str, nn.Parameter]: ...

    def expert_layers(self) -> Dict[str, nn.Module]: ...

    def set_expert_group_enabled(self, group: int, enabled: bool) -> None: ...


def load_tokenizer(name: str):
    """``"byte"`` (a ByT5 byte tokenizer, built without files) or the tokenizer of a backbone name or folder."""
    if name == BYTE_TOKENIZER:
        from transformers import ByT5Tokenizer

        return ByT5Tokenizer()
    from continual.models.backbone import load_tokenizer as backbone_tokenizer, resolve_backbone

    return backbone_tokenizer(name, resolve_backbone(name), trust_remote_code=False)


def build_lm(model_cfg: DictConfig | LMModelConfig) -> Tuple[nn.Module, Any]:
    """The model and tokenizer a config describes (see :class:`LMModelConfig`), in eval mode.

    Raises:
        BackboneError: a causal LM or tokenizer that cannot be found (offline, unknown name).
    """
    overrides = dict(model_cfg.config_overrides)
    if model_cfg.kind == "causal_lm":
        import continual.models.moduleformer  # noqa: F401  (registers ModuleFormer folders with the Auto classes)
        from continual.models.backbone import load_causal_lm

        return load_causal_lm(model_cfg.name, random_init=model_cfg.random_init, config_overrides=overrides)
    from continual.models.moduleformer import ModuleFormerConfig, ModuleFormerForCausalLM

    tokenizer = load_tokenizer(model_cfg.tokenizer)
    config = ModuleFormerConfig.from_size(model_cfg.size, **{"vocab_size": len(tokenizer), **overrides})
    if config.vocab_size < len(tokenizer):
        raise ConfigError(
            f"model.config_overrides.vocab_size: {config.vocab_size} is smaller than the tokenizer's {len(tokenizer)} ids"
        )
    return ModuleFormerForCausalLM(config).eval(), tokenizer


def upcycled_lm(model: nn.Module, x: DictConfig | LMExpansionConfig) -> nn.Module:
    """Experts mode on a causal LM without experts: the model upcycled (FFNs turned into expert sites, in place) and
    wrapped as an :class:`ExpandableLM` with ``x``'s options (see :class:`LMExpansionConfig`).

    Raises:
        ConfigError: attention experts asked for, or an architecture that cannot be upcycled (naming the key).
    """
    from continual.models.upcycled_lm import UpcycledExpertsLM

    name = type(model).__name__
    if x.att_experts_per_domain:
        raise ConfigError(f"expansion.att_experts_per_domain: must be 0 for an upcycled {name} (feed-forward experts "
                          f"only), got {x.att_experts_per_domain}")
    try:
        return UpcycledExpertsLM(model, n=x.experts_per_domain, k=x.top_k, expert_hidden=x.expert_hidden, gate=x.gate,
                                 gate_hidden=x.gate_hidden, upcycle=x.upcycle, slices=x.slices, start_logit=x.start_logit)
    except ValueError as err:
        if "slices" in str(err):  # the one option that depends on the model: slices must divide its FFN width
            raise ConfigError(f"expansion.slices: cannot upcycle {name}: {err}") from None
        raise ConfigError(f"expansion.mode=experts: {name} has no experts to add and cannot be upcycled ({err}); "
                          + _EXPERTS_HINT) from None


def expert_router_parameters(model: ExpandableLM) -> List[nn.Parameter]:
    """Every router row of every group, and the routers' shared hidden layers, in every expert layer."""
    params: List[nn.Parameter] = []
    for layer in model.expert_layers().values():
        params += [group.router for group in layer.groups]
        if layer.gate is not None:
            params += list(layer.gate.parameters())
    return params


def set_expert_group_enabled(model: ExpandableLM, group: int, enabled: bool) -> None:
    """Switch one group of experts on or off in every expert layer (off: never selected, outputs as without it)."""
    model.set_expert_group_enabled(group, enabled)


@torch.no_grad()
def group_shares(model: ExpandableLM) -> np.ndarray:
    """``[G]`` share of the counted token-to-expert selections that went to each expert group, pooled over every
    expert layer (attention and FFN), since the usage counters were last reset."""
    layers = list(model.expert_layers().values())
    totals = np.zeros(max(layer.n_groups for layer in layers))
    for layer in layers:
        counts = layer.usage().counts
        for g in range(layer.n_groups):
            totals[g] += float(counts[layer.group_slice(g)].sum())
    return totals / max(totals.sum(), 1.0)


def weights_checksum(model: nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of every tensor of the state dict, to show two runs start from the same weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def count(params) -> int:
    """Distinct parameters' elements (a tied weight counts once)."""
    return sum(p.numel() for p in {id(p): p for p in params}.values())


def domain_parameters(model: nn.Module, expand: bool, n: int, n_att: int,
                      train_router: str) -> Tuple[Optional[int], List[nn.Parameter], int]:
    """What a domain trains: ``(new expert group or None, parameters to train, parameters added)``.

    ``expand`` False (dense mode, or the base domain) trains every weight; True appends ``n`` FFN and ``n_att``
    attention experts to every expert layer and trains only them (plus every router with ``train_router="all"``).
    """
    if not expand:
        return None, list(model.parameters()), 0
    if not isinstance(model, ExpandableLM):
        raise ConfigError(f"expansion.mode=experts: {type(model).__name__} has no experts to add; " + _EXPERTS_HINT)
    group = model.add_experts(n, n_att=n_att)
    params = list(model.expert_group_parameters(group).values())
    added = count(params)
    if train_router == "all":
        params += expert_router_parameters(model)
    return group, params, added
