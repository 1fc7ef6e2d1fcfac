"""Conversion of a tokenized stream into an Avalanche benchmark: one experience per task, with task labels."""

from __future__ import annotations

from typing import Callable, List, Sequence

import torch
from torch.utils.data import Dataset


class TokenizedClassificationData(Dataset):
    """``(x, y)`` pairs where ``x = stack(input_ids, attention_mask)`` has shape ``[2, L]``.

    Args:
        input_ids: [N, L] token ids, right-padded.
        attention_mask: [N, L].
        targets: N class indices in the head's label space.
    """

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, targets: Sequence[int]):
        if input_ids.shape != attention_mask.shape:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} differ")
        self.x = torch.stack([input_ids.long(), attention_mask.long()], dim=1)
        self.targets = [int(t) for t in targets]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return self.x[index], self.targets[index]


def to_classification_dataset(hf_dataset, task_index: int, target_index: Sequence[int]):
    """Wrap one tokenized split (``input_ids``, ``attention_mask``, ``label``) as a task-aware Avalanche dataset.

    Args:
        hf_dataset: a ``datasets.Dataset`` with the three columns.
        task_index: the Avalanche task label of every sample.
        target_index: maps the task-local label index to the head's label index.
    """
    from avalanche.benchmarks.utils import _make_taskaware_classification_dataset

    columns = hf_dataset.with_format("torch", columns=["input_ids", "attention_mask", "label"])[:]
    local = columns["label"].tolist()
    targets = [target_index[y] for y in local]
    data = TokenizedClassificationData(columns["input_ids"], columns["attention_mask"], targets)
    return _make_taskaware_classification_dataset(data, task_labels=task_index, targets=targets)


def dataset_from_tensors(x: torch.Tensor, targets: torch.Tensor, task_labels: torch.Tensor):
    """A task-aware Avalanche dataset of already tokenized samples (e.g. a replay memory read back from a run's state).

    Args:
        x: ``[N, 2, L]`` token ids stacked on the attention mask.
        targets: ``[N]`` class indices in the head's label space.
        task_labels: ``[N]`` task label of each sample.
    """
    from avalanche.benchmarks.utils import _make_taskaware_classification_dataset

    data = TokenizedClassificationData(x[:, 0], x[:, 1], targets.tolist())
    labels = sorted(set(int(t) for t in task_labels))
    # One task: a constant label, as the stream's own datasets have (Avalanche cannot concatenate a constant task
    # label sequence with a per-sample one).
    task = labels[0] if len(labels) == 1 else [int(t) for t in task_labels]
    return _make_taskaware_classification_dataset(data, task_labels=task, targets=data.targets)


def to_avalanche_benchmark(stream, target_index: Callable[[int], List[int]]):
    """Build a benchmark with ``train_stream`` and ``test_stream``, experience i = task i (task label i).

    Args:
        stream: a ``streams.build.Stream``.
        target_index: ``task index -> [head index of each local label]`` (from the model's heads).
    """
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
    from avalanche.benchmarks.scenarios.task_aware import with_task_labels

    train, test = [], []
    for task in stream.tasks:
        mapping = target_index(task.info.index)
        train.append(to_classification_dataset(task.train, task.info.index, mapping))
        test.append(to_classification_dataset(task.test, task.info.index, mapping))
    return with_classes_timeline(with_task_labels(benchmark_from_datasets(train=train, test=test)))


def joint_experience(experiences):
    """One training experience holding the union of ``experiences`` (each sample keeps its task label)."""
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
    from avalanche.benchmarks.scenarios.task_aware import with_task_labels

    datasets = [exp.dataset for exp in experiences]
    union = datasets[0]
    for extra in datasets[1:]:
        union = union.concat(extra)
    benchmark = with_classes_timeline(with_task_labels(benchmark_from_datasets(train=[union])))
    return benchmark.train_stream[0]
