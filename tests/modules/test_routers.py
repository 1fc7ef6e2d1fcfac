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
    means, counts = (t.clone() for t in router.tasks[0])
    scatter = router.scatter.clone()
    router.fit_task(1, *_task(1, 5.0))
    assert torch.equal(router.tasks[0][0], means) and torch.equal(router.tasks[0][1], counts)
    # the shared scatter grows by task 1's own share only: task 0's share is unchanged
    x1, y1 = _task(1, 5.0)
    share = torch.cat([x1[y1 == c] - x1[y1 == c].mean(0) for c in range(3)]).double()
    torch.testing.assert_close(router.scatter - scatter, share.T @ share)
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
    assert router.stored_bytes(0) == 3 * 8 * 4 + 3 * 8 + 8 * 8 * 8  # means, counts and the shared scatter
    router.fit_task(2, *_task(2, 3.0, h=8))
    assert router.stored_bytes(2) == 3 * 8 * 4 + 3 * 8  # the shared scatter is counted once, at the first task
    with pytest.raises(ValueError, match="no training samples"):
        router.fit_task(1, torch.zeros(0, 8), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="router.name: unknown router 'psychic'; registered: oracle, entropy, keys"):
        build_router("psychic")
    with pytest.raises(ValueError, match="shrinkage"):
        PrototypeRouter(shrinkage=2.0)


def test_keys_are_the_direction_of_the_task_mean_and_score_by_cosine():
    from continual.modules.routers import KeysRouter

    router = KeysRouter()
    data = [_task(i, centre=4.0 * (i + 1)) for i in range(2)]
    data[1] = (-data[1][0], data[1][1])
    for t, (x, y) in enumerate(data):
        router.fit_task(t, x, y)
    key = torch.nn.functional.normalize(torch.nn.functional.normalize(data[0][0], dim=-1).mean(0), dim=0)
    torch.testing.assert_close(router.tasks[0], key)
    assert (router.scores(data[1][0]).argmax(1) == 1).all()
    assert router.stored_bytes(0) == 8 * 4


def test_entropy_router_prefers_the_confident_candidate():
    from continual.modules.routers import EntropyRouter

    router = EntropyRouter()
    router.fit_task(0, torch.zeros(0, 0), torch.zeros(0))
    router.fit_task(1, torch.zeros(0, 0), torch.zeros(0))
    logits = torch.tensor([[[0.0, 0.0, float("-inf")]], [[9.0, 0.0, 0.0]]])  # [K=2, B=1, C=3], padding on task 0
    scores = router.scores_from_logits(logits)
    assert scores.shape == (1, 2) and scores.argmax(1).item() == 1
    torch.testing.assert_close(scores[0, 0], -torch.log(torch.tensor(2.0)))
    assert router.stored_bytes(0) == 0


def test_no_module_acts_under_zero_slot_weights_or_a_bypass(tiny_backbone):
    # Routing features run the bare backbone (the bank bypassed); zero slot weights must give the same outputs.
    import copy

    from continual.models.backbone import load_backbone
    from continual.models.classifier import ContinualClassifier
    from continual.expansion import TaskInfo
    from strategies.delta import DeltaStrategy

    torch.manual_seed(0)
    backbone, _ = load_backbone(tiny_backbone["name"], random_init=True,
                                config_overrides=tiny_backbone["config_overrides"])
    plain = ContinualClassifier(copy.deepcopy(backbone), [("a", "b")]).eval()
    for kinds in (["lora"], ["prompt"], ["prefix", "adapter"]):
        model = ContinualClassifier(copy.deepcopy(backbone), [("a", "b")])
        DeltaStrategy(kinds=kinds).setup(model, [TaskInfo(0, "t", ("a", "b"))])
        model.bank.add_task(0)
        with torch.no_grad():
            for p in model.bank.task_parameters(0):
                p.add_(0.5)
        model.eval()
        x = torch.stack([torch.randint(1, 60, (3, 7)), torch.ones(3, 7, dtype=torch.long)], 1)
        model.router_layers = [1, 2]
        plain.router_layers = [1, 2]
        torch.testing.assert_close(model.routing_features(x), plain.routing_features(x))
        with torch.no_grad(), model.bank.route(torch.zeros(3, dtype=torch.long), weights=torch.zeros(3, 0)):
            ids, mask, positions, n_virtual = model.bank.prepare_inputs(x[:, 0], x[:, 1])
            zero = model.encode(ids, mask, positions if n_virtual else None, n_virtual)
        torch.testing.assert_close(zero, plain.encode(x[:, 0], x[:, 1]))


def test_a_router_plugin_that_fails_to_import_is_skipped_with_one_warning(monkeypatch):
    import warnings
    from dataclasses import dataclass

    from continual.config import RouterConfig
    from continual.modules import routers

    @dataclass
    class MineConfig(RouterConfig):
        name: str = "mine"

    class FakeEntryPoint:
        def __init__(self, name, value, load):
            self.name, self.value, self.load = name, value, load

    def broken():
        raise ImportError("No module named 'faiss_magic'")

    points = [FakeEntryPoint("broken", "broken_pkg:SPEC", broken),
              FakeEntryPoint("mine", "my_pkg:SPEC", lambda: routers.RouterSpec(routers.KeysRouter, MineConfig))]
    monkeypatch.setattr("importlib.metadata.entry_points", lambda group: points if group == "continual.routers" else [])
    monkeypatch.setattr(routers, "ROUTERS", dict(routers.ROUTERS))
    monkeypatch.setattr(routers, "_BROKEN", {})
    monkeypatch.setattr(routers, "_LOADED_ENTRY_POINTS", False)
    with pytest.warns(RuntimeWarning, match=r"router entry point 'broken' \(broken_pkg:SPEC\) failed to import: "
                                            r"ImportError: No module named 'faiss_magic'; skipped it"):
        names = routers.router_names()
    assert {"oracle", "prototype", "keys", "entropy", "mine"} <= set(names) and "broken" not in names
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once
        assert routers.router_spec("keys").config.__name__ == "KeysConfig"
        with pytest.raises(KeyError, match="'broken' .*failed to import: .*faiss_magic"):
            routers.router_spec("broken")
        with pytest.raises(ValueError, match="router.name: router entry point 'broken' .*faiss_magic"):
            build_router("broken")
