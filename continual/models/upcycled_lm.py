"""A dense Hugging Face causal LM upcycled into a mixture of experts that grows by one group of experts per domain.

Sparse upcycling (Komatsuzaki et al. 2023, "Sparse Upcycling: Training Mixture-of-Experts from Dense Checkpoints",
ICLR) of every feed-forward block, grown as in ModuleFormer's extendability setting (Shen et al. 2023, "ModuleFormer:
Modularity Emerges from Mixture-of-Experts", arXiv 2306.04640). No second expert implementation: every FFN becomes
an ``experts`` site of a :class:`~continual.modules.ModuleBank` (:func:`continual.modules.experts.upcycle`), whose
shared expert is the FFN itself, so outputs are unchanged at conversion. :class:`UpcycledExpertsLM` shows that bank
as the ``ExpandableLM`` interface of ``continual.lm``:

- an expert **group** of the interface is a group of each site's pool: the bank's task **slot** ``t`` is group
  :func:`~continual.modules.experts.group_of_slot` ``(t)`` at every site (``n`` experts and their router rows), and
  group :data:`~continual.modules.experts.SHARED_GROUP` is the shared FFN expert(s) (router rows only, frozen);
- :meth:`~UpcycledExpertsLM.expert_layers` returns each site's :class:`~continual.modules.experts.ExpertPool`,
  so usage counting, group slices and router rows read exactly as for a native ModuleFormer;
- routing is the bank's ``simultaneous`` composition: every token chooses its top-k over the shared experts and the
  switched-on experts of every group, with no domain id (the same question a native ModuleFormer answers); or, with
  ``expert_groups``, over the groups each sample is allowed (the bank's per-sample slot weights).
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
from torch import nn

from continual.modules.bank import ModuleBank
from continual.modules.experts import (
    SHARED_GROUP,
    ExpertPool,
    ExpertsDelta,
    expert_deltas,
    group_of_slot,
    routing_losses,
    set_slot_enabled,
    slot_of_group,
)
from continual.modules.experts import upcycle as upcycle_ffns  # the constructor's `upcycle` argument shadows the name


class UpcycledExpertsLM(nn.Module):
    """A dense causal LM whose FFNs are routed expert layers that grow by ``n`` experts per site at a time.

    Implements ``continual.lm.ExpandableLM`` (feed-forward experts only). ``forward`` takes the LM's arguments and
    returns the LM's output with two more attributes, the routing losses of that forward averaged over the expert
    sites that routed tokens (None while no group is switched on):

    - ``concentration_loss``: load concentration ``H(e)``;
    - ``mi_loss``: mutual information (load balancing) ``H(e|x) - H(e)``.

    Args:
        lm: a Hugging Face Llama-like (Llama, Mistral, Qwen2, SmolLM2) or GPT-2 causal LM. Upcycled in place (its
            FFNs become expert sites, outputs unchanged) and frozen.
        n: experts every group adds at every site (the bank's slot size; fixed here).
        targets: regexes naming the fused FFN modules to upcycle; None: every block's.
        **options: the other :class:`~continual.modules.experts.ExpertsDelta` options (``k``, ``expert_hidden``,
            ``gate``, ``gate_hidden``, ``upcycle``, ``slices``, ``activation``, ``start_logit``, ``dispatch``), with
            its defaults.

    Raises:
        ValueError: an architecture without an FFN fuser (e.g. T5), or an invalid expert option.
    """

    def __init__(self, lm: nn.Module, n: int = 4, targets: Optional[Sequence[str]] = None, **options):
        super().__init__()
        self.lm = lm
        self.n = n
        self.bank = ModuleBank("simultaneous")  # a plain object: the sites live inside `lm`
        upcycle_ffns(lm, self.bank, targets, n=n, **options)
        lm.requires_grad_(False)

    @property
    def config(self):
        """The wrapped LM's Hugging Face config."""
        return self.lm.config

    def _deltas(self) -> Dict[str, ExpertsDelta]:
        """Module path (relative to this model) of each site's expert pool -> the site's kind."""
        return {f"lm.{site}.delta.pool": delta for site, delta in expert_deltas(self.bank).items()}

    # ------------------------------------------------------------------ ExpandableLM
    def expert_layers(self) -> Dict[str, ExpertPool]:
        """Every expert site's pool by module name (as in ``named_modules``), in model order."""
        return {name: delta.pool for name, delta in self._deltas().items()}

    def add_experts(self, n: int, n_att: int = 0, enabled: bool = True) -> int:
        """Freeze every earlier group, then append group ``g`` (the bank's next slot) at every site.

        Args:
            n: experts per site; must be the ``n`` this model was upcycled with.
            n_att: attention experts; must be 0 (an upcycled dense LM has feed-forward experts only).
            enabled: False adds the group switched off (outputs stay bit-identical).

        Returns:
            The new group's index (1 for the first).
        """
        if n_att:
            raise ValueError(f"an upcycled {type(self.lm).__name__} has feed-forward experts only, got n_att={n_att}")
        if n != self.n:
            raise ValueError(f"this model was upcycled with n={self.n} experts per group and site, got n={n}")
        for slot in range(self.bank.n_tasks):
            if slot not in self.bank.frozen:
                self.bank.freeze_task(slot)
        slot = self.bank.n_tasks
        self.bank.add_task(slot)  # switched off: no output changes yet
        if enabled:
            set_slot_enabled(self.bank, slot, True)
        return group_of_slot(slot)

    def expert_group_parameters(self, group: int) -> Dict[str, nn.Parameter]:
        """One group's parameters at every site by ``named_parameters`` name (the shared group: the shared router rows
        and the "mlp" router's hidden layer; a slot's group: ``bank.task_parameters(slot_of_group(group))``)."""
        return {
            f"{name}.{key}": param
            for name, pool in self.expert_layers().items()
            for key, param in pool.group_parameters(group).items()
        }

    # ------------------------------------------------------------------ switching and usage
    def set_expert_group_enabled(self, group: int, enabled: bool) -> None:
        """Switch a slot's group on or off at every site. Unlike a native pool, fewer than ``k`` experts may stay
        on: a token that cannot choose ``k`` gets the dense FFN exactly."""
        if group == SHARED_GROUP:
            raise ValueError(f"group {SHARED_GROUP} is the dense FFN itself and is always on")
        set_slot_enabled(self.bank, slot_of_group(group), enabled)

    def record_expert_usage(self, on: bool = True) -> None:
        """Start (or stop) counting expert selections at every site."""
        for pool in self.expert_layers().values():
            pool.record_usage = on

    def reset_expert_usage(self) -> None:
        for pool in self.expert_layers().values():
            pool.reset_usage()

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                expert_groups: Optional[torch.Tensor] = None, **kwargs):
        """The LM's output for ``input_ids [B, T]`` (or ``inputs_embeds``), with ``concentration_loss`` and
        ``mi_loss`` set (scalars, or None when no site routed).

        Args:
            expert_groups: ``[B, G]`` bool, the groups each sample's tokens may route to (task-conditioned routing:
                the bank's per-sample slot weights are its slot columns); column :data:`SHARED_GROUP` must be true,
                the dense FFN always acts. A sample allowed no slot's group gets the dense LM exactly. None: every
                group (token-level routing with no domain id).
        """
        ref = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if ref is None:
            raise ValueError("pass input_ids or inputs_embeds")
        weights = None
        if expert_groups is not None:
            if expert_groups.dim() != 2 or expert_groups.shape[0] != ref.shape[0]:
                raise ValueError(
                    f"expert_groups must have shape [B={ref.shape[0]}, G], got {tuple(expert_groups.shape)}")
            if not bool(expert_groups[:, SHARED_GROUP].all()):
                raise ValueError(f"expert_groups: group {SHARED_GROUP} is the dense FFN itself and always acts")
            weights = expert_groups[:, group_of_slot(0):].float()  # [B, K] slot weights: which slots may act
        # The composition is simultaneous, so the ids only size the batch: every sample may use every group unless
        # its slot weights say otherwise.
        with self.bank.route(torch.zeros(ref.shape[0], dtype=torch.long, device=ref.device), weights):
            out = self.lm(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        losses = routing_losses(expert_deltas(self.bank).values())
        out.mi_loss, out.concentration_loss = losses if losses is not None else (None, None)
        return out

