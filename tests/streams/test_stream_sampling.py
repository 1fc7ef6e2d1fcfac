from collections import Counter

import pytest

from streams.data import TaskSplit
from streams.sampling import cap_per_class, cap_total


def make_split(counts):
    """A split with ``counts[c]`` rows of class c, interleaved; texts are the row positions."""
    labels = []
    left = dict(enumerate(counts))
    while any(left.values()):
        for c in sorted(left):
            if left[c]:
                labels.append(c)
                left[c] -= 1
    return TaskSplit([str(i) for i in range(len(labels))], labels)


def positions(split):
    return [int(t) for t in split.texts]


def test_cap_per_class_caps_each_class_and_keeps_order():
    split = make_split([50, 20, 3])
    capped = cap_per_class(split, 10, seed=0)
    assert Counter(capped.labels) == {0: 10, 1: 10, 2: 3}
    assert positions(capped) == sorted(positions(capped))
    assert all(split.labels[p] == label for p, label in zip(positions(capped), capped.labels))


def test_cap_per_class_none_keeps_everything():
    split = make_split([5, 5])
    assert cap_per_class(split, None, seed=0) is split
    assert positions(cap_per_class(split, 100, seed=0)) == positions(split)


def test_cap_per_class_seeded():
    split = make_split([200, 200])
    assert cap_per_class(split, 20, seed=3).texts == cap_per_class(split, 20, seed=3).texts
    assert cap_per_class(split, 20, seed=3).texts != cap_per_class(split, 20, seed=4).texts


def test_cap_total_keeps_proportions():
    split = make_split([600, 300, 100])
    capped = cap_total(split, 10, seed=0)
    assert Counter(capped.labels) == {0: 6, 1: 3, 2: 1}
    assert positions(capped) == sorted(positions(capped))


def test_cap_total_largest_remainder():
    # exact shares of 10 rows: 4.5, 3.5, 2.0 -> 4 + 3 + 2 = 9, one more to the largest remainder (ties: larger class)
    split = make_split([45, 35, 20])
    assert Counter(cap_total(split, 10, seed=0).labels) == {0: 5, 1: 3, 2: 2}
    # a tiny class may get nothing when the cap is smaller than the number of classes
    split = make_split([98, 1, 1])
    assert len(cap_total(split, 2, seed=0)) == 2


def test_cap_total_exact_total_and_no_op():
    split = make_split([7, 5, 3])
    for n in range(1, 15):
        assert len(cap_total(split, n, seed=1)) == n
    assert cap_total(split, 15, seed=1) is split
    assert cap_total(split, None, seed=1) is split


def test_cap_total_seeded():
    split = make_split([300, 100])
    assert cap_total(split, 40, seed=0).texts == cap_total(split, 40, seed=0).texts
    assert cap_total(split, 40, seed=0).texts != cap_total(split, 40, seed=1).texts


def test_negative_caps_rejected():
    with pytest.raises(ValueError):
        cap_per_class(make_split([3]), -1, seed=0)
    with pytest.raises(ValueError):
        cap_total(make_split([3]), -1, seed=0)
