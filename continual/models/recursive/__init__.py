"""Relaxed recursive backbones (Bae et al. 2024, "Relaxed Recursive Transformers: Effective Parameter Sharing with
Layer-wise LoRA", arXiv 2410.20672).

- :func:`convert_to_recursive`: ``L`` pretrained layers -> ``K = L / R`` shared blocks looped ``R`` times (CYCLE or
  SEQUENCE sharing; Stepwise, Average or Lower init), tied by parameter identity, optionally relaxed by a depth-wise
  LoRA per projection (:class:`RelaxedLinear`, SVD or zero init);
- :func:`save_recursive` / :func:`load_recursive`: safetensors with shared tensors stored once, tying rebuilt
  from ``config.recursion``;
- :func:`depthwise_early_exit` / :func:`recursive_early_exit`: early exit after any loop, with continuous
  depth-wise batching or per-sample recursion.
"""

from continual.models.recursive.convert import (
    Layout,
    RecursionConfig,
    apply_recursion,
    convert_to_recursive,
    layout,
    parameter_breakdown,
    recursion_of,
    resolve_ranks,
)
from continual.models.recursive.early_exit import (
    ExitResult,
    confidence,
    depthwise_early_exit,
    first_confident,
    loop_logits,
    recursive_early_exit,
)
from continual.models.recursive.families import FAMILIES, Family, family_of
from continual.models.recursive.io import load_recursive, save_recursive, unique_state
from continual.models.recursive.relaxation import RelaxedLinear, per_sample, svd_lora_factors, truncation_error
from continual.models.recursive.sharing import (
    INITS,
    SHARINGS,
    block_index,
    init_sources,
    stepwise_layers,
    tied_depths,
)

__all__ = [
    "FAMILIES",
    "INITS",
    "SHARINGS",
    "ExitResult",
    "Family",
    "Layout",
    "RecursionConfig",
    "RelaxedLinear",
    "apply_recursion",
    "block_index",
    "confidence",
    "convert_to_recursive",
    "depthwise_early_exit",
    "family_of",
    "first_confident",
    "init_sources",
    "layout",
    "load_recursive",
    "loop_logits",
    "parameter_breakdown",
    "per_sample",
    "recursion_of",
    "recursive_early_exit",
    "resolve_ranks",
    "save_recursive",
    "stepwise_layers",
    "svd_lora_factors",
    "tied_depths",
    "truncation_error",
    "unique_state",
]
