"""Exchange one task's LoRA deltas (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") with
PEFT adapter folders.

A PEFT LoRA adapter folder holds ``adapter_config.json`` (a ``peft.LoraConfig``) and ``adapter_model.safetensors``
with one ``lora_A [r, in]`` / ``lora_B [out, r]`` pair per adapted module, keyed
``base_model.model.<module>.lora_A.weight``. The bank's LoRA slots have the same layout and the same scale
``alpha / r`` (GPT-2 ``Conv1D`` included: PEFT keeps A and B un-transposed there and only records
``fan_in_fan_out=true``), so one task's slot is one adapter, tensor for tensor.

Module names are relative to the model the bank was attached to (the backbone, e.g. ``ContinualClassifier.backbone``
for a BERT ``AutoModel``): ``PeftModel.from_pretrained(<the same architecture, unadapted>, folder)`` reproduces the
task's hidden states. Task heads are not part of the adapter.

Decisions:

- Export covers LoRA only. When the bank also holds other kinds (adapters, BitFit, ...), their change to the task's
  outputs cannot be written as a PEFT LoRA: :func:`export_peft_lora` raises, naming the kinds and sites, unless
  ``skip_other_kinds=True``, which exports the LoRA part alone with a warning.
- A task that uses several slots (sequential composition: slots ``0..j``; simultaneous: all) is not one PEFT
  adapter. Export raises unless ``merge_slots=True``, which writes the exact sum as one LoRA of rank ``sum(r)``
  (``A`` stacked on the rank axis, ``B`` concatenated with each slot's routing weight folded in, ``lora_alpha``
  scaled so that ``lora_alpha / rank`` stays the bank's ``alpha / r``).
- Import accepts plain LoRA only: DoRA, rsLoRA, biases, extra saved modules, trainable tokens, per-module ranks or
  alphas that differ from the bank, base-modifying initialisations (PiSSA, OLoRA, CorDA, LoftQ) and pickled
  weights (``adapter_model.bin``) are refused with the offending key or module named. Nothing in the bank changes
  unless every check passes.

PEFT is a development dependency; it is imported when one of these functions is called.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from continual.modules.bank import ModuleBank, TaskModuleSite, is_conv1d

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLED_WEIGHTS = "adapter_model.bin"
KEY_PREFIX = "base_model.model."  # what PEFT puts before module names in a saved adapter

# LoraConfig fields whose non-empty / true value changes what an adapter computes beyond W + (alpha/r) B A.
_UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA adds a magnitude vector per module",
    "use_rslora": "rsLoRA scales by lora_alpha / sqrt(r), the bank by alpha / r",
    "use_qalora": "QALoRA pools the input groupwise",
    "lora_bias": "lora_bias adds a bias to lora_B",
    "modules_to_save": "modules_to_save stores whole extra modules",
    "trainable_token_indices": "trainable_token_indices trains embedding rows",
    "target_parameters": "target_parameters adapts raw parameters, not modules",
    "layer_replication": "layer_replication changes the model's layers",
    "alora_invocation_tokens": "activated LoRA applies only after invocation tokens",
}
# init_lora_weights values that rewrite the base weights: the adapter is relative to a model we do not have.
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq")

PathLike = Union[str, Path]


def _require_peft():
    try:
        import peft  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "PEFT adapter import/export needs the `peft` package (a development dependency): "
            "pip install 'peft>=0.13' or pip install -e '.[dev]'"
        ) from err
    return peft


# ---------------------------------------------------------------------------------------------------- bank view
def _checked_sites(bank: ModuleBank, model: nn.Module) -> Dict[str, TaskModuleSite]:
    sites = bank.sites()
    if not sites:
        raise ValueError("the bank has no sites: attach a LoRA kind first")
    for name, site in sites.items():
        try:
            found = model.get_submodule(name)
        except AttributeError:
            found = None
        if found is not site:
            raise ValueError(f"{type(model).__name__} is not the model this bank is attached to (site {name!r})")
    return sites


def _plain_name(name: str, sites: Dict[str, TaskModuleSite]) -> str:
    """The module name of a site in the unadapted model: kinds stacked on one linear nest as ``<name>.base``."""
    while name.endswith(".base") and name[: -len(".base")] in sites:
        name = name[: -len(".base")]
    return name


def _plain_module_names(model: nn.Module) -> List[str]:
    """Names of ``model``'s modules as they are without the bank: a site stands for the linear it replaced."""
    names: List[str] = []
    inside: List[str] = []  # prefixes of outermost sites
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in inside):
            continue
        if name:
            names.append(name)
        if isinstance(module, TaskModuleSite):
            inside.append(name + ".")
    return names


def _innermost(site: TaskModuleSite) -> nn.Module:
    base = site.base
    while isinstance(base, TaskModuleSite):
        base = base.base
    return base


def _split_kinds(bank: ModuleBank, model: nn.Module) -> Tuple[Dict[str, TaskModuleSite], Dict[str, str]]:
    """(plain module name -> LoRA site, site name -> kind of every other site)."""
    sites = _checked_sites(bank, model)
    lora: Dict[str, TaskModuleSite] = {}
    others: Dict[str, str] = {}
    for name, site in sites.items():
        kind = getattr(site.delta, "kind", type(site.delta).__name__)
        if kind == "lora":
            plain = _plain_name(name, sites)
            if plain in lora:
                raise ValueError(f"two LoRA sites wrap module {plain!r}; a PEFT adapter holds one LoRA per module")
            lora[plain] = site
        else:
            others[name] = kind
    if not lora:
        raise ValueError(f"the bank has no LoRA sites (kinds: {sorted(set(others.values()))})")
    return lora, others


def _alpha(delta: nn.Module) -> float:
    return float(delta.scale * delta.r)


def _targets(config) -> str:
    targets = config.target_modules
    return repr(sorted(targets) if isinstance(targets, (set, list, tuple)) else targets)


def _number(value: float) -> Union[int, float]:
    return int(value) if float(value).is_integer() else float(value)


# ---------------------------------------------------------------------------------------------------- export
def export_peft_lora(
    bank: ModuleBank,
    model: nn.Module,
    task_index: int,
    folder: PathLike,
    base_model_name_or_path: Optional[str] = None,
    *,
    merge_slots: bool = False,
    skip_other_kinds: bool = False,
) -> Path:
    """Write one task's LoRA deltas as a PEFT LoRA adapter folder.

    Args:
        bank: the module bank holding LoRA sites.
        model: the model the bank is attached to (the backbone); adapter module names are relative to it.
        task_index: the task to export.
        folder: output folder (created); ``adapter_config.json`` and ``adapter_model.safetensors`` are written.
        base_model_name_or_path: recorded in the config; None: ``model.config.name_or_path`` when set.
        merge_slots: when the task uses several slots (sequential or simultaneous composition), write their exact
            sum as one LoRA of rank ``sum(r)`` instead of raising.
        skip_other_kinds: export only the LoRA part (with a warning) when the bank holds other kinds too, instead
            of raising.

    Returns:
        The folder written.

    Raises:
        ImportError: PEFT is not installed.
        ValueError: no LoRA sites, another kind in the bank (without ``skip_other_kinds``), a task that uses
            several slots (without ``merge_slots``), a task with no modules, or a model the bank is not attached to.
    """
    _require_peft()
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    from safetensors.torch import save_file

    lora, others = _split_kinds(bank, model)
    if not 0 <= task_index < bank.n_tasks:
        raise ValueError(f"task {task_index} has no modules (allocated: {bank.n_tasks})")
    if others:
        listing = ", ".join(f"{name} ({kind})" for name, kind in list(others.items())[:6])
        message = (
            f"the bank also holds kinds {sorted(set(others.values()))} at {len(others)} site(s) ({listing}); a PEFT "
            "LoRA adapter cannot carry them"
        )
        if not skip_other_kinds:
            raise ValueError(message + ": pass skip_other_kinds=True to export the LoRA part alone")
        warnings.warn(message + f"; exporting task {task_index}'s LoRA alone, which does not reproduce its outputs",
                      stacklevel=2)

    weights = bank.routing.router.weights(torch.tensor([task_index]), bank.n_tasks)[0]  # [K]
    slots = [k for k in range(bank.n_tasks) if float(weights[k]) != 0.0]
    if not slots:
        raise ValueError(f"task {task_index} routes to no slot under the bank's router")
    if slots != [task_index] or float(weights[task_index]) != 1.0:
        mode = bank.routing.mode or type(bank.routing.router).__name__
        if not merge_slots:
            raise ValueError(
                f"task {task_index} uses slots {slots} with weights {[round(float(weights[k]), 4) for k in slots]} "
                f"({mode} composition), which one PEFT LoRA adapter cannot hold as separate slots; pass "
                f"merge_slots=True to export their exact sum as one LoRA of rank {len(slots)} x r"
            )

    tensors: Dict[str, torch.Tensor] = {}
    ranks: Dict[str, int] = {}
    alphas: Dict[str, Union[int, float]] = {}
    for name, site in lora.items():
        delta = site.delta
        A = torch.cat([delta.lora_A[k].detach() for k in slots], dim=0)  # [n r, in]
        B = torch.cat([float(weights[k]) * delta.lora_B[k].detach() for k in slots], dim=1)  # [out, n r]
        tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = A.to("cpu").contiguous()
        tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = B.to("cpu").contiguous()
        ranks[name] = A.shape[0]
        alphas[name] = _number(delta.scale * A.shape[0])  # keeps lora_alpha / rank == alpha / r

    r, _ = Counter(ranks.values()).most_common(1)[0]
    alpha, _ = Counter(alphas.values()).most_common(1)[0]
    dropouts = {float(site.delta.dropout.p) for site in lora.values()}
    if len(dropouts) > 1:
        warnings.warn(f"LoRA sites use different dropouts {sorted(dropouts)}; PEFT takes one, {max(dropouts)}",
                      stacklevel=2)
    bases = [_innermost(site) for site in lora.values()]
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "name_or_path", None) or None

    def config_for(targets: List[str]) -> "LoraConfig":
        return LoraConfig(
            r=r,
            lora_alpha=alpha,
            lora_dropout=max(dropouts),
            target_modules=targets,
            rank_pattern={name: v for name, v in ranks.items() if v != r},
            alpha_pattern={name: v for name, v in alphas.items() if v != alpha},
            fan_in_fan_out=all(is_conv1d(b) for b in bases),
            bias="none",
            task_type="FEATURE_EXTRACTION",
            base_model_name_or_path=base_model_name_or_path,
            inference_mode=True,
        )

    # Short leaf names ("query", "value") when they select exactly these modules in PEFT's matching, else full names.
    plain = _plain_module_names(model)
    chosen = None
    for targets in (sorted({name.rpartition(".")[2] for name in lora}), sorted(lora)):
        config = config_for(targets)
        if {n for n in plain if check_target_module_exists(config, n)} == set(lora):
            chosen = config
            break
    if chosen is None:  # pragma: no cover - full names always select themselves
        raise ValueError(f"could not write target_modules that select exactly {sorted(lora)}")

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    chosen.save_pretrained(str(folder))
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return folder


# ---------------------------------------------------------------------------------------------------- import
def _read_config(folder: Path):
    from peft import LoraConfig

    if not folder.is_dir():
        raise FileNotFoundError(f"PEFT adapter folder not found: {folder}")
    config_path = folder / ADAPTER_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder}: no {ADAPTER_CONFIG}; not a PEFT adapter folder")
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path}: not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{config_path}: expected a JSON object")
    if raw.get("peft_type") != "LORA":
        raise ValueError(f"{config_path}: peft_type is {raw.get('peft_type')!r}; only 'LORA' adapters can be imported")
    for key, why in _UNSUPPORTED_FLAGS.items():
        if raw.get(key):
            raise ValueError(f"{config_path}: {key}={raw[key]!r} is not supported ({why}); the bank holds plain LoRA")
    if raw.get("bias", "none") != "none":
        raise ValueError(f"{config_path}: bias={raw['bias']!r} is not supported (LoRA biases); only 'none'")
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
        raise ValueError(
            f"{config_path}: init_lora_weights={init!r} rewrites the base weights, so the adapter is relative to a "
            "modified model; convert it to a plain LoRA with PEFT first (path_initial_model_for_weight_conversion)"
        )
    with warnings.catch_warnings():  # PEFT warns about configs written by other versions; the checks above decide
        warnings.simplefilter("ignore")
        return LoraConfig.from_pretrained(str(folder))


def import_peft_lora(bank: ModuleBank, model: nn.Module, folder: PathLike) -> int:
    """Load a PEFT LoRA adapter folder into the bank as the next task's slot.

    The bank must already have LoRA sites at exactly the modules the adapter targets (PEFT's matching of
    ``target_modules``, ``exclude_modules``, ``layers_to_transform`` applied to the unadapted module names), with
    the same rank and ``alpha / r`` at each. Every other kind in the bank gets its fresh (initial) slot.

    Args:
        bank: the module bank holding LoRA sites.
        model: the model the bank is attached to (the backbone the adapter was trained on).
        folder: a PEFT adapter folder with ``adapter_config.json`` and ``adapter_model.safetensors``.

    Returns:
        The index of the new task.

    Raises:
        ImportError: PEFT is not installed.
        FileNotFoundError: no folder, config or weights file.
        ValueError: a non-LoRA or unsupported adapter (DoRA, rsLoRA, biases, ...), only pickled weights, a target
            or rank mismatch (naming the module), a tensor of the wrong shape (naming the key).
        KeyError: tensors missing from or unexpected in the weights file (naming the keys).
    """
    _require_peft()
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key
    from safetensors.torch import load_file

    folder = Path(folder)
    config = _read_config(folder)
    weights_path = folder / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        if (folder / PICKLED_WEIGHTS).is_file():
            raise ValueError(
                f"{folder} holds only {PICKLED_WEIGHTS}, a pickle, which is never loaded here (unpickling runs "
                f"code); re-save the adapter with safetensors (PEFT's save_pretrained default) as {ADAPTER_WEIGHTS}"
            )
        raise FileNotFoundError(f"{folder}: no {ADAPTER_WEIGHTS}")

    lora, others = _split_kinds(bank, model)
    if isinstance(config.target_modules, str) and config.target_modules == "all-linear":
        raise ValueError(
            f"{folder}: target_modules='all-linear' is resolved by PEFT against the model it loads into; write the "
            "module names into adapter_config.json (PeftModel's peft_config after loading lists them)"
        )
    targeted = {name for name in _plain_module_names(model) if check_target_module_exists(config, name)}
    not_in_bank = sorted(targeted - set(lora))
    if not_in_bank:
        raise ValueError(
            f"{folder}: the adapter targets module(s) {not_in_bank[:6]} where the bank has no LoRA site "
            f"(target_modules={_targets(config)}; bank LoRA sites: {sorted(lora)[:6]})"
        )
    not_targeted = sorted(set(lora) - targeted)
    if not_targeted:
        raise ValueError(
            f"{folder}: the bank has LoRA sites at {not_targeted[:6]} that the adapter does not target "
            f"(target_modules={_targets(config)})"
        )

    rank_pattern, alpha_pattern = dict(config.rank_pattern or {}), dict(config.alpha_pattern or {})
    for name, site in lora.items():
        r_key, alpha_key = get_pattern_key(rank_pattern.keys(), name), get_pattern_key(alpha_pattern.keys(), name)
        r = rank_pattern.get(r_key, config.r)
        alpha = alpha_pattern.get(alpha_key, config.lora_alpha)
        r_source = f"rank_pattern[{r_key!r}]" if r_key in rank_pattern else "r"
        a_source = f"alpha_pattern[{alpha_key!r}]" if alpha_key in alpha_pattern else "lora_alpha"
        if r != site.delta.r:
            raise ValueError(
                f"{folder}: module {name!r} has rank {r} ({r_source}) but the bank's LoRA there has r={site.delta.r}"
            )
        if not math.isclose(alpha / r, site.delta.scale, rel_tol=1e-6):
            raise ValueError(
                f"{folder}: module {name!r} has lora_alpha {alpha} ({a_source}) over r={r}, scale {alpha / r:g}; the "
                f"bank's LoRA there has alpha={_alpha(site.delta):g}, scale {site.delta.scale:g}"
            )
        if float(config.lora_dropout) != float(site.delta.dropout.p):
            warnings.warn(
                f"{folder}: lora_dropout {config.lora_dropout} differs from the bank's {site.delta.dropout.p} at "
                f"{name!r} (outputs in eval mode are unaffected; training uses the bank's)",
                stacklevel=2,
            )

    state = load_file(str(weights_path))
    expected = {}
    for name, site in lora.items():
        d = site.delta
        expected[f"{KEY_PREFIX}{name}.lora_A.weight"] = (site, "lora_A", (d.r, d.in_features))
        expected[f"{KEY_PREFIX}{name}.lora_B.weight"] = (site, "lora_B", (d.out_features, d.r))
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing:
        raise KeyError(f"{weights_path}: missing tensor(s) {missing[:6]}")
    if unexpected:
        raise KeyError(f"{weights_path}: unexpected tensor(s) {unexpected[:6]} (only lora_A/lora_B of the targets)")
    for key, (_, _, shape) in expected.items():
        if tuple(state[key].shape) != shape:
            raise ValueError(f"{weights_path}: {key} has shape {tuple(state[key].shape)}, the bank expects {shape}")

    if bank.routing.mode != "isolated":
        warnings.warn(
            f"the bank's composition is {bank.routing.mode or type(bank.routing.router).__name__!r}: the imported "
            "task will also use other tasks' slots, so its outputs differ from the PEFT model's",
            stacklevel=2,
        )
    if others:
        warnings.warn(
            f"the bank also holds kinds {sorted(set(others.values()))}: the imported task gets their initial slots",
            stacklevel=2,
        )

    task = bank.n_tasks
    bank.add_task(task)
    with torch.no_grad():
        for key, (site, role, _) in expected.items():
            site.delta.slot_parameters(task)[role].copy_(state[key])
    return task
