"""Inferring routers: task statistics from each task's own data, frozen after it, scores over tasks."""

from __future__ import annotations

import pytest
import torch

from continual.modules.routers import PrototypeRouter, build_router


def _task(seed: int, centre: float, n: int = 60, classes: int = 3, h: int = 8):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    means = centre + torch.randn(classes, h, generator=gen)
    return means[labels] + 0.3 * torch.randn(n, h, generator=gen), labels


def test_prototype_router_identifies_separated_tasks():
    router = PrototypeRouter(shrinkage=0.1)
    data = [_task(i, centre=4.0 * i) for i in range(3)]
    for t, (x, y) in enumerate(data):
        router.fit_task(t, x, y)
    for t, (x, _) in enumerate(data):
        assert (router.scores(x).argmax(1) == t).float().mean() > 0.95


def test_a_task_is_frozen_after_its_fit_and_earlier_statistics_do_not_change():
    router = PrototypeRouter()
    x0, y0 = _task(0, 0.0)
    router.fit_task(0, x0, y0)
    before = router.tasks[0].means.clone(), router.tasks[0].scatter.clone()
    router.fit_task(1, *_task(1, 5.0))
    assert torch.equal(router.tasks[0].means, before[0]) and torch.equal(router.tasks[0].scatter, before[1])
    with pytest.raises(ValueError, match="already fitted"):
        router.fit_task(0, x0, y0)


def test_mahalanobis_score_matches_the_explicit_formula():
    router = PrototypeRouter(shrinkage=0.2)
    x, y = _task(0, 0.0, h=4)
    router.fit_task(0, x, y)
    centred = torch.cat([x[y == c] - x[y == c].mean(0) for c in range(3)]).double()
    cov = centred.T @ centred / (len(x) - 3)
    cov = 0.8 * cov + 0.2 * torch.trace(cov) / 4 * torch.eye(4, dtype=cov.dtype)
    means = torch.stack([x[y == c].mean(0) for c in range(3)]).double()
    q = x[:5].double()
    expected = -torch.stack([((q - m) @ torch.linalg.inv(cov) * (q - m)).sum(1) for m in means], 1).min(1).values
    torch.testing.assert_close(router.scores(x[:5])[:, 0].double(), expected, rtol=1e-4, atol=1e-4)


def test_stored_bytes_and_bad_input():
    router = PrototypeRouter()
    router.fit_task(0, *_task(0, 0.0, h=8))
    assert router.stored_bytes(0) == 3 * 8 * 4 + 3 * 8 + 8 * 8 * 8
    with pytest.raises(ValueError, match="no training samples"):
        router.fit_task(1, torch.zeros(0, 8), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="router.name: unknown router 'psychic'.*oracle.*prototype"):
        build_router("psychic")
    with pytest.raises(ValueError, match="shrinkage"):
        PrototypeRouter(shrinkage=2.0)
