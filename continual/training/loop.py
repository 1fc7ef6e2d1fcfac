"""The training loop and the evaluation over packed token blocks, and what every trainer shares: which parameters
train, the learning-rate schedule and the finite-loss check.

The loop is written once for every recipe that trains a language model on ``[N, T]`` blocks (the continual-LM
recipe's pretraining and domains, uptraining of recursive models). What differs between them, the objective, is a
``loss(model, batch)`` callable; everything else (sampling, AdamW, schedule, clipping, logging) is the same.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

# loss(model, input_ids [B, T]) -> scalar tensor
BlockLoss = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def set_trainable(model: nn.Module, params: Iterable[nn.Parameter]) -> List[nn.Parameter]:
    """Make exactly ``params`` trainable in ``model`` (requires_grad), everything else frozen.

    Returns:
        The de-duplicated list, in model order, ready for an optimizer.

    Raises:
        ValueError: some of ``params`` are not parameters of ``model``.
    """
    wanted = {id(p) for p in params}
    out: List[nn.Parameter] = []
    seen: set = set()
    for p in model.parameters():
        train = id(p) in wanted
        p.requires_grad_(train)
        if train and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    if len(seen) != len(wanted):
        raise ValueError("trainable_parameters returned parameters that are not part of the model")
    return out


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then linear decay to zero at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (steps - step) / max(steps - warmup, 1))


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; what was trained and logged before it is kept."""

    def __init__(self, value: float, where: str, advice: str):
        self.value, self.where = value, where
        super().__init__(f"loss became {value} {where}: {advice}")


def check_finite_loss(value: float, where: str, advice: str = "lower the learning rate") -> float:
    """``value`` itself when finite.

    Args:
        value: the loss of one step.
        where: the step, for the message (``"in domain agnews at step 12"``).
        advice: what the user can change.

    Raises:
        NonFiniteLossError: ``value`` is NaN or infinite.
    """
    if not math.isfinite(value):
        raise NonFiniteLossError(value, where, advice)
    return value


# Steps between finite-loss checks on an accelerator (each check is one device sync); the CPU checks every step.
FINITE_CHECK_EVERY = 16


class FiniteLossCheck:
    """The losses of one epoch: their running sum, and :func:`check_finite_loss` on each, without a device sync per
    step on an accelerator.

    On the CPU every loss is read and checked as it is added (nothing to wait for). On a GPU the losses stay on the
    device and are read together every ``every`` steps and at :meth:`flush` (the epoch's end); the error still names
    the first non-finite step, up to ``every - 1`` steps later than the CPU would.

    Args:
        advice: what the user can change, for the error.
        every: steps between reads (1: every step).
    """

    def __init__(self, advice: str, every: int = 1):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.advice, self.every = advice, every
        self.reset()

    def reset(self) -> None:
        self.total, self.count = 0.0, 0  # over the losses read so far
        self._pending: List[tuple] = []  # (loss tensor, where) not read yet

    def add(self, loss: torch.Tensor, where: str) -> None:
        """One step's loss (a scalar tensor, detached) and the step for the message (``"on task 0, epoch 1, ..."``)."""
        self._pending.append((loss, where))
        if len(self._pending) >= self.every:
            self.flush()

    def flush(self) -> None:
        """Read and check every pending loss (one device sync).

        Raises:
            NonFiniteLossError: naming the first step whose loss is NaN or infinite.
        """
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        values = torch.stack([loss.reshape(()).float() for loss, _ in pending]).cpu().tolist()
        for value, (_, where) in zip(values, pending):
            self.total += check_finite_loss(value, where, self.advice)
            self.count += 1

    @property
    def mean(self) -> float:
        """Mean of the losses read so far (NaN before any)."""
        return self.total / self.count if self.count else math.nan


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: ``logits [B, T, V]`` at positions ``0..T-2`` against ``input_ids [B, T]`` at ``1..T-1``."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), input_ids[:, 1:].reshape(-1))


def next_token_block_loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """:func:`next_token_loss` of a causal LM's logits on ``[B, T]`` blocks (a :data:`BlockLoss`)."""
    return next_token_loss(model(input_ids=input_ids).logits, input_ids)


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    blocks: torch.Tensor,
    batch_size: int,
    device: torch.device,
    loss: BlockLoss = next_token_block_loss,
    progress: bool = False,
) -> float:
    """Mean ``loss`` over ``[N, T]`` blocks in eval mode, every block weighing the same."""
    from tqdm.auto import tqdm

    model.eval()
    total = 0.0
    starts = range(0, blocks.shape[0], batch_size)
    for start in tqdm(starts, desc="evaluate", unit="batch", disable=not progress, leave=False):
        batch = blocks[start:start + batch_size].to(device)
        total += float(loss(model, batch)) * batch.shape[0]
    return total / max(blocks.shape[0], 1)


def perplexity(
    model: nn.Module,
    blocks: torch.Tensor,
    batch_size: int,
    device: torch.device,
    loss: BlockLoss = next_token_block_loss,
    progress: bool = False,
) -> float:
    """Held-back perplexity ``exp(mean next-token loss)`` over ``[N, T]`` blocks (see :func:`evaluate_loss`); ``inf``
    when the loss is too large for a float (a diverged model is measured, not an error), NaN for a NaN loss."""
    try:
        return math.exp(evaluate_loss(model, blocks, batch_size, device, loss, progress))
    except OverflowError:
        return math.inf


def train_on_blocks(
    model: nn.Module,
    params: List[nn.Parameter],
    blocks: torch.Tensor,
    loss: BlockLoss,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    max_grad_norm: float = 1.0,
    device: torch.device | str = "cpu",
    seed: int = 0,
    desc: str = "train",
    progress: bool = True,
    on_log: Optional[Callable[[int, Dict[str, float]], None]] = None,
    log_every: int = 10,
) -> List[float]:
    """Train ``params`` (only them: the caller froze the rest) with AdamW for ``steps`` steps on ``blocks [N, T]``.

    Blocks are drawn in a seeded random order, reshuffled each pass; the learning rate follows :func:`lr_factor`.

    Args:
        loss: the objective of one batch, ``loss(model, input_ids [B, T])``.
        desc: the phase, shown on the progress bar and in the error of a non-finite loss.
        on_log: called every ``log_every`` steps with ``(step, {"loss": mean of those steps, "lr": ...})``.

    Returns:
        The objective of every step. The model is left in eval mode.

    Raises:
        NonFiniteLossError: the objective became NaN or infinite (names the phase and step).
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
        objective = loss(model, batch)
        value = check_finite_loss(float(objective.detach()), f"in {desc} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        schedule.step()
        losses.append(value)
        if on_log is not None and (step + 1) % log_every == 0:
            on_log(step + 1, {"loss": sum(losses[-log_every:]) / log_every, "lr": schedule.get_last_lr()[0]})
    model.eval()
    return losses
