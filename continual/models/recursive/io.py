"""Saving and loading recursive models with safetensors, tying restored from the config.

safetensors refuses tensors that share storage, and a recursive model shares most of its layers. The file keeps
one tensor per shared storage, under the first state-dict key that uses it; ``config.json`` carries
``recursion`` (see :mod:`continual.models.recursive.convert`). Loading builds the architecture from the config,
applies the same tying and relaxation structure, then fills it from the file: nothing is unpickled, and every
alias of a shared parameter is restored because it *is* the loaded parameter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from continual.models.recursive.convert import FORMAT_VERSION, apply_recursion, recursion_of

WEIGHTS_NAME = "model.safetensors"


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device.type, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)


def unique_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The state dict with one key per storage: the first key under which each shared tensor appears."""
    out: Dict[str, torch.Tensor] = {}
    seen: set = set()
    for key, value in model.state_dict().items():
        storage = _storage_key(value)
        if storage not in seen:
            seen.add(storage)
            out[key] = value
    return out


def save_recursive(model: nn.Module, folder: str | Path, tokenizer=None) -> Path:
    """Write ``config.json`` (with the recursion settings) and ``model.safetensors`` (shared tensors once).

    Args:
        model: a model converted with :func:`convert_to_recursive`.
        folder: created if needed; existing files of the same names are replaced.
        tokenizer: also saved there when given, so the folder loads as a backbone by path.

    Returns:
        The folder.
    """
    recursion = recursion_of(model)
    if recursion is None:
        raise ValueError(f"{type(model).__name__} is not recursive; use save_pretrained for ordinary models")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in unique_state(model).items()}
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt", "recursion": json.dumps(recursion)})
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def _model_class(name: str) -> type:
    """A model class exported by ``transformers`` (never code from the folder)."""
    import transformers
    from transformers import PreTrainedModel

    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise ValueError(f"recursion.model_class {name!r} is not a transformers model class")
    return cls


def load_recursive(folder: str | Path, device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Rebuild a model written by :func:`save_recursive`, with its tying, and load its weights.

    Raises:
        FileNotFoundError: no config.json or weights file in ``folder``.
        ValueError: the config has no recursion settings, or the weights do not match the rebuilt structure (the
            message lists the missing and unexpected keys).
    """
    from transformers import AutoConfig

    folder = Path(folder)
    for name in ("config.json", WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} not found: not a folder written by save_recursive")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    recursion = getattr(config, "recursion", None)
    if not recursion:
        raise ValueError(f"{folder / 'config.json'} has no 'recursion' settings: not a recursive model")
    if recursion.get("format") != FORMAT_VERSION:
        raise ValueError(f"{folder / 'config.json'}: recursion format {recursion.get('format')!r}, expected {FORMAT_VERSION}")
    model = _model_class(recursion["model_class"])(config)
    if not recursion.get("pooler", True) and getattr(model, "pooler", None) is not None:
        model.pooler = None
    with torch.no_grad():
        apply_recursion(model, recursion, initialise=False)

    expected = unique_state(model)
    with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as handle:
        keys = list(handle.keys())
        missing: List[str] = sorted(set(expected) - set(keys))
        unexpected: List[str] = sorted(set(keys) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"{folder / WEIGHTS_NAME} does not match the rebuilt {type(model).__name__}: "
                f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
            )
        with torch.no_grad():
            for key in keys:
                value = handle.get_tensor(key)
                target = expected[key]
                if tuple(value.shape) != tuple(target.shape):
                    raise ValueError(f"{folder / WEIGHTS_NAME}: {key} has shape {tuple(value.shape)}, expected {tuple(target.shape)}")
                target.copy_(value)
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval()
