"""Language-modelling evaluation of one-step internal fine-tuning (TinT, Panigrahi et al. 2023, arXiv 2307.01189,
§4.1): each chunk of held-back text is split in two; the model takes one internal step on the first half and its
loss is measured on the second half, the whole chunk being the input (the first half is also its context). The
plain model's loss on the same tokens is the baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List

import torch
from torch import nn

from continual.models.tint.one_step import InnerStep, applied, next_token_losses, one_step_update


def chunk_tokens(token_ids: Iterable[int], length: int, max_chunks: int | None = None) -> torch.Tensor:
    """Cut one long token stream into ``[N, length]`` consecutive chunks (the incomplete tail is dropped).

    Raises:
        ValueError: ``length < 4`` or the stream is shorter than one chunk.
    """
    if length < 4:
        raise ValueError(f"chunk length must be >= 4 (two halves of at least two tokens), got {length}")
    ids = torch.as_tensor(list(token_ids), dtype=torch.long)
    n = ids.numel() // length
    if max_chunks is not None:
        n = min(n, max_chunks)
    if n == 0:
        raise ValueError(f"{ids.numel()} tokens do not make one chunk of {length}")
    return ids[: n * length].view(n, length)


def half_masks(length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, test)`` target masks ``[length]``: targets in the first half (position 0 excluded, it is never a
    target) and targets in the second half."""
    half = length // 2
    positions = torch.arange(length)
    return (positions >= 1) & (positions < half), positions >= half


@dataclass
class LMResult:
    """Mean next-token loss on the second halves, plain vs after the step (per chunk and overall)."""

    plain: torch.Tensor  # [N]
    tint: torch.Tensor  # [N]

    @property
    def plain_loss(self) -> float:
        return float(self.plain.mean())

    @property
    def tint_loss(self) -> float:
        return float(self.tint.mean())


def second_half_loss(model: nn.Module, chunks: torch.Tensor) -> torch.Tensor:
    """``[N]`` mean next-token loss on each chunk's second half (whole chunk as input)."""
    _, test = half_masks(chunks.shape[1])
    with torch.no_grad():
        logits = model(input_ids=chunks, attention_mask=torch.ones_like(chunks)).logits
        losses = next_token_losses(logits, chunks)
    weights = test[1:].to(losses.device, losses.dtype)
    return (losses * weights).sum(1) / weights.sum()


def evaluate_lm(
    model: nn.Module,
    chunks: torch.Tensor,
    step: InnerStep,
    batch_size: int = 8,
    progress: bool = True,
) -> LMResult:
    """Plain vs one-step loss on the second halves of ``chunks`` (``[N, L]`` token ids on the model's device).

    Every chunk is its own context, so each takes its own update (a loop over contexts); the plain losses are
    computed in batches.
    """
    from tqdm.auto import tqdm

    train, _ = half_masks(chunks.shape[1])
    plain: List[torch.Tensor] = []
    for start in range(0, chunks.shape[0], batch_size):
        plain.append(second_half_loss(model, chunks[start : start + batch_size]))
    tint: List[torch.Tensor] = []
    for chunk in tqdm(chunks, desc="one-step LM eval", unit="chunk", leave=False, disable=not progress):
        row = chunk[None]
        update = one_step_update(model, row, torch.ones_like(row), train.to(row.device)[None], step)
        with applied(update):
            tint.append(second_half_loss(model, row))
    return LMResult(plain=torch.cat(plain).cpu(), tint=torch.cat(tint).cpu())
