"""Label-word classification on a causal LM: a class is scored by the log-probability of its words after the prompt,
read through the frozen LM head, so no head parameters exist per task and a new task cannot overwrite an old one.
This is how the O-LoRA family (Wang et al. 2023, "Orthogonal Subspace Learning for Language Model Continual
Learning", arXiv 2310.14152, and its successors) poses text classification to a language model; they generate the
label and match strings, we score every candidate label instead (the same answer when the model's greedy output is
a candidate, and a proper probability for training).

For an input ``x`` of task ``t`` the prompt is ``lead + prefix_t + x + suffix_t`` (the task's template,
``"{text}\\nAnswer:"`` by default, around the input's tokens; ``lead`` is what the tokenizer puts before a text, e.g.
a BOS token), and label ``c`` with word tokens ``w_1..w_n`` (those of ``" " + words``) scores

    s(c) = sum_k log p(w_k | prompt, w_1..w_{k-1})

the sum, not the mean, of its tokens' log-probabilities: the log-probability of the whole label string, so labels of
different lengths compete on one scale (the mean would favour long labels whose later tokens are easy to guess).

Candidates are the current task's labels while training. The loss is either the cross-entropy over their scores
(``label_loss="candidates"``: only the task's labels compete) or the language-modelling loss of the gold label's words
over the whole vocabulary (``"lm"``, how the O-LoRA family trains its generator): the training logits then carry one
more column, the log-probability of every continuation that is not a candidate, ``log(1 - sum_c exp s(c))``, so the
softmax over them is the model's own distribution and the cross-entropy is exactly ``-s(gold)``. Only the second
pushes down the labels of other tasks, which compete with the task's own at test time with ``"seen"``. At test
time ``label_space="task"`` scores the sample's task's labels (task id given) and ``"seen"`` every label of the tasks
trained so far (task id not given, the O-LoRA family's setting). Either way the logits go back to Avalanche in the
gold task's label space plus an "other" column (:mod:`continual.models.label_space`), so a prediction counts as right
only when its label string is the gold label.

Scoring is batched: one pass over the prompts (through the module bank when a strategy attached one, each sample
routed to its task's modules) gives every candidate's first-token log-probability from the last prompt position;
the later tokens of multi-token labels run in a second pass that continues the prompt's cached keys and values, one
row per (sample, candidate) with more than one token.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from continual.compat import decoder_forward
from continual.models.classifier import ContinualClassifier
from continual.models.label_space import best_in_gold_space, label_map
from continual.models.tint.label_words import LabelWordError
from continual.models.tint.prompts import assemble_queries, strip_queries
from continual.modules.families import FAMILIES, MODEL_TYPES

TEXT = "{text}"


def check_causal_lm(config, name: str) -> None:
    """Fail unless ``config`` describes a decoder-only causal LM (what label words are scored with).

    Raises:
        LabelWordError: an encoder-only (BERT family) or encoder-decoder (T5) model, naming its model type.
    """
    model_type = getattr(config, "model_type", None)
    family = FAMILIES.get(MODEL_TYPES.get(model_type, ""))
    if getattr(config, "is_encoder_decoder", False) or (family is not None and not family.causal_lm):
        kind = "an encoder-decoder" if getattr(config, "is_encoder_decoder", False) else "an encoder-only"
        raise LabelWordError(
            f"backbone.head=label_words scores label words with a causal LM's next-token head, but backbone "
            f"{name!r} is model_type {model_type!r}, {kind} model; use a GPT-2 or Llama-family causal LM "
            "(e.g. backbone.name=smollm2) or backbone.head=task"
        )


def label_word_sequences(
    tokenizer, labels: Sequence[str], words: Optional[Mapping[str, str]] = None, task: str = ""
) -> List[Tuple[int, ...]]:
    """The token ids that spell each label after the prompt: those of ``" " + words``.

    Args:
        tokenizer: a Hugging Face tokenizer.
        labels: the task's label strings, in label-index order.
        words: optional ``{label: words}`` overrides (a label not named is spelt by its own string).
        task: the task's name, for messages and the config key they name.

    Raises:
        LabelWordError: an override names a label the task does not have, a label's words give no token, or two
            labels of the task are spelt by the same tokens.
    """
    words = dict(words or {})
    key = f"backbone.label_words.{task or '<task>'}"
    unknown = sorted(set(words) - set(labels))
    if unknown:
        raise LabelWordError(f"{key}: {unknown} are not labels of task {task!r} (its labels: {list(labels)})")
    out: List[Tuple[int, ...]] = []
    for label in labels:
        word = str(words.get(label, label))
        tokens = tuple(int(i) for i in tokenizer(" " + word, add_special_tokens=False)["input_ids"]) if word.strip() else ()
        if not tokens:
            raise LabelWordError(
                f"task {task!r}: label {label!r} is spelt by {word!r}, which gives no token; set {key}={{{label!r}: ...}}"
            )
        out.append(tokens)
    seen: Dict[Tuple[int, ...], str] = {}
    for label, tokens in zip(labels, out):
        if tokens in seen:
            raise LabelWordError(
                f"task {task!r}: labels {seen[tokens]!r} and {label!r} are spelt by the same tokens {list(tokens)}, so "
                f"they cannot be told apart; give them distinct words with {key}={{{seen[tokens]!r}: ..., {label!r}: ...}}"
            )
        seen[tokens] = label
    return out


@dataclass(frozen=True)
class PromptTemplates:
    """Token pieces of the prompts: ``lead + prefix + text + suffix`` per task.

    Attributes:
        lead: ids the tokenizer puts before a text (BOS), once at the start of every prompt.
        added: ids the tokenizer adds around a text (lead and trailing ones), stripped from stream-tokenized inputs.
        pad_id: padding id.
        pieces: ``(prefix ids, suffix ids)`` of each distinct template.
        of_task: which of ``pieces`` each task uses.
    """

    lead: Tuple[int, ...]
    added: Tuple[int, ...]
    pad_id: int
    pieces: Tuple[Tuple[Tuple[int, ...], Tuple[int, ...]], ...]
    of_task: Tuple[int, ...]

    @classmethod
    def from_tokenizer(
        cls, tokenizer, task_names: Sequence[str], template: str, task_templates: Optional[Mapping[str, str]] = None
    ) -> "PromptTemplates":
        """Tokenize each template's text around ``{text}`` once (the input's own tokens are spliced between).

        Raises:
            ValueError: a template without exactly one ``{text}``, or a per-task template for a task not in the
                stream, naming the config key.
        """
        task_templates = dict(task_templates or {})
        unknown = sorted(set(task_templates) - set(task_names))
        if unknown:
            raise ValueError(f"backbone.task_templates: {unknown} are not tasks of this stream ({list(task_names)})")
        chosen = [task_templates.get(name, template) for name in task_names]
        for name, text in zip(task_names, chosen):
            if text.count(TEXT) != 1:
                key = f"backbone.task_templates.{name}" if name in task_templates else "backbone.template"
                raise ValueError(f"{key}: {text!r} must contain {TEXT} exactly once (where the input goes)")
        distinct = list(dict.fromkeys(chosen))

        def ids(piece: str) -> Tuple[int, ...]:
            return tuple(int(i) for i in tokenizer(piece, add_special_tokens=False)["input_ids"]) if piece else ()

        pieces = tuple((ids(t.split(TEXT)[0]), ids(t.split(TEXT)[1])) for t in distinct)
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        full = tokenizer("a", add_special_tokens=True)["input_ids"]
        start = next((i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain), 0)
        lead, trail = full[:start], full[start + len(plain):]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token")
        return cls(
            lead=tuple(int(i) for i in lead), added=tuple(sorted({int(i) for i in lead + trail})), pad_id=int(pad),
            pieces=pieces, of_task=tuple(distinct.index(t) for t in chosen),
        )

    def assemble(self, x: torch.Tensor, tasks: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Stream-tokenized inputs -> prompts.

        Args:
            x: ``[B, 2, L]`` ids stacked on the attention mask (right-padded, with the tokenizer's added tokens).
            tasks: ``[B]`` each input's task (whose template wraps it).

        Returns:
            ``(ids [B, P], mask [B, P])``, right-padded.
        """
        texts, lengths = strip_queries(x, self.added, self.pad_id)
        groups = torch.tensor(self.of_task, device=x.device)[tasks.long()]
        if len(self.pieces) == 1:
            return self._wrap(0, texts, lengths)
        ids = torch.full((x.shape[0], 0), self.pad_id, dtype=texts.dtype, device=x.device)
        mask = ids.clone()
        for group in groups.unique().tolist():  # one pass per distinct template in the batch (usually one)
            rows = (groups == group).nonzero(as_tuple=True)[0]
            part, part_mask = self._wrap(group, texts[rows], lengths[rows])
            width = max(ids.shape[1], part.shape[1])
            ids = nn.functional.pad(ids, (0, width - ids.shape[1]), value=self.pad_id)
            mask = nn.functional.pad(mask, (0, width - mask.shape[1]))
            ids[rows] = nn.functional.pad(part, (0, width - part.shape[1]), value=self.pad_id)
            mask[rows] = nn.functional.pad(part_mask, (0, width - part.shape[1]))
        return ids, mask

    def _wrap(self, group: int, texts: torch.Tensor, lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        prefix, suffix = self.pieces[group]
        head = torch.tensor(self.lead + prefix, dtype=texts.dtype, device=texts.device)
        return assemble_queries(head, texts, lengths, suffix, self.pad_id)


class LabelWords(nn.Module):
    """The "heads" of a label-word classifier: every task's labels and the tokens that spell them; nothing trains.

    Answers the questions the learner asks of heads (``target_index``, ``activate``, ``parameters_for``, ``mode``)
    and maps answers into the gold task's label space.

    Args:
        task_labels: the label strings of every task, in stream order.
        spellings: per task, each label's word token ids (:func:`label_word_sequences`).
        label_space: "task" or "seen" (see the module docstring).
        task_names: for messages.

    Raises:
        LabelWordError: with ``label_space="seen"``, one label string spelt differently by two tasks, or two
            different labels spelt by the same tokens (every seen label competes, so they could not be told apart).
    """

    mode = "label_words"

    def __init__(
        self,
        task_labels: Sequence[Sequence[str]],
        spellings: Sequence[Sequence[Sequence[int]]],
        label_space: str = "task",
        task_names: Optional[Sequence[str]] = None,
    ):
        super().__init__()
        if label_space not in ("task", "seen"):
            raise ValueError(f"backbone.label_space must be 'task' or 'seen', got {label_space!r}")
        names = list(task_names or [f"task{i}" for i in range(len(task_labels))])
        self.task_labels = [tuple(labels) for labels in task_labels]
        self.label_space = label_space
        # The labels of the whole stream by string, in order of first appearance: the candidates of "seen".
        self.seen_labels: List[str] = []
        spelling_of: Dict[str, Tuple[int, ...]] = {}
        for name, labels, spelt in zip(names, self.task_labels, spellings):
            for label, tokens in zip(labels, spelt):
                tokens = tuple(tokens)
                if label not in spelling_of:
                    self.seen_labels.append(label)
                    spelling_of[label] = tokens
                elif spelling_of[label] != tokens and label_space == "seen":
                    raise LabelWordError(
                        f"backbone.label_words.{name}: label {label!r} is spelt {list(tokens)} here but "
                        f"{list(spelling_of[label])} by an earlier task; one label string needs one spelling"
                    )
        if label_space == "seen":
            by_tokens: Dict[Tuple[int, ...], str] = {}
            for label in self.seen_labels:
                other = by_tokens.setdefault(spelling_of[label], label)
                if other != label:
                    raise LabelWordError(
                        f"labels {other!r} and {label!r} (of different tasks) are spelt by the same tokens, so with "
                        "backbone.label_space=seen they cannot be told apart; give one of them other words with "
                        "backbone.label_words"
                    )
        self.width = max(len(labels) for labels in self.task_labels)
        longest = max(len(tokens) for spelt in spellings for tokens in spelt)
        words = torch.zeros(len(self.task_labels), self.width, longest, dtype=torch.long)
        lengths = torch.zeros(len(self.task_labels), self.width, dtype=torch.long)
        for t, spelt in enumerate(spellings):
            for c, tokens in enumerate(spelt):
                words[t, c, : len(tokens)] = torch.tensor(tokens)
                lengths[t, c] = len(tokens)
        seen_words = torch.zeros(len(self.seen_labels), longest, dtype=torch.long)
        for s, label in enumerate(self.seen_labels):
            seen_words[s, : len(spelling_of[label])] = torch.tensor(spelling_of[label])
        member = torch.tensor([[label in labels for label in self.seen_labels] for labels in self.task_labels])
        # Derived from the tokenizer, not stored: rebuilt identically by the run that loads a checkpoint.
        self.register_buffer("words", words, persistent=False)  # [T, W, Lw]
        self.register_buffer("lengths", lengths, persistent=False)  # [T, W] (0: no such label)
        self.register_buffer("seen_words", seen_words, persistent=False)  # [S, Lw]
        self.register_buffer("seen_lengths", torch.tensor([len(spelling_of[l]) for l in self.seen_labels]), persistent=False)
        self.register_buffer("member", member, persistent=False)  # [T, S]: the seen labels each task has
        self.register_buffer("active", torch.zeros(len(self.task_labels), dtype=torch.bool), persistent=True)
        self._label_map: Optional[torch.Tensor] = None

    @property
    def seen_list(self) -> int:
        """The index of the seen labels among the label lists :meth:`in_gold_space` answers with (after the tasks)."""
        return len(self.task_labels)

    def target_index(self, task: int) -> List[int]:
        return list(range(len(self.task_labels[task])))

    def activate(self, task: int) -> None:
        """Mark a task as trained: its labels become candidates of the "seen" label space."""
        self.active[task] = True

    def parameters_for(self, task: int) -> List[nn.Parameter]:
        return []

    def seen_mask(self) -> torch.Tensor:
        """``[S]`` the labels of the tasks trained so far (every label of the stream before any task is)."""
        if not bool(self.active.any()):
            return torch.ones(len(self.seen_labels), dtype=torch.bool, device=self.member.device)
        return self.member[self.active].any(0)

    def label_map(self) -> torch.Tensor:
        """``[T + 1, T, max(W, S), W + 1]``: :func:`~continual.models.label_space.label_map` from every task's labels
        and the seen labels (list ``T``) to every task's."""
        if self._label_map is None:
            answering = self.task_labels + [tuple(self.seen_labels)]
            self._label_map = label_map(answering, self.task_labels, max(self.width, len(self.seen_labels)), self.width)
        return self._label_map

    def in_gold_space(self, scores: torch.Tensor, answering: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
        """Label-word scores of the labels each sample was answered with, in its gold task's label space.

        Args:
            scores: ``[B, Wi]`` scores of list ``answering[b]``'s labels (a task's, or the seen labels when
                ``answering[b] == seen_list``), ``-inf`` where a list has fewer labels.
            answering, gold: ``[B]``.

        Returns:
            ``[B, W + 1]``: each gold label's score, and the best score of the labels the gold task does not have.
        """
        mapping = self.label_map().to(scores.device)
        scores = nn.functional.pad(scores, (0, mapping.shape[2] - scores.shape[1]), value=float("-inf"))
        return best_in_gold_space(scores, mapping[answering.long(), gold.long()])


class LabelWordClassifier(ContinualClassifier):
    """A causal LM that classifies by scoring label words (see the module docstring); the interface of
    ``ContinualClassifier`` (``backbone`` is the causal LM, its ``bank`` and routers work unchanged).

    Args:
        lm: a Hugging Face causal LM (``*ForCausalLM``).
        heads: the label words of every task.
        prompts: the prompt templates.
    """

    LOSSES = ("candidates", "lm")

    def __init__(self, lm: nn.Module, heads: LabelWords, prompts: PromptTemplates, label_loss: str = "candidates"):
        super().__init__(lm, heads.task_labels, pooling="last", heads=heads)
        if label_loss not in self.LOSSES:
            raise ValueError(f"backbone.label_loss must be one of {list(self.LOSSES)}, got {label_loss!r}")
        self.prompts = prompts
        self.label_loss = label_loss

    def hidden_model(self) -> nn.Module:
        """The LM's base model (its hidden states, without the vocabulary logits)."""
        return getattr(self.backbone, self.backbone.base_model_prefix)

    def _forward(self, x: torch.Tensor, task_labels) -> torch.Tensor | Dict[int, torch.Tensor]:
        """x: ``[B, 2, L]``; task_labels: ``[B]``, one int, or None (every trained task's logits, as Avalanche's LwF
        asks) -> ``[B, W]`` (the task's labels) or ``[B, W + 1]`` (answers mapped into the gold label space)."""
        if task_labels is None:
            tasks = sorted(self.known_train_tasks_labels)
            return {t: self.routed_logits(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)) for t in tasks}
        if not torch.is_tensor(task_labels):
            task_labels = torch.full((x.shape[0],), int(task_labels), dtype=torch.long, device=x.device)
        gold = task_labels.to(x.device).long()
        modules = gold  # whose modules (in the bank) answer: the given task, or the inferred one when routed
        if self.routes_by_inference():
            if self.router_top_k > 1:
                raise ValueError("router.top_k > 1 mixes heads' probabilities; label words answer with one route")
            modules = self.infer_tasks(x)
            self.routing_log.append((gold.detach().cpu(), modules.detach().cpu()))
        if self.training or self.heads.label_space == "task":  # the answering task's labels compete
            scores = self.score(x, gold, modules, self.heads.words[modules], self.heads.lengths[modules])
            if modules is not gold:
                return self.heads.in_gold_space(scores, modules, gold)
            return with_rest(scores) if self.training and self.label_loss == "lm" else scores
        seen = self.heads.seen_mask().nonzero(as_tuple=True)[0]  # [S'] "seen": only the seen labels are scored
        words = self.heads.seen_words[seen].expand(x.shape[0], -1, -1)
        lengths = self.heads.seen_lengths[seen].expand(x.shape[0], -1)
        scores = self.score(x, gold, modules, words, lengths)  # [B, S']
        full = scores.new_full((x.shape[0], len(self.heads.seen_labels)), float("-inf")).index_copy(1, seen, scores)
        return self.heads.in_gold_space(full, torch.full_like(gold, self.heads.seen_list), gold)

    def routed_logits(self, x: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
        """``[B, W]`` scores of the labels of ``tasks: [B]``, each sample through that task's modules and in that
        task's template (what a router reading candidates' predictions and Avalanche's LwF ask for; ``forward``
        keeps the input's own template when it knows the input's task)."""
        tasks = tasks.to(x.device).long()
        return self.score(x, tasks, tasks, self.heads.words[tasks], self.heads.lengths[tasks])

    def score(
        self, x: torch.Tensor, gold: torch.Tensor, modules: torch.Tensor, words: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        """Label-word log-probabilities: the sum over each candidate's tokens.

        Args:
            x: ``[B, 2, L]`` stream-tokenized inputs.
            gold: ``[B]`` each input's task (its prompt template).
            modules: ``[B]`` the task whose modules (in the bank) each sample runs through.
            words: ``[B, C, Lw]`` candidate token ids, right-padded.
            lengths: ``[B, C]`` candidate lengths (0: no candidate there).

        Returns:
            ``[B, C]`` float32, ``-inf`` where ``lengths == 0``.
        """
        prompt, prompt_mask = self.prompts.assemble(x, gold)
        B, C, Lw = words.shape
        base, head = self.hidden_model(), self.backbone.get_output_embeddings()
        multi = (lengths > 1).nonzero(as_tuple=True)  # (sample, candidate) pairs with later tokens to score
        with self._routed(modules):
            ids, mask, positions, n_virtual = (
                self.bank.prepare_inputs(prompt, prompt_mask) if self.bank is not None else (prompt, prompt_mask, None, 0)
            )
            extra = {"position_ids": positions} if n_virtual else {}
            hidden, cache = decoder_forward(base, input_ids=ids, attention_mask=mask, use_cache=bool(multi[0].numel()), **extra)
        real = prompt_mask.sum(1)  # [B] prompt tokens; the last one predicts each label's first token
        last = hidden[torch.arange(B, device=x.device), n_virtual + real - 1]  # [B, H]
        first = torch.log_softmax(head(last).float(), dim=-1)  # [B, V]
        scores = first.gather(1, words[:, :, 0])  # [B, C]
        if multi[0].numel():
            b, c = multi
            # One row per multi-token candidate continues its sample's cached prompt: tokens 1..n-1 are predicted by
            # the positions of tokens 0..n-2 (at real positions real_b, real_b + 1, ...).
            cache.batch_select_indices(b)
            steps = torch.arange(Lw - 1, device=x.device)
            with self._routed(modules[b]):
                if self.bank is not None:
                    self.bank.continue_inputs()
                more, _ = decoder_forward(
                    base, cache=cache, use_cache=True, input_ids=words[b, c, :-1],
                    attention_mask=torch.cat([mask[b], mask.new_ones(len(b), Lw - 1)], dim=1),
                    position_ids=real[b, None] + steps,
                )  # [N, Lw - 1, H]
            valid = steps[None] + 1 < lengths[b, c][:, None]  # [N, Lw - 1]: position j predicts token j + 1
            logits = head(more[valid]).float()  # [M, V]: only real tokens reach the vocabulary
            target = words[b, c, 1:][valid][:, None]  # [M, 1]
            token = (logits.gather(1, target) - logits.logsumexp(-1, keepdim=True)).squeeze(1)  # [M] log-probabilities
            row = torch.arange(len(b), device=x.device)[:, None].expand_as(valid)[valid]  # [M] which candidate row
            later = torch.zeros(len(b), device=x.device).index_add(0, row, token)  # [N]
            scores = scores + torch.zeros_like(scores).index_put((b, c), later)
        return scores.masked_fill(lengths == 0, float("-inf"))

    def _routed(self, tasks: torch.Tensor):
        return self.bank.route(tasks) if self.bank is not None else nullcontext()


def with_rest(scores: torch.Tensor) -> torch.Tensor:
    """``[B, C]`` candidates' log-probabilities -> ``[B, C + 1]``, the last column the log-probability of every other
    continuation, ``log(1 - sum_c exp s_c)``: the softmax over the result is the LM's own distribution over "one of the
    candidates, or anything else", so the cross-entropy at a candidate is minus its log-probability (the LM loss of its
    words). Candidates whose words extend another's can sum past 1; the rest then gets a tiny floor, not NaN."""
    total = torch.logsumexp(scores, dim=1, keepdim=True).clamp(max=-1e-6)  # log sum_c p(c), below 0
    return torch.cat([scores, torch.log(-torch.expm1(total))], dim=1)


def build_label_word_classifier(
    lm: nn.Module,
    tokenizer,
    task_names: Sequence[str],
    task_labels: Sequence[Sequence[str]],
    *,
    name: str = "",
    label_space: str = "task",
    label_loss: str = "auto",
    template: str = "{text}\nAnswer:",
    task_templates: Optional[Mapping[str, str]] = None,
    label_words: Optional[Mapping[str, Mapping[str, str]]] = None,
) -> LabelWordClassifier:
    """A label-word classifier over a stream's tasks (the ``backbone.head=label_words`` options as flat arguments).

    Args:
        lm: a Hugging Face causal LM.
        tokenizer: its tokenizer.
        task_names, task_labels: the stream's tasks.
        name: the backbone's name, for messages.
        label_space, label_loss, template, task_templates, label_words: as in ``BackboneConfig`` ("auto" loss: "lm"
            with ``label_space="seen"``, "candidates" with ``"task"``).

    Raises:
        LabelWordError: an encoder-only or encoder-decoder model, or unusable label words.
        ValueError: a bad template or a per-task option naming a task the stream does not have.
    """
    check_causal_lm(lm.config, name or type(lm).__name__)
    label_words = {str(k): dict(v) for k, v in (label_words or {}).items()}
    unknown = sorted(set(label_words) - set(task_names))
    if unknown:
        raise LabelWordError(f"backbone.label_words: {unknown} are not tasks of this stream ({list(task_names)})")
    spellings = [
        label_word_sequences(tokenizer, labels, label_words.get(task), task) for task, labels in zip(task_names, task_labels)
    ]
    heads = LabelWords(task_labels, spellings, label_space, task_names)
    prompts = PromptTemplates.from_tokenizer(tokenizer, task_names, template, task_templates)
    if label_loss == "auto":
        label_loss = "lm" if label_space == "seen" else "candidates"
    return LabelWordClassifier(lm, heads, prompts, label_loss=label_loss)
