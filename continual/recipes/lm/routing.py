"""Domain routing for continual language modelling: each sequence's tokens route to the shared expert group(s) and one
domain's group only, the domain given while it trains and inferred from the sequence's text at evaluation.

In the extendability setting as published (``router.name=none``; ModuleFormer, Shen et al. 2023, arXiv 2306.04640)
every token chooses its top-k over every domain's experts, so a later domain's experts also serve the earlier
domains' text and the routing need not specialise. Here the domain is a property of the whole sequence, as in
task-conditioned routing: while domain ``d`` trains, its blocks may use the shared group(s) and group ``d`` only; at
evaluation the domain router picks each held-back block's domain, with no domain id (task prediction from frozen
features and per-task statistics, as in EPI, Wang et al. 2023, "Rehearsal-free Continual Language Learning via
Efficient Parameter Isolation").

**The restriction** is the expert pools' own top-k gate with a per-sample allowed-groups mask ``[B, G]``
(``expert_groups`` of both :class:`~continual.recipes.lm.model.ExpandableLM` models: a native ModuleFormer turns it
into each pool's expert mask with :meth:`~continual.modules.experts.ExpertPool.group_expert_mask`, an upcycled LM
passes its slot columns as the module bank's per-sample slot weights). No second gate, no new parameter; experts of
other groups get probability 0.

**What is fitted and stored**, per domain and once (after the domain is learnt; frozen after): the statistics of the
feature router (``continual.modules.routers``: the prototype router's domain mean and its share of the pooled
scatter, the keys router's unit key) over ``[N, F]`` features of the domain's first ``router.fit_blocks`` training
blocks. A feature is the mean over tokens of the hidden states at ``router.layers`` (concatenated) of the model with
every domain's group switched off: only the shared part acts (the pretrained ModuleFormer's group 0, the upcycled
LM's dense FFNs), which no later domain trains, so a domain's statistics stay valid as domains are added.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
from torch import nn

from continual.config import ConfigError
from continual.modules.routers import InferringRouter, build_router, default_layers
from continual.recipes.lm.config import ROUTER_NONE, ROUTER_ORACLE, lm_router_options
from continual.training import evaluate_loss, next_token_loss

NO_DOMAIN = -1  # a sequence routed to no domain: the shared group(s) only


def allowed_groups(domains: torch.Tensor, domain_groups: Sequence[Optional[int]], n_groups: int) -> torch.Tensor:
    """The expert groups each sequence may route to: the shared ones and those of its domains.

    Args:
        domains: ``[B]`` or ``[B, k]`` long domain indices; :data:`NO_DOMAIN`, or a domain not learnt yet, adds no
            group.
        domain_groups: the group each learnt domain added, in domain order (None: it added none, e.g. a domain that
            trained the base). Groups no domain added are the shared ones.
        n_groups: ``G``, the groups of every expert layer.

    Returns:
        ``[B, G]`` bool.
    """
    D = len(domain_groups)
    owned = {g for g in domain_groups if g is not None}
    table = torch.zeros(D + 1, n_groups, dtype=torch.bool)  # one row per domain, the last for no domain
    table[:, [g for g in range(n_groups) if g not in owned]] = True
    for d, g in enumerate(domain_groups):
        if g is not None:
            table[d, g] = True
    domains = domains.reshape(domains.shape[0], -1).cpu().long()
    rows = torch.where((domains >= 0) & (domains < D), domains, torch.full_like(domains, D))
    return table[rows].any(dim=1)


def expert_group_count(model: nn.Module) -> int:
    """``G``: the expert groups of an ``ExpandableLM`` (every expert layer holds the same groups)."""
    return max(layer.n_groups for layer in model.expert_layers().values())


@dataclass
class DomainRouter:
    """Routes each sequence of an experts-mode LM to the shared group(s) and one learnt domain's group.

    Args:
        name: ``oracle`` (the true domain, given) or a registered feature router's name.
        router: the feature router (per-domain statistics, :class:`~continual.modules.routers.InferringRouter`);
            None for the oracle.
        layers: hidden-state indices the features read (0 = embeddings), non-negative.
        top_k: a sequence may use the groups of its ``top_k`` most likely domains (their union).
        fit_blocks: training blocks per domain the statistics are fitted on (the first ones); None: all.
    """

    name: str
    router: Optional[InferringRouter]
    layers: List[int] = field(default_factory=list)
    top_k: int = 1
    fit_blocks: Optional[int] = None
    domain_groups: List[Optional[int]] = field(default_factory=list)  # the group each learnt domain added

    def add_domain(self, group: Optional[int]) -> int:
        """Register the next domain and the group it added (None: none); returns its index."""
        self.domain_groups.append(group)
        return len(self.domain_groups) - 1

    def allowed(self, domains: torch.Tensor, model: nn.Module) -> torch.Tensor:
        """``[B]`` or ``[B, k]`` domains -> ``[B, G]`` bool allowed groups of ``model`` (see :func:`allowed_groups`)."""
        return allowed_groups(domains, self.domain_groups, expert_group_count(model))

    @torch.no_grad()
    def features(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` blocks -> ``[B, F]``: mean-pooled hidden states of the shared part alone (every domain's group
        off), at ``layers``, concatenated."""
        shared = self.allowed(torch.full((input_ids.shape[0],), NO_DOMAIN), model).to(input_ids.device)
        out = model(input_ids=input_ids, expert_groups=shared, output_hidden_states=True)
        return torch.cat([out.hidden_states[i].float().mean(dim=1) for i in self.layers], dim=-1)

    def _features(self, model: nn.Module, blocks: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
        model.eval()
        return torch.cat([self.features(model, blocks[s:s + batch_size].to(device)).cpu()
                          for s in range(0, blocks.shape[0], batch_size)])

    def fit_domain(self, model: nn.Module, domain: int, blocks: torch.Tensor, batch_size: int,
                   device: torch.device) -> int:
        """Fit domain ``domain``'s statistics on its training blocks ``[N, T]`` (once; frozen after).

        Returns:
            The bytes the router keeps for the domain (0 for the oracle, which keeps nothing).
        """
        if self.router is None:
            return 0
        blocks = blocks[: self.fit_blocks] if self.fit_blocks else blocks
        features = self._features(model, blocks, batch_size, device)
        self.router.fit_task(domain, features, torch.zeros(features.shape[0], dtype=torch.long))  # one class
        return self.router.stored_bytes(domain)

    @torch.no_grad()
    def route(self, model: nn.Module, blocks: torch.Tensor, domain: int, batch_size: int,
              device: torch.device) -> torch.Tensor:
        """The domains each of ``[N, T]`` blocks of domain ``domain`` routes to.

        The oracle answers ``domain``; a feature router reads only the text (``domain`` is unused), answering
        :data:`NO_DOMAIN` before any domain was fitted.

        Returns:
            ``[N, k]`` long domain indices, the most likely first.
        """
        n = blocks.shape[0]
        if self.router is None:
            return torch.full((n, 1), domain, dtype=torch.long)
        fitted = sorted(self.router.tasks)
        if not fitted:
            return torch.full((n, 1), NO_DOMAIN, dtype=torch.long)
        scores = self.router.scores(self._features(model, blocks, batch_size, device))  # [N, K]
        top = scores.topk(min(self.top_k, len(fitted)), dim=1).indices
        return torch.tensor(fitted, dtype=torch.long)[top]


def make_domain_router(cfg, model: nn.Module) -> Optional[DomainRouter]:
    """The domain router a ``router`` config node describes, for ``model`` (None for ``none``).

    Raises:
        ConfigError: an invalid router option or ``router.layers`` out of the model's range, naming the key.
    """
    if cfg.name == ROUTER_NONE:
        return None
    if cfg.name == ROUTER_ORACLE:
        return DomainRouter(ROUTER_ORACLE, None)
    try:
        router = build_router(cfg.name, **lm_router_options(cfg))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"router: {err}") from None
    n_states = int(model.config.num_hidden_layers) + 1
    layers = list(cfg.layers) or default_layers(n_states)
    bad = [i for i in layers if not -n_states <= i < n_states]
    if bad:
        raise ConfigError(f"router.layers: {bad} out of range for a model with {n_states} hidden states")
    return DomainRouter(cfg.name, router, [i % n_states for i in layers], int(cfg.top_k), cfg.fit_blocks)


def routed_perplexity(model: nn.Module, blocks: torch.Tensor, groups: torch.Tensor, batch_size: int,
                      device: torch.device) -> float:
    """Held-back perplexity of ``[N, T]`` blocks, block ``i`` routed only to the groups ``groups[i]`` (``[N, G]``
    bool); every block weighs the same, as in :func:`continual.training.perplexity`."""
    total = 0.0
    for start in range(0, blocks.shape[0], batch_size):
        batch, allowed = blocks[start:start + batch_size], groups[start:start + batch_size].to(device)
        loss = lambda m, ids: next_token_loss(m(input_ids=ids, expert_groups=allowed).logits, ids)
        total += evaluate_loss(model, batch, batch.shape[0], device, loss) * batch.shape[0]
    return math.exp(total / max(blocks.shape[0], 1))
