"""Modules allocated per task at sites of a frozen backbone and mixed per sample by a router.

``ModuleBank`` attaches sites (``TaskModuleSite``) holding per-task delta modules (``continual.modules.deltas``);
``Routing`` carries a batch's task ids to every site; ``routing_weights`` is the pure routing math. Routed experts
(pool, gating, dispatch, routing losses, upcycling, pruning) and their bank kind live in ``continual.modules.experts``.
"""

from continual.modules.bank import (
    COMPOSITIONS,
    ModuleBank,
    Routing,
    TaskIdRouter,
    TaskModuleSite,
    TaskRouter,
    architecture_family,
    routing_weights,
)
from continual.modules.deltas import DELTA_KINDS, TaskDelta, get_delta_kind, register_delta
from continual.modules.peft_interop import export_peft_lora, import_peft_lora  # noqa: F401 (PEFT adapter folders)
from continual.modules.experts import ExpertsDelta  # noqa: F401 (registers the "experts" kind)

__all__ = [
    "COMPOSITIONS",
    "DELTA_KINDS",
    "ModuleBank",
    "Routing",
    "TaskDelta",
    "TaskIdRouter",
    "TaskModuleSite",
    "TaskRouter",
    "architecture_family",
    "get_delta_kind",
    "register_delta",
    "routing_weights",
]
