"""TinT as a continual strategy (Panigrahi et al. 2023, "Trainable Transformer in Transformer", arXiv 2307.01189):
nothing is trained or stored per task. When a task arrives, ``shots`` examples are drawn from its training data; from
then on, each of its test examples is answered by a causal LM that takes one internal SGD step on those in-context
examples (stop-gradient attention, first-order norm/activation backward, top ``layers`` blocks) and then reads the
label words after ``context + query``. Tasks not reached yet are answered zero-shot by the plain LM. The backbone is
shared and never changes, so the strategy stores zero parameters per task.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from continual.config import StrategyConfig
from continual.expansion import BaseStrategy, TaskInfo
from continual.models.tint.attention import check_supported
from continual.models.tint.label_words import label_word_ids
from continual.models.tint.layouts import resolve_layers
from continual.models.tint.one_step import InnerStep
from continual.models.tint.prompts import PromptFormat, build_context

log = logging.getLogger(__name__)


@dataclass
class TinTConfig(StrategyConfig):
    name: str = "tint"
    # In-context examples per task (fewer when they do not fit in max_context_tokens).
    shots: int = 32
    # Top blocks back-propagated and updated; null for all of them.
    layers: Optional[int] = 3
    # Inner SGD learning rate on the sum-reduced context loss (0: plain in-context learning).
    inner_lr: float = 1e-4
    # Inner loss: "context" (every context token) or "label_words" (the examples' label words only).
    loss: str = "context"
    # TinT's first-order backward through norms and activations, N (f(x + g/N) - f(x)); false: exact backward.
    first_order: bool = True
    first_order_n: float = 1000.0
    # Also update the final norm's bias (TinT descends through it).
    update_final_norm: bool = True
    # Score the query after the context (as in TinT's single forward pass); false: the query alone.
    query_with_context: bool = True
    # Prompt template: text + infix + label word + separator per example.
    infix: str = "\nAnswer:"
    separator: str = "\n\n"
    # Truncation of each in-context example's text, and the longest context (also capped by the model's positions).
    max_example_tokens: int = 96
    max_context_tokens: int = 2048
    # Seed of the draw of in-context examples (combined with the task index).
    context_seed: int = 0
    # Per-task label-word overrides, {task name: {label: word}}; default word = the label string (first token of
    # " <word>" scores the class).
    label_words: Dict[str, Dict[str, str]] = field(default_factory=dict)


class TinT(BaseStrategy):
    """One-step internal fine-tuning at test time; zero stored parameters per task."""

    name = "tint"
    Config = TinTConfig
    backbone_kind = "causal_lm"

    def __init__(
        self,
        shots: int = 32,
        layers: Optional[int] = 3,
        inner_lr: float = 1e-4,
        loss: str = "context",
        first_order: bool = True,
        first_order_n: float = 1000.0,
        update_final_norm: bool = True,
        query_with_context: bool = True,
        infix: str = "\nAnswer:",
        separator: str = "\n\n",
        max_example_tokens: int = 96,
        max_context_tokens: int = 2048,
        context_seed: int = 0,
        label_words: Optional[Mapping[str, Mapping[str, str]]] = None,
    ):
        if shots < 0:
            raise ValueError(f"strategy.shots must be >= 0, got {shots}")
        if loss not in ("context", "label_words"):
            raise ValueError(f"strategy.loss must be 'context' or 'label_words', got {loss!r}")
        for key, value in (("max_example_tokens", max_example_tokens), ("max_context_tokens", max_context_tokens)):
            if value < 1:
                raise ValueError(f"strategy.{key} must be >= 1, got {value}")
        try:
            self.step = InnerStep(lr=inner_lr, layers=layers, first_order=first_order, n=first_order_n, final_norm=update_final_norm)
        except ValueError as err:
            raise ValueError(f"strategy (inner_lr / layers / first_order_n): {err}") from None
        self.shots, self.loss, self.query_with_context = shots, loss, query_with_context
        self.infix, self.separator = infix, separator
        self.max_example_tokens, self.max_context_tokens = max_example_tokens, max_context_tokens
        self.context_seed = context_seed
        self.label_words = {str(k): dict(v) for k, v in (label_words or {}).items()}
        self._pools: Dict[int, object] = {}  # task index -> its (capped) training split, where contexts come from
        self._context_budget = max_context_tokens

    # ------------------------------------------------------------------ model
    def build_model(self, backbone: nn.Module, tokenizer, stream, backbone_cfg) -> nn.Module:
        from continual.models.tint.classifier import TinTClassifier  # Avalanche: only when a run builds it

        check_supported(backbone)  # fail before any evaluation: unsupported architecture, too many layers
        try:
            resolve_layers(backbone, self.step.layers)
        except ValueError as err:
            raise ValueError(f"strategy.layers: {err}") from None
        infos = stream.task_infos
        unknown = sorted(set(self.label_words) - {t.name for t in infos})
        if unknown:
            raise ValueError(f"strategy.label_words: {unknown} are not tasks of this stream ({[t.name for t in infos]})")
        fmt = PromptFormat.from_tokenizer(tokenizer, self.infix, self.separator, self.max_example_tokens)
        label_ids = [label_word_ids(tokenizer, t.labels, self.label_words.get(t.name), t.name) for t in infos]
        self._tokenizer, self._fmt, self._label_ids = tokenizer, fmt, label_ids
        self._pools = {task.info.index: task.data.train for task in stream.tasks}
        # Room left for the longest query once the context is in: the model's positions minus a stream row.
        positions = _max_positions(backbone)
        query_room = max(len(task.test[0]["input_ids"]) for task in stream.tasks) + len(fmt.infix) + 1
        self._context_budget = min(self.max_context_tokens, positions - query_room) if positions else self.max_context_tokens
        if self._context_budget <= len(fmt.lead):
            raise ValueError(
                f"the model's {positions} positions leave no room for a context next to {query_room}-token queries: "
                "lower stream.max_length"
            )
        return TinTClassifier(backbone, fmt, label_ids, self.step, loss=self.loss, query_with_context=self.query_with_context)

    # ------------------------------------------------------------------ task boundaries
    def before_task(self, model: nn.Module, task: TaskInfo) -> None:
        """The task's data has arrived: draw its in-context examples (nothing is trained). With ``shots=0`` the task
        stays zero-shot."""
        if self.shots == 0:
            return
        pool = self._pools[task.index]
        rng = np.random.default_rng([self.context_seed, task.index])
        chosen = rng.permutation(len(pool))[: self.shots].tolist()
        texts = [pool.texts[i] for i in chosen]
        labels = [self._label_ids[task.index][pool.labels[i]] for i in chosen]
        context = build_context(self._fmt, self._tokenizer, texts, labels, self._context_budget)
        if context.shots == 0:
            log.warning("task %s: no in-context example fits in %d tokens; it stays zero-shot", task.name, self._context_budget)
            return
        if context.shots < len(chosen):
            log.warning("task %s: %d of %d in-context examples fit in %d tokens", task.name, context.shots, len(chosen), self._context_budget)
        model.set_context(task.index, context)

    def trainable_parameters(self, model: nn.Module, task: TaskInfo) -> List[nn.Parameter]:
        return []

    # ------------------------------------------------------------------ storage: nothing per task
    def task_state(self, model: nn.Module, task: TaskInfo) -> Dict[str, torch.Tensor]:
        return {}

    def load_task_state(self, model: nn.Module, task: TaskInfo, state: Dict[str, torch.Tensor]) -> None:
        if state:
            raise KeyError(f"tint stores nothing per task, but the checkpoint of {task.name!r} has {sorted(state)[:5]}")

    def stored_parameters(self, model: nn.Module, tasks_so_far: Sequence[TaskInfo]) -> int:
        return 0


def _max_positions(model: nn.Module) -> Optional[int]:
    config = model.config
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
