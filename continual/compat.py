"""The few calls into transformers that have no stable public form, kept in one place.

Everything else in continual uses public APIs of transformers and Avalanche. What is here changed between releases
(``create_causal_mask`` renamed ``past_key_values`` to ``cache`` and the mask builders ``input_embeds`` to
``inputs_embeds`` within 5.x; BERT's private ``_create_attention_masks`` changed signature in 5.24), so each function inspects the signature it finds and fails with a message that names the
installed transformers version instead of a bare ``TypeError``. ``tests/test_compat.py`` covers each one.

One Avalanche behaviour has no public switch either: once ``torch.distributed`` is initialised, its data loaders
(built inside its templates and plugins, e.g. the replay plugin's) shard the data themselves with a
``DistributedSampler``; data-parallel runs shard each global batch themselves instead
(:func:`avalanche_sees_one_process`).
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Any, Dict, Iterator, Optional, Tuple

import torch
from torch import nn


class UnsupportedTransformersError(RuntimeError):
    """The installed transformers lacks (or changed) an API continual needs."""


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def _unsupported(what: str, detail: str) -> UnsupportedTransformersError:
    return UnsupportedTransformersError(
        f"{what} is not available in the installed transformers {transformers_version()} ({detail}); "
        "continual is tested with the range declared in its pyproject.toml"
    )


# Argument names that changed between transformers releases: the name continual uses -> every spelling seen.
_SPELLINGS = {
    "inputs_embeds": ("inputs_embeds", "input_embeds"),  # masking_utils: input_embeds in 5.0, inputs_embeds later
    "cache": ("cache", "past_key_values"),  # create_causal_mask: past_key_values until 5.2x, cache since
}


def _call(function, optional: Optional[dict] = None, **kwargs):
    """Call ``function`` with each keyword spelt as the installed release spells it.

    Args:
        optional: arguments passed only when ``function`` takes them (e.g. ``cache_position``, required in 5.0 and
            gone later).

    Raises:
        UnsupportedTransformersError: ``function`` takes none of the spellings of an argument it needs.
    """
    params = inspect.signature(function).parameters
    spelt = {}
    for name, value in kwargs.items():
        for spelling in _SPELLINGS.get(name, (name,)):
            if spelling in params:
                spelt[spelling] = value
                break
        else:
            if name == "cache":  # a release without cache support needs no "no cache" argument
                continue
            raise _unsupported(f"{function.__module__}.{function.__name__}", f"it takes no argument {name!r}")
    for name, value in (optional or {}).items():
        if name in params:
            spelt[name] = value
    return function(**spelt)


def causal_mask(
    config: Any, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
) -> Any:
    """The causal attention mask a decoder layer of ``config``'s attention implementation expects, without a cache.

    Args:
        inputs_embeds: ``[B, T, H]`` (shape, dtype and device are read).
        attention_mask: ``[B, T]``, 1 for tokens, 0 for padding.
        position_ids: ``[1, T]`` or ``[B, T]``.

    Returns:
        Whatever ``transformers.masking_utils.create_causal_mask`` returns (a 4D tensor, a BlockMask or None).
    """
    try:
        from transformers.masking_utils import create_causal_mask
    except ImportError as error:
        raise _unsupported("transformers.masking_utils.create_causal_mask", str(error)) from error
    positions = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)
    return _call(
        create_causal_mask, optional={"cache_position": positions}, config=config, inputs_embeds=inputs_embeds,
        attention_mask=attention_mask, cache=None, position_ids=position_ids,
    )


def bidirectional_mask(base: nn.Module, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> Any:
    """The padding mask an encoder layer (BERT family) of ``base`` expects.

    Uses the public ``masking_utils.create_bidirectional_mask`` where it exists (transformers >= 4.57), else the
    model's public ``get_extended_attention_mask`` (the additive ``[B, 1, 1, T]`` mask of older releases).

    Args:
        base: the encoder model (``BertModel``...), whose config selects the attention implementation.
        inputs_embeds: ``[B, T, H]``.
        attention_mask: ``[B, T]``, 1 for tokens, 0 for padding.
    """
    try:
        from transformers.masking_utils import create_bidirectional_mask
    except ImportError:
        create_bidirectional_mask = None
    if create_bidirectional_mask is not None:
        return _call(
            create_bidirectional_mask, config=base.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask
        )
    extend = getattr(base, "get_extended_attention_mask", None)
    if extend is None:
        raise _unsupported(
            "an encoder attention mask builder",
            "neither masking_utils.create_bidirectional_mask nor get_extended_attention_mask exists",
        )
    return extend(attention_mask, tuple(inputs_embeds.shape[:2]), dtype=inputs_embeds.dtype)


def attn_implementation(model: nn.Module) -> Optional[str]:
    """The attention implementation a Hugging Face model runs (``"eager"``, ``"sdpa"``, a registered name...)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def dispatches_attention_interface(model: nn.Module) -> bool:
    """Whether ``model``'s attention goes through ``AttentionInterface`` (so ``set_attn_implementation`` can swap
    it). Models that transformers cannot tell about are assumed to (it is then checked when set)."""
    if not hasattr(model, "set_attn_implementation"):
        return False
    can_set = getattr(model, "_can_set_attn_implementation", None)
    if can_set is None:
        return True
    return bool(can_set())


def decoder_forward(model: nn.Module, *, cache: Any = None, use_cache: bool = False, **inputs) -> Tuple[torch.Tensor, Any]:
    """Run a decoder's base model and return its last hidden states and key/value cache.

    The cache argument and output field are ``cache`` in recent 5.x releases and ``past_key_values`` before (still
    accepted, with a deprecation warning); this passes and reads whichever the installed release has.

    Args:
        model: a decoder base model (``LlamaModel``, ``GPT2Model``...).
        cache: a cache an earlier call returned, to continue those sequences (None: start afresh).
        use_cache: return the keys and values of this call (extending ``cache`` when given).
        **inputs: ``input_ids``, ``attention_mask``, ``position_ids``...

    Returns:
        ``(last_hidden_state [B, T, H], cache or None)``.

    Raises:
        UnsupportedTransformersError: the model's forward takes no cache argument while one is needed.
    """
    name = _cache_argument(type(model))
    if name is None and (cache is not None or use_cache):
        raise _unsupported(f"{type(model).__name__}.forward with a key/value cache", "it takes no cache argument")
    if name is not None:
        inputs["use_cache"] = use_cache
        if cache is not None:
            inputs[name] = cache
    out = model(**inputs)
    returned = out.get("cache", None)
    if returned is None:
        returned = out.get("past_key_values", None)
    return out.last_hidden_state, returned


_CACHE_ARGUMENTS: Dict[type, Optional[str]] = {}


def _cache_argument(model_type: type) -> Optional[str]:
    """``"cache"``, ``"past_key_values"`` or None: how ``model_type.forward`` takes a key/value cache (read once per
    class)."""
    if model_type not in _CACHE_ARGUMENTS:
        params = inspect.signature(model_type.forward).parameters
        _CACHE_ARGUMENTS[model_type] = next((n for n in ("cache", "past_key_values") if n in params), None)
    return _CACHE_ARGUMENTS[model_type]


# ---------------------------------------------------------------------------------------------------- Avalanche


class _OneProcessHelper:
    """Avalanche's ``DistributedHelper`` answering as in a single process (everything else asked of the real one)."""

    is_distributed = False
    is_main_process = True
    rank = 0
    world_size = 1

    def __init__(self, helper: Any):
        self._helper = helper

    def __getattr__(self, name: str) -> Any:
        return getattr(self._helper, name)


# Avalanche 0.6 modules that read ``DistributedHelper.is_distributed``: its data loaders (whether to shard with a
# DistributedSampler) and its template (a warning about plugins not marked ``supports_distributed``).
_AVALANCHE_HELPER_USERS = ("avalanche.benchmarks.utils.data_loader", "avalanche.training.templates.base")


@contextmanager
def avalanche_sees_one_process() -> Iterator[None]:
    """While active, Avalanche builds its data loaders as in one process although ``torch.distributed`` is
    initialised: every process then draws the same global batches, which the learner shards itself.

    Raises:
        RuntimeError: the installed Avalanche no longer has the module-level ``DistributedHelper`` this relies on.
    """
    import importlib

    modules = [importlib.import_module(name) for name in _AVALANCHE_HELPER_USERS]
    missing = [m.__name__ for m in modules if not hasattr(m, "DistributedHelper")]
    if missing:
        import avalanche

        raise RuntimeError(f"avalanche {avalanche.__version__}: {', '.join(missing)} has no DistributedHelper; "
                           "data-parallel runs cannot switch its distributed sampling off")
    saved = [(m, m.DistributedHelper) for m in modules]
    for module, helper in saved:
        module.DistributedHelper = _OneProcessHelper(helper)
    try:
        yield
    finally:
        for module, helper in saved:
            module.DistributedHelper = helper
