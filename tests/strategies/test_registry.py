"""The strategy registry: a constructor's rejection of an option is a config error naming ``strategy.<key>``, and a
third-party plugin that fails to import is skipped with one warning, leaving the built-ins and the other plugins."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Callable

import pytest

import strategies.registry as registry
from continual.cli import main
from continual.config import ConfigError, StrategyConfig
from continual.training.experiment import load_run_config
from strategies.registry import build_strategy


@dataclass
class PluginConfig(StrategyConfig):
    name: str = "plugin"
    rank: int = 4
    alpha: float = 1.0


class Plugin:
    """A third-party strategy whose messages do not name their config keys."""

    name = "plugin"
    Config = PluginConfig

    def __init__(self, rank: int = 4, alpha: float = 1.0):
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if alpha <= 0:
            raise ValueError("scaling needs a positive value")


@dataclass
class FakeEntryPoint:
    name: str
    value: str
    load: Callable[[], type]


def _broken_load():
    raise ImportError("No module named 'torch_magic'")


@pytest.fixture
def plugins(monkeypatch):
    """Entry points: a plugin that fails to import, the built-ins, then a working plugin; a fresh registry."""
    points = [FakeEntryPoint("broken", "broken_pkg.strategy:Broken", _broken_load),
              *entry_points(group=registry.ENTRY_POINT_GROUP), FakeEntryPoint("plugin", "my_pkg:Plugin", lambda: Plugin)]
    monkeypatch.setattr(registry, "entry_points", lambda group: points if group == registry.ENTRY_POINT_GROUP else [])
    monkeypatch.setattr(registry, "_REGISTRY", {})
    monkeypatch.setattr(registry, "_BROKEN", {})
    monkeypatch.setattr(registry, "_LOADED_ENTRY_POINTS", False)


def test_a_plugin_that_fails_to_import_is_skipped_with_one_warning(plugins, capsys):
    with pytest.warns(RuntimeWarning) as record:
        names = registry.available_strategies()
    messages = [str(w.message) for w in record if "broken" in str(w.message)]
    assert messages == ["strategy entry point 'broken' (broken_pkg.strategy:Broken) failed to import: "
                        "ImportError: No module named 'torch_magic'; skipped it"]
    assert {"full_finetune", "delta", "ewc", "plugin"} <= set(names) and "broken" not in names
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: asking again neither warns nor reloads
        assert registry.available_strategies() == names
        with pytest.raises(KeyError, match=r"'broken' \(broken_pkg.strategy:Broken\) failed to import: .*torch_magic"):
            registry.get_strategy_class("broken")
        with pytest.raises(ConfigError, match=r"^strategy.name: strategy entry point 'broken' .*failed to import"):
            load_run_config(None, ["strategy.name=broken"])
        assert main(["run", "quickstart", "strategy.name=broken"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: strategy.name: strategy entry point 'broken'") and "torch_magic" in err
    assert load_run_config(None, ["strategy.name=plugin"]).strategy.rank == 4  # the other plugin still works


def test_constructor_errors_become_config_errors_naming_the_key(plugins):
    with pytest.warns(RuntimeWarning, match="broken"):
        registry.available_strategies()
    with pytest.raises(ConfigError, match=r"^strategy.rank: rank must be >= 1, got 0$"):
        build_strategy({"name": "plugin", "rank": 0})
    with pytest.raises(ConfigError, match=r"^strategy: scaling needs a positive value$"):  # no key named: the node
        build_strategy({"name": "plugin", "alpha": 0.0})
    with pytest.raises(ConfigError, match=r"^strategy.beta: .*unexpected keyword argument 'beta'"):  # a TypeError
        build_strategy({"name": "plugin", "beta": 1})
    with pytest.raises(ConfigError, match=r"^strategy.rank: rank must be >= 1") as caught:  # at load time already
        load_run_config(None, ["strategy.name=plugin", "strategy.rank=0"])
    assert isinstance(caught.value.__cause__, ValueError)


def test_a_message_that_names_its_key_is_not_prefixed_again():
    with pytest.raises(ConfigError) as caught:
        load_run_config(None, ["strategy.name=delta", "strategy.kinds=[foo]"])
    assert str(caught.value).startswith("strategy.kinds: unknown kind 'foo'; known kinds: ")
    with pytest.raises(ConfigError) as caught:
        build_strategy({"name": "delta", "alpha": 0.0})
    assert str(caught.value) == "strategy.alpha must be > 0, got 0.0"
