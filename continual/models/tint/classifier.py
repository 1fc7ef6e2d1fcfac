"""A few-shot classifier that fine-tunes itself for one step at test time (TinT, Panigrahi et al. 2023,
"Trainable Transformer in Transformer", arXiv 2307.01189), with the same interface as ``ContinualClassifier``.

``forward(x, task_labels)`` takes stream-tokenized inputs (``x: [B, 2, L]``, ids stacked on the attention mask) and
returns ``[B, C]`` logits: for each sample, the causal LM's log-probability of each of its task's label words after
``context + query + infix``, where the LM has first taken one internal SGD step on the task's context
(:mod:`.one_step`). A task without a context (not reached yet in the stream) is answered zero-shot by the plain LM.

Batched over queries: the update depends only on the context, so each task present in a batch costs one update
(cached for the next batch of the same task), its context's keys and values are computed once under that update
(kept for the next batch too, where the family has a key/value cache), and all its queries are scored in one
forward pass; there is no loop over single queries. The LM's weights are restored after every scoring pass.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from avalanche.models import MultiTaskModule
from torch import nn

from continual.models.tint.layouts import has_kv_cache
from continual.models.tint.one_step import InnerStep, ParameterUpdate, applied, one_step_update
from continual.models.tint.prompts import Context, PromptFormat, assemble_queries, strip_queries


class LabelWordHeads(nn.Module):
    """The classifier's heads are label words: task ``t``'s class ``c`` is the token ``label_ids[t][c]``.

    Same questions answered as ``TaskHeads`` in task mode (``target_index``, ``activate``, ``parameters_for``), with
    nothing to train or store.
    """

    mode = "task"

    def __init__(self, label_ids: Sequence[Sequence[int]]):
        super().__init__()
        if not label_ids or any(len(ids) == 0 for ids in label_ids):
            raise ValueError("every task needs at least one label word")
        self.label_ids = [tuple(int(i) for i in ids) for ids in label_ids]
        self.width = max(len(ids) for ids in self.label_ids)

    def target_index(self, task: int) -> List[int]:
        return list(range(len(self.label_ids[task])))

    def activate(self, task: int) -> None:
        return None

    def parameters_for(self, task: int) -> List[nn.Parameter]:
        return []


def label_logprobs(lm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, label_ids: Sequence[int]) -> torch.Tensor:
    """Log-probabilities of the label words as the next token after each row's last real token.

    Runs the base model and applies the LM head to the last position only (never ``[B, L, V]`` logits).

    Args:
        lm: a Hugging Face ``*ForCausalLM``.
        input_ids, attention_mask: ``[B, L]``, right-padded.
        label_ids: ``C`` token ids.

    Returns:
        ``[B, C]`` log-probabilities (float32) under the full vocabulary softmax.
    """
    base = getattr(lm, lm.base_model_prefix)
    hidden = base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    last = attention_mask.sum(1).long().clamp_min(1) - 1
    h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    logits = lm.get_output_embeddings()(h).float()
    ids = torch.tensor(list(label_ids), dtype=torch.long, device=logits.device)
    return torch.log_softmax(logits, dim=-1)[:, ids]


def context_cache(lm: nn.Module, head: torch.Tensor):
    """The keys and values of ``head [H]`` (one sequence) as the model's cache object, for
    :func:`label_logprobs_after`."""
    base = getattr(lm, lm.base_model_prefix)
    return base(input_ids=head[None], use_cache=True).past_key_values


def label_logprobs_after(
    lm: nn.Module,
    head: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    label_ids: Sequence[int],
    cache=None,
) -> torch.Tensor:
    """:func:`label_logprobs` of ``head + row`` for every row, running the shared ``head`` once: its keys and values
    are computed for one sequence and repeated over the batch, so a long context costs one pass, not ``B``.

    Args:
        lm: a Hugging Face ``*ForCausalLM``.
        head: ``[H]`` ids shared by every row (``H >= 1``).
        input_ids, attention_mask: ``[B, L]`` the rows after the head, right-padded.
        label_ids: ``C`` token ids.
        cache: ``context_cache(lm, head)`` computed earlier with the same weights (left unchanged: a copy is
            extended); None computes it here.

    Returns:
        ``[B, C]`` log-probabilities (float32).
    """
    base = getattr(lm, lm.base_model_prefix)
    B, H = input_ids.shape[0], head.numel()
    past = context_cache(lm, head) if cache is None else copy.deepcopy(cache)
    past.batch_repeat_interleave(B)
    full_mask = torch.cat([attention_mask.new_ones(B, H), attention_mask], dim=1)
    hidden = base(input_ids=input_ids, attention_mask=full_mask, past_key_values=past, use_cache=True).last_hidden_state
    last = attention_mask.sum(1).long().clamp_min(1) - 1
    h = hidden[torch.arange(B, device=hidden.device), last]
    logits = lm.get_output_embeddings()(h).float()
    ids = torch.tensor(list(label_ids), dtype=torch.long, device=logits.device)
    return torch.log_softmax(logits, dim=-1)[:, ids]


class TinTClassifier(MultiTaskModule):
    """Label-word classification by a causal LM with one internal fine-tuning step per task context.

    Args:
        lm: a Hugging Face causal LM of a supported family (GPT-2, Llama, the native ModuleFormer).
        fmt: the prompt template.
        label_ids: per task, the label-word token id of each class.
        step: the inner step (learning rate, top layers, first-order options).
        loss: the inner loss, ``"context"`` (every context token) or ``"label_words"``.
        query_with_context: score queries after the context (in-context learning plus the step, as in TinT's one
            forward pass); False scores the query alone with the updated weights.
        reuse_context: run the shared context once per batch and reuse its keys and values for every query
            (:func:`label_logprobs_after`); False runs ``context + query`` for each row (same numbers, slower). A
            family without a key/value cache (ModuleFormer) always runs ``context + query``.
    """

    def __init__(
        self,
        lm: nn.Module,
        fmt: PromptFormat,
        label_ids: Sequence[Sequence[int]],
        step: InnerStep,
        loss: str = "context",
        query_with_context: bool = True,
        reuse_context: bool = True,
    ):
        super().__init__()
        if loss not in ("context", "label_words"):
            raise ValueError(f"inner loss must be 'context' or 'label_words', got {loss!r}")
        self.lm = lm
        self.fmt = fmt
        self.heads = LabelWordHeads(label_ids)
        self.step = step
        self.loss = loss
        self.query_with_context = query_with_context
        self.reuse_context = reuse_context
        self.contexts: Dict[int, Context] = {}
        # The last update computed, keyed by everything it depends on: one task's batches reuse it (transient, the
        # size of the updated tensors; never stored).
        self._cached: Optional[Tuple[tuple, ParameterUpdate]] = None
        # The keys and values of the last head (context) run with that update in place: every batch of the task's
        # queries extends a copy instead of running the context again (transient, like the update).
        self._cached_head: Optional[Tuple[tuple, object, Optional[ParameterUpdate]]] = None

    # ------------------------------------------------------------------ contexts
    def set_context(self, task: int, context: Context) -> None:
        """Give ``task`` its in-context examples (from then on its queries use them)."""
        if not 0 <= task < len(self.heads.label_ids):
            raise IndexError(f"task {task} is not one of the {len(self.heads.label_ids)} tasks of this model")
        if context.shots == 0:
            raise ValueError(f"task {task}: a context without examples; leave the task without one to answer zero-shot")
        self.contexts[task] = context
        self._cached = self._cached_head = None

    def update_for(self, task: int) -> Optional[ParameterUpdate]:
        """The one-step update of ``task``'s context (None: no context, or a zero learning rate)."""
        context = self.contexts.get(task)
        if context is None or self.step.lr == 0:
            return None
        key = (task, id(context), self.step, self.loss)
        if self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        device = self._device()
        ids = context.ids.to(device)[None]
        update = one_step_update(
            self.lm, ids, torch.ones_like(ids), context.loss_mask(self.loss).to(device)[None], self.step
        )
        self._cached = (key, update)
        return update

    # ------------------------------------------------------------------ scoring
    def forward(self, x: torch.Tensor, task_labels) -> torch.Tensor:
        """x: ``[B, 2, L]``; task_labels: ``[B]`` tensor or one int -> ``[B, C]`` logits (``-inf`` beyond a task's
        classes)."""
        if task_labels is None:
            raise ValueError("TinTClassifier answers one task per sample: pass task_labels")
        if not torch.is_tensor(task_labels):
            task_labels = torch.full((x.shape[0],), int(task_labels), dtype=torch.long, device=x.device)
        queries, lengths = strip_queries(x, self.fmt.special_ids, self.fmt.pad_id)
        out = torch.full((x.shape[0], self.heads.width), float("-inf"), device=x.device)
        for task in task_labels.unique().tolist():  # one update per task present, not per query
            rows = (task_labels == task).nonzero(as_tuple=True)[0]
            out[rows, : len(self.heads.label_ids[task])] = self.score_task(task, queries[rows], lengths[rows])
        return out

    def score_task(self, task: int, queries: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``[B, C]`` label-word log-probabilities of ``task``'s queries (``[B, Q]`` ids valid up to ``lengths``)."""
        context = self.contexts.get(task)
        head = torch.tensor(self.fmt.lead, dtype=torch.long)
        if context is not None and self.query_with_context:
            head = context.ids
        head = head.to(queries.device)
        split = self.reuse_context and head.numel() > 0 and has_kv_cache(self.lm)  # ModuleFormer: no cache
        input_ids, mask = assemble_queries(head[:0] if split else head, queries, lengths, self.fmt.infix, self.fmt.pad_id)
        labels = self.heads.label_ids[task]
        update = self.update_for(task)
        with torch.no_grad(), applied(update) if update is not None else nullcontext():
            if split:
                return label_logprobs_after(self.lm, head, input_ids, mask, labels, self._head_cache(task, head, update))
            return label_logprobs(self.lm, input_ids, mask, labels)

    def _head_cache(self, task: int, head: torch.Tensor, update: Optional[ParameterUpdate]):
        """``context_cache`` of ``head`` under the weights in place now (``update`` applied), kept for the next
        batch of the same task, head, update and device."""
        key = (task, id(self.contexts.get(task)), id(update), self.step, self.loss, self.query_with_context,
               head.numel(), head.device)
        if self._cached_head is None or self._cached_head[0] != key:
            # the update itself is kept with the cache, so its id cannot be reused by another update meanwhile
            self._cached_head = (key, context_cache(self.lm, head), update)
        return self._cached_head[1]

    def forward_single_task(self, x: torch.Tensor, task_label: int) -> torch.Tensor:
        return self.forward(x, task_label)

    def _device(self) -> torch.device:
        return next(self.lm.parameters()).device
