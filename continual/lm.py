"""Continual language modelling: a causal LM learns a stream of text domains one after the other, either by adding
experts for each domain or by fine-tuning every weight. The experts mode is the extendability setting of ModuleFormer
(Shen et al. 2023, "ModuleFormer: Modularity Emerges from Mixture-of-Experts", arXiv 2306.04640): a new domain gets
new experts and new router rows in every expert layer, everything learnt before is frozen, and a load concentration
loss makes the domain settle on few experts. A dense causal LM (SmolLM2, any Llama-like or GPT-2 model) is upcycled
first (sparse upcycling, Komatsuzaki et al. 2023): every FFN becomes a routed expert layer whose shared expert is the
FFN itself, so the stream starts from the model's exact outputs, and only the added experts and their router rows
train (:class:`continual.models.upcycled_lm.UpcycledExpertsLM`).

Reads setup -> (pretrain) -> per domain: expand, train, evaluate every domain, log -> report.

A domain is one CL_Benchmark task folder; its sentences are split into training and held-back blocks before packing
(:func:`streams.text.build_text_blocks`). After domain ``i`` the held-back perplexity of every domain ``j`` fills
``P[i, j]`` (``[D, D]``; an ``initial`` row is measured before the stream). Lower is better, so forgetting is the
increase ``P[D-1, j] - P[j, j]`` for ``j < D-1`` and plasticity is ``P[j, j]``, the perplexity a domain reaches when
it is learnt. When a pretraining phase (or a list of general-domain tasks) is configured, the held-back perplexity of
that general text is tracked as well.

Run: ``continual lm CONFIG.yaml [key=value ...]`` (presets in ``configs/lm/``).
"""

from __future__ import annotations

import csv
import hashlib
import inspect
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from continual.config import ConfigError, TrackingConfig, flatten, merge_layers, read_layers, to_yaml
from continual.report import fresh_run_dir, new_figure
from continual.modules.experts import GATES, UPCYCLING

MODEL_KINDS = ("moduleformer", "causal_lm")
MODES = ("experts", "dense")
ROUTER_TRAINING = ("new", "all")
BYTE_TOKENIZER = "byte"


# ---------------------------------------------------------------------------------------------------- config
@dataclass
class LMModelConfig:
    # "moduleformer": a new native ModuleFormer of `size`; "causal_lm": any causal LM by `name` (a short name such as
    # "smollm2", a local folder, including a ModuleFormer written by save_pretrained, or a Hub id).
    kind: str = "moduleformer"
    # moduleformer: named size ("tiny", "small", "base"; see continual.models.moduleformer.SIZES).
    size: str = "small"
    # moduleformer: "byte" (UTF-8 bytes, ByT5's 384 ids, no files needed) or a backbone name or folder whose
    # tokenizer is used ("smollm2", "minilm", ...); the model's vocab_size follows the tokenizer.
    tokenizer: str = BYTE_TOKENIZER
    # causal_lm: short name, local folder or Hub id.
    name: str = "smollm2"
    # causal_lm: random weights from the model's config (tests, from-scratch baselines).
    random_init: bool = False
    # Overrides of the model config: ModuleFormerConfig arguments (moduleformer) or Hugging Face config attributes
    # (causal_lm), e.g. {n_layer: 2, d_model: 64}.
    config_overrides: Dict[str, Any] = field(default_factory=dict)


@dataclass
class LMDataConfig:
    # The stream: one CL_Benchmark task folder per domain ("agnews" or "TC/agnews"), learnt in this order.
    domains: List[str] = field(default_factory=lambda: ["agnews", "yelp", "dbpedia"])
    # CL_Benchmark root; empty: $CONTINUAL_DATA.
    data_root: Optional[str] = None
    # Split files read per task ("train", "test", "dev").
    splits: List[str] = field(default_factory=lambda: ["train"])
    # Tokens per block.
    block_size: int = 128
    # Share of each domain's sentences held back for evaluation (split before packing).
    heldout_fraction: float = 0.1
    # Sentences read per task (a seeded sample), None for all.
    max_sentences: Optional[int] = None
    # Held-back blocks evaluated per domain (the first ones), None for all.
    eval_blocks: Optional[int] = 64
    # Seed of the sentence shuffling and split.
    seed: int = 0


@dataclass
class LMPretrainConfig:
    # General-domain task folders: trained on (every weight) before the stream when `steps` > 0, and their held-back
    # perplexity is tracked after every domain. None of them may be a stream domain.
    tasks: List[str] = field(default_factory=list)
    # Pretraining steps (0: no pretraining phase; the general text is still evaluated when `tasks` is set).
    steps: int = 0
    # Peak learning rate of the pretraining phase.
    lr: float = 1.0e-3
    # Linear warm-up steps, then linear decay to zero at `steps`.
    warmup_steps: int = 0
    # Weight of ModuleFormer's mutual-information (load balancing) loss while pretraining.
    mi_loss_coef: float = 0.01


@dataclass
class LMExpansionConfig:
    # "experts": add experts for each domain and train only them; "dense": train every weight. A ModuleFormer grows
    # its own expert layers; any other causal LM (Llama/SmolLM2, Mistral, Qwen2, GPT-2) is upcycled first: every FFN
    # becomes a routed expert layer whose shared expert is the FFN itself (outputs unchanged), the dense weights stay
    # frozen, and each domain adds experts there (continual.models.upcycled_lm).
    mode: str = "experts"
    # experts: feed-forward experts added to every layer for each domain.
    experts_per_domain: int = 4
    # experts: attention experts added to every layer for each domain (ModuleFormer only; 0 for an upcycled LM).
    att_experts_per_domain: int = 0
    # experts: "new" trains only the new group's router rows; "all" also trains the earlier groups' router rows and
    # the routers' shared hidden layers (the earlier experts themselves stay frozen). Upcycled LM: the earlier
    # domains' rows, the FFN's own rows and an "mlp" gate's hidden layer; the dense weights stay frozen.
    train_router: str = "new"
    # experts: the first domain trains the whole model (no experts added) as the base the later domains extend; for
    # a model without pretraining. Upcycled LM: the first domain fine-tunes the dense LM, whose FFNs are the shared
    # experts of the later domains. False: every domain adds experts to the model as it is.
    first_domain_trains_base: bool = False
    # --- upcycling a causal LM without experts of its own (ignored by a ModuleFormer, whose k is in its config).
    # Experts per token: the top-k of one softmax over the shared expert(s) and every domain's experts (gates not
    # renormalised, no domain id). At most shared + experts_per_domain (1 + n for "copy", slices + n for "slices").
    top_k: int = 2
    # Hidden width of each new expert (W_in [d, h], W_out [h, d], no biases); 0: a quarter of the model width.
    expert_hidden: int = 0
    # Router logit a new expert starts with (its row's bias), against 0 for the FFN: at -4 the FFN keeps about 93%
    # of each token's probability when a domain's 4 experts switch on (W_out starts at 0), so training starts next
    # to the pretrained model; 0 starts new experts as likely as the FFN.
    start_logit: float = -4.0
    # The FFN as the shared expert(s): "copy" (the FFN itself) or "slices" (its hidden units cut into `slices` equal
    # experts; their router rows tie, so use top_k = slices + 1).
    upcycle: str = "copy"
    slices: int = 4
    # Router: "linear" (a row per expert over [x, 1]) or "mlp" (a fixed random GELU layer of gate_hidden units
    # first, frozen so that later domains never move earlier domains' routing).
    gate: str = "linear"
    gate_hidden: int = 64


@dataclass
class LMTrainingConfig:
    # Optimizer steps per domain.
    steps_per_domain: int = 200
    # Blocks per step (pretraining too).
    batch_size: int = 16
    # Peak learning rate on every domain.
    lr: float = 1.0e-3
    weight_decay: float = 0.0
    # Linear warm-up steps on each domain, then linear decay to zero at `steps_per_domain`.
    warmup_steps: int = 0
    # Gradient-norm clip (0 disables).
    max_grad_norm: float = 1.0
    # Weight of the mutual-information (load balancing) loss on stream domains (routed models: a ModuleFormer in
    # both modes, an upcycled LM in experts mode).
    mi_loss_coef: float = 0.0
    # Weight of the load concentration loss H(e) on stream domains (routed models, as for mi_loss_coef).
    concentration_loss_coef: float = 0.01
    eval_batch_size: int = 16
    # Log the mean training loss every this many steps.
    log_every: int = 10
    # "cpu", "cuda", "cuda:0" or "auto" (cuda when available).
    device: str = "auto"
    # CPU threads for torch (0: leave torch's default).
    threads: int = 0
    progress: bool = True


@dataclass
class LMConfig:
    model: LMModelConfig = field(default_factory=LMModelConfig)
    data: LMDataConfig = field(default_factory=LMDataConfig)
    pretrain: LMPretrainConfig = field(default_factory=LMPretrainConfig)
    expansion: LMExpansionConfig = field(default_factory=LMExpansionConfig)
    training: LMTrainingConfig = field(default_factory=LMTrainingConfig)
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(output_dir="outputs/lm"))
    seed: int = 0


def load_lm_config(
    path: str | Path | None = None, overrides: Sequence[str] = (), extra: Dict[str, Any] | None = None
) -> DictConfig:
    """A YAML file (optional), a dict and ``key=value`` overrides merged onto :class:`LMConfig` and checked.

    Returns:
        A read-only ``DictConfig``.

    Raises:
        ConfigError: unknown key, wrong type or out-of-range value, naming the full key path.
    """
    cfg = merge_layers(OmegaConf.structured(LMConfig), read_layers(path, overrides, extra))
    _check(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _check(cfg: DictConfig) -> None:
    """Value checks the schema cannot express; each failure names its key."""
    stream = {Path(d).name.lower() for d in cfg.data.domains}
    checks = [
        ("model.kind", cfg.model.kind in MODEL_KINDS, f"one of {list(MODEL_KINDS)}"),
        ("expansion.mode", cfg.expansion.mode in MODES, f"one of {list(MODES)}"),
        ("expansion.train_router", cfg.expansion.train_router in ROUTER_TRAINING, f"one of {list(ROUTER_TRAINING)}"),
        ("data.domains", len(cfg.data.domains) >= 1, "a list of at least one task folder"),
        ("data.domains", len(stream) == len(cfg.data.domains), "a list without repeated domains"),
        ("data.heldout_fraction", 0 < cfg.data.heldout_fraction < 1, "in (0, 1)"),
        ("data.max_sentences", cfg.data.max_sentences is None or cfg.data.max_sentences >= 1, ">= 1 or null"),
        ("data.eval_blocks", cfg.data.eval_blocks is None or cfg.data.eval_blocks >= 1, ">= 1 or null"),
        ("pretrain.tasks", not ({Path(t).name.lower() for t in cfg.pretrain.tasks} & stream),
         "disjoint from data.domains (a domain's held-back text must not be pretrained on)"),
        ("pretrain.tasks", cfg.pretrain.steps == 0 or len(cfg.pretrain.tasks) > 0,
         "a non-empty list when pretrain.steps > 0"),
        ("expansion.experts_per_domain",
         cfg.expansion.mode == "dense" or cfg.expansion.experts_per_domain + cfg.expansion.att_experts_per_domain >= 1,
         "such that experts_per_domain + att_experts_per_domain >= 1 in experts mode"),
        ("expansion.upcycle", cfg.expansion.upcycle in UPCYCLING, f"one of {list(UPCYCLING)}"),
        ("expansion.gate", cfg.expansion.gate in GATES, f"one of {list(GATES)}"),
        ("expansion.slices", cfg.expansion.slices >= 2, ">= 2"),
    ]
    if cfg.model.kind == "causal_lm" and cfg.expansion.mode == "experts":  # upcycled (unless it is a ModuleFormer)
        x = cfg.expansion
        most = (1 if x.upcycle == "copy" else x.slices) + x.experts_per_domain
        checks.append(("expansion.top_k", x.top_k <= most,
                       f"at most the shared expert(s) + experts_per_domain = {most} (upcycle={x.upcycle})"))
    at_least_one = ("data.block_size", "training.steps_per_domain", "training.batch_size", "training.eval_batch_size",
                    "training.log_every", "expansion.top_k", "expansion.gate_hidden")
    checks += [(key, OmegaConf.select(cfg, key) >= 1, ">= 1") for key in at_least_one]
    not_negative = ("pretrain.steps", "pretrain.warmup_steps", "pretrain.mi_loss_coef", "training.warmup_steps",
                    "training.weight_decay", "training.max_grad_norm", "training.mi_loss_coef",
                    "training.concentration_loss_coef", "training.threads", "expansion.experts_per_domain",
                    "expansion.att_experts_per_domain", "expansion.expert_hidden")
    checks += [(key, OmegaConf.select(cfg, key) >= 0, ">= 0") for key in not_negative]
    checks += [(key, OmegaConf.select(cfg, key) > 0, "> 0") for key in ("training.lr", "pretrain.lr")]
    for key, ok, need in checks:
        if not ok:
            raise ConfigError(f"{key}: must be {need}, got {OmegaConf.select(cfg, key)!r}")
    if cfg.model.kind == "moduleformer":
        _check_moduleformer_overrides(cfg.model.size, OmegaConf.to_container(cfg.model.config_overrides))


def _check_moduleformer_overrides(size: str, overrides: Dict[str, Any]) -> None:
    """Fail on a misspelt or invalid ModuleFormerConfig override now, before any data or model is loaded."""
    from continual.models.moduleformer import ModuleFormerConfig

    known = set(inspect.signature(ModuleFormerConfig.__init__).parameters) - {"self", "kwargs"}
    for key in overrides:
        if key not in known:
            raise ConfigError(f"model.config_overrides.{key}: not a ModuleFormerConfig argument; known: {sorted(known)}")
    try:
        ModuleFormerConfig.from_size(size, **overrides)
    except ValueError as err:
        key = "model.size" if "unknown ModuleFormer size" in str(err) else "model.config_overrides"
        raise ConfigError(f"{key}: {err}") from None


# ---------------------------------------------------------------------------------------------------- models
@runtime_checkable
class ExpandableLM(Protocol):
    """A causal LM that can grow groups of routed experts (``ModuleFormerForCausalLM``, ``UpcycledExpertsLM``)."""

    def add_experts(self, n: int, n_att: int = 0, enabled: bool = True) -> int: ...

    def expert_group_parameters(self, group: int) -> Dict[str, nn.Parameter]: ...

    def expert_layers(self) -> Dict[str, nn.Module]: ...

    def set_expert_group_enabled(self, group: int, enabled: bool) -> None: ...


def load_tokenizer(name: str):
    """``"byte"`` (a ByT5 byte tokenizer, built without files) or the tokenizer of a backbone name or folder."""
    if name == BYTE_TOKENIZER:
        from transformers import ByT5Tokenizer

        return ByT5Tokenizer()
    from continual.models.backbone import _load_tokenizer, resolve_backbone

    return _load_tokenizer(name, resolve_backbone(name), trust_remote_code=False)


def build_lm(model_cfg: DictConfig | LMModelConfig) -> Tuple[nn.Module, Any]:
    """The model and tokenizer a config describes (see :class:`LMModelConfig`), in eval mode.

    Raises:
        BackboneError: a causal LM or tokenizer that cannot be found (offline, unknown name).
    """
    overrides = dict(model_cfg.config_overrides)
    if model_cfg.kind == "causal_lm":
        import continual.models.moduleformer  # noqa: F401  (registers ModuleFormer folders with the Auto classes)
        from continual.models.backbone import load_causal_lm

        return load_causal_lm(model_cfg.name, random_init=model_cfg.random_init, config_overrides=overrides)
    from continual.models.moduleformer import ModuleFormerConfig, ModuleFormerForCausalLM

    tokenizer = load_tokenizer(model_cfg.tokenizer)
    config = ModuleFormerConfig.from_size(model_cfg.size, **{"vocab_size": len(tokenizer), **overrides})
    if config.vocab_size < len(tokenizer):
        raise ConfigError(
            f"model.config_overrides.vocab_size: {config.vocab_size} is smaller than the tokenizer's {len(tokenizer)} ids"
        )
    return ModuleFormerForCausalLM(config).eval(), tokenizer


def upcycled_lm(model: nn.Module, x: DictConfig | LMExpansionConfig) -> nn.Module:
    """Experts mode on a causal LM without experts: the model upcycled (FFNs turned into expert sites, in place) and
    wrapped as an :class:`ExpandableLM` with ``x``'s options (see :class:`LMExpansionConfig`).

    Raises:
        ConfigError: attention experts asked for, or an architecture that cannot be upcycled (naming the key).
    """
    from continual.models.upcycled_lm import UpcycledExpertsLM

    name = type(model).__name__
    if x.att_experts_per_domain:
        raise ConfigError(f"expansion.att_experts_per_domain: must be 0 for an upcycled {name} (feed-forward experts "
                          f"only), got {x.att_experts_per_domain}")
    try:
        return UpcycledExpertsLM(model, n=x.experts_per_domain, k=x.top_k, expert_hidden=x.expert_hidden, gate=x.gate,
                                 gate_hidden=x.gate_hidden, upcycle=x.upcycle, slices=x.slices, start_logit=x.start_logit)
    except ValueError as err:
        if "slices" in str(err):  # the one option that depends on the model: slices must divide its FFN width
            raise ConfigError(f"expansion.slices: cannot upcycle {name}: {err}") from None
        raise ConfigError(f"expansion.mode=experts: {name} has no experts to add and cannot be upcycled ({err}); "
                          + _EXPERTS_HINT) from None


def expert_router_parameters(model: ExpandableLM) -> List[nn.Parameter]:
    """Every router row of every group, and the routers' shared hidden layers, in every expert layer."""
    params: List[nn.Parameter] = []
    for layer in model.expert_layers().values():
        params += [group.router for group in layer.groups]
        if layer.gate is not None:
            params += list(layer.gate.parameters())
    return params


def set_expert_group_enabled(model: ExpandableLM, group: int, enabled: bool) -> None:
    """Switch one group of experts on or off in every expert layer (off: never selected, outputs as without it)."""
    model.set_expert_group_enabled(group, enabled)


@torch.no_grad()
def group_shares(model: ExpandableLM) -> np.ndarray:
    """``[G]`` share of the counted token-to-expert selections that went to each expert group, pooled over every
    expert layer (attention and FFN), since the usage counters were last reset."""
    layers = list(model.expert_layers().values())
    totals = np.zeros(max(layer.n_groups for layer in layers))
    for layer in layers:
        counts = layer.usage().counts
        for g in range(layer.n_groups):
            totals[g] += float(counts[layer.group_slice(g)].sum())
    return totals / max(totals.sum(), 1.0)


def weights_checksum(model: nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of every tensor of the state dict, to show two runs start from the same weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def count(params) -> int:
    """Distinct parameters' elements (a tied weight counts once)."""
    return sum(p.numel() for p in {id(p): p for p in params}.values())


# ---------------------------------------------------------------------------------------------------- math
def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: ``logits [B, T, V]`` at positions ``0..T-2`` against ``input_ids [B, T]`` at ``1..T-1``."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), input_ids[:, 1:].reshape(-1))


def training_objective(out, input_ids: torch.Tensor, mi_coef: float, concentration_coef: float) -> torch.Tensor:
    """Next-token loss plus the routing losses that a routed model's output carries (a ModuleFormer's, an upcycled
    LM's once its experts are on; others have none).

    Args:
        out: the model's output for ``input_ids [B, T]`` (``logits``; ``mi_loss``/``concentration_loss`` if routed).
        mi_coef: weight of the mutual-information loss ``H(e|x) - H(e)``.
        concentration_coef: weight of the load concentration loss ``H(e)``.
    """
    loss = next_token_loss(out.logits, input_ids)
    if getattr(out, "mi_loss", None) is not None and mi_coef:
        loss = loss + mi_coef * out.mi_loss
    if getattr(out, "concentration_loss", None) is not None and concentration_coef:
        loss = loss + concentration_coef * out.concentration_loss
    return loss


def perplexity_forgetting(matrix: np.ndarray) -> np.ndarray:
    """``[D-1]`` increase of perplexity on each earlier domain by the end: ``P[D-1, j] - P[j, j]`` (positive = forgot)."""
    p = np.asarray(matrix, dtype=float)
    idx = np.arange(p.shape[0] - 1)
    return p[-1, idx] - p[idx, idx]


def plasticity(matrix: np.ndarray) -> np.ndarray:
    """``[D]`` perplexity each domain reaches right after it is learnt: ``P[j, j]``."""
    return np.diag(np.asarray(matrix, dtype=float)).copy()


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then linear decay to zero at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (steps - step) / max(steps - warmup, 1))


# ---------------------------------------------------------------------------------------------------- train / evaluate
@torch.no_grad()
def perplexity(model: nn.Module, blocks: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """Held-back perplexity ``exp(mean next-token loss)`` over ``[N, T]`` blocks (every block weighs the same)."""
    model.eval()
    total = 0.0
    for start in range(0, blocks.shape[0], batch_size):
        batch = blocks[start:start + batch_size].to(device)
        total += float(next_token_loss(model(input_ids=batch).logits, batch)) * batch.shape[0]
    return math.exp(total / max(blocks.shape[0], 1))


def train_on_blocks(
    model: nn.Module,
    params: List[nn.Parameter],
    blocks: torch.Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    max_grad_norm: float = 1.0,
    mi_coef: float = 0.0,
    concentration_coef: float = 0.0,
    device: torch.device | str = "cpu",
    seed: int = 0,
    desc: str = "train",
    progress: bool = True,
    on_log: Optional[Callable[[int, Dict[str, float]], None]] = None,
    log_every: int = 10,
) -> List[float]:
    """Train ``params`` (only them: the caller froze the rest) with AdamW for ``steps`` steps on ``blocks [N, T]``.

    Blocks are drawn in a seeded random order, reshuffled each pass. ``on_log(step, {"loss", "lr"})`` gets the mean
    objective of the last ``log_every`` steps.

    Returns:
        The objective of every step.

    Raises:
        RuntimeError: the objective became NaN or infinite (names the phase and step).
    """
    from tqdm.auto import tqdm

    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps, warmup_steps))
    generator = torch.Generator().manual_seed(seed)
    order: List[int] = []
    losses: List[float] = []
    model.train()
    for step in tqdm(range(steps), desc=desc, unit="step", disable=not progress, leave=False):
        if len(order) < batch_size:
            order += torch.randperm(blocks.shape[0], generator=generator).tolist()
        batch = blocks[torch.tensor(order[:batch_size])].to(device)
        order = order[batch_size:]
        loss = training_objective(model(input_ids=batch), batch, mi_coef, concentration_coef)
        if not torch.isfinite(loss):
            raise RuntimeError(f"{desc}: the training loss became {float(loss)} at step {step}; lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if on_log is not None and (step + 1) % log_every == 0:
            on_log(step + 1, {"loss": sum(losses[-log_every:]) / log_every, "lr": schedule.get_last_lr()[0]})
    model.eval()
    return losses


_EXPERTS_HINT = ("use a ModuleFormer (model.kind=moduleformer, or a saved ModuleFormer folder), a Llama-like or GPT-2 "
                 "causal LM (upcycled), or expansion.mode=dense")


def domain_parameters(model: nn.Module, expand: bool, n: int, n_att: int,
                      train_router: str) -> Tuple[Optional[int], List[nn.Parameter], int]:
    """What a domain trains: ``(new expert group or None, parameters to train, parameters added)``.

    ``expand`` False (dense mode, or the base domain) trains every weight; True appends ``n`` FFN and ``n_att``
    attention experts to every expert layer and trains only them (plus every router with ``train_router="all"``).
    """
    if not expand:
        return None, list(model.parameters()), 0
    if not isinstance(model, ExpandableLM):
        raise ConfigError(f"expansion.mode=experts: {type(model).__name__} has no experts to add; " + _EXPERTS_HINT)
    group = model.add_experts(n, n_att=n_att)
    params = list(model.expert_group_parameters(group).values())
    added = count(params)
    if train_router == "all":
        params += expert_router_parameters(model)
    return group, params, added


# ---------------------------------------------------------------------------------------------------- results
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
    output_dir: Optional[Path] = None
    run_id: Optional[str] = None

    @property
    def forgetting(self) -> np.ndarray:
        return perplexity_forgetting(self.matrix)

    @property
    def plasticity(self) -> np.ndarray:
        return plasticity(self.matrix)

    def summary(self) -> Dict[str, float]:
        """Stream-level numbers: mean forgetting (NaN for one domain), mean plasticity, mean final perplexity."""
        forgetting = self.forgetting
        return {
            "mean_forgetting": float(forgetting.mean()) if forgetting.size else float("nan"),
            "mean_plasticity": float(self.plasticity.mean()),
            "mean_final_ppl": float(self.matrix[-1].mean()),
            **({"final_general_ppl": float(self.general[-1])} if self.general is not None else {}),
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
        }


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
        share = [["routing share (end)"] + [f"group {g}" for g in range(result.group_share.shape[1])]]
        share += [[name] + [f"{v:.3f}" for v in row] for name, row in zip(result.domains, result.group_share)]
        lines += [""] + _grid(share)
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


# ---------------------------------------------------------------------------------------------------- recipe
def text_blocks(cfg: DictConfig, tokenizer, tasks: Sequence[str]):
    """Training and held-back blocks of some task folders, cut as ``cfg.data`` says (:func:`streams.text.build_text_blocks`)."""
    from streams.text import build_text_blocks

    d = cfg.data
    return build_text_blocks(list(tasks), tokenizer, block_size=d.block_size, heldout_fraction=d.heldout_fraction,
                             seed=d.seed, data_root=d.data_root, splits=list(d.splits), max_sentences=d.max_sentences)


def pretrain(model: nn.Module, blocks: torch.Tensor, cfg: DictConfig, device: torch.device,
             on_log: Optional[Callable[[int, Dict[str, float]], None]] = None) -> List[float]:
    """The pretraining phase: every weight, ``cfg.pretrain.steps`` steps on general-text blocks ``[N, T]``."""
    from continual.expansion import set_trainable

    p, t = cfg.pretrain, cfg.training
    return train_on_blocks(
        model, set_trainable(model, model.parameters()), blocks, p.steps, t.batch_size, p.lr, t.weight_decay,
        p.warmup_steps, t.max_grad_norm, p.mi_loss_coef, 0.0, device, seed=cfg.seed, desc="pretrain",
        progress=t.progress, on_log=on_log, log_every=t.log_every,
    )


def default_lm_names(cfg: DictConfig) -> Tuple[str, str]:
    """(experiment, run name): ``lm-<domains>`` and ``<mode>-<model>-seed<seed>``."""
    experiment = cfg.tracking.experiment or "lm-" + "-".join(Path(d).name for d in cfg.data.domains)
    model = f"moduleformer-{cfg.model.size}" if cfg.model.kind == "moduleformer" else Path(cfg.model.name).name
    return experiment, cfg.tracking.run_name or f"{cfg.expansion.mode}-{model}-seed{cfg.seed}"


def run_continual_lm(
    cfg: DictConfig,
    echo: Callable[[str], None] = print,
    model: Optional[nn.Module] = None,
    tokenizer=None,
    after_domain: Optional[Callable[[int, nn.Module], None]] = None,
) -> LMResult:
    """Setup -> (pretrain) -> per domain: expand, train, evaluate every domain, log -> report; tracked in MLflow.

    Args:
        cfg: a config from :func:`load_lm_config`.
        echo: where progress lines and the final table go.
        model, tokenizer: start from this model instead of building ``cfg.model`` (the pretraining phase still runs
            when ``cfg.pretrain.steps > 0``). The model is trained in place; in experts mode a model without experts
            is upcycled in place and wrapped (:func:`upcycled_lm`), and ``after_domain`` gets the wrapper.
        after_domain: called with ``(domain index, model)`` after each domain is learnt and evaluated.

    Returns:
        The :class:`LMResult`; artifacts are under ``result.output_dir``.
    """
    from tqdm.auto import tqdm

    from continual.expansion import resolve_device, set_trainable
    from continual.runner import seed_everything
    from continual.tracking import ExperimentTracker

    # ---------------------------------------------------------------- setup
    seed_everything(cfg.seed)
    if cfg.training.threads:
        torch.set_num_threads(cfg.training.threads)
    device = resolve_device(cfg.training.device)
    if (model is None) != (tokenizer is None):
        raise ValueError("pass both model and tokenizer, or neither")
    if model is None:
        model, tokenizer = build_lm(cfg.model)
    d, t, x = cfg.data, cfg.training, cfg.expansion
    if x.mode == "experts" and not isinstance(model, ExpandableLM):
        model = upcycled_lm(model, x)  # outputs unchanged until the first domain's experts switch on
    model = model.to(device).eval()
    routed = x.mode == "experts" and hasattr(model, "record_expert_usage")  # track which groups each domain uses
    cap = lambda blocks: blocks[: d.eval_blocks] if d.eval_blocks else blocks
    domains = [Path(name).name for name in d.domains]
    data = [text_blocks(cfg, tokenizer, [name])
            for name in tqdm(d.domains, desc="reading domains", unit="domain", disable=not t.progress, leave=False)]
    heldout = [cap(blocks.heldout) for blocks in data]
    general = text_blocks(cfg, tokenizer, cfg.pretrain.tasks) if cfg.pretrain.tasks else None
    D = len(domains)
    result = LMResult(domains, x.mode, np.full((D, D), np.nan), np.full(D, np.nan),
                      None if general is None else np.full(D + 1, np.nan))
    experiment, run_name = default_lm_names(cfg)
    output_dir = fresh_run_dir(Path(cfg.tracking.output_dir) / experiment, run_name)
    run_name = output_dir.name  # suffixed when an earlier run's artifacts are there: never overwritten
    (output_dir / "config.yaml").write_text(to_yaml(cfg))
    step = 0  # global training step over every phase, for the training-loss curves

    def evaluate_row() -> Tuple[np.ndarray, Optional[float]]:
        """Held-back perplexity of every domain (and of the general text); in experts mode also the expert groups
        each domain's tokens are routed to (``result.group_share``, kept from the latest row)."""
        row, shares = [], []
        for blocks in heldout:
            if routed:
                model.reset_expert_usage()
                model.record_expert_usage(True)
            row.append(perplexity(model, blocks, t.eval_batch_size, device))
            if routed:
                shares.append(group_shares(model))
                model.record_expert_usage(False)
        if routed:
            result.group_share = np.stack(shares)
        return np.array(row), None if general is None else perplexity(model, cap(general.heldout), t.eval_batch_size, device)

    def logger(tracker, start: int) -> Callable[[int, Dict[str, float]], None]:
        return lambda s, metrics: tracker.log_metrics({f"train/{k}": v for k, v in metrics.items()}, step=start + s)

    def finish(tracker) -> None:
        """Write and upload every artifact of what has been measured so far (also after a failure)."""
        if np.isfinite(result.matrix).any():
            tracker.log_metrics({f"final/{k}": v for k, v in result.summary().items()}, step=D - 1)
            tracker.log_metrics({f"final/forgetting/{n}": v for n, v in zip(domains, result.forgetting)}, step=D - 1)
            tracker.log_metrics({f"final/plasticity/{n}": v for n, v in zip(domains, result.plasticity)}, step=D - 1)
        save_perplexity_csv(result, output_dir / "perplexity_matrix.csv")
        if np.isfinite(result.matrix).all():
            plot_perplexity_matrix(result, output_dir / "perplexity_matrix.png")
        (output_dir / "summary.json").write_text(json.dumps(
            {**result.to_dict(), "config": flatten(cfg), "run_id": tracker.run_id}, indent=2, default=str) + "\n")
        for path in sorted(output_dir.iterdir()):
            tracker.log_artifact(path)

    tags = {"recipe": "lm", "mode": x.mode, "model": cfg.model.kind if cfg.model.kind == "moduleformer" else cfg.model.name}
    with ExperimentTracker(experiment, run_name, uri=cfg.tracking.uri, enabled=cfg.tracking.enabled, tags=tags) as tracker:
        tracker.log_params(flatten(cfg))
        tracker.log_text(to_yaml(cfg), "config.yaml")
        echo(f"{experiment} / {run_name}: {D} domains ({', '.join(domains)}), {x.mode} mode, "
             f"{count(model.parameters()):,} parameters on {device}; {tracker.describe()}")
        try:
            if cfg.pretrain.steps:
                pretrain(model, general.train, cfg, device, on_log=logger(tracker, 0))
                step = cfg.pretrain.steps
            result.start_checksum = weights_checksum(model)
            tracker.log_params({"start_checksum": result.start_checksum})
            result.initial[:], first_general = evaluate_row()
            if general is not None:
                result.general[0] = first_general
            tracker.log_metrics({**{f"initial_ppl/{n}": v for n, v in zip(domains, result.initial)},
                                 **({"initial_ppl/general": first_general} if general is not None else {})}, step=0)

            # ---------------------------------------------------------------- the stream
            for i, (name, blocks) in enumerate(zip(domains, data)):
                expand = x.mode == "experts" and not (i == 0 and x.first_domain_trains_base)
                group, params, added = domain_parameters(
                    model, expand, x.experts_per_domain, x.att_experts_per_domain, x.train_router
                )
                clock = time.perf_counter()
                losses = train_on_blocks(
                    model, set_trainable(model, params), blocks.train, t.steps_per_domain, t.batch_size, t.lr,
                    t.weight_decay, t.warmup_steps, t.max_grad_norm, t.mi_loss_coef, t.concentration_loss_coef,
                    device, seed=cfg.seed + 1 + i, desc=f"domain {name}", progress=t.progress,
                    on_log=logger(tracker, step), log_every=t.log_every,
                )
                wall = time.perf_counter() - clock
                step += t.steps_per_domain
                result.matrix[i], general_ppl = evaluate_row()
                if general is not None:
                    result.general[i + 1] = general_ppl
                record = DomainRecord(
                    name, group, added, count(params), count(model.parameters()),
                    sum(losses[-t.log_every:]) / len(losses[-t.log_every:]), wall,
                )
                result.records.append(record)
                tracker.log_metrics({
                    **{f"ppl/{n}": v for n, v in zip(domains, result.matrix[i])},
                    **({"ppl/general": general_ppl} if general is not None else {}),
                    "ppl/mean_seen": float(result.matrix[i, : i + 1].mean()),
                    "added_parameters": added, "trainable_parameters": record.trainable_parameters,
                    "total_parameters": record.total_parameters, "domain_train_loss": record.train_loss,
                    "wall_time_s": wall,
                    **({f"routing_share/{n}/group{g}": v for n, row in zip(domains, result.group_share)
                        for g, v in enumerate(row)} if routed else {}),
                }, step=i)
                echo(f"after {name}: " + "  ".join(f"{n} {v:.3f}" for n, v in zip(domains, result.matrix[i]))
                     + (f"  general {general_ppl:.3f}" if general is not None else ""))
                if after_domain is not None:
                    after_domain(i, model)
        except BaseException:
            finish(tracker)
            raise
        finish(tracker)
        result.run_id = tracker.run_id
    result.output_dir = output_dir
    echo(format_lm_table(result))
    echo(f"artifacts: {output_dir}")
    return result
