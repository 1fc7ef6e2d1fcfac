"""Continual language modelling: a causal LM learns a stream of text domains one after the other, either by adding
experts for each domain or by fine-tuning every weight (the extendability setting of ModuleFormer, Shen et al. 2023,
arXiv 2306.04640).

One file per concern: ``config`` (the typed schema and its checks), ``model`` (building, upcycling, what a domain
adds and trains), ``objective`` (next-token plus routing losses), ``routing`` (domain routers: which expert groups a
sequence may use), ``results`` (the perplexity matrix, forgetting, plasticity, routing shares and accuracy, the table,
CSV and heatmap) and ``recipe`` (setup -> (pretrain) -> per domain -> report).

Run: ``continual lm CONFIG.yaml [key=value ...]`` (presets in ``configs/lm/``).
"""

from continual.recipes.lm.config import (
    LMConfig,
    LMDataConfig,
    LMExpansionConfig,
    LMModelConfig,
    LMPretrainConfig,
    LMRouterConfig,
    LMTrainingConfig,
    lm_router_names,
    load_lm_config,
)
from continual.recipes.lm.model import (
    ExpandableLM,
    build_lm,
    count,
    domain_parameters,
    expert_router_parameters,
    group_shares,
    load_tokenizer,
    set_expert_group_enabled,
    upcycled_lm,
    weights_checksum,
)
from continual.recipes.lm.objective import block_objective, training_objective
from continual.recipes.lm.recipe import default_lm_names, pretrain, run_continual_lm
from continual.recipes.lm.results import (
    DomainRecord,
    LMResult,
    format_lm_table,
    own_group_share,
    perplexity_forgetting,
    plasticity,
    plot_perplexity_matrix,
    routing_accuracy,
    routing_confusion,
    save_perplexity_csv,
)
from continual.recipes.lm.routing import (
    NO_DOMAIN,
    DomainRouter,
    allowed_groups,
    make_domain_router,
    routed_perplexity,
)

__all__ = [
    "NO_DOMAIN",
    "DomainRecord",
    "DomainRouter",
    "ExpandableLM",
    "LMConfig",
    "LMDataConfig",
    "LMExpansionConfig",
    "LMModelConfig",
    "LMPretrainConfig",
    "LMResult",
    "LMRouterConfig",
    "LMTrainingConfig",
    "allowed_groups",
    "block_objective",
    "build_lm",
    "count",
    "default_lm_names",
    "domain_parameters",
    "expert_router_parameters",
    "format_lm_table",
    "group_shares",
    "lm_router_names",
    "load_lm_config",
    "load_tokenizer",
    "make_domain_router",
    "own_group_share",
    "perplexity_forgetting",
    "plasticity",
    "plot_perplexity_matrix",
    "pretrain",
    "routed_perplexity",
    "routing_accuracy",
    "routing_confusion",
    "run_continual_lm",
    "save_perplexity_csv",
    "set_expert_group_enabled",
    "training_objective",
    "upcycled_lm",
    "weights_checksum",
]
