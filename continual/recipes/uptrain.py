"""Uptraining recipe for recursive models (Bae et al. 2024, arXiv 2410.20672, section 3.3): convert a pretrained
model, then train the shared blocks and the relaxation LoRA together for a short while on general text to recover
the quality that tying removed.

Reads setup -> train -> evaluate -> save. The text stream is CL_Benchmark sentences packed into blocks
(``streams.text``); the objective is next-token prediction for causal LMs (``lm``), or, for any model (encoders
included), matching the unconverted model's final hidden states (``distill``). Perplexity (or the distillation
loss) on held-back blocks is measured for the original model, the converted one before training and after it;
everything is tracked in MLflow and the result is written with ``save_recursive`` (loadable as a backbone for the
``recursive`` strategy with ``strategy.pretrained=<folder>``).

Run: ``continual uptrain [CONFIG.yaml] [key=value ...]`` (defaults: SmolLM2-135M halved, R=2).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from continual.config import (
    ConfigError,
    TrackingConfig,
    check_tracking_names,
    flatten,
    merge_layers,
    read_layers,
    to_yaml,
)
from continual.models.recursive import RecursionConfig
from continual.training import (
    BlockLoss,
    TextDataConfig,
    artifacts_on_failure,
    evaluate_loss,
    open_run_dir,
    perplexity,
    resolve_device,
    seed_everything,
    set_trainable,
    text_blocks,
    train_on_blocks,
)

OBJECTIVES = ("lm", "distill")
MODEL_KINDS = ("causal_lm", "encoder")


# ---------------------------------------------------------------------------------------------------- config
@dataclass
class UptrainModelConfig:
    # Short name ("smollm2", "minilm"), local folder or Hub id.
    name: str = "smollm2"
    # "causal_lm" (with its LM head; objective lm or distill) or "encoder" (objective distill only).
    kind: str = "causal_lm"
    # Random weights from the config (tests and smoke runs), with optional config overrides.
    random_init: bool = False
    config_overrides: Dict[str, Any] = field(default_factory=dict)


@dataclass
class UptrainDataConfig(TextDataConfig):
    """How the text is read and cut (the fields of :class:`TextDataConfig`), and which task folders it comes from."""

    # Tokens per block.
    block_size: int = 256
    # CL_Benchmark task folders whose sentences form the text stream.
    tasks: List[str] = field(default_factory=lambda: ["agnews", "dbpedia", "amazon", "yahoo"])


@dataclass
class UptrainTrainingConfig:
    steps: int = 300
    batch_size: int = 8
    lr: float = 2.0e-4
    weight_decay: float = 0.0
    # Linear warm-up steps, then linear decay to zero at `steps`.
    warmup_steps: int = 30
    # Gradient-norm clip (0 disables).
    max_grad_norm: float = 1.0
    # "lm": next-token loss (causal LMs); "distill": MSE to the unconverted model's final hidden states.
    objective: str = "lm"
    # lm only: weight of the mean next-token loss at the exits of loops 1..R-1 (trains early exit); 0 disables.
    loop_loss_weight: float = 0.0
    # Held-back blocks evaluated (None: all).
    eval_blocks: Optional[int] = 200
    eval_batch_size: int = 8
    # Log the training loss every this many steps.
    log_every: int = 10
    # "cpu", "cuda", "cuda:0" or "auto".
    device: str = "auto"
    progress: bool = True


@dataclass
class UptrainConfig:
    model: UptrainModelConfig = field(default_factory=UptrainModelConfig)
    recursion: RecursionConfig = field(default_factory=lambda: RecursionConfig(init="average", rank=32))
    data: UptrainDataConfig = field(default_factory=UptrainDataConfig)
    training: UptrainTrainingConfig = field(default_factory=UptrainTrainingConfig)
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="uptrain", output_dir="outputs/uptrain"))
    seed: int = 0


def load_uptrain_config(path: str | Path | None = None, overrides: Sequence[str] = (), extra: dict | None = None) -> DictConfig:
    """A YAML file (optional), a dict and ``key=value`` overrides merged onto :class:`UptrainConfig` and checked.

    Raises:
        ConfigError: unknown key, wrong type or out-of-range value, naming the full key path.
    """
    cfg = merge_layers(OmegaConf.structured(UptrainConfig), read_layers(path, overrides, extra))
    checks = [
        ("model.kind", cfg.model.kind in MODEL_KINDS, f"one of {list(MODEL_KINDS)}"),
        ("training.objective", cfg.training.objective in OBJECTIVES, f"one of {list(OBJECTIVES)}"),
        ("training.objective", cfg.training.objective == "distill" or cfg.model.kind == "causal_lm",
         "distill for model.kind=encoder (an encoder has no next-token head)"),
        ("training.loop_loss_weight", cfg.training.loop_loss_weight == 0 or cfg.training.objective == "lm",
         "0 unless training.objective=lm"),
    ]
    for key in ("training.steps", "training.batch_size", "training.eval_batch_size", "training.log_every", "data.block_size"):
        checks.append((key, OmegaConf.select(cfg, key) >= 1, ">= 1"))
    checks += [
        ("training.lr", cfg.training.lr > 0, "> 0"),
        ("training.warmup_steps", cfg.training.warmup_steps >= 0, ">= 0"),
        ("training.loop_loss_weight", cfg.training.loop_loss_weight >= 0, ">= 0"),
        ("training.eval_blocks", cfg.training.eval_blocks is None or cfg.training.eval_blocks >= 1, ">= 1 or null"),
        ("data.heldout_fraction", 0 < cfg.data.heldout_fraction < 1, "in (0, 1)"),
    ]
    for key, ok, need in checks:
        if not ok:
            raise ConfigError(f"{key}: must be {need}, got {OmegaConf.select(cfg, key)!r}")
    try:
        RecursionConfig(**OmegaConf.to_container(cfg.recursion))
    except ValueError as err:
        raise ConfigError(f"recursion: {err}") from None
    check_tracking_names(cfg.tracking)
    OmegaConf.set_readonly(cfg, True)
    return cfg


# ---------------------------------------------------------------------------------------------------- math
def lm_loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``[B, T]`` blocks (every position predicts the next)."""
    return model(input_ids=input_ids, labels=input_ids).loss


def final_hidden(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """``[B, T, H]`` last hidden states (after the final norm for causal LMs)."""
    return model(input_ids=input_ids, output_hidden_states=True).hidden_states[-1]


def distill_loss(student: nn.Module, teacher: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """MSE between the student's and the frozen teacher's final hidden states on ``[B, T]`` blocks."""
    with torch.no_grad():
        target = final_hidden(teacher, input_ids)
    return F.mse_loss(final_hidden(student, input_ids).float(), target.float())


def lm_loss_with_loop_exits(model: nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token loss at the final exit and the mean one at the exits after loops ``1..R-1`` (CYCLE models).

    The exit after loop ``r`` is the model's own final norm and LM head applied to the output of depth ``r K - 1``.
    """
    from continual.models.recursive import layout
    from continual.models.recursive.families import base_model

    lay = layout(model)
    if lay.sharing != "cycle" or lay.num_loops < 2:
        raise ValueError("loop exit losses need a CYCLE-shared model with at least 2 loops")
    captured: List[torch.Tensor] = []
    hook = lambda _m, _i, out: captured.append(out[0] if isinstance(out, tuple) else out)
    handles = [lay.layers[r * lay.num_blocks - 1].register_forward_hook(hook) for r in range(1, lay.num_loops)]
    try:
        final = lm_loss(model, input_ids)
    finally:
        for handle in handles:
            handle.remove()
    norm, head = base_model(model, lay.family).norm, model.lm_head
    losses = [
        F.cross_entropy(head(norm(h[:, :-1])).flatten(0, 1).float(), input_ids[:, 1:].flatten()) for h in captured
    ]
    return final, torch.stack(losses).mean()


def uptraining_loss(teacher: Optional[nn.Module] = None, loop_loss_weight: float = 0.0) -> BlockLoss:
    """The objective of one batch: distillation towards ``teacher`` when given, else the next-token loss, plus
    ``loop_loss_weight`` times the mean next-token loss at the earlier loops' exits when that weight is positive."""
    if teacher is not None:
        return lambda model, input_ids: distill_loss(model, teacher, input_ids)
    if loop_loss_weight > 0:

        def with_loop_exits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
            final, loops = lm_loss_with_loop_exits(model, input_ids)
            return final + loop_loss_weight * loops

        return with_loop_exits
    return lm_loss


def evaluate(
    model: nn.Module, blocks: torch.Tensor, batch_size: int, device: torch.device, teacher: Optional[nn.Module] = None,
    progress: bool = False,
) -> float:
    """Held-back perplexity (``teacher`` None) or mean distillation loss (``teacher`` given) over ``[N, T]`` blocks."""
    if teacher is None:
        return perplexity(model, blocks, batch_size, device, loss=lm_loss, progress=progress)
    return evaluate_loss(model, blocks, batch_size, device, loss=uptraining_loss(teacher), progress=progress)


def uptrain(
    model: nn.Module,
    blocks: torch.Tensor,
    steps: int,
    batch_size: int = 8,
    lr: float = 2e-4,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    max_grad_norm: float = 1.0,
    teacher: Optional[nn.Module] = None,
    loop_loss_weight: float = 0.0,
    device: torch.device | str = "cpu",
    seed: int = 0,
    progress: bool = True,
    on_log: Optional[Callable[[int, Dict[str, float]], None]] = None,
    log_every: int = 10,
) -> List[float]:
    """Train every parameter of ``model`` (shared blocks, relaxation, embeddings) with AdamW for ``steps`` steps
    (the training kit's loop, :func:`continual.training.train_on_blocks`).

    Args:
        blocks: ``[N, T]`` training token blocks, sampled in a seeded random order, reshuffled each pass.
        warmup_steps: linear warm-up steps, then linear decay to zero at ``steps``.
        teacher: distil towards this frozen model's final hidden states instead of next-token prediction.
        loop_loss_weight: add this weight times the mean next-token loss at the earlier loops' exits.
        on_log: called every ``log_every`` steps with ``{"train_loss": mean over those steps, "lr": ...}``.

    Returns:
        The loss of every step.

    Raises:
        NonFiniteLossError: the loss became NaN or infinite.
    """
    log = None if on_log is None else lambda step, m: on_log(step, {"train_loss": m["loss"], "lr": m["lr"]})
    return train_on_blocks(
        model, set_trainable(model, model.parameters()), blocks, uptraining_loss(teacher, loop_loss_weight), steps,
        batch_size, lr, weight_decay, warmup_steps, max_grad_norm, device, seed=seed, desc="uptrain",
        progress=progress, on_log=log, log_every=log_every,
    )


# ---------------------------------------------------------------------------------------------------- recipe
@dataclass
class UptrainResult:
    """What a run measured and where it saved the model."""

    metric: str  # "perplexity" or "distill_mse"
    original: float
    before: float
    after: float
    parameters: Dict[str, int]  # parameter_breakdown of the converted model, plus "original"
    folder: Path
    losses: List[float] = field(default_factory=list)


def run_uptraining(cfg: DictConfig, echo: Callable[[str], None] = print) -> UptrainResult:
    """Setup -> evaluate original -> convert -> evaluate -> uptrain -> evaluate -> save, tracked in MLflow.

    The model is saved in a fresh folder ``tracking.output_dir/<run name>`` (``-2``, ``-3``... when an earlier run
    left files there), which holds ``config.yaml`` from the start and ``uptrain_summary.json`` at the end, also when
    the run fails.
    """
    from continual.models.backbone import load_backbone, load_causal_lm
    from continual.models.recursive import convert_to_recursive, parameter_breakdown, save_recursive
    from continual.tracking import ExperimentTracker

    # ---------------------------------------------------------------- setup
    seed_everything(cfg.seed)
    device = resolve_device(cfg.training.device)
    loader = load_causal_lm if cfg.model.kind == "causal_lm" else load_backbone
    model, tokenizer = loader(cfg.model.name, random_init=cfg.model.random_init, config_overrides=dict(cfg.model.config_overrides))
    model = model.to(device).eval()
    blocks = text_blocks(cfg.data, tokenizer, cfg.data.tasks)
    heldout = blocks.heldout[: cfg.training.eval_blocks] if cfg.training.eval_blocks else blocks.heldout
    rec = OmegaConf.to_container(cfg.recursion)
    run_name = cfg.tracking.run_name or (
        f"{Path(cfg.model.name).name}-R{rec['num_loops']}-{rec['sharing']}-{rec['init']}-r{rec['rank']}-{cfg.training.objective}"
    )
    folder = open_run_dir(cfg.tracking.output_dir, run_name, cfg)
    run_name = folder.name  # the MLflow run and the model's folder share a name, suffixed when an earlier run had it
    distill = cfg.training.objective == "distill"
    metric = "distill_mse" if distill else "perplexity"
    t = cfg.training
    ev = lambda m, teacher=None: evaluate(m, heldout, t.eval_batch_size, device, teacher, t.progress)
    measured: Dict[str, Any] = {"original": None, "before": None, "after": None, "parameters": None}

    def finish(tracker, failed: bool = False) -> None:
        """Write the summary of what has been measured so far (also after a failure) and upload it, with the saved
        model's config once there is one."""
        summary = {"metric": metric, **measured, "steps": t.steps, "folder": str(folder), "failed": failed}
        (folder / "uptrain_summary.json").write_text(json.dumps(summary, indent=2))
        for name in ("uptrain_summary.json", "config.json"):
            if (folder / name).is_file():
                tracker.log_artifact(folder / name)

    with ExperimentTracker(cfg.tracking.experiment or "uptrain", run_name, uri=cfg.tracking.uri,
                           enabled=cfg.tracking.enabled, tags={"recipe": "uptrain", "model": cfg.model.name}) as tracker:
        tracker.log_params(flatten(cfg))
        tracker.log_text(to_yaml(cfg), "config.yaml")
        echo(f"uptrain {run_name}: {blocks.train.shape[0]} training and {heldout.shape[0]} held-back blocks of "
             f"{blocks.block_size} tokens on {device}; {tracker.describe()}")
        with artifacts_on_failure(lambda: finish(tracker, failed=True)):
            original_count = sum(p.numel() for p in model.parameters())
            teacher = copy.deepcopy(model).requires_grad_(False) if distill else None
            original = measured["original"] = 0.0 if distill else ev(model)
            convert_to_recursive(model, **rec)
            counts = measured["parameters"] = {"original": original_count, **parameter_breakdown(model)}
            before = measured["before"] = ev(model, teacher)
            tracker.log_metrics({**{f"parameters/{k}": v for k, v in counts.items()}, "eval/original": original,
                                 "eval/before": before}, step=0)

            # ---------------------------------------------------------------- train
            losses = uptrain(
                model, blocks.train, t.steps, t.batch_size, t.lr, t.weight_decay, t.warmup_steps, t.max_grad_norm,
                teacher=teacher, loop_loss_weight=t.loop_loss_weight, device=device, seed=cfg.seed,
                progress=t.progress, on_log=lambda step, m: tracker.log_metrics(m, step=step), log_every=t.log_every,
            )

            # ---------------------------------------------------------------- evaluate and save
            after = measured["after"] = ev(model, teacher)
            tracker.log_metrics({"eval/after": after}, step=t.steps)
            save_recursive(model, folder, tokenizer)
        finish(tracker)
    shown = "" if distill else f"original {original:.2f} -> "
    echo(f"{metric}: {shown}converted {before:.4g} -> uptrained {after:.4g} ({t.steps} steps); "
         f"parameters {counts['total']:,} of {original_count:,}; saved to {folder}")
    return UptrainResult(metric, original, before, after, counts, folder, losses)
