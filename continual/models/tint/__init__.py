"""TinT: one-step internal fine-tuning at test time (Panigrahi, Malladi, Xia, Arora 2023, "Trainable Transformer in
Transformer", arXiv 2307.01189).

- :mod:`.one_step`: the explicit procedure (dynamic evaluation with TinT's approximations) on Hugging Face causal
  LMs (GPT-2, Llama family), :mod:`.layouts` saying where it acts, :mod:`.attention` (stop-gradient attention) and
  :mod:`.first_order` (first-order norm and activation backward) supplying the approximations;
- :mod:`.classifier`: a continual-learning classifier answering each task with k in-context examples and one step
  (the ``tint`` strategy's model), with :mod:`.prompts` and :mod:`.label_words`;
- :mod:`.lm_eval`: the language-modelling protocol (train on the first half of a chunk, loss on the rest);
- :mod:`.construction` and :mod:`.simulated`: the construction's pieces as modules and their end-to-end chaining.
"""

from continual.models.tint.attention import DETACHED, detached_attention, detached_eager_attention
from continual.models.tint.first_order import first_order_backward, first_order_vjp
from continual.models.tint.label_words import LabelWordError, label_word_ids
from continual.models.tint.layouts import LAYOUTS, UpdateSite, layout_for, register_layout, update_sites
from continual.models.tint.lm_eval import LMResult, chunk_tokens, evaluate_lm
from continual.models.tint.one_step import InnerStep, ParameterUpdate, applied, context_loss, one_step_update
from continual.models.tint.prompts import Context, PromptFormat, build_context

__all__ = [
    "DETACHED",
    "LAYOUTS",
    "Context",
    "InnerStep",
    "LMResult",
    "LabelWordError",
    "LabelWordHeads",
    "ParameterUpdate",
    "PromptFormat",
    "TinTClassifier",
    "UpdateSite",
    "applied",
    "build_context",
    "chunk_tokens",
    "context_loss",
    "detached_attention",
    "detached_eager_attention",
    "evaluate_lm",
    "first_order_backward",
    "first_order_vjp",
    "label_logprobs",
    "label_word_ids",
    "layout_for",
    "one_step_update",
    "register_layout",
    "update_sites",
]


def __getattr__(name: str):
    # The classifier is an Avalanche MultiTaskModule: import Avalanche only when it is asked for, so that
    # `continual list` (which imports every strategy) stays light.
    if name in ("LabelWordHeads", "TinTClassifier", "label_logprobs"):
        from continual.models.tint import classifier

        return getattr(classifier, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
