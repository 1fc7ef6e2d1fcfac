"""Seeded sub-sampling of a split: a cap per class (training) and a stratified cap in total (evaluation).

Both keep the kept rows in their original order and draw with their own ``random.Random(seed)``, so the result
depends only on the split, the cap and the seed.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

from streams.data import TaskSplit


def _by_class(split: TaskSplit) -> Dict[int, List[int]]:
    rows: Dict[int, List[int]] = defaultdict(list)
    for i, label in enumerate(split.labels):
        rows[label].append(i)
    return dict(sorted(rows.items()))


def _draw_rows(split: TaskSplit, quotas: Dict[int, int], seed: int) -> List[int]:
    rng = random.Random(seed)
    keep: List[int] = []
    for label, rows in _by_class(split).items():
        quota = quotas.get(label, 0)
        keep.extend(rows if quota >= len(rows) else rng.sample(rows, quota))
    return sorted(keep)


def _draw(split: TaskSplit, quotas: Dict[int, int], seed: int) -> TaskSplit:
    return split.subset(_draw_rows(split, quotas, seed))


def _per_class_rows(split: TaskSplit, n: int, seed: int) -> List[int]:
    if n < 0:
        raise ValueError(f"cap_per_class: n must be >= 0 or None, got {n}")
    return _draw_rows(split, {label: n for label in _by_class(split)}, seed)


def cap_per_class(split: TaskSplit, n: Optional[int], seed: int) -> TaskSplit:
    """At most ``n`` rows of each class, drawn at random with ``seed``; ``None`` keeps everything."""
    return split if n is None else split.subset(_per_class_rows(split, n, seed))


def split_per_class(split: TaskSplit, n: Optional[int], seed: int) -> Tuple[TaskSplit, TaskSplit]:
    """(the rows :func:`cap_per_class` keeps, every other row), both in their original order: the second is what a
    held-out evaluation may draw from without touching a training row."""
    if n is None:
        return split, split.subset([])
    keep = _per_class_rows(split, n, seed)
    kept = set(keep)
    return split.subset(keep), split.subset([i for i in range(len(split)) if i not in kept])


def cap_total(split: TaskSplit, n: Optional[int], seed: int) -> TaskSplit:
    """At most ``n`` rows in total, stratified: each class keeps its share of the split as far as possible.

    Shares are rounded by largest remainder, so the quotas sum to exactly ``min(n, len(split))``.
    """
    if n is None or n >= len(split):
        return split
    if n < 0:
        raise ValueError(f"cap_total: n must be >= 0 or None, got {n}")
    counts = {label: len(rows) for label, rows in _by_class(split).items()}
    total = len(split)
    exact = {label: n * count / total for label, count in counts.items()}
    quotas = {label: int(share) for label, share in exact.items()}
    left = n - sum(quotas.values())
    # Hand the rows lost to rounding down to the classes with the largest remainders (ties: larger class first).
    order = sorted(counts, key=lambda label: (quotas[label] - exact[label], -counts[label], label))
    for label in order[:left]:
        quotas[label] += 1
    return _draw(split, quotas, seed)
