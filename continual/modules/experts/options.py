"""The options of an upcycled expert layer, validated in one place (sparse upcycling, Komatsuzaki et al. 2023,
grown per task as in ModuleFormer, Shen et al. 2023, arXiv 2306.04640).

The ``experts`` bank kind is built from them (:class:`~continual.modules.experts.kind.ExpertsDelta`), and so is every
caller that configures one: the ``experts`` strategy (``strategies.experts``, under its own option names) and the
upcycled causal LM (``continual.models.upcycled_lm``, through the kind). Each checks them with
:meth:`ExpertOptions.check`, naming the keys its users wrote.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Mapping, Optional

from continual.modules.experts.layer import ACTIVATIONS
from continual.modules.experts.pool import DISPATCH_BACKENDS

UPCYCLING = ("copy", "slices")
GATES = ("linear", "mlp")


@dataclass(frozen=True)
class ExpertOptions:
    """One expert site's options: the ``experts`` kind's constructor options, with their defaults. What each one does
    is told where users set it (``strategies.experts.ExpertConfig``) and in :mod:`continual.modules.experts.kind`."""

    n: int = 2  # experts appended per task slot (strategy: experts_per_task)
    k: int = 2  # experts per token, at most shared + n (strategy: top_k)
    expert_hidden: int = 0  # hidden width of a new expert; 0: d_model // 4
    gate: str = "linear"  # router: one of GATES
    gate_hidden: int = 64  # hidden width of the "mlp" router
    upcycle: str = "copy"  # the dense FFN as shared expert(s): one of UPCYCLING
    slices: int = 4  # shared experts for "slices" (must also divide the FFN's hidden width: the kind checks that)
    activation: str = "gelu"  # of the new experts: a key of ACTIVATIONS
    start_logit: float = -4.0  # router logit (row bias) of a new expert, against 0 for the shared ones
    dispatch: str = "auto"  # expert matmul backend: one of DISPATCH_BACKENDS

    def __post_init__(self):
        object.__setattr__(self, "start_logit", float(self.start_logit))

    @property
    def shared(self) -> int:
        """``S``: the shared experts the dense FFN becomes (1 for "copy", ``slices`` for "slices")."""
        return 1 if self.upcycle == "copy" else self.slices

    def as_kwargs(self) -> Dict[str, object]:
        """The options as the kind's keyword arguments."""
        return asdict(self)

    def check(self, where: str = "experts: ", keys: Optional[Mapping[str, str]] = None) -> "ExpertOptions":
        """Raise ValueError on the first invalid option; returns ``self``.

        Args:
            where: what the messages start with (e.g. "experts: ").
            keys: option -> the name the caller's users know it by (e.g. ``{"k": "strategy.top_k"}``); others keep
                their own name.
        """
        name = {field: field for field in self.as_kwargs()}
        name.update(keys or {})
        for field, low in (("n", 1), ("k", 1), ("expert_hidden", 0), ("gate_hidden", 1), ("slices", 2)):
            value = getattr(self, field)
            if value < low:
                raise ValueError(f"{where}{name[field]} must be >= {low}, got {value}")
        for field, choices in (
            ("gate", GATES), ("upcycle", UPCYCLING), ("activation", sorted(ACTIVATIONS)), ("dispatch", DISPATCH_BACKENDS),
        ):
            value = getattr(self, field)
            if value not in choices:
                raise ValueError(f"{where}{name[field]} must be one of {list(choices)}, got {value!r}")
        if self.k > self.shared + self.n:
            raise ValueError(
                f"{where}{name['k']}={self.k} exceeds the {self.shared} shared + {self.n} per-task experts a "
                f"task-conditioned token can use (raise {name['n']} or lower {name['k']})"
            )
        return self
