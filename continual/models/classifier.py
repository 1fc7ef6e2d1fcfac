"""A continual text classifier: a Hugging Face encoder, a pooling step and task-incremental or shared heads.

Inputs travel through Avalanche as one tensor ``x`` of shape ``[B, 2, L]`` (token ids stacked on the attention
mask, right-padded), so the default collate and ``.to(device)`` work unchanged; the model trims the padding that
no sample in the batch uses before running the encoder.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from avalanche.models import MultiTaskModule
from torch import nn


class TaskHeads(nn.Module):
    """Classification heads.

    ``mode="task"``: one linear head per task, picked by the sample's task label (task-incremental).
    ``mode="shared"``: one linear head over the union of all labels of the stream; logits of labels that no task
    trained so far has shown are masked to ``-inf`` (task-agnostic / class-incremental).

    Args:
        hidden: input width.
        task_labels: the label strings of every task of the stream, in stream order.
        mode: "task" or "shared".
    """

    def __init__(self, hidden: int, task_labels: Sequence[Sequence[str]], mode: str = "task"):
        super().__init__()
        if mode not in ("task", "shared"):
            raise ValueError(f"head mode must be 'task' or 'shared', got {mode!r}")
        self.mode = mode
        self.task_labels = [tuple(labels) for labels in task_labels]
        self.shared_labels: List[str] = []
        for labels in self.task_labels:
            for label in labels:
                if label not in self.shared_labels:
                    self.shared_labels.append(label)
        if mode == "task":
            self.heads = nn.ModuleList(nn.Linear(hidden, len(labels)) for labels in self.task_labels)
            self.width = max(len(labels) for labels in self.task_labels)
        else:
            self.shared = nn.Linear(hidden, len(self.shared_labels))
            self.width = len(self.shared_labels)
            self.register_buffer("active", torch.zeros(self.width, dtype=torch.bool), persistent=True)

    def target_index(self, task: int) -> List[int]:
        """Map a task's local label index to the index this head predicts."""
        if self.mode == "task":
            return list(range(len(self.task_labels[task])))
        return [self.shared_labels.index(label) for label in self.task_labels[task]]

    def activate(self, task: int) -> None:
        """Mark a task's labels as seen (shared mode): from now on they can be predicted."""
        if self.mode == "shared":
            self.active[self.target_index(task)] = True

    def parameters_for(self, task: int) -> List[nn.Parameter]:
        return list((self.heads[task] if self.mode == "task" else self.shared).parameters())

    def forward(self, features: torch.Tensor, task_labels: torch.Tensor) -> torch.Tensor:
        """features: [B, H]; task_labels: [B] -> logits [B, width] (padding and unseen labels are -inf)."""
        if self.mode == "shared":
            logits = self.shared(features)
            if bool(self.active.any()):
                logits = logits.masked_fill(~self.active, float("-inf"))
            return logits
        # Every task's head padded to the widest one ([T, C, H] weights, -inf bias on padding), gathered per sample:
        # one batched product whatever the number of tasks in the batch, no host sync.
        weights = torch.stack([nn.functional.pad(h.weight, (0, 0, 0, self.width - h.out_features)) for h in self.heads])
        biases = torch.stack([
            nn.functional.pad(h.bias, (0, self.width - h.out_features), value=float("-inf")) for h in self.heads
        ])
        task_labels = task_labels.to(features.device).long()
        return torch.einsum("bh,bch->bc", features, weights[task_labels]) + biases[task_labels]


class ContinualClassifier(MultiTaskModule):
    """Encoder + pooling + heads. ``forward(x, task_labels)`` with ``x: [B, 2, L]`` returns ``[B, C]`` logits."""

    def __init__(
        self,
        backbone: nn.Module,
        task_labels: Sequence[Sequence[str]],
        head: str = "task",
        pooling: str = "mean",
    ):
        super().__init__()
        if pooling not in ("mean", "cls", "last"):
            raise ValueError(f"pooling must be 'mean', 'cls' or 'last', got {pooling!r}")
        self.backbone = backbone
        self.pooling = pooling
        hidden = backbone.config.hidden_size
        self.heads = TaskHeads(hidden, task_labels, head)
        # A continual.modules.ModuleBank set by a strategy that puts per-task modules in the backbone; when set,
        # every backbone call routes each sample to its task's modules.
        self.bank = None

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        n_virtual: int = 0,
    ) -> torch.Tensor:
        """[B, L] ids and mask -> [B, H] sentence features.

        ``n_virtual`` leading positions (prompt/prefix tokens of a module bank, with their ``position_ids``) are
        run through the backbone but not pooled.
        """
        extra = {} if position_ids is None else {"position_ids": position_ids}
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        if n_virtual:
            hidden, attention_mask = hidden[:, n_virtual:], attention_mask[:, n_virtual:]
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.to(hidden.dtype)
        if self.pooling == "mean":
            return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)
        last = attention_mask.sum(1).long().clamp_min(1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    def forward(self, x: torch.Tensor, task_labels) -> torch.Tensor | Dict[int, torch.Tensor]:
        """x: [B, 2, L]; task_labels: [B] tensor, one int for the whole batch, or None for every task trained so
        far (Avalanche's convention, used by LwF), which returns ``{task: [B, C] logits}``."""
        if task_labels is None:
            tasks = sorted(self.known_train_tasks_labels)
            labels = {task: torch.full((x.shape[0],), task, dtype=torch.long, device=x.device) for task in tasks}
            if self.bank is not None:  # features differ per task: one backbone pass per task
                return {task: self.heads(self._features(x, labels[task]), labels[task]) for task in tasks}
            features = self._features(x)
            return {task: self.heads(features, labels[task]) for task in tasks}
        if not torch.is_tensor(task_labels):
            task_labels = torch.full((x.shape[0],), int(task_labels), dtype=torch.long, device=x.device)
        return self.heads(self._features(x, task_labels), task_labels)

    def _features(self, x: torch.Tensor, task_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Drop the padding columns no sample uses, then encode: [B, 2, L] -> [B, H].

        ``task_labels: [B]`` routes each sample to its task's modules when a bank is attached (required then).
        """
        input_ids, attention_mask = x[:, 0], x[:, 1]
        used = max(int(attention_mask.sum(1).max().item()) if attention_mask.numel() else 0, 1)
        if self.bank is None:
            return self.encode(input_ids[:, :used], attention_mask[:, :used])
        if task_labels is None:
            raise ValueError("this model has per-task modules: its features need the samples' task labels")
        with self.bank.route(task_labels):
            ids, mask, positions, n_virtual = self.bank.prepare_inputs(input_ids[:, :used], attention_mask[:, :used])
            if n_virtual and not self._takes_position_ids():
                positions = None  # e.g. T5: relative positions; the virtual tokens shift nothing absolute
            return self.encode(ids, mask, positions, n_virtual)

    def _takes_position_ids(self) -> bool:
        backbone_type = type(self.backbone)
        if getattr(self, "_position_ids_for", (None,))[0] is not backbone_type:  # inspect once per backbone class
            import inspect

            self._position_ids_for = (backbone_type, "position_ids" in inspect.signature(self.backbone.forward).parameters)
        return self._position_ids_for[1]

    # Avalanche's MultiTaskModule routes single-task calls through here (LwF's forward_all_tasks, for one).
    def forward_single_task(self, x: torch.Tensor, task_label: int) -> torch.Tensor:
        return self.forward(x, task_label)
