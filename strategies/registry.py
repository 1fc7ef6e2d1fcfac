"""Strategy registry.

Every strategy, built-in or third-party, is found the same way: a class with a ``name`` and a ``Config`` dataclass
(subclass of :class:`continual.config.StrategyConfig`), registered under the ``continual.strategies`` entry-point
group (see this project's ``pyproject.toml``) or at run time with :func:`register_strategy`.

A third-party package adds to its own pyproject::

    [project.entry-points."continual.strategies"]
    my_strategy = "my_package.my_module:MyStrategy"
"""

from __future__ import annotations

import re
import warnings
from importlib.metadata import entry_points
from typing import Dict, List, Type

from continual.config import ConfigError

ENTRY_POINT_GROUP = "continual.strategies"

_REGISTRY: Dict[str, type] = {}
_BROKEN: Dict[str, str] = {}  # entry-point name -> why it could not be registered (warned once, then skipped)
_LOADED_ENTRY_POINTS = False


def register_strategy(cls: type) -> type:
    """Register a strategy class (usable as a decorator). Its ``name`` must be unique."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__qualname__} needs a class attribute `name` (str) to be registered")
    config_cls = getattr(cls, "Config", None)
    if config_cls is None:
        raise TypeError(f"{cls.__qualname__} needs a `Config` dataclass (subclass of StrategyConfig)")
    existing = _REGISTRY.get(name)
    if existing is not None and existing is not cls:
        raise ValueError(f"strategy name {name!r} is already registered by {existing.__module__}.{existing.__qualname__}")
    _REGISTRY[name] = cls
    return cls


def _load_entry_points() -> None:
    global _LOADED_ENTRY_POINTS
    if _LOADED_ENTRY_POINTS:
        return
    _LOADED_ENTRY_POINTS = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _REGISTRY:
            continue
        # A broken plugin must not take the built-ins and the other plugins down with it: warn once, skip it, and
        # say why when the strategy is asked for by name.
        try:
            cls = ep.load()
            if getattr(cls, "name", None) != ep.name:
                raise ValueError(f"it points at a class whose name is {getattr(cls, 'name', None)!r}")
            register_strategy(cls)
        except Exception as err:
            _BROKEN[ep.name] = f"strategy entry point {ep.name!r} ({ep.value}) failed to import: {type(err).__name__}: {err}"
            warnings.warn(f"{_BROKEN[ep.name]}; skipped it", RuntimeWarning, stacklevel=2)


def available_strategies() -> List[str]:
    _load_entry_points()
    return sorted(_REGISTRY)


def get_strategy_class(name: str) -> type:
    _load_entry_points()
    try:
        return _REGISTRY[name]
    except KeyError:
        if name in _BROKEN:
            raise KeyError(_BROKEN[name]) from None
        raise KeyError(f"unknown strategy {name!r}; known strategies: {', '.join(sorted(_REGISTRY)) or '(none)'}") from None


def get_strategy_config_class(name: str) -> Type:
    return get_strategy_class(name).Config


def build_strategy(strategy_cfg) -> "object":
    """Instantiate the strategy named by ``strategy_cfg.name`` with its options as flat keyword arguments.

    Raises:
        ConfigError: the strategy's constructor rejected its options (a ``ValueError`` or ``TypeError``); the
            message names ``strategy.<key>`` (or ``strategy`` when no single option is named).
    """
    from omegaconf import OmegaConf

    cls = get_strategy_class(strategy_cfg["name"])  # a config node or a plain dict
    options = OmegaConf.to_container(strategy_cfg, resolve=True) if not isinstance(strategy_cfg, dict) else dict(strategy_cfg)
    options.pop("name", None)
    try:
        return cls(**options)
    except (TypeError, ValueError) as err:
        raise ConfigError(option_error_message(str(err), options)) from err


def option_error_message(message: str, options) -> str:
    """A strategy constructor's error message, led by the config key it is about.

    A message that already names a ``strategy.<key>`` (or starts with ``strategy``) is kept as it is; otherwise it is
    prefixed with ``strategy.<key>:`` when exactly one option's name appears in it, else with ``strategy:``.
    """
    if message.startswith("strategy") or re.search(r"\bstrategy\.\w", message):
        return message
    named = [key for key in options if re.search(rf"(?<![\w.]){re.escape(key)}\b", message)]
    return f"strategy.{named[0]}: {message}" if len(named) == 1 else f"strategy: {message}"
