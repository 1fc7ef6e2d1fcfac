"""Plain containers for a task: what the learner and strategies see of it, and its data as loaded, before
tokenization."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Tuple


@dataclass(frozen=True)
class TaskInfo:
    """One task of a stream as the learner and strategies see it."""

    index: int  # position in the stream (also the Avalanche task label)
    name: str
    labels: tuple  # label strings, in labels.json order


@dataclass
class TaskSplit:
    """One split of a task: parallel lists of texts and label indices."""

    texts: List[str]
    labels: List[int]  # indices into the task's label tuple

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"TaskSplit: {len(self.texts)} texts but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: List[int]) -> "TaskSplit":
        """The rows at ``indices``, in the order given."""
        return TaskSplit([self.texts[i] for i in indices], [self.labels[i] for i in indices])


@dataclass
class TaskData:
    """A task as read from disk or the Hub: its label strings and a train and an evaluation split."""

    name: str  # folder-safe task name ("agnews", "glue_sst2")
    source: str  # where it came from (a folder, or "hf:<id>")
    labels: Tuple[str, ...]  # label strings; TaskSplit.labels index into this
    train: TaskSplit
    test: TaskSplit  # the evaluation split (stream.eval_split)
    skipped: Dict[str, int] = field(default_factory=dict)  # file -> rows skipped (unknown labels)
