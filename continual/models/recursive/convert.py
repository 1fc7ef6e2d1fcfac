"""Converting a pretrained Hugging Face model into a (relaxed) recursive one, in place.

Relaxed Recursive Transformers (Bae et al. 2024, arXiv 2410.20672). The ``L`` layers stay ``L`` distinct modules
(so Hugging Face's forward, generate and KV cache run unchanged and every depth keeps its own module names), but
the parameters of depths tied to the same shared block are *the same* ``nn.Parameter`` objects: ``K = L / R``
blocks' worth of storage, gradients summed over the loops. Relaxed projections become :class:`RelaxedLinear`
modules that add a depth-wise LoRA to the shared weight.

The settings are recorded in ``model.config.recursion`` (a plain dict saved in ``config.json``), which is all
:func:`continual.models.recursive.io.load_recursive` needs to rebuild the tying.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from continual.models.recursive.families import Family, family_of, layer_list_path
from continual.models.recursive.relaxation import LORA_INITS, RelaxedLinear, svd_lora_factors
from continual.models.recursive.sharing import INITS, SHARINGS, block_index, init_sources, tied_depths

FORMAT_VERSION = 1


@dataclass
class RecursionConfig:
    """How to convert a model (typed OmegaConf node; ``to_kwargs`` gives :func:`convert_to_recursive`'s arguments)."""

    # R: loops over the shared blocks; the model's layer count must be divisible by it (K = L / R blocks).
    num_loops: int = 2
    # "cycle" (depth l uses block l mod K) or "sequence" (block floor(l / R)).
    sharing: str = "cycle"
    # Shared block init from the pretrained layers: "stepwise", "average" or "lower".
    init: str = "stepwise"
    # Relaxation LoRA rank at every target projection of every depth; 0: no relaxation (plain recursive model).
    rank: int = 0
    # Per-projection ranks overriding `rank`, e.g. {self_attn.q_proj: 64, down_proj: 0}; keys are projection names
    # or dotted suffixes of them. Ranks above min(in, out) are capped there (full rank).
    ranks: Dict[str, int] = field(default_factory=dict)
    # Relaxation init: "svd" (truncated SVD of original - shared) or "zero" (A Kaiming, B zero).
    lora_init: str = "svd"
    # Projections that get the relaxation (names or suffixes); empty: every projection of the layer.
    targets: List[str] = field(default_factory=list)
    # Tie the normalisation weights (and the biases) of tied depths too; False keeps each depth's own pretrained ones.
    share_norms: bool = True
    share_biases: bool = True

    def __post_init__(self) -> None:
        """Checks what can be checked without a model (OmegaConf calls it for its defaults; direct use for the rest)."""
        check_options(self.num_loops, self.sharing, self.init, self.rank, self.lora_init)

    def to_kwargs(self) -> dict:
        return {
            "num_loops": self.num_loops, "sharing": self.sharing, "init": self.init, "rank": self.rank,
            "ranks": dict(self.ranks), "lora_init": self.lora_init, "targets": list(self.targets),
            "share_norms": self.share_norms, "share_biases": self.share_biases,
        }


def check_options(num_loops: int, sharing: str, init: str, rank: int, lora_init: str) -> None:
    """ValueError naming the option when a conversion setting is out of range."""
    if num_loops < 1:
        raise ValueError(f"num_loops must be >= 1, got {num_loops}")
    if sharing not in SHARINGS:
        raise ValueError(f"sharing must be one of {list(SHARINGS)}, got {sharing!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {list(INITS)}, got {init!r}")
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    if lora_init not in LORA_INITS:
        raise ValueError(f"lora_init must be one of {list(LORA_INITS)}, got {lora_init!r}")


def _matching(family: Family, key: str, what: str) -> List[str]:
    """Projections named ``key`` exactly, else those ending with ``.key``; ValueError when none."""
    exact = [p for p in family.projections if p == key]
    hits = exact or [p for p in family.projections if p.endswith("." + key)]
    if not hits:
        raise ValueError(f"{what}: {key!r} names no {family.name} projection; they are {list(family.projections)}")
    return hits


def resolve_ranks(
    family: Family, rank: int, ranks: Optional[Mapping[str, int]], targets: Sequence[str], shapes: Mapping[str, Tuple[int, int]]
) -> Dict[str, int]:
    """The relaxation rank of every projection of the family (0 = not relaxed), capped at full rank.

    Args:
        rank: default rank of the targets.
        ranks: per-projection overrides (projection names or suffixes).
        targets: projections that take ``rank`` (empty: all).
        shapes: projection -> ``(out, in)`` of its weight.
    """
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    chosen = {p for t in targets for p in _matching(family, t, "targets")} if targets else set(family.projections)
    resolved = {p: (rank if p in chosen else 0) for p in family.projections}
    for key, value in (ranks or {}).items():
        if int(value) < 0:
            raise ValueError(f"ranks.{key}: must be >= 0, got {value}")
        for p in _matching(family, key, f"ranks.{key}"):
            resolved[p] = int(value)
    return {p: min(r, *shapes[p]) for p, r in resolved.items()}


def _classify(layer: nn.Module, family: Family) -> Dict[str, Tuple[str, str]]:
    """Every parameter of one layer -> (kind, owning module) with kind "weight", "bias" or "norm"."""
    kinds: Dict[str, Tuple[str, str]] = {}
    for name, _ in layer.named_parameters():
        owner, _, attr = name.rpartition(".")
        if owner in family.projections and attr in ("weight", "bias"):
            kinds[name] = (attr, owner)
        elif owner in family.norms:
            kinds[name] = ("norm", owner)
        else:
            raise ValueError(
                f"{family.name} layer parameter {name!r} is neither a projection ({list(family.projections)}) nor a "
                f"norm ({list(family.norms)}); the family table in continual/models/recursive/families.py needs it"
            )
    for owner in family.projections:
        if not isinstance(layer.get_submodule(owner), nn.Linear):
            raise ValueError(f"{family.name} projection {owner!r} is a {type(layer.get_submodule(owner)).__name__}, not nn.Linear")
    return kinds


def _set_param(layer: nn.Module, name: str, param: nn.Parameter) -> None:
    owner, _, attr = name.rpartition(".")
    setattr(layer.get_submodule(owner) if owner else layer, attr, param)


def apply_recursion(model: nn.Module, recursion: Mapping, initialise: bool = True) -> nn.Module:
    """Tie and relax ``model`` as ``recursion`` (the dict :func:`convert_to_recursive` records) says.

    Args:
        model: an unconverted model of a supported family.
        recursion: ``num_loops``, ``sharing``, ``init``, resolved ``ranks``, ``lora_init``, ``share_norms``,
            ``share_biases``.
        initialise: compute the shared blocks and the relaxation factors from the pretrained weights; False builds the
            structure only (the values are about to be loaded from a checkpoint).
    """
    family = family_of(model)
    layers = model.get_submodule(layer_list_path(model, family))
    L, R = len(layers), int(recursion["num_loops"])
    index = block_index(L, R, recursion["sharing"])
    groups = tied_depths(index)
    sources = init_sources(L, R, recursion["sharing"], recursion["init"])
    kinds = _classify(layers[0], family)
    for depth, layer in enumerate(layers):
        if set(dict(layer.named_parameters())) != set(kinds):
            raise ValueError(f"layer {depth} has different parameters from layer 0; only uniform stacks can be tied")
    shared_kinds = {"weight"} | ({"norm"} if recursion["share_norms"] else set()) | ({"bias"} if recursion["share_biases"] else set())
    ranks: Dict[str, int] = dict(recursion["ranks"])
    params = [dict(layer.named_parameters()) for layer in layers]

    # Every shared value is computed from the untouched pretrained layers before any depth is rewired.
    shared: List[Dict[str, nn.Parameter]] = []
    for k, depths in enumerate(groups):
        block = {}
        for name, (kind, _) in kinds.items():
            if kind not in shared_kinds:
                continue
            taken = sources[k] if initialise else [depths[0]]
            ref = params[taken[0]][name]
            value = torch.stack([params[s][name].detach().float() for s in taken]).mean(0).to(ref.dtype)
            block[name] = nn.Parameter(value, requires_grad=ref.requires_grad)
        shared.append(block)

    for k, depths in enumerate(groups):
        for depth in depths:
            layer = layers[depth]
            originals = {p: layer.get_submodule(p).weight.detach() for p, r in ranks.items() if r}
            for name, param in shared[k].items():
                _set_param(layer, name, param)
            for proj, rank in ranks.items():
                if not rank:
                    continue
                linear = layer.get_submodule(proj)
                A = B = None
                if not initialise:
                    A = torch.zeros(rank, linear.in_features, dtype=linear.weight.dtype, device=linear.weight.device)
                    B = torch.zeros(linear.out_features, rank, dtype=linear.weight.dtype, device=linear.weight.device)
                elif recursion["lora_init"] == "svd":
                    A, B = svd_lora_factors(originals[proj] - linear.weight.detach(), rank)
                owner, _, child = proj.rpartition(".")
                setattr(layer.get_submodule(owner), child, RelaxedLinear(linear.weight, linear.bias, rank, A, B))
    return model


def convert_to_recursive(
    model: nn.Module,
    num_loops: int = 2,
    sharing: str = "cycle",
    init: str = "stepwise",
    rank: int = 0,
    ranks: Optional[Mapping[str, int]] = None,
    lora_init: str = "svd",
    targets: Sequence[str] = (),
    share_norms: bool = True,
    share_biases: bool = True,
) -> nn.Module:
    """Turn a pretrained model into a recursive one with ``K = L / R`` shared blocks, in place.

    Args:
        model: a Hugging Face model of a supported family (Llama/SmolLM2, Mistral, Qwen2, BERT/MiniLM, RoBERTa), with
            or without its head.
        num_loops: ``R``.
        sharing: "cycle" or "sequence".
        init: "stepwise", "average" or "lower" (how each shared block is formed from the pretrained layers).
        rank: relaxation LoRA rank of every target projection at every depth (0: none).
        ranks: per-projection ranks (names or suffixes) overriding ``rank``; capped at full rank.
        lora_init: "svd" or "zero".
        targets: projections relaxed with ``rank`` (empty: all).
        share_norms: tie norm weights too (else each depth keeps its pretrained ones).
        share_biases: tie projection biases too.

    Returns:
        ``model`` itself, now recursive; ``model.config.recursion`` records the settings.

    Raises:
        ValueError: an unknown option value, an unsupported architecture, ``L`` not divisible by ``R``, or a model that
            is already recursive.
    """
    check_options(num_loops, sharing, init, rank, lora_init)
    if recursion_of(model) is not None:
        raise ValueError(f"{type(model).__name__} is already recursive: {recursion_of(model)}")
    family = family_of(model)
    layers = model.get_submodule(layer_list_path(model, family))
    shapes = {p: tuple(layers[0].get_submodule(p).weight.shape) for p in family.projections}
    recursion = {
        "format": FORMAT_VERSION,
        "num_loops": int(num_loops),
        "sharing": sharing,
        "init": init,
        "ranks": resolve_ranks(family, int(rank), ranks, list(targets), shapes),
        "lora_init": lora_init,
        "share_norms": bool(share_norms),
        "share_biases": bool(share_biases),
        "model_class": type(model).__name__,
        "pooler": getattr(model, "pooler", "absent") is not None,
    }
    block_index(len(layers), recursion["num_loops"], sharing)  # validates R before any work
    with torch.no_grad():
        apply_recursion(model, recursion, initialise=True)
    model.config.recursion = recursion
    return model


# ---------------------------------------------------------------------------------------------------- queries
def recursion_of(model: nn.Module) -> Optional[dict]:
    """The recorded recursion settings of a converted model, or None for an ordinary one."""
    value = getattr(getattr(model, "config", None), "recursion", None)
    return dict(value) if value else None


@dataclass(frozen=True)
class Layout:
    """Where the unrolled depths of a recursive model are and which block each uses."""

    family: Family
    layers: nn.ModuleList  # the L depth modules
    index: Tuple[int, ...]  # block of each depth
    num_loops: int
    sharing: str

    @property
    def num_blocks(self) -> int:
        return len(self.layers) // self.num_loops


def layout(model: nn.Module) -> Layout:
    """The :class:`Layout` of a recursive model (ValueError for an unconverted one)."""
    recursion = recursion_of(model)
    if recursion is None:
        raise ValueError(f"{type(model).__name__} is not recursive: convert it with convert_to_recursive first")
    family = family_of(model)
    layers = model.get_submodule(layer_list_path(model, family))
    index = block_index(len(layers), recursion["num_loops"], recursion["sharing"])
    return Layout(family, layers, tuple(index), recursion["num_loops"], recursion["sharing"])


def parameter_breakdown(model: nn.Module) -> Dict[str, int]:
    """Unique parameters of a (recursive) model by role.

    Returns:
        ``{"blocks": tied layer parameters (K blocks), "per_depth": layer parameters used by one depth only (untied
        norms or biases), "relaxation": depth-wise LoRA factors, "other": embeddings, final norm, heads,
        "total": all unique parameters}``.
    """
    family = family_of(model)
    layers = model.get_submodule(layer_list_path(model, family))
    uses: Dict[int, int] = {}
    sizes: Dict[int, int] = {}
    relax = {id(p) for m in layers.modules() if isinstance(m, RelaxedLinear) for p in (m.relax_A, m.relax_B)}
    for layer in layers:
        for p in layer.parameters():
            uses[id(p)] = uses.get(id(p), 0) + 1
            sizes[id(p)] = p.numel()
    total = sum(p.numel() for p in model.parameters())
    relaxation = sum(sizes[i] for i in relax)
    blocks = sum(sizes[i] for i, n in uses.items() if n > 1 and i not in relax)
    per_depth = sum(sizes[i] for i, n in uses.items() if n == 1 and i not in relax)
    if recursion_of(model) is None or recursion_of(model)["num_loops"] == 1:
        blocks, per_depth = blocks + per_depth, 0  # nothing is tied: every layer is its own block
    return {"blocks": blocks, "per_depth": per_depth, "relaxation": relaxation, "other": total - blocks - per_depth - relaxation, "total": total}
