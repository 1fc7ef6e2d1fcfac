"""Delta kinds: per-task modules that a :class:`~continual.modules.bank.TaskModuleSite` holds at one place of a
backbone (a linear, the input embedding, a block).

Each kind lives in its own module and registers itself there with ``@register_delta``; importing this package
imports every built-in kind.
"""

from continual.modules.deltas.registry import DELTA_KINDS, TaskDelta, get_delta_kind, register_delta
from continual.modules.deltas.lora import LoRADelta
from continual.modules.deltas.adapter import AdapterDelta
from continual.modules.deltas.parallel_adapter import ParallelAdapterDelta
from continual.modules.deltas.bitfit import BitFitDelta
from continual.modules.deltas.intrinsic import IntrinsicDelta
from continual.modules.deltas.full import LastLayerDelta, SelectiveDelta
from continual.modules.deltas.tokens import PrefixDelta, PromptDelta

__all__ = [
    "DELTA_KINDS",
    "TaskDelta",
    "get_delta_kind",
    "register_delta",
    "LoRADelta",
    "AdapterDelta",
    "ParallelAdapterDelta",
    "BitFitDelta",
    "IntrinsicDelta",
    "LastLayerDelta",
    "PrefixDelta",
    "PromptDelta",
    "SelectiveDelta",
]
