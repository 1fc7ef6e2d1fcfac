"""Answers in the gold task's label space: a prediction counts as right only when its label string is the gold label.

A classifier may answer with a label list other than the sample's own task's: a routed task's head (task inference),
or every label seen so far (label-word classification without a task id). Avalanche scores ``argmax(logits) ==
target`` with targets indexed in the gold task's labels, so the answer is re-expressed in that space: each answering
label goes to the gold label with the same string, and any label the gold task does not have goes to one extra last
column that no target uses ("another task's label"), which can only count as wrong.
"""

from __future__ import annotations

from typing import Sequence

import torch


def label_map(answering: Sequence[Sequence[str]], gold: Sequence[Sequence[str]], width_in: int, width_out: int) -> torch.Tensor:
    """Which answering label is which gold label, by label string.

    Args:
        answering: ``R`` label lists a classifier may answer with (e.g. every task's labels, or the seen labels).
        gold: ``G`` label lists of the tasks samples come from.
        width_in: ``Wi >= max(len(a) for a in answering)``: the width of the answering logits (padded).
        width_out: ``Wo >= max(len(g) for g in gold)``: the width of the gold label space (padded).

    Returns:
        ``[R, G, Wi, Wo + 1]`` of 0/1: ``M[r, g, i, j] = 1`` when label ``i`` of list ``r`` is label ``j`` of list
        ``g``, and ``j = Wo`` (the "other" column) when list ``g`` has no such label; padding rows are all 0.
    """
    m = torch.zeros(len(answering), len(gold), width_in, width_out + 1)
    for r, labels in enumerate(answering):
        for g, targets in enumerate(gold):
            for i, label in enumerate(labels):
                m[r, g, i, targets.index(label) if label in targets else width_out] = 1.0
    return m


def best_in_gold_space(scores: torch.Tensor, mapping: torch.Tensor) -> torch.Tensor:
    """Each gold label's score is the best score of the answering labels mapped to it (at most one, as label strings
    are unique in a list), and the "other" column's is the best score of the labels the gold task does not have, so
    ``argmax`` of the result is the gold label exactly when the answering argmax is that label.

    Args:
        scores: ``[B, Wi]`` scores of the answering labels (``-inf`` where a sample has no such label).
        mapping: ``[B, Wi, Wo + 1]`` each sample's slice of :func:`label_map`.

    Returns:
        ``[B, Wo + 1]`` (``-inf`` where nothing maps).
    """
    spread = scores.float()[:, :, None].masked_fill(mapping == 0, float("-inf"))  # [B, Wi, Wo+1]
    return spread.amax(dim=1)
