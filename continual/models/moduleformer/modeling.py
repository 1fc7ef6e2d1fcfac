"""The native ModuleFormer causal language model (Shen et al. 2023, "ModuleFormer: Modularity Emerges from
Mixture-of-Experts", arXiv 2306.04640), as a Hugging Face ``PreTrainedModel``.

Each block is ``h + MoA(LN(h))`` then ``h + FFN-experts(LN(h))``: a mixture of attention heads with stick-breaking
attention (no position embeddings) and an :class:`~continual.modules.experts.ExpertLayer`. With
``labels`` the loss is the shifted next-token cross-entropy plus ``mi_loss_coef`` times the mutual-information loss
and ``concentration_loss_coef`` times the load concentration loss, both averaged over every router of the model
(attention and FFN) and over non-pad tokens; the terms are also returned on their own.

Experts grow and shrink on the whole model: :meth:`ModuleFormerPreTrainedModel.add_experts` appends a group to every
expert layer (group ``g`` is the same group number everywhere), :meth:`~ModuleFormerPreTrainedModel.prune_experts`
removes experts per layer; both record the new layout in the config so ``save_pretrained``/``from_pretrained``
rebuild it. No key/value cache: ``generate()`` recomputes the whole prefix at every step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput
from transformers.utils import ModelOutput

from continual.models.moduleformer.attention import MixtureOfAttentionHeads
from continual.models.moduleformer.configuration import ModuleFormerConfig
from continual.modules.experts import ExpertGroup, ExpertLayer, ExpertPool, ExpertUsage, mean_routing_losses

try:  # transformers >= 5: init functions that skip tensors already loaded from a checkpoint
    from transformers import initialization as _init
except ImportError:  # pragma: no cover - transformers 4.x
    _init = nn.init


@dataclass
class ModuleFormerCausalLMOutput(ModelOutput):
    """Outputs of :class:`ModuleFormerForCausalLM`; every loss is a scalar."""

    loss: Optional[torch.Tensor] = None  # lm_loss + aux_loss (only with labels)
    logits: Optional[torch.Tensor] = None  # [B, T, vocab]
    lm_loss: Optional[torch.Tensor] = None  # shifted next-token cross-entropy (only with labels)
    aux_loss: Optional[torch.Tensor] = None  # mi_loss_coef * mi_loss + concentration_loss_coef * concentration_loss
    mi_loss: Optional[torch.Tensor] = None  # H(e|x) - H(e), mean over the model's routers
    concentration_loss: Optional[torch.Tensor] = None  # H(e), mean over the model's routers
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None  # [B, T, d] after the embedding and every block


class ModuleFormerBlock(nn.Module):
    """``h + MoA(LN(h))``, then ``h + FFN-experts(LN(h))``."""

    def __init__(self, config: ModuleFormerConfig, layer: int):
        super().__init__()
        std, out_std = config.initializer_range, config.initializer_range / math.sqrt(2 * config.n_layer)
        self.ln_attn = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.attn = MixtureOfAttentionHeads(
            config.d_model, config.n_head, config.head_dim, config.att_expert_groups[layer], config.k_att,
            gate_hidden=config.gate_hidden, attend_current=config.attend_current, dropout=config.dropout,
            dispatch=config.expert_dispatch, init_std={"w_q": std, "w_o": out_std, "router": std},
        )
        self.ln_ffn = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.ffn = ExpertLayer(
            config.d_model, config.ffn_hidden, config.ffn_expert_groups[layer], config.k_ffn,
            gate_hidden=config.gate_hidden, activation=config.activation, dispatch=config.expert_dispatch,
            init_std={"w_in": std, "w_out": out_std, "router": std},
        )
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, h: torch.Tensor, attention_mask: Optional[torch.Tensor],
                expert_groups: Optional[torch.Tensor] = None) -> torch.Tensor:
        """h: [B, T, d]; attention_mask: [B, T] (1 = token, 0 = padding) or None; expert_groups: [B, G] bool groups
        each sample may route to, or None (every group) -> [B, T, d]."""
        att_mask = ffn_mask = None
        if expert_groups is not None:
            att_mask, ffn_mask = self.attn.group_expert_mask(expert_groups), self.ffn.group_expert_mask(expert_groups)
        h = h + self.dropout(self.attn(self.ln_attn(h), attention_mask, expert_mask=att_mask))
        return h + self.dropout(self.ffn(self.ln_ffn(h), expert_mask=ffn_mask, token_mask=attention_mask))


class ModuleFormerPreTrainedModel(PreTrainedModel):
    """Weight initialisation and the expert operations shared by the ModuleFormer models."""

    config_class = ModuleFormerConfig
    base_model_prefix = "transformer"
    main_input_name = "input_ids"
    _no_split_modules = ["ModuleFormerBlock"]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # Linear, Embedding, LayerNorm
        if isinstance(module, ExpertGroup):
            for name, param in module.named_parameters(recurse=False):
                _init.normal_(param, mean=0.0, std=module.init_std[name])

    # ------------------------------------------------------------------ experts
    def expert_layers(self) -> Dict[str, ExpertPool]:
        """Every routed layer (attention experts and FFN experts) by module name, in model order."""
        return {name: m for name, m in self.named_modules() if isinstance(m, ExpertPool)}

    def add_experts(self, n: int, n_att: int = 0, enabled: bool = True) -> int:
        """Append a group to every expert layer: ``n`` FFN experts and ``n_att`` attention experts per layer.

        Every layer gets the group (empty where the count is 0), so group ``g`` means the same thing everywhere
        (e.g. the experts of task ``g``).

        Args:
            n: new feed-forward experts per layer.
            n_att: new attention experts per layer.
            enabled: False adds them switched off (never selected: outputs stay bit-identical).

        Returns:
            The index of the new group.
        """
        groups = set()
        for layer in self.expert_layers().values():
            groups.add(layer.add_experts(n_att if isinstance(layer, MixtureOfAttentionHeads) else n, enabled))
        if len(groups) != 1:
            raise RuntimeError(f"expert layers disagree on their group count: new groups {sorted(groups)}")
        self._record_expert_layout()
        return groups.pop()

    def prune_experts(self, keep: Mapping[str, torch.Tensor]) -> int:
        """Remove experts: ``keep`` maps expert-layer names (see :meth:`expert_layers`) to ``[E]`` bool masks.

        Layers not named are left as they are. Returns the number of parameters removed. Rebuild the optimizer
        afterwards (pruned layers get new parameter tensors).
        """
        layers = self.expert_layers()
        unknown = sorted(set(keep) - set(layers))
        if unknown:
            raise ValueError(f"prune_experts: no expert layer named {unknown[:3]}; layers are e.g. {list(layers)[:3]}")
        removed = sum(layers[name].prune(mask) for name, mask in keep.items())
        self._record_expert_layout()
        return removed

    def expert_group_parameters(self, group: int) -> Dict[str, nn.Parameter]:
        """One group's parameters in every expert layer (group 0 also owns the routers' and attention's shared ones)."""
        return {
            f"{name}.{key}": param
            for name, layer in self.expert_layers().items()
            for key, param in layer.group_parameters(group).items()
        }

    def set_expert_group_enabled(self, group: int, enabled: bool) -> None:
        """Switch one group on or off in every expert layer (off: never selected, outputs as without it)."""
        for layer in self.expert_layers().values():
            layer.set_group_enabled(group, enabled)

    def freeze_expert_group(self, group: int) -> None:
        """Stop one group of every expert layer from training (see :meth:`expert_group_parameters`)."""
        for param in self.expert_group_parameters(group).values():
            param.requires_grad_(False)

    def record_expert_usage(self, on: bool = True) -> None:
        """Start (or stop) counting expert selections in every expert layer."""
        for layer in self.expert_layers().values():
            layer.record_usage = on

    def expert_usage(self) -> Dict[str, ExpertUsage]:
        """Counted selections per expert layer since the last :meth:`reset_expert_usage`."""
        return {name: layer.usage() for name, layer in self.expert_layers().items()}

    def reset_expert_usage(self) -> None:
        for layer in self.expert_layers().values():
            layer.reset_usage()

    def routing_losses(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(mutual-information loss, load concentration loss) of the last forward, averaged over all routers."""
        routings = [layer.last_routing for layer in self.expert_layers().values()]
        if any(r is None for r in routings):
            raise RuntimeError("routing_losses needs a forward pass first (some expert layer has no routing yet)")
        return mean_routing_losses(routings)

    def _record_expert_layout(self) -> None:
        blocks = self.base_model.blocks
        self.config.att_expert_groups = [block.attn.group_sizes for block in blocks]
        self.config.ffn_expert_groups = [block.ffn.group_sizes for block in blocks]

    def save_pretrained(self, *args, **kwargs):
        """``PreTrainedModel.save_pretrained`` after writing the current expert layout into the config."""
        self._record_expert_layout()
        return super().save_pretrained(*args, **kwargs)


class ModuleFormerModel(ModuleFormerPreTrainedModel):
    """Embedding, ModuleFormer blocks and a final LayerNorm (no position embeddings)."""

    def __init__(self, config: ModuleFormerConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(ModuleFormerBlock(config, i) for i in range(config.n_layer))
        self.norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed = value

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        past_key_values=None,
        expert_groups: Optional[torch.Tensor] = None,
        **kwargs,
    ) -> BaseModelOutput:
        """Hidden states of every token.

        Args:
            input_ids: ``[B, T]`` token ids (or ``inputs_embeds [B, T, d]``).
            attention_mask: ``[B, T]`` 1 for tokens, 0 for padding (left or right).
            output_hidden_states: also return the input of every block and the final output.
            return_dict: False returns a tuple instead of the output object.
            past_key_values: must be None (there is no cache); other keyword arguments from ``generate()``
                (``use_cache``, ``position_ids``, ...) are accepted and ignored.
            expert_groups: ``[B, G]`` bool, the expert groups each sample's tokens may route to in every expert
                layer (task-conditioned routing, e.g. the shared group and one domain's); None: every group.

        Returns:
            ``BaseModelOutput`` with ``last_hidden_state [B, T, d]``.
        """
        if past_key_values is not None:
            raise ValueError("ModuleFormer has no key/value cache: pass the whole sequence and past_key_values=None")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        if attention_mask is not None:
            if attention_mask.shape != h.shape[:2]:
                raise ValueError(
                    f"attention_mask must have shape {tuple(h.shape[:2])}, got {tuple(attention_mask.shape)}"
                )
            attention_mask = attention_mask.bool()
        h = self.dropout(h)
        hidden_states = [h] if output_hidden_states else None
        for block in self.blocks:
            h = block(h, attention_mask, expert_groups)
            if hidden_states is not None:
                hidden_states.append(h)
        h = self.norm(h)
        if hidden_states is not None:
            hidden_states[-1] = h
        out = BaseModelOutput(last_hidden_state=h, hidden_states=tuple(hidden_states) if hidden_states else None)
        return out if return_dict is not False else out.to_tuple()


class ModuleFormerForCausalLM(ModuleFormerPreTrainedModel, GenerationMixin):
    """ModuleFormer with a language-modelling head; ``labels`` give the LM loss plus the routing losses."""

    _tied_weights_keys = {"lm_head.weight": "transformer.embed.weight"}

    def __init__(self, config: ModuleFormerConfig):
        super().__init__(config)
        self.transformer = ModuleFormerModel(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.embed = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        expert_groups: Optional[torch.Tensor] = None,
        **kwargs,
    ) -> ModuleFormerCausalLMOutput:
        """Next-token logits, and the losses.

        Args:
            input_ids: ``[B, T]`` token ids (or ``inputs_embeds [B, T, d]``).
            attention_mask: ``[B, T]`` 1 for tokens, 0 for padding; padding is ignored by attention and by the
                routing losses.
            labels: ``[B, T]`` targets (usually ``input_ids``; shifted inside); -100 is ignored.
            output_hidden_states: also return every block's output.
            expert_groups: ``[B, G]`` bool, the expert groups each sample may route to (see
                :meth:`ModuleFormerModel.forward`); None: every group.

        Returns:
            :class:`ModuleFormerCausalLMOutput` (``loss`` only with labels; the routing losses always); its
            ``to_tuple()`` when ``return_dict=False``.
        """
        out = self.transformer(
            input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
            output_hidden_states=output_hidden_states, return_dict=True, expert_groups=expert_groups, **kwargs,
        )
        logits = self.lm_head(out.last_hidden_state)
        mi, concentration = self.routing_losses()
        aux = self.config.mi_loss_coef * mi + self.config.concentration_loss_coef * concentration
        lm_loss = loss = None
        if labels is not None:
            if labels.shape != logits.shape[:2]:
                raise ValueError(f"labels must have shape {tuple(logits.shape[:2])}, got {tuple(labels.shape)}")
            lm_loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
            )
            loss = lm_loss + aux
        output = ModuleFormerCausalLMOutput(
            loss=loss, logits=logits, lm_loss=lm_loss, aux_loss=aux, mi_loss=mi, concentration_loss=concentration,
            hidden_states=out.hidden_states,
        )
        return output if return_dict is not False else output.to_tuple()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # no cache: generate() must not create one

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, inputs_embeds=None, **kwargs):
        """Without a cache every generation step runs the whole sequence so far."""
        if inputs_embeds is not None:
            raise ValueError("ModuleFormer generate() takes input_ids, not inputs_embeds")
        return {"input_ids": input_ids, "attention_mask": attention_mask}
