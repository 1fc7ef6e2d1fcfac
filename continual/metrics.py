"""Continual-learning metrics as pure functions of the accuracy matrix.

``R[i, j]`` is the accuracy on task j's test set after training on tasks 0..i (T tasks, 0-based) and ``b[j]`` the
accuracy on task j before any training on the stream. Definitions, as in the project's metric spec:

- Average accuracy ``ACC = mean_j R[T-1, j]``, backward transfer ``BWT = mean_{j<T-1} (R[T-1, j] - R[j, j])`` and
  forward transfer ``FWT = mean_{j>0} (R[j-1, j] - b[j])``: Lopez-Paz & Ranzato, "Gradient Episodic Memory for
  Continual Learning", NeurIPS 2017 (GEM).
- Forgetting ``F_j = max_{j<=l<T-1} R[l, j] - R[T-1, j]`` for ``j < T-1``, averaged over those tasks: Chaudhry et
  al., "Riemannian Walk for Incremental Learning: Understanding Forgetting and Intransigence", ECCV 2018. Only rows
  from the one where task j was learned count: an accuracy before task j was trained (chance level, say) was never
  learned, so losing it is not forgetting.

Rows that were not evaluated are NaN (a joint run only has its last row). A metric whose inputs are NaN is NaN; we
never average over the rows that happen to exist, because that would silently change what the number means. The one
exception is the max over earlier rows in forgetting, which skips rows that were not evaluated.
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from continual.results import RunResult


def _check_matrix(matrix: np.ndarray) -> np.ndarray:
    """Returns ``matrix`` as a float array after checking it is square ``[T, T]`` with ``T >= 1``."""
    r = np.asarray(matrix, dtype=float)
    if r.ndim != 2 or r.shape[0] != r.shape[1] or r.shape[0] < 1:
        raise ValueError(f"accuracy matrix must be square [T, T] with T >= 1, got shape {r.shape}")
    return r


def average_accuracy(matrix: np.ndarray) -> float:
    """Mean accuracy over all tasks after training on the last one.

    Args:
        matrix: ``[T, T]`` accuracy matrix, NaN where not evaluated.

    Returns:
        ``mean_j R[T-1, j]``; NaN if any entry of the last row is NaN.
    """
    r = _check_matrix(matrix)
    return float(np.mean(r[-1]))


def backward_transfer(matrix: np.ndarray) -> float:
    """Mean change of accuracy on earlier tasks between learning them and the end of the stream.

    Args:
        matrix: ``[T, T]`` accuracy matrix, NaN where not evaluated.

    Returns:
        ``mean_{j<T-1} (R[T-1, j] - R[j, j])``, negative when the learner forgot; NaN when ``T == 1`` or any needed
        entry is NaN.
    """
    r = _check_matrix(matrix)
    t = r.shape[0]
    if t == 1:
        return float("nan")
    idx = np.arange(t - 1)
    return float(np.mean(r[-1, idx] - r[idx, idx]))


def forward_transfer(matrix: np.ndarray, initial: Optional[np.ndarray]) -> float:
    """Mean gain on a task from the tasks learnt before it, relative to the untrained model.

    Args:
        matrix: ``[T, T]`` accuracy matrix, NaN where not evaluated.
        initial: ``[T]`` accuracies ``b`` before any training, or None when not measured.

    Returns:
        ``mean_{j>0} (R[j-1, j] - b[j])``; NaN when ``initial`` is None, ``T == 1`` or any needed entry is NaN.

    Raises:
        ValueError: if the matrix is not square or ``initial`` does not have shape ``[T]``.
    """
    r = _check_matrix(matrix)
    t = r.shape[0]
    if initial is None:
        return float("nan")
    b = np.asarray(initial, dtype=float)
    if b.shape != (t,):
        raise ValueError(f"initial accuracies must have shape ({t},) to match the matrix, got {b.shape}")
    if t == 1:
        return float("nan")
    j = np.arange(1, t)
    return float(np.mean(r[j - 1, j] - b[j]))


def forgetting(matrix: np.ndarray) -> np.ndarray:
    """Per-task forgetting: best earlier accuracy on a task minus its final accuracy.

    Args:
        matrix: ``[T, T]`` accuracy matrix, NaN where not evaluated.

    Returns:
        ``[T-1]`` array with ``F_j = max_{j<=l<T-1} R[l, j] - R[T-1, j]`` for ``j < T-1`` (empty when ``T == 1``).
        Rows before task j was learned (``l < j``) never count. Rows ``l`` that were not evaluated are skipped in
        the max; ``F_j`` is NaN if all of them are NaN or if ``R[T-1, j]`` is NaN.
    """
    r = _check_matrix(matrix)
    t = r.shape[0]
    earlier = r[: t - 1, : t - 1]  # [T-1, T-1]: rows l < T-1, columns j < T-1
    final = r[-1, : t - 1]  # [T-1]
    # A max over an all-NaN column is NaN; computed by hand to avoid numpy's "All-NaN slice" warning.
    learned = np.tril(np.ones_like(earlier, dtype=bool))  # [l, j] True where l >= j: task j had been trained
    evaluated = ~np.isnan(earlier) & learned
    best = np.where(evaluated, earlier, -np.inf).max(axis=0, initial=-np.inf)
    best = np.where(evaluated.any(axis=0), best, np.nan)
    return best - final


def mean_forgetting(matrix: np.ndarray) -> float:
    """Mean of :func:`forgetting` over tasks ``j < T-1``; NaN when ``T == 1`` or any ``F_j`` is NaN."""
    f = forgetting(matrix)
    if f.size == 0:
        return float("nan")
    return float(np.mean(f))


def summarize(result: RunResult) -> Dict[str, float]:
    """All stream-level metrics of a run.

    Args:
        result: the run; ``result.matrix`` is ``[T, T]`` with ``T == len(result.task_names)``.

    Returns:
        ``{"acc", "bwt", "fwt", "forgetting"}`` as fractions (0..1 scale, like the matrix), NaN where undefined.
        A routed run (``result.oracle_matrix`` set) adds ``acc_oracle`` (ACC with the task id given), ``bwt_oracle``
        and ``routing_acc`` (the mean over tasks of the final routing-accuracy row: the fraction of each task's test
        samples routed to that task).

    Raises:
        ValueError: if the matrix is not square or does not match the number of task names.
    """
    r = _check_matrix(result.matrix)
    if r.shape[0] != len(result.task_names):
        raise ValueError(f"matrix has {r.shape[0]} tasks but the run names {len(result.task_names)}")
    summary = {
        "acc": average_accuracy(r),
        "bwt": backward_transfer(r),
        "fwt": forward_transfer(r, result.initial),
        "forgetting": mean_forgetting(r),
    }
    if result.oracle_matrix is not None:
        oracle = _check_matrix(result.oracle_matrix)
        summary["acc_oracle"] = average_accuracy(oracle)
        summary["bwt_oracle"] = backward_transfer(oracle)
    if result.routing_matrix is not None:
        summary["routing_acc"] = average_accuracy(_check_matrix(result.routing_matrix))
    return summary
