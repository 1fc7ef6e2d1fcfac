"""Where TinT's one-step update acts inside a Hugging Face causal LM, per architecture.

TinT (Panigrahi et al. 2023, "Trainable Transformer in Transformer", arXiv 2307.01189) back-propagates through the
top ``n`` blocks only and updates their value, output-projection and MLP weights and their layer-norm biases; query
and key projections are never updated and the embeddings stay fixed. A *layout* answers, for one architecture
family, which blocks there are and, in each block, which tensors (or which slice of a fused tensor) may change,
which modules are normalisations and which are elementwise activations. One :func:`register_layout` call per family;
``config.model_type`` picks the layout.

Supported: GPT-2 (``gpt2``), Llama (``llama``, which covers SmolLM2), both read from the one architecture table
(:mod:`continual.modules.families`), and the native ModuleFormer (``moduleformer``,
:mod:`continual.models.moduleformer`). Another family (Qwen2...) plugs in with one more registration here; a family
whose attention does not go through transformers' ``AttentionInterface`` also says how to stop its gradients
(``stop_gradient``, see :class:`ModuleFormerLayout`) and whether it has a key/value cache (``kv_cache``).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Protocol, Sequence, Tuple

import torch
from torch import nn

from continual.modules.families import FAMILIES as ARCHITECTURES
from continual.modules.families import ArchitectureFamily


@dataclass(frozen=True)
class UpdateSite:
    """One tensor (or a slice of it) that the one-step update may change.

    Attributes:
        name: the parameter's dotted name in the model (plus the slice, for fused tensors).
        param: the parameter itself.
        index: a tuple of slices selecting the updated part of ``param``; ``None`` for all of it.
    """

    name: str
    param: nn.Parameter
    index: Optional[Tuple[slice, ...]] = None

    def part(self, tensor: torch.Tensor) -> torch.Tensor:
        """The updated part of a tensor shaped like ``param`` (a view)."""
        return tensor if self.index is None else tensor[self.index]

    @property
    def numel(self) -> int:
        return self.part(self.param).numel()


@dataclass(frozen=True)
class NormSite:
    """A normalisation module and how it normalises (its affine part is applied after).

    Attributes:
        module: the norm module (its forward is replaced while first-order backward is on).
        kind: ``"layernorm"`` (``(x - mean) / sqrt(var + eps)``) or ``"rmsnorm"`` (``x / sqrt(mean(x^2) + eps)``).
        eps: the epsilon inside the square root.
    """

    module: nn.Module
    kind: str
    eps: float


@dataclass(frozen=True)
class BlockSites:
    """What the update touches in one transformer block."""

    update: List[UpdateSite]  # value / output / MLP weights and biases, norm biases
    norms: List[NormSite]  # normalisations inside the block
    activations: List[nn.Module]  # elementwise activation modules inside the block


class CausalLMLayout(Protocol):
    """One architecture family's answers to "where does the update act".

    Optional attributes: ``kv_cache`` (default True: the model accepts ``past_key_values``, so a shared context is
    run once per batch) and ``stop_gradient(model)`` (a context manager that makes the family's attention
    probabilities, and any other mixing weights, constants to autograd; without it the attention goes through
    transformers' ``AttentionInterface``, see :mod:`.attention`).
    """

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        """The transformer blocks, bottom to top."""

    def block_sites(self, model: nn.Module, index: int) -> BlockSites:
        """The update sites, norms and activations of block ``index``."""

    def final_norm(self, model: nn.Module) -> NormSite:
        """The normalisation after the last block (before the LM head)."""

    def final_norm_sites(self, model: nn.Module) -> List[UpdateSite]:
        """The final norm's updatable tensors (its bias, if it has one)."""


# name -> layout; filled by ``register_layout`` below, nowhere else.
LAYOUTS: Dict[str, CausalLMLayout] = {}


def register_layout(model_types: Sequence[str], layout: CausalLMLayout) -> None:
    """Serve every ``config.model_type`` in ``model_types`` with ``layout``."""
    for model_type in model_types:
        if model_type in LAYOUTS and LAYOUTS[model_type] is not layout:
            raise ValueError(f"a TinT layout for model_type {model_type!r} is already registered")
        LAYOUTS[model_type] = layout


def layout_for(model: nn.Module) -> CausalLMLayout:
    """The layout of ``model`` (a Hugging Face ``*ForCausalLM``); ValueError naming the supported families."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in LAYOUTS:
        raise ValueError(
            f"TinT one-step fine-tuning does not know where to act in a model of type {model_type!r}; supported "
            f"model types: {', '.join(sorted(LAYOUTS))} (register a layout with "
            "continual.models.tint.layouts.register_layout)"
        )
    return LAYOUTS[model_type]


def _linear_sites(prefix: str, module: nn.Module) -> List[UpdateSite]:
    sites = [UpdateSite(f"{prefix}.weight", module.weight)]
    if getattr(module, "bias", None) is not None:
        sites.append(UpdateSite(f"{prefix}.bias", module.bias))
    return sites


def _norm_bias(prefix: str, module: nn.Module) -> List[UpdateSite]:
    bias = getattr(module, "bias", None)
    return [UpdateSite(f"{prefix}.bias", bias)] if isinstance(bias, nn.Parameter) else []


class FamilyLayout:
    """A Hugging Face causal LM whose module names are an entry of the architecture table
    (:mod:`continual.modules.families`).

    Updated per block: the value projection (for GPT-2's fused ``attn.c_attn``, Conv1D weight ``[in, 3d]`` = q | k |
    v, only its value third), the attention output projection, the FFN's gate (Llama), up and down projections (with
    biases when present), and the biases of the block's norms (RMS norms have none). Norms are LayerNorm or RMSNorm,
    read from the module itself; the final norm comes from the table too.
    """

    def __init__(self, family: ArchitectureFamily):
        self.family = family

    def _stack(self, model: nn.Module) -> Tuple[str, Sequence[nn.Module]]:
        for path in self.family.layer_lists:
            try:
                return path, model.get_submodule(path)
            except AttributeError:
                continue
        raise ValueError(f"{type(model).__name__} has none of the {self.family.name} block lists {self.family.layer_lists}")

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        return self._stack(model)[1]

    def block_sites(self, model: nn.Module, index: int) -> BlockSites:
        path, stack = self._stack(model)
        block, prefix, f = stack[index], f"{path}.{index}", self.family
        if f.qkv:
            d = model.config.hidden_size
            fused = block.get_submodule(f.qkv)
            update = [UpdateSite(f"{prefix}.{f.qkv}.weight[:, {2 * d}:]", fused.weight, (slice(None), slice(2 * d, 3 * d)))]
            if getattr(fused, "bias", None) is not None:
                update.append(UpdateSite(f"{prefix}.{f.qkv}.bias[{2 * d}:]", fused.bias, (slice(2 * d, 3 * d),)))
        else:
            update = _linear_sites(f"{prefix}.{f.value}", block.get_submodule(f.value))
        for name in (f.attn_out, f.ffn_gate, f.ffn_in, f.ffn_out):
            if name:
                update += _linear_sites(f"{prefix}.{name}", block.get_submodule(name))
        for name in f.norms:
            update += _norm_bias(f"{prefix}.{name}", block.get_submodule(name))
        norms = [_norm(block.get_submodule(name)) for name in f.norms]
        return BlockSites(update=update, norms=norms, activations=[block.get_submodule(f.ffn_act)])

    def _final(self, model: nn.Module) -> Tuple[str, nn.Module]:
        for path in self.family.final_norm or ():
            try:
                return path, model.get_submodule(path)
            except AttributeError:
                continue
        raise ValueError(f"{type(model).__name__} has no final norm at {self.family.final_norm}")

    def final_norm(self, model: nn.Module) -> NormSite:
        return _norm(self._final(model)[1])

    def final_norm_sites(self, model: nn.Module) -> List[UpdateSite]:
        return _norm_bias(*self._final(model))


def _norm(module: nn.Module) -> NormSite:
    return _ln(module) if isinstance(module, nn.LayerNorm) else _rms(module)


def _ln(module: nn.LayerNorm) -> NormSite:
    return NormSite(module, "layernorm", module.eps)


def _rms(module: nn.Module) -> NormSite:
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if eps is None:
        raise ValueError(f"{type(module).__name__} does not expose its epsilon (variance_epsilon or eps)")
    return NormSite(module, "rmsnorm", float(eps))


class ModuleFormerLayout:
    """The native ModuleFormer (:mod:`continual.models.moduleformer`): ``transformer.blocks[i]``.

    Updated, as TinT's value/output/MLP rule reads for a mixture of experts: the shared value projection
    ``attn.v_proj``, every attention expert's output projection ``attn.groups[g].w_o``, every FFN expert's ``w_in``
    and ``w_out``, and the biases of ``ln_attn`` and ``ln_ffn``. Never updated: the experts' query projections, the
    shared key projection and the routers (the counterparts of queries and keys). Stop-gradient covers both kinds
    of mixing weights: the stick-breaking attention weights and the routers' gates are constants to autograd. No
    key/value cache, so a context is run again with each batch of queries.
    """

    kv_cache = False

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        return model.transformer.blocks

    def block_sites(self, model: nn.Module, index: int) -> BlockSites:
        block = model.transformer.blocks[index]
        prefix = f"transformer.blocks.{index}"
        update = [UpdateSite(f"{prefix}.attn.v_proj.weight", block.attn.v_proj.weight)]
        for pool, roles in (("attn", ("w_o",)), ("ffn", ("w_in", "w_out"))):
            for g, group in enumerate(block.get_submodule(pool).groups):
                update += [UpdateSite(f"{prefix}.{pool}.groups.{g}.{role}", getattr(group, role))
                           for role in roles if group.n > 0]
        update += _norm_bias(f"{prefix}.ln_attn", block.ln_attn) + _norm_bias(f"{prefix}.ln_ffn", block.ln_ffn)
        norms = [_ln(block.ln_attn), _ln(block.ln_ffn)]
        return BlockSites(update=update, norms=norms, activations=[block.ffn.act])

    def final_norm(self, model: nn.Module) -> NormSite:
        return _ln(model.transformer.norm)

    def final_norm_sites(self, model: nn.Module) -> List[UpdateSite]:
        return _norm_bias("transformer.norm", model.transformer.norm)

    @contextmanager
    def stop_gradient(self, model: nn.Module) -> Iterator[None]:
        pools = [m for block in self.blocks(model) for m in (block.attn, block.ffn)]
        previous = [pool.stop_gradient_mixing for pool in pools]
        try:
            for pool in pools:
                pool.stop_gradient_mixing = True
            yield
        finally:
            for pool, flag in zip(pools, previous):
                pool.stop_gradient_mixing = flag


def has_kv_cache(model: nn.Module) -> bool:
    """Whether ``model``'s family takes ``past_key_values`` (see ``CausalLMLayout``)."""
    return bool(getattr(layout_for(model), "kv_cache", True))


register_layout(["gpt2"], FamilyLayout(ARCHITECTURES["gpt2"]))
register_layout(["llama"], FamilyLayout(ARCHITECTURES["llama"]))
register_layout(["moduleformer"], ModuleFormerLayout())


# ---------------------------------------------------------------------------------------------------- selection
def resolve_layers(model: nn.Module, layers: Optional[int]) -> List[int]:
    """Indices of the top ``layers`` blocks (all of them for ``None``), bottom to top.

    Raises:
        ValueError: ``layers`` is not in ``1..number of blocks``.
    """
    total = len(layout_for(model).blocks(model))
    if layers is None:
        return list(range(total))
    if not 1 <= int(layers) <= total:
        raise ValueError(f"layers={layers}: the model has {total} blocks, choose 1..{total} (or None for all)")
    return list(range(total - int(layers), total))


def update_sites(model: nn.Module, layers: Optional[int], final_norm: bool = True) -> List[UpdateSite]:
    """Every tensor the one-step update may change: the sites of the top ``layers`` blocks, then (when
    ``final_norm``) the final norm's bias."""
    layout = layout_for(model)
    sites: List[UpdateSite] = []
    for index in resolve_layers(model, layers):
        sites += layout.block_sites(model, index).update
    if final_norm:
        sites += layout.final_norm_sites(model)
    return sites

