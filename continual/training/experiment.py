"""Loading a classification run's config: the experiment schema with the ``strategy`` and ``router`` nodes typed by
the registered config classes of the names they give. Shared by the ``run`` and ``compare`` recipes."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Sequence

from omegaconf import DictConfig

from continual.config import load_experiment_config

# The presets shipped with the repository (`continual list` shows them).
PRESETS_DIR = Path(__file__).resolve().parents[2] / "configs"


def presets() -> list:
    return sorted(PRESETS_DIR.rglob("*.yaml")) if PRESETS_DIR.is_dir() else []


def resolve_preset(name: str | Path) -> Path:
    """A path, or the name of a preset in configs/ (with or without .yaml, e.g. ``quickstart``, ``deltas/lora``)."""
    path = Path(name)
    if path.is_file():
        return path
    for preset in presets():
        if preset.stem == str(name) or preset.relative_to(PRESETS_DIR).with_suffix("").as_posix() == str(name):
            return preset
    return path  # the config loader reports the missing file


def load_run_config(
    path: str | Path | None = None, overrides: Sequence[str] = (), extra: Dict[str, Any] | None = None
) -> DictConfig:
    """A YAML preset (optional), a dict and ``key=value`` overrides merged onto the experiment schema and checked.

    Returns:
        A resolved, read-only ``DictConfig`` (see :func:`continual.config.load_experiment_config`).

    Raises:
        ConfigError: unknown key, wrong type, unknown strategy or router, out-of-range choice, or an option the
            strategy's or the router's constructor rejects, naming the full key.
    """
    from continual.modules.routers import router_spec
    from continual.training.routing import make_router
    from strategies.registry import build_strategy, get_strategy_config_class

    cfg = load_experiment_config(
        path, overrides, extra, strategy_schema=get_strategy_config_class,
        router_schema=lambda name: router_spec(name).config,
    )
    # Options only the constructors check (a delta kind's name, a router's range): build both once and drop them,
    # so a bad option fails here, before any data or model is read (and before `continual compare` runs a cell).
    build_strategy(cfg.strategy)
    make_router(cfg.router)
    return cfg
