"""The training kit under every recipe: seeding and devices, which parameters train, the learning-rate schedule,
the one training loop and evaluation over token blocks, the finite-loss check, text data, and run folders with their
failure artifacts. Written once here; the recipes (``continual.recipes``) and the learner only call it."""

from continual.training.environment import native_bf16, resolve_device, resolve_precision, seed_everything
from continual.training.loop import (
    FINITE_CHECK_EVERY,
    BlockLoss,
    FiniteLossCheck,
    NonFiniteLossError,
    check_finite_loss,
    evaluate_loss,
    lr_factor,
    next_token_block_loss,
    next_token_loss,
    perplexity,
    set_trainable,
    train_on_blocks,
)
from continual.training.run_dir import artifacts_on_failure, open_run_dir
from continual.training.text import TextDataConfig, text_blocks

__all__ = [
    "FINITE_CHECK_EVERY",
    "BlockLoss",
    "FiniteLossCheck",
    "NonFiniteLossError",
    "TextDataConfig",
    "artifacts_on_failure",
    "check_finite_loss",
    "evaluate_loss",
    "lr_factor",
    "next_token_block_loss",
    "next_token_loss",
    "open_run_dir",
    "perplexity",
    "native_bf16",
    "resolve_device",
    "resolve_precision",
    "seed_everything",
    "set_trainable",
    "text_blocks",
    "train_on_blocks",
]
