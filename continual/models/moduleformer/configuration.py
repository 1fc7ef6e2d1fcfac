"""Configuration of the native ModuleFormer causal LM (Shen et al. 2023, "ModuleFormer: Modularity Emerges from
Mixture-of-Experts", arXiv 2306.04640).

The defaults are the "small" size (a few million parameters with a small vocabulary, trainable from scratch on a
laptop CPU); :data:`SIZES` names the others. The released MoLM models use 16 attention experts with k=2, 32 FFN
experts with k=2, FFN hidden 2048 and gating size 256.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from transformers import PretrainedConfig

from continual.modules.experts import ACTIVATIONS, DISPATCH_BACKENDS

# Named sizes: overrides of the defaults (which are "small"). Set vocab_size to the tokenizer's.
SIZES: Dict[str, Dict[str, Any]] = {
    # Unit tests: 2 layers, width 32, a handful of experts.
    "tiny": dict(
        vocab_size=128, d_model=32, n_layer=2, n_head=2, head_dim=8, n_att_experts=4, k_att=2, n_ffn_experts=4,
        k_ffn=2, ffn_hidden=32, gate_hidden=16, max_position_embeddings=128,
    ),
    "small": {},
    # A MoLM-like layout at a width a single GPU trains quickly.
    "base": dict(
        d_model=512, n_layer=8, n_head=4, head_dim=64, n_att_experts=16, k_att=2, n_ffn_experts=32, k_ffn=2,
        ffn_hidden=512, gate_hidden=256,
    ),
}


class ModuleFormerConfig(PretrainedConfig):
    """Sizes, routing and losses of a :class:`~continual.models.moduleformer.ModuleFormerForCausalLM`.

    Every argument is described on its line below; bad values raise ValueError naming the argument.
    ``att_expert_groups`` and ``ffn_expert_groups`` are written by the model when experts are added or pruned, so
    that ``from_pretrained`` rebuilds a grown or pruned model; leave them None when creating a model.
    """

    model_type = "moduleformer"
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
    }

    def __init__(
        self,
        vocab_size: int = 49152,  # tokens in the vocabulary (49152: the SmolLM2 tokenizer)
        d_model: int = 128,  # width of the residual stream
        n_layer: int = 4,  # transformer blocks
        n_head: int = 4,  # heads of each attention expert
        head_dim: int = 32,  # width of one attention head (an expert's query/output width is n_head * head_dim)
        n_att_experts: int = 8,  # attention experts per layer (query + output projections; keys/values shared)
        k_att: int = 2,  # attention experts chosen per token
        n_ffn_experts: int = 16,  # feed-forward experts per layer
        k_ffn: int = 2,  # feed-forward experts chosen per token
        ffn_hidden: int = 128,  # hidden width of one feed-forward expert
        gate_hidden: int = 64,  # hidden width of the MLP routers; 0 makes each router a single linear layer
        activation: str = "gelu",  # activation inside the feed-forward experts
        attend_current: bool = False,  # stick-breaking attends to the token itself too (True in released MoLM)
        dropout: float = 0.0,  # dropout on embeddings, attention weights and residual branches
        mi_loss_coef: float = 0.01,  # weight of the mutual-information (load balancing) loss added to the LM loss
        concentration_loss_coef: float = 0.0,  # weight of the load concentration loss H(e) (e.g. 0.01 on a new task)
        tie_word_embeddings: bool = True,  # share the input embedding and the output projection
        max_position_embeddings: int = 1024,  # longest sequence meant to be used (no position embeddings exist)
        initializer_range: float = 0.02,  # std of the normal initialisation (residual outputs scaled by 1/sqrt(2L))
        layer_norm_eps: float = 1e-5,  # LayerNorm epsilon
        expert_dispatch: str = "auto",  # "auto", "loop" or "grouped" (see continual.modules.experts.DISPATCH_BACKENDS)
        att_expert_groups: Optional[List[List[int]]] = None,  # per layer: sizes of the attention expert groups
        ffn_expert_groups: Optional[List[List[int]]] = None,  # per layer: sizes of the feed-forward expert groups
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.n_layer = n_layer
        self.n_head = n_head
        self.head_dim = head_dim
        self.n_att_experts = n_att_experts
        self.k_att = k_att
        self.n_ffn_experts = n_ffn_experts
        self.k_ffn = k_ffn
        self.ffn_hidden = ffn_hidden
        self.gate_hidden = gate_hidden
        self.activation = activation
        self.attend_current = attend_current
        self.dropout = dropout
        self.mi_loss_coef = mi_loss_coef
        self.concentration_loss_coef = concentration_loss_coef
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.expert_dispatch = expert_dispatch
        self.att_expert_groups = _layout(att_expert_groups, n_att_experts, n_layer, "att_expert_groups")
        self.ffn_expert_groups = _layout(ffn_expert_groups, n_ffn_experts, n_layer, "ffn_expert_groups")
        kwargs.setdefault("use_cache", False)  # no key/value cache: generate() recomputes the prefix each step
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self._validate()

    @classmethod
    def from_size(cls, size: str, **overrides) -> "ModuleFormerConfig":
        """A config of a named size (:data:`SIZES`), with keyword overrides (e.g. ``vocab_size``)."""
        if size not in SIZES:
            raise ValueError(f"unknown ModuleFormer size {size!r}; known: {', '.join(SIZES)}")
        return cls(**{**SIZES[size], **overrides})

    def _validate(self) -> None:
        positive = ("vocab_size", "d_model", "n_layer", "n_head", "head_dim", "n_att_experts", "k_att",
                    "n_ffn_experts", "k_ffn", "ffn_hidden", "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModuleFormerConfig.{name} must be an integer >= 1, got {value!r}")
        if self.k_att > self.n_att_experts:
            raise ValueError(f"ModuleFormerConfig.k_att={self.k_att} exceeds n_att_experts={self.n_att_experts}")
        if self.k_ffn > self.n_ffn_experts:
            raise ValueError(f"ModuleFormerConfig.k_ffn={self.k_ffn} exceeds n_ffn_experts={self.n_ffn_experts}")
        if not isinstance(self.gate_hidden, int) or self.gate_hidden < 0:
            raise ValueError(f"ModuleFormerConfig.gate_hidden must be an integer >= 0, got {self.gate_hidden!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"ModuleFormerConfig.activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}"
            )
        if self.expert_dispatch not in DISPATCH_BACKENDS:
            raise ValueError(
                f"ModuleFormerConfig.expert_dispatch must be one of {list(DISPATCH_BACKENDS)}, "
                f"got {self.expert_dispatch!r}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModuleFormerConfig.dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("mi_loss_coef", "concentration_loss_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"ModuleFormerConfig.{name} must be >= 0, got {getattr(self, name)!r}")


def _layout(groups: Optional[List[List[int]]], n_experts: int, n_layer: int, name: str) -> List[List[int]]:
    """Per-layer group sizes; None means one group of ``n_experts`` in every layer."""
    if groups is None:
        return [[n_experts] for _ in range(n_layer)]
    if len(groups) != n_layer or any(not sizes or sum(sizes) < 1 or min(sizes) < 0 for sizes in groups):
        raise ValueError(
            f"ModuleFormerConfig.{name} must list the group sizes (>= 0, at least one expert in all) of each of the "
            f"{n_layer} layers, got {groups!r}"
        )
    return [[int(n) for n in sizes] for sizes in groups]
