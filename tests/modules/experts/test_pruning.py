"""Pruning along a stream: usage carried over later prunings and appended slots, the history as flat tensors, and
replaying stored keep masks."""

from __future__ import annotations

import pytest
import torch

from continual.modules.experts import ExpertUsage, PruningHistory, carry_usage, prune_experts


def usage(counts, tokens=10):
    counts = torch.tensor(counts, dtype=torch.float64)
    return ExpertUsage(counts, counts / 2, tokens)


def test_usage_is_carried_through_prunings_and_appended_experts():
    recorded = usage([10.0, 4.0, 6.0])  # shared, and a slot of two experts
    keeps = [torch.tensor([True, False, True]),  # the pruning right after recording: [shared, e2]
             torch.tensor([True, True, False, True, True])]  # later: [shared, e2, +a, +b, +c] without +a
    carried = carry_usage(recorded, keeps, n_experts=6)  # one more slot of two appended since
    assert carried.counts.tolist() == [10.0, 6.0, 0.0, 0.0, 0.0, 0.0]
    assert carried.gate_sums.tolist() == [5.0, 3.0, 0.0, 0.0, 0.0, 0.0]
    assert carried.tokens == 10
    assert carry_usage(recorded, [], 3).counts.tolist() == [10.0, 4.0, 6.0]
    with pytest.raises(ValueError, match="cannot be carried"):
        carry_usage(recorded, [torch.tensor([True, True])], 3)  # a mask over fewer experts than were recorded


class FakePool:
    def __init__(self, n):
        self.n_experts = n


class FakeDelta:
    """An expert site of S = 1 shared expert and slots of two, k = 2 (the parts prune_unused reads)."""

    n_shared, k = 1, 2

    def __init__(self, slots):
        self.slots = list(slots)  # slot of every task expert
        self.pool = FakePool(1 + len(self.slots))

    @property
    def n_slots(self):
        return max(self.slots, default=-1) + 1

    def expert_slots(self):
        return torch.tensor([-1] + self.slots)

    def add_slot(self):
        self.slots += [self.n_slots] * 2
        self.pool.n_experts += 2

    def prune(self, keep):
        self.slots = [s for s, k in zip(self.slots, keep[1:].tolist()) if k]
        removed = self.pool.n_experts - int(keep.sum())
        self.pool.n_experts = int(keep.sum())
        return 10 * removed


def test_history_prunes_by_every_tasks_frozen_usage_and_round_trips_as_tensors():
    site = FakeDelta([0, 0])
    deltas = {"layer.0": site}
    history = PruningHistory()
    # Task 0 chooses the shared expert and mostly its first expert.
    result = history.prune(deltas, 0, {"layer.0": usage([10.0, 9.0, 1.0])}, threshold=0.3)
    assert result.keep["layer.0"].tolist() == [True, True, False] and result.parameters_removed == 10
    site.add_slot()  # task 1: [shared, e0, f0, f1]
    result = history.prune(deltas, 1, {"layer.0": usage([10.0, 2.0, 1.0, 7.0])}, threshold=0.3)
    # e0 stays (task 0's frozen usage), f0 goes (nobody uses it enough), f1 stays.
    assert result.keep["layer.0"].tolist() == [True, True, False, True]
    assert [u["layer.0"].counts.tolist() for u in history.usage_now(deltas).values()] == [[10, 9, 0], [10, 2, 7]]

    state = history.state_dict()
    assert sorted(state) == sorted(
        [f"usage.{t}.layer.0.{f}" for t in (0, 1) for f in ("counts", "gate_sums", "tokens")]
        + ["keep.0.layer.0", "keep.1.layer.0"])
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    restored = PruningHistory()
    restored.load_state_dict(state)
    assert restored.state_dict().keys() == state.keys()
    assert all(torch.equal(restored.state_dict()[k], v) for k, v in state.items())
    assert history.state_dict([1]).keys() == {k for k in state if k.split(".")[1] == "1"}

    with pytest.raises(KeyError, match="unexpected key"):
        restored.load_state_dict({**state, "usage.x.layer.0.counts": torch.zeros(1)})
    with pytest.raises(KeyError, match="lacks"):
        restored.load_state_dict({k: v for k, v in state.items() if not k.endswith("tokens")})
    with pytest.raises(ValueError, match="differ"):
        restored.load_state_dict({k: v for k, v in state.items() if k != "keep.1.layer.0"})


def test_replaying_a_plan_needs_a_mask_for_every_site():
    deltas = {"a": FakeDelta([0, 0]), "b": FakeDelta([0, 0])}
    with pytest.raises(ValueError, match="missing \\['b'\\]"):
        prune_experts(deltas, {"a": torch.tensor([True, True, False])})
    result = prune_experts(deltas, {"a": torch.tensor([True, True, False]), "b": torch.ones(3, dtype=torch.bool)})
    assert result.parameters_removed == 10 and result.experts_removed == {"a": [2], "b": []}
    assert result.experts_kept == {"a": 2, "b": 3}
