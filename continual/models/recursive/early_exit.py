"""Early exit after any loop, and continuous depth-wise batching (Bae et al. 2024, arXiv 2410.20672, section 4).

A CYCLE-shared recursive model runs the same ``K`` blocks in every loop, so after each loop an exit head can score
the current hidden states and a sample whose prediction is confident enough stops there. Because every loop calls
the same blocks, samples at *different* loops can share one call of a block (the depth-wise LoRA is applied per
group of rows), and the slot a finished sample frees is refilled at once from the queue: continuous depth-wise
batching.

Two implementations of the same decision rule:

- :func:`recursive_early_exit`: per-sample recursion through the unrolled depth modules, each with its own
  parameters (the reference);
- :func:`depthwise_early_exit`: the continuous depth-wise batched scheduler.

Here a "sample" is a whole sequence scored at its last token (next-token prediction for a causal LM, or any head on
the hidden states); per-token exits inside autoregressive decoding (with their KV-cache bookkeeping) are not covered.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from continual.models.recursive.convert import Layout, layout
from continual.models.recursive.families import ExitHead, default_exit_head, embed, layer_kwargs, run_layer
from continual.models.recursive.relaxation import RelaxedLinear, per_sample

ExitHeads = Union[ExitHead, Sequence[ExitHead], None]


@dataclass
class ExitResult:
    """What an early-exit run returns, in input order.

    Attributes:
        logits: ``[N, V]`` exit-head logits at the loop each sample stopped after.
        exit_loop: ``[N]`` loops run, in ``1..R``.
        confidence: ``[N]`` maximum softmax probability of ``logits``.
        block_calls: calls of a layer module made in all (a depth-wise batched call counts once).
        mixed_calls: of those, calls that served samples at more than one loop depth at once.
    """

    logits: torch.Tensor
    exit_loop: torch.Tensor
    confidence: torch.Tensor
    block_calls: int
    mixed_calls: int = 0

    @property
    def mean_loops(self) -> float:
        return float(self.exit_loop.float().mean())


def confidence(logits: torch.Tensor) -> torch.Tensor:
    """``[..., V]`` logits -> ``[...]`` maximum softmax probability."""
    return logits.float().softmax(-1).amax(-1)


def _heads(model: nn.Module, lay: Layout, exit_heads: ExitHeads) -> List[ExitHead]:
    """One exit head per loop (a single head is shared by every loop)."""
    if exit_heads is None:
        head = default_exit_head(model, lay.family)
        if head is None:
            raise ValueError(f"{type(model).__name__} has no LM head: pass exit_heads=head(hidden, mask) -> logits")
        return [head] * lay.num_loops
    if callable(exit_heads):
        return [exit_heads] * lay.num_loops
    heads = list(exit_heads)
    if len(heads) != lay.num_loops:
        raise ValueError(f"exit_heads: one head per loop ({lay.num_loops}) or a single head, got {len(heads)}")
    return heads


def _cycle_layout(model: nn.Module) -> Layout:
    lay = layout(model)
    if lay.sharing != "cycle":
        raise ValueError(f"early exit after a loop needs CYCLE sharing (whole-stack loops); this model uses {lay.sharing!r}")
    return lay


def loop_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, exit_heads: ExitHeads = None) -> torch.Tensor:
    """Every loop's exit logits by per-sample recursion through the unrolled depths.

    Args:
        input_ids: ``[B, T]``; attention_mask: ``[B, T]`` (right padding).

    Returns:
        ``[R, B, V]``: the exit head applied after loops ``1..R``.
    """
    lay = _cycle_layout(model)
    heads = _heads(model, lay, exit_heads)
    hidden = embed(model, lay.family, input_ids)
    kwargs = layer_kwargs(model, lay.family, hidden, attention_mask)
    out = []
    for depth, layer in enumerate(lay.layers):
        hidden = run_layer(layer, hidden, kwargs)
        if (depth + 1) % lay.num_blocks == 0:
            out.append(heads[len(out)](hidden, attention_mask))
    return torch.stack(out)


def first_confident(conf: torch.Tensor, threshold: float) -> torch.Tensor:
    """``[R, B]`` per-loop confidences -> ``[B]`` index of the first loop reaching ``threshold`` (the last if none)."""
    hit = conf >= threshold
    hit[-1] = True
    return hit.int().argmax(0)  # argmax returns the first maximum


def recursive_early_exit(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, threshold: float, exit_heads: ExitHeads = None
) -> ExitResult:
    """Reference early exit: each sample's exit after the first loop whose confidence reaches ``threshold``."""
    logits = loop_logits(model, input_ids, attention_mask, exit_heads)  # [R, B, V]
    conf = confidence(logits)
    stop = first_confident(conf, threshold)
    rows = torch.arange(logits.shape[1], device=logits.device)
    return ExitResult(logits[stop, rows], stop + 1, conf[stop, rows], block_calls=len(layout(model).layers))


def _relaxation_ids(layer: nn.Module) -> set:
    return {id(p) for m in layer.modules() if isinstance(m, RelaxedLinear) for p in (m.relax_A, m.relax_B)}


def _block_plan(lay: Layout) -> List[Tuple[nn.Module, List[List[RelaxedLinear]]]]:
    """Per block: its loop-0 depth module and, per relaxed projection in it, that projection at loops ``0..R-1``.

    Raises:
        ValueError: some depth has a parameter of its own besides the relaxation (untied norms or biases, or per-task
            modules from a bank), so the loops cannot share one call.
    """
    K, R = lay.num_blocks, lay.num_loops
    plan = []
    for j in range(K):
        depths = [lay.layers[r * K + j] for r in range(R)]
        shared = [{id(p) for p in d.parameters()} - _relaxation_ids(d) for d in depths]
        if any(s != shared[0] for s in shared[1:]):
            raise ValueError(
                "depth-wise batching needs every parameter except the relaxation LoRA tied across loops; convert with "
                "share_norms=True and share_biases=True, and detach any module bank"
            )
        relaxed = [name for name, m in depths[0].named_modules() if isinstance(m, RelaxedLinear)]
        plan.append((depths[0], [[d.get_submodule(name) for d in depths] for name in relaxed]))
    return plan


@torch.no_grad()
def depthwise_early_exit(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    threshold: float,
    slots: int = 32,
    exit_heads: ExitHeads = None,
    progress: bool = False,
) -> ExitResult:
    """Early exit with continuous depth-wise batching.

    At most ``slots`` samples are in flight, each at its own loop. One step runs the ``K`` shared blocks once for all
    of them (the depth-wise LoRA of row ``i`` is that of its loop), then every sample that reached ``threshold`` or
    the last loop leaves and its slot is refilled from the queue before the next step.

    Args:
        input_ids: ``[N, T]`` every sample, padded to one length; attention_mask: ``[N, T]`` (right padding).
        threshold: exit when the maximum softmax probability of the exit logits reaches it (> 1: never early).
        slots: samples in flight at once (the batch size of every block call).
        exit_heads: one head per loop, a shared head, or None for a causal LM's own norm + LM head.
        progress: show a tqdm bar over finished samples.

    Returns:
        The same decisions and logits as :func:`recursive_early_exit`, computed with shared block calls.
    """
    from tqdm.auto import tqdm

    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    lay = _cycle_layout(model)
    heads = _heads(model, lay, exit_heads)
    plan = _block_plan(lay)
    N, R = input_ids.shape[0], lay.num_loops
    device = input_ids.device
    shared_head = all(h is heads[0] for h in heads)
    out_logits: Optional[torch.Tensor] = None  # [N, V], filled as samples finish
    out_loop = torch.zeros(N, dtype=torch.long, device=device)
    out_conf = torch.zeros(N, device=device)

    sample = torch.empty(0, dtype=torch.long, device=device)  # [b] which input each slot holds
    loops = torch.empty(0, dtype=torch.long, device=device)  # [b] loops done so far
    hidden: Optional[torch.Tensor] = None  # [b, T, H]
    queued, calls, mixed = 0, 0, 0
    with tqdm(total=N, desc="depth-wise batching", unit="sample", disable=not progress) as bar:
        while queued < N or sample.numel():
            take = min(slots - sample.numel(), N - queued)
            if take:  # refill freed slots with new samples at loop 0
                new = torch.arange(queued, queued + take, device=device)
                fresh = embed(model, lay.family, input_ids[new])
                hidden = fresh if hidden is None or not sample.numel() else torch.cat([hidden, fresh])
                sample, loops = torch.cat([sample, new]), torch.cat([loops, torch.zeros_like(new)])
                queued += take
            mask = attention_mask[sample]
            kwargs = layer_kwargs(model, lay.family, hidden, mask)
            groups = [(r, (loops == r).nonzero(as_tuple=True)[0]) for r in loops.unique().tolist()]  # rows per loop
            for block, relaxed in plan:  # one call per shared block, every sample at its own loop
                with ExitStack() as stack:
                    for siblings in relaxed:
                        stack.enter_context(per_sample(siblings[0], [(rows, siblings[r]) for r, rows in groups]))
                    hidden = run_layer(block, hidden, kwargs)
                calls += 1
                mixed += len(groups) > 1
            if shared_head:
                logits = heads[0](hidden, mask)
            else:  # the exit head of the loop each sample has just finished
                parts = {r: heads[r](hidden[rows], mask[rows]) for r, rows in groups}
                logits = next(iter(parts.values())).new_empty(sample.numel(), next(iter(parts.values())).shape[-1])
                for r, rows in groups:
                    logits[rows] = parts[r]
            loops = loops + 1
            conf = confidence(logits)
            done = (conf >= threshold) | (loops == R)
            if out_logits is None:
                out_logits = logits.new_zeros(N, logits.shape[-1])
            finished = sample[done]
            out_logits[finished], out_loop[finished], out_conf[finished] = logits[done], loops[done], conf[done]
            keep = ~done
            sample, loops, hidden = sample[keep], loops[keep], hidden[keep]
            bar.update(int(finished.numel()))
    return ExitResult(
        logits=out_logits,
        exit_loop=out_loop,
        confidence=out_conf,
        block_calls=calls,
        mixed_calls=mixed,
    )
