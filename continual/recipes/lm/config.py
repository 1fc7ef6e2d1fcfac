"""Configuration of the continual language-modelling recipe: the typed schema (one dataclass per node, a comment per
field) and the value checks it cannot express, each failure naming its key.

Run: ``continual lm CONFIG.yaml [key=value ...]`` (presets in ``configs/lm/``).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from continual.config import (
    ConfigError,
    RouterConfig,
    TrackingConfig,
    check_tracking_names,
    chosen_name,
    merge_layers,
    read_layers,
)
from continual.modules.experts import GATES, UPCYCLING
from continual.training import TextDataConfig

MODEL_KINDS = ("moduleformer", "causal_lm")
MODES = ("experts", "dense")
ROUTER_TRAINING = ("new", "all")
BYTE_TOKENIZER = "byte"
# router.name values of the LM recipe itself; any other name is a registered feature router (continual.modules.routers).
ROUTER_NONE, ROUTER_ORACLE = "none", "oracle"


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
class LMDataConfig(TextDataConfig):
    """How each domain's text is read and cut (the fields of :class:`TextDataConfig`), plus the stream itself."""

    # The stream: one CL_Benchmark task folder per domain ("agnews" or "TC/agnews"), learnt in this order.
    domains: List[str] = field(default_factory=lambda: ["agnews", "yelp", "dbpedia"])
    # Held-back blocks evaluated per domain (the first ones), None for all.
    eval_blocks: Optional[int] = 64


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
class LMRouterConfig(RouterConfig):
    """Which expert groups the tokens of a sequence may route to (experts mode); see ``continual.recipes.lm.routing``.

    - ``none`` (the default, the extendability setting as published): every token chooses its top-k over the shared
      experts and every domain's, ungated, with no domain id.
    - ``oracle``: each sequence routes to the shared group(s) and its own domain's group only, the domain id given
      in training and at evaluation (the bound a domain router can reach).
    - a registered feature router (``prototype``, ``keys``; ``continual list``): the same restriction, the domain id
      given while a domain trains and inferred from each held-back sequence's text at evaluation.
    """

    name: str = ROUTER_NONE


@dataclass
class LMFeatureRouterOptions(LMRouterConfig):
    """What the LM recipe adds to a feature router's own options (its typed config, e.g. ``PrototypeConfig``)."""

    # Training blocks of each domain the router's statistics are fitted on after the domain is learnt (the first
    # ones: a seeded sample of its sentences); null: every training block.
    fit_blocks: Optional[int] = 256


@functools.lru_cache(maxsize=None)
def _feature_router_schema(config: type) -> type:
    return make_dataclass(f"LM{config.__name__}", [], bases=(config, LMFeatureRouterOptions))


def lm_router_names() -> List[str]:
    """The ``router.name`` values ``continual lm`` takes: ``none``, ``oracle`` and every registered feature router."""
    from continual.modules.routers import router_names, router_spec

    names = [n for n in router_names() if n != ROUTER_ORACLE and router_spec(n).needs_features]
    return [ROUTER_NONE, ROUTER_ORACLE] + names


def lm_router_schema(name: str) -> type:
    """The typed schema of the ``router`` node for ``router.name=name``.

    Raises:
        KeyError: a name ``continual lm`` cannot route with, listing the ones it can.
    """
    if name in (ROUTER_NONE, ROUTER_ORACLE):
        return LMRouterConfig
    from continual.modules.routers import router_spec

    if name in lm_router_names():
        return _feature_router_schema(router_spec(name).config)
    raise KeyError(f"{name!r} is not a router continual lm can use (a domain is inferred from hidden-state features "
                   f"of the sequence); one of {lm_router_names()}")


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
    # Typed by router.name: LMRouterConfig for none/oracle, else the feature router's options + fit_blocks.
    router: LMRouterConfig = field(default_factory=LMRouterConfig)
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
    layers = read_layers(path, overrides, extra)
    schema = OmegaConf.structured(LMConfig)
    try:  # the router's name decides its node's schema, so find it before merging
        schema.router = OmegaConf.structured(lm_router_schema(chosen_name(layers, "router", ROUTER_NONE)))
    except KeyError as err:
        raise ConfigError(f"router.name: {err.args[0]}") from None
    cfg = merge_layers(schema, layers)
    _check(cfg)
    check_tracking_names(cfg.tracking)
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
    _check_router(cfg)
    if cfg.model.kind == "moduleformer":
        _check_moduleformer_overrides(cfg.model.size, OmegaConf.to_container(cfg.model.config_overrides))


def _check_router(cfg: DictConfig) -> None:
    """The router's options, and what it needs of the rest of the config; builds the router once to check its own."""
    r = cfg.router
    if r.name == ROUTER_NONE:
        return
    if cfg.expansion.mode != "experts":
        raise ConfigError(f"router.name: {r.name} routes each sequence to its domain's experts and needs "
                          f"expansion.mode=experts, got {cfg.expansion.mode!r}")
    if r.name == ROUTER_ORACLE:
        return
    if cfg.expansion.train_router != "new":
        raise ConfigError(f"expansion.train_router: must be 'new' with router.name={r.name}: 'all' trains the routers' "
                          "shared layers, so the shared part's hidden states the domain statistics were fitted on "
                          "would move after they are frozen")
    checks = [
        ("router.top_k", getattr(r, "top_k", 1) >= 1, ">= 1"),
        ("router.temperature", getattr(r, "temperature", 1.0) == 1.0,
         "1.0: continual lm does not weigh domains (a sequence may use the union of its top_k domains' groups, and "
         "the expert gate weighs the experts)"),
        ("router.fit_blocks", r.fit_blocks is None or r.fit_blocks >= 1, ">= 1 or null"),
    ]
    for key, ok, need in checks:
        if not ok:
            raise ConfigError(f"{key}: must be {need}, got {OmegaConf.select(cfg, key)!r}")
    from continual.modules.routers import build_router

    try:
        build_router(r.name, **lm_router_options(r))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"router: {err}") from None


def lm_router_options(node) -> Dict[str, Any]:
    """A feature router's ``router`` node -> its factory's keyword arguments (what the recipe applies left out)."""
    from continual.modules.routers import router_options

    return {k: v for k, v in router_options(node).items() if k not in ("fit_blocks",)}


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
