"""What the continual language-modelling recipe measures and reports: the perplexity matrix with forgetting and
plasticity (pure functions of it), the cost of each domain, and the text table, CSV and heatmap of a run.

``P[i, j]`` is domain ``j``'s held-back perplexity after domain ``i`` (``[D, D]``). Lower is better, so forgetting is
the increase ``P[D-1, j] - P[j, j]`` for ``j < D-1`` and plasticity is ``P[j, j]``.
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from continual.report import new_figure


def perplexity_forgetting(matrix: np.ndarray) -> np.ndarray:
    """``[D-1]`` increase of perplexity on each earlier domain by the end: ``P[D-1, j] - P[j, j]`` (positive = forgot)."""
    p = np.asarray(matrix, dtype=float)
    idx = np.arange(p.shape[0] - 1)
    return p[-1, idx] - p[idx, idx]


def plasticity(matrix: np.ndarray) -> np.ndarray:
    """``[D]`` perplexity each domain reaches right after it is learnt: ``P[j, j]``."""
    return np.diag(np.asarray(matrix, dtype=float)).copy()


def own_group_share(group_share: np.ndarray, domain_groups: Sequence[Optional[int]]) -> np.ndarray:
    """How much of each domain's routing to domain experts reaches its own group.

    Args:
        group_share: ``[D, G]`` share of domain ``j``'s held-back token-to-expert selections that went to group ``g``.
        domain_groups: the group each learnt domain added, in domain order (None: none); the groups no domain added
            are the shared ones and count in neither side of the ratio.

    Returns:
        ``[D]``: selections of domain ``j``'s tokens in its own group over its selections in any domain's group; NaN
        for a domain without a group (not learnt yet, or one that trained the base) or whose tokens reached no
        domain's group. 1.0 when every routed sequence reaches its own domain's experts only.
    """
    share = np.asarray(group_share, dtype=float)
    owned = sorted({g for g in domain_groups if g is not None and g < share.shape[1]})
    out = np.full(share.shape[0], np.nan)
    for j, group in enumerate(domain_groups[: share.shape[0]]):
        experts = share[j, owned].sum()
        if group is not None and experts > 0:
            out[j] = share[j, group] / experts
    return out


def routing_accuracy(routed: Sequence[np.ndarray], learnt: int) -> np.ndarray:
    """``[D]`` share of domain ``j``'s held-back sequences routed to domain ``j`` (``routed[j]``: the domain each of
    them went to), for the ``learnt`` domains so far; NaN for the others (their domain cannot be chosen yet)."""
    return np.array([float(np.mean(np.asarray(r) == j)) if j < learnt and len(r) else np.nan
                     for j, r in enumerate(routed)])


def routing_confusion(routed: Sequence[np.ndarray], n_domains: int) -> np.ndarray:
    """``[D, D]`` counts: held-back sequences of domain ``j`` (row) routed to domain ``r`` (column); a sequence routed
    to no domain is not counted."""
    counts = np.zeros((n_domains, n_domains))
    for j, r in enumerate(routed):
        r = np.asarray(r)
        r = r[(r >= 0) & (r < n_domains)]
        np.add.at(counts[j], r, 1)
    return counts


@dataclass
class DomainRecord:
    """What learning one domain cost."""

    domain: str
    group: Optional[int]  # expert group added for the domain (None: no experts added)
    added_parameters: int  # parameters the domain added to the model
    trainable_parameters: int  # parameters updated while learning it
    total_parameters: int  # model size after it
    train_loss: float  # mean objective over the last `log_every` steps
    wall_time_s: float  # training time (evaluation excluded)
    router_bytes: int = 0  # what the domain router keeps for the domain (its frozen statistics)


@dataclass
class LMResult:
    """Perplexities along a domain stream; ``matrix[i, j]`` is domain j's held-back perplexity after domain i."""

    domains: List[str]
    mode: str
    matrix: np.ndarray  # [D, D]
    initial: np.ndarray  # [D] before the stream (after pretraining)
    general: Optional[np.ndarray] = None  # [D + 1] pretraining text: before the stream, then after each domain
    records: List[DomainRecord] = field(default_factory=list)
    start_checksum: str = ""  # weights_checksum of the model the stream started from
    group_share: Optional[np.ndarray] = None  # [D, G] experts models: share of domain j's routing to group g, at the end
    router: str = "none"  # router.name: which groups a sequence may route to
    # [D, D] experts models: own_group_share of domain j after domain i (NaN while j has no group)
    own_share: Optional[np.ndarray] = None
    # [D, D] with a domain router: share of domain j's held-back sequences routed to j after domain i (NaN for j > i)
    routing_accuracy: Optional[np.ndarray] = None
    routing_confusion: Optional[np.ndarray] = None  # [D, D] at the end: sequences of domain j (row) routed to r
    output_dir: Optional[Path] = None
    run_id: Optional[str] = None

    @property
    def forgetting(self) -> np.ndarray:
        return perplexity_forgetting(self.matrix)

    @property
    def plasticity(self) -> np.ndarray:
        return plasticity(self.matrix)

    def summary(self) -> Dict[str, float]:
        """Stream-level numbers: mean forgetting (NaN for one domain), mean plasticity, mean final perplexity; in
        experts mode the mean own-group share at the end, with a domain router the mean routing accuracy at the end."""
        forgetting = self.forgetting
        return {
            "mean_forgetting": float(forgetting.mean()) if forgetting.size else float("nan"),
            "mean_plasticity": float(self.plasticity.mean()),
            "mean_final_ppl": float(self.matrix[-1].mean()),
            **({"final_general_ppl": float(self.general[-1])} if self.general is not None else {}),
            **({"mean_own_group_share": _nanmean(self.own_share[-1])} if self.own_share is not None else {}),
            **({"mean_routing_accuracy": _nanmean(self.routing_accuracy[-1])}
               if self.routing_accuracy is not None else {}),
        }

    def to_dict(self) -> Dict[str, Any]:
        nums = lambda a: None if a is None else [_finite(v) for v in np.asarray(a, dtype=float).reshape(-1)]
        return {
            "domains": list(self.domains), "mode": self.mode,
            "matrix": [nums(row) for row in self.matrix], "initial": nums(self.initial), "general": nums(self.general),
            "forgetting": nums(self.forgetting), "plasticity": nums(self.plasticity),
            "summary": {k: _finite(v) for k, v in self.summary().items()},
            "records": [asdict(r) for r in self.records], "start_checksum": self.start_checksum,
            "group_share": None if self.group_share is None else [nums(row) for row in self.group_share],
            "router": self.router,
            **{key: None if value is None else [nums(row) for row in value]
               for key, value in (("own_group_share", self.own_share), ("routing_accuracy", self.routing_accuracy),
                                  ("routing_confusion", self.routing_confusion))},
        }


def _nanmean(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=float)
    return float(values[np.isfinite(values)].mean()) if np.isfinite(values).any() else float("nan")


def _finite(value: float) -> Optional[float]:
    return float(value) if math.isfinite(float(value)) else None


def format_lm_table(result: LMResult) -> str:
    """The perplexity matrix, forgetting and plasticity per domain, and what each domain cost, as plain text."""
    general = result.general is not None
    header = ["perplexity"] + list(result.domains) + (["general"] if general else [])
    rows = [header]
    labels = ["initial"] + [f"after {d}" for d in result.domains]
    for i, (label, values) in enumerate(zip(labels, [result.initial, *result.matrix])):
        rows.append([label] + [f"{v:.3f}" for v in values] + ([f"{result.general[i]:.3f}"] if general else []))
    rows.append(["forgetting"] + [f"{v:+.3f}" for v in result.forgetting] + ["-"] + ([""] if general else []))
    rows.append(["plasticity"] + [f"{v:.3f}" for v in result.plasticity] + ([""] if general else []))
    summary = result.summary()
    lines = _grid(rows) + ["", "  ".join(f"{k} {v:.3f}" for k, v in summary.items())]
    if result.group_share is not None:
        cell = lambda v: "-" if not math.isfinite(v) else f"{v:.3f}"
        extra = [("own group", result.own_share), ("routing acc", result.routing_accuracy)]
        extra = [(label, m[-1]) for label, m in extra if m is not None]
        share = [["routing share (end)"]
                 + [f"group {g}" for g in range(result.group_share.shape[1])] + [label for label, _ in extra]]
        share += [[name] + [f"{v:.3f}" for v in row] + [cell(float(values[j])) for _, values in extra]
                  for j, (name, row) in enumerate(zip(result.domains, result.group_share))]
        lines += ["", f"router: {result.router}"] + _grid(share)
    cost = [["domain", "group", "added params", "trainable params", "total params", "train loss", "wall time s"]]
    for r in result.records:
        cost.append([r.domain, "-" if r.group is None else str(r.group), f"{r.added_parameters:,}",
                     f"{r.trainable_parameters:,}", f"{r.total_parameters:,}", f"{r.train_loss:.4f}", f"{r.wall_time_s:.1f}"])
    return "\n".join(lines + [""] + _grid(cost))


def _grid(rows: Sequence[Sequence[str]]) -> List[str]:
    """First column left-aligned, the others right-aligned, two spaces apart."""
    widths = [max(len(row[c]) for row in rows if c < len(row)) for c in range(max(len(r) for r in rows))]
    return ["  ".join([row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])]).rstrip()
            for row in rows]


def save_perplexity_csv(result: LMResult, path: Path) -> Path:
    """``after_domain,<domains...>[,general]``: the initial row then one row per domain, floats written with repr."""
    path.parent.mkdir(parents=True, exist_ok=True)
    general = result.general is not None
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["after_domain"] + list(result.domains) + (["general"] if general else []))
        for i, (label, values) in enumerate(zip(["initial", *result.domains], [result.initial, *result.matrix])):
            writer.writerow([label] + [repr(float(v)) for v in values] + ([repr(float(result.general[i]))] if general else []))
    return path


def plot_perplexity_matrix(result: LMResult, path: Path) -> Path:
    """An annotated heatmap of the initial row and the perplexity matrix (log colour scale, darker = lower)."""
    from matplotlib.colors import LogNorm

    data = np.vstack([result.initial[None], result.matrix])  # [D + 1, D]
    labels = ["initial"] + [f"after {d}" for d in result.domains]
    fig = new_figure(max(4.0, 1.5 + 0.9 * data.shape[1]), max(3.0, 1.0 + 0.5 * data.shape[0]))
    ax = fig.add_subplot()
    image = ax.imshow(data, cmap="viridis", norm=LogNorm(vmin=float(data.min()), vmax=max(float(data.max()), float(data.min()) * 1.01)),
                      aspect="auto")
    middle = math.sqrt(float(data.min()) * float(data.max()))
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", fontsize=9,
                    color="white" if data[i, j] < middle else "black")
    ax.set_xticks(range(data.shape[1]), labels=list(result.domains))
    ax.set_yticks(range(data.shape[0]), labels=labels)
    ax.set_xlabel("held-back text of domain")
    ax.set_ylabel("model state")
    ax.set_title(f"Perplexity ({result.mode})")
    fig.colorbar(image, ax=ax, label="perplexity")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
