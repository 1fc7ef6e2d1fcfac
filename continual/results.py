"""Plain records of a run: what the learner produces and what metrics, reports and trackers consume."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np


@dataclass
class TaskRecord:
    """What happened while training one task (one row of the accuracy matrix)."""

    task: str
    trainable_parameters: int  # parameters that received updates on this task
    stored_parameters: int  # parameters kept to serve every task seen so far
    wall_time_s: float  # training time of this task (evaluation excluded)
    peak_memory_mb: float  # peak process RSS (CPU) or peak allocated CUDA memory while training this task
    train_loss: float  # mean training loss over the task's last epoch
    stored_bytes: int = 0  # bytes of this task's checkpoint (0 when checkpoints are off)
    router_bytes: int = 0  # bytes a task-inferring router keeps for this task (0 for the oracle)
    strategy_metrics: Dict[str, float] = field(default_factory=dict)  # what the strategy reports (e.g. pruning)


@dataclass
class RunResult:
    """Accuracies of a whole stream.

    ``matrix[i, j]`` is the accuracy (0..1) on task j's test set after training on tasks 0..i; rows that were not
    evaluated (a joint run has only its final row) are NaN. ``initial[j]`` is the accuracy before any training.
    """

    task_names: List[str]
    matrix: np.ndarray  # [T, T] float, NaN where not evaluated
    initial: Optional[np.ndarray] = None  # [T] or None
    records: List[TaskRecord] = field(default_factory=list)
    output_dir: Optional[Path] = None  # where the run wrote its artifacts (set by run_experiment)
    # Runs that infer the task (a router other than the oracle): `matrix` is the routed accuracy, `oracle_matrix`
    # the same model with the task id given, `routing_matrix[i, j]` the fraction of task j's test samples routed to
    # task j after task i (NaN for tasks not yet learnt), `routing_confusion[i, j]` the final counts of task i's test
    # samples routed to task j, `eval_seconds` the evaluation time of each way.
    oracle_matrix: Optional[np.ndarray] = None
    routing_matrix: Optional[np.ndarray] = None
    routing_confusion: Optional[np.ndarray] = None
    eval_seconds: Optional[Dict[str, float]] = None

    @classmethod
    def from_dict(cls, data: Dict, output_dir: Optional[Path] = None) -> "RunResult":
        """Inverse of :meth:`to_dict` (None entries back to NaN)."""
        def array(rows):
            return None if rows is None else np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=float)

        return cls(
            task_names=list(data["task_names"]),
            matrix=array(data["matrix"]),
            initial=None if data.get("initial") is None else np.array(data["initial"], dtype=float),
            records=[TaskRecord(**r) for r in data.get("records", [])],
            output_dir=output_dir,
            oracle_matrix=array(data.get("oracle_matrix")),
            routing_matrix=array(data.get("routing_matrix")),
            routing_confusion=array(data.get("routing_confusion")),
            eval_seconds=dict(data["eval_seconds"]) if data.get("eval_seconds") else None,
        )

    def to_dict(self) -> Dict:
        return {
            "task_names": list(self.task_names),
            "matrix": [[None if np.isnan(v) else float(v) for v in row] for row in self.matrix],
            "initial": None if self.initial is None else [float(v) for v in self.initial],
            "records": [asdict(r) for r in self.records],
            **{
                name: [[None if np.isnan(v) else float(v) for v in row] for row in value]
                for name, value in (("oracle_matrix", self.oracle_matrix), ("routing_matrix", self.routing_matrix),
                                    ("routing_confusion", self.routing_confusion))
                if value is not None
            },
            **({"eval_seconds": dict(self.eval_seconds)} if self.eval_seconds else {}),
        }
