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

With a domain router (``router.name`` other than ``none``; :mod:`continual.recipes.lm.routing`) each sequence's tokens
route only to the shared expert group(s) and one domain's group: its own while the domain trains, the one the router
infers from its text at evaluation. The router's statistics for a domain are fitted after the domain is learnt and
frozen; each row also measures how much of each domain's expert routing reaches its own group and how many of its
held-back sequences were routed to it.

Run: ``continual lm CONFIG.yaml [key=value ...]`` (presets in ``configs/lm/``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from continual.config import flatten, to_yaml
from continual.recipes.lm.model import (
    ExpandableLM,
    build_lm,
    count,
    domain_parameters,
    group_shares,
    upcycled_lm,
    weights_checksum,
)
from continual.recipes.lm.objective import block_objective
from continual.recipes.lm.results import (
    DomainRecord,
    LMResult,
    format_lm_table,
    own_group_share,
    plot_perplexity_matrix,
    routing_accuracy,
    routing_confusion,
    save_perplexity_csv,
)
from continual.recipes.lm.routing import NO_DOMAIN, make_domain_router, routed_perplexity
from continual.training import (
    artifacts_on_failure,
    open_run_dir,
    perplexity,
    resolve_device,
    seed_everything,
    set_trainable,
    text_blocks,
    train_on_blocks,
)


def pretrain(model: nn.Module, blocks: torch.Tensor, cfg: DictConfig, device: torch.device,
             on_log: Optional[Callable[[int, Dict[str, float]], None]] = None) -> List[float]:
    """The pretraining phase: every weight, ``cfg.pretrain.steps`` steps on general-text blocks ``[N, T]``."""
    p, t = cfg.pretrain, cfg.training
    return train_on_blocks(
        model, set_trainable(model, model.parameters()), blocks, block_objective(p.mi_loss_coef, 0.0), p.steps,
        t.batch_size, p.lr, t.weight_decay, p.warmup_steps, t.max_grad_norm, device, seed=cfg.seed, desc="pretrain",
        progress=t.progress, on_log=on_log, log_every=t.log_every,
    )


def default_lm_names(cfg: DictConfig) -> Tuple[str, str]:
    """(experiment, run name): ``lm-<domains>`` and ``<mode>-<model>[-<router>]-seed<seed>`` (the router unless
    ``none``)."""
    experiment = cfg.tracking.experiment or "lm-" + "-".join(Path(d).name for d in cfg.data.domains)
    model = f"moduleformer-{cfg.model.size}" if cfg.model.kind == "moduleformer" else Path(cfg.model.name).name
    router = "" if cfg.router.name == "none" else f"-{cfg.router.name}"
    return experiment, cfg.tracking.run_name or f"{cfg.expansion.mode}-{model}{router}-seed{cfg.seed}"


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
    # Which groups a sequence may use: None, every group (router.name=none); else its domain's and the shared ones.
    domain_router = make_domain_router(cfg.router, model) if x.mode == "experts" else None
    cap = lambda blocks: blocks[: d.eval_blocks] if d.eval_blocks else blocks
    domains = [Path(name).name for name in d.domains]
    data = [text_blocks(d, tokenizer, [name])
            for name in tqdm(d.domains, desc="reading domains", unit="domain", disable=not t.progress, leave=False)]
    heldout = [cap(blocks.heldout) for blocks in data]
    general = text_blocks(d, tokenizer, cfg.pretrain.tasks) if cfg.pretrain.tasks else None
    D = len(domains)
    result = LMResult(domains, x.mode, np.full((D, D), np.nan), np.full(D, np.nan),
                      None if general is None else np.full(D + 1, np.nan), router=cfg.router.name)
    if routed:
        result.own_share = np.full((D, D), np.nan)
    if domain_router is not None:
        result.routing_accuracy = np.full((D, D), np.nan)
    experiment, run_name = default_lm_names(cfg)
    output_dir = open_run_dir(Path(cfg.tracking.output_dir) / experiment, run_name, cfg)
    run_name = output_dir.name  # suffixed when an earlier run's artifacts are there: never overwritten
    step = 0  # global training step over every phase, for the training-loss curves

    def route(blocks: torch.Tensor, domain: int) -> Optional[torch.Tensor]:
        """``[N, k]`` the domains each block of ``domain`` routes to (None: every group, router.name=none)."""
        return None if domain_router is None else domain_router.route(model, blocks, domain, t.eval_batch_size, device)

    def evaluate(blocks: torch.Tensor, to: Optional[torch.Tensor]) -> float:
        """Held-back perplexity of blocks, each routed to the groups of the domains ``to`` (see :func:`route`)."""
        if to is None:
            return perplexity(model, blocks, t.eval_batch_size, device)
        return routed_perplexity(model, blocks, domain_router.allowed(to, model), t.eval_batch_size, device)

    def evaluate_row(i: Optional[int]) -> Tuple[np.ndarray, Optional[float]]:
        """Held-back perplexity of every domain (and of the general text) after domain ``i`` (None: before the
        stream); in experts mode also the expert groups each domain's tokens are routed to (``result.group_share``,
        kept from the latest row) and the share reaching each domain's own group, with a domain router which domain
        each held-back sequence was routed to."""
        row, shares, destinations = [], [], []
        for j, blocks in enumerate(heldout):
            to = route(blocks, j)  # read from the text before any expert usage is counted
            if routed:
                model.reset_expert_usage()
                model.record_expert_usage(True)
            row.append(evaluate(blocks, to))
            destinations.append(None if to is None else to[:, 0].numpy())
            if routed:
                shares.append(group_shares(model))
                model.record_expert_usage(False)
        if routed:
            result.group_share = np.stack(shares)
        if i is not None and routed:
            result.own_share[i] = own_group_share(result.group_share, [r.group for r in result.records])
        if i is not None and domain_router is not None:
            result.routing_accuracy[i] = routing_accuracy(destinations, i + 1)
            result.routing_confusion = routing_confusion(destinations, D)
        if general is None:
            return np.array(row), None
        general_blocks = cap(general.heldout)
        return np.array(row), evaluate(general_blocks, route(general_blocks, NO_DOMAIN))

    def logger(tracker, start: int) -> Callable[[int, Dict[str, float]], None]:
        return lambda s, metrics: tracker.log_metrics({f"train/{k}": v for k, v in metrics.items()}, step=start + s)

    def finish(tracker, failed: bool = False) -> None:
        """Write and upload every artifact of what has been measured so far (also after a failure)."""
        if np.isfinite(result.matrix).any():
            tracker.log_metrics({f"final/{k}": v for k, v in result.summary().items()}, step=D - 1)
            tracker.log_metrics({f"final/forgetting/{n}": v for n, v in zip(domains, result.forgetting)}, step=D - 1)
            tracker.log_metrics({f"final/plasticity/{n}": v for n, v in zip(domains, result.plasticity)}, step=D - 1)
            for key, matrix in (("own_group_share", result.own_share), ("routing_acc", result.routing_accuracy)):
                if matrix is not None:
                    tracker.log_metrics({f"final/{key}/{n}": v for n, v in zip(domains, matrix[-1]) if np.isfinite(v)},
                                        step=D - 1)
        save_perplexity_csv(result, output_dir / "perplexity_matrix.csv")
        if np.isfinite(result.matrix).all():
            plot_perplexity_matrix(result, output_dir / "perplexity_matrix.png")
        summary = {**result.to_dict(), "failed": failed, "config": flatten(cfg), "run_id": tracker.run_id}
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        for path in sorted(output_dir.iterdir()):
            tracker.log_artifact(path)

    tags = {"recipe": "lm", "mode": x.mode, "router": cfg.router.name,
            "model": cfg.model.kind if cfg.model.kind == "moduleformer" else cfg.model.name}
    with ExperimentTracker(experiment, run_name, uri=cfg.tracking.uri, enabled=cfg.tracking.enabled, tags=tags) as tracker:
        tracker.log_params(flatten(cfg))
        tracker.log_text(to_yaml(cfg), "config.yaml")
        echo(f"{experiment} / {run_name}: {D} domains ({', '.join(domains)}), {x.mode} mode"
             + (f" (router {cfg.router.name})" if domain_router is not None else "")
             + f", {count(model.parameters()):,} parameters on {device}; {tracker.describe()}")
        with artifacts_on_failure(lambda: finish(tracker, failed=True)):
            if cfg.pretrain.steps:
                pretrain(model, general.train, cfg, device, on_log=logger(tracker, 0))
                step = cfg.pretrain.steps
            result.start_checksum = weights_checksum(model)
            tracker.log_params({"start_checksum": result.start_checksum})
            result.initial[:], first_general = evaluate_row(None)
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
                own_groups = None  # the domain is known while it trains: its group and the shared ones
                if domain_router is not None:
                    own_groups = domain_router.allowed(torch.tensor([domain_router.add_domain(group)]), model)[0]
                clock = time.perf_counter()
                losses = train_on_blocks(
                    model, set_trainable(model, params), blocks.train,
                    block_objective(t.mi_loss_coef, t.concentration_loss_coef, own_groups), t.steps_per_domain,
                    t.batch_size, t.lr, t.weight_decay, t.warmup_steps, t.max_grad_norm, device, seed=cfg.seed + 1 + i,
                    desc=f"domain {name}", progress=t.progress, on_log=logger(tracker, step), log_every=t.log_every,
                )
                wall = time.perf_counter() - clock
                step += t.steps_per_domain
                # The router's statistics of this domain, from its own training text, frozen from now on.
                stored = 0 if domain_router is None else domain_router.fit_domain(
                    model, i, blocks.train, t.eval_batch_size, device)
                record = DomainRecord(
                    name, group, added, count(params), count(model.parameters()),
                    sum(losses[-t.log_every:]) / len(losses[-t.log_every:]), wall, stored,
                )
                result.records.append(record)
                result.matrix[i], general_ppl = evaluate_row(i)
                if general is not None:
                    result.general[i + 1] = general_ppl
                tracker.log_metrics({
                    **{f"ppl/{n}": v for n, v in zip(domains, result.matrix[i])},
                    **({"ppl/general": general_ppl} if general is not None else {}),
                    "ppl/mean_seen": float(result.matrix[i, : i + 1].mean()),
                    "added_parameters": added, "trainable_parameters": record.trainable_parameters,
                    "total_parameters": record.total_parameters, "domain_train_loss": record.train_loss,
                    "wall_time_s": wall,
                    **({f"routing_share/{n}/group{g}": v for n, row in zip(domains, result.group_share)
                        for g, v in enumerate(row)} if routed else {}),
                    **({f"own_group_share/{n}": v for n, v in zip(domains, result.own_share[i]) if np.isfinite(v)}
                       if routed else {}),
                    **({f"routing_acc/{n}": v for n, v in zip(domains, result.routing_accuracy[i]) if np.isfinite(v)}
                       if domain_router is not None else {}),
                    **({"router_bytes": stored} if domain_router is not None else {}),
                }, step=i)
                echo(f"after {name}: " + "  ".join(f"{n} {v:.3f}" for n, v in zip(domains, result.matrix[i]))
                     + (f"  general {general_ppl:.3f}" if general is not None else ""))
                if after_domain is not None:
                    after_domain(i, model)
        finish(tracker)
        result.run_id = tracker.run_id
    result.output_dir = output_dir
    echo(format_lm_table(result))
    echo(f"artifacts: {output_dir}")
    return result
