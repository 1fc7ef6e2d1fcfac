"""ModuleFormer (Shen et al. 2023, "ModuleFormer: Modularity Emerges from Mixture-of-Experts", arXiv 2306.04640):
a causal LM of routed attention and feed-forward experts that can be added and pruned, built from the expert pool of
:mod:`continual.modules.experts` (attention experts: :mod:`~continual.models.moduleformer.attention`).

Importing this package registers the model with the Auto classes, so ``AutoModelForCausalLM.from_pretrained(folder)``
loads a saved ModuleFormer without remote code.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from continual.models.moduleformer.attention import (
    MixtureOfAttentionHeads,
    stick_breaking_attention,
    stick_breaking_weights,
)
from continual.models.moduleformer.configuration import SIZES, ModuleFormerConfig
from continual.models.moduleformer.modeling import (
    ModuleFormerCausalLMOutput,
    ModuleFormerForCausalLM,
    ModuleFormerModel,
    ModuleFormerPreTrainedModel,
)

# The expert building blocks the model is made of live in continual.modules.experts; they stay importable from here
# for code that reaches them through the model package.
from continual.modules.experts import (
    DISPATCH_BACKENDS,
    ExpertGroup,
    ExpertLayer,
    ExpertPool,
    ExpertUsage,
    RouterOutput,
    expert_matmul,
    load_concentration_loss,
    mutual_information_loss,
    routing_entropies,
    sort_by_expert,
    top_k_gating,
)

# The one registration of the model type with the Auto classes (exist_ok: re-imports are harmless).
AutoConfig.register(ModuleFormerConfig.model_type, ModuleFormerConfig, exist_ok=True)
AutoModel.register(ModuleFormerConfig, ModuleFormerModel, exist_ok=True)
AutoModelForCausalLM.register(ModuleFormerConfig, ModuleFormerForCausalLM, exist_ok=True)

__all__ = [
    "DISPATCH_BACKENDS",
    "SIZES",
    "ExpertGroup",
    "ExpertLayer",
    "ExpertPool",
    "ExpertUsage",
    "MixtureOfAttentionHeads",
    "ModuleFormerCausalLMOutput",
    "ModuleFormerConfig",
    "ModuleFormerForCausalLM",
    "ModuleFormerModel",
    "ModuleFormerPreTrainedModel",
    "RouterOutput",
    "expert_matmul",
    "load_concentration_loss",
    "mutual_information_loss",
    "routing_entropies",
    "sort_by_expert",
    "stick_breaking_attention",
    "stick_breaking_weights",
    "top_k_gating",
]
