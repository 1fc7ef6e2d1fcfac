"""Virtual-token deltas: soft prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt
Tuning") and prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation").

Both give each task ``P`` extra sequence positions. The bank prepends placeholder positions to the input
(:meth:`~continual.modules.bank.ModuleBank.prepare_inputs`) and masks them per sample; these kinds write their
slots' vectors into those positions:

- prompt tuning at the input embedding: the placeholder embeddings become the task's soft tokens, which then run
  through every layer like real tokens;
- prefix tuning at each attention layer's key and value projections: the placeholder keys and values become the
  task's per-layer prefix vectors, whatever the hidden state at those positions is, so real tokens attend to
  exactly the learned prefix (the placeholders' own outputs are never read).

With sequential composition a task-``j`` sample sees the blocks of tasks ``0..j`` (Progressive Prompts,
Razdaibiedina et al. 2023); with isolated composition each sample gets its own task's block (gathered, ``P``
positions whatever the number of tasks). Either way only the slots the batch uses are read (one gather from the
stacked vectors, no per-slot Python work), so a mixed batch costs what its own tasks need.
"""

from __future__ import annotations

from typing import ClassVar, Dict, Tuple

import torch
from torch import nn

from continual.modules.families import default_targets
from continual.modules.deltas.registry import register_delta
from continual.modules.deltas.stacking import SlotParameters, SlotSelection


class VirtualTokens(nn.Module):
    """Shared machinery: ``P`` vectors of width ``width`` per slot, written into the bank's virtual positions.

    Subclasses define how a slot is initialised and which output columns the vectors replace.
    """

    virtual_tokens: ClassVar[bool] = True
    identity_at_init: ClassVar[bool] = False
    mergeable: ClassVar[bool] = False

    def __init__(self, tokens: int, width: int, columns: Tuple[int, int], reparam_hidden: int = 0):
        super().__init__()
        if tokens < 1:
            raise ValueError(f"{self.kind}: tokens must be >= 1, got {tokens}")
        if reparam_hidden < 0:
            raise ValueError(f"{self.kind}: reparam_hidden must be >= 0, got {reparam_hidden}")
        self.tokens_per_slot, self.width, self.columns = tokens, width, columns
        self.reparam_hidden = reparam_hidden
        self.group = -1  # set by the bank: which block of virtual positions this site writes
        self.vectors = SlotParameters()  # slot k: [P, width] (the reparameterisation's input while training)
        # slot k: an MLP width -> hidden -> width applied to vectors[k] while the slot trains, Identity once folded
        self.reparam = nn.ModuleList()

    @property
    def n_slots(self) -> int:
        return len(self.vectors)

    def init_vectors(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def add_slot(self, device: torch.device, dtype: torch.dtype) -> None:
        self.vectors.append(nn.Parameter(self.init_vectors(device, dtype)))
        if self.reparam_hidden:
            mlp = nn.Sequential(
                nn.Linear(self.width, self.reparam_hidden), nn.Tanh(), nn.Linear(self.reparam_hidden, self.width)
            ).to(device=device, dtype=dtype)
            nn.init.zeros_(mlp[2].weight)  # start at the plain vectors: v + MLP(v) with the MLP's output at 0
            nn.init.zeros_(mlp[2].bias)
            self.reparam.append(mlp)
        else:
            self.reparam.append(nn.Identity())

    def slot_parameters(self, slot: int) -> Dict[str, nn.Parameter]:
        out = {"vectors": self.vectors[slot]}
        out.update({f"reparam.{name}": p for name, p in self.reparam[slot].named_parameters()})
        return out

    def slot_values(self, slot: int) -> torch.Tensor:
        """``[P, width]``: the vectors, through the reparameterisation while the slot still has one."""
        v = self.vectors[slot]
        mlp = self.reparam[slot]
        return v if isinstance(mlp, nn.Identity) else v + mlp(v)

    def freeze_slot(self, slot: int) -> None:
        """Fold the reparameterisation into plain vectors: a frozen task stores ``P x width`` numbers only."""
        if isinstance(self.reparam[slot], nn.Identity):
            return
        with torch.no_grad():
            folded = self.slot_values(slot).detach().clone()
        self.vectors[slot] = nn.Parameter(folded, requires_grad=False)
        self.reparam[slot] = nn.Identity()

    def used_values(self, selection: SlotSelection) -> torch.Tensor:
        """``[U, P, width]`` the values of the slots the batch uses: rows of the stacked vectors, and a slot that
        still trains through its reparameterisation computed through it."""
        values = self.vectors.rows(selection.slots, selection.ids)
        if self.reparam_hidden:
            live = [(u, k) for u, k in enumerate(selection.ids) if not isinstance(self.reparam[k], nn.Identity)]
            if live:
                where = torch.tensor([u for u, _ in live], device=values.device)
                values = values.index_copy(0, where, torch.stack([self.slot_values(k) for _, k in live]))
        return values

    def place(self, h: torch.Tensor, selection: SlotSelection, span: Tuple[int, int]) -> torch.Tensor:
        """Write the used slots' vectors into the virtual positions of ``h``.

        Args:
            h: ``[B, V+T, out]`` output of the wrapped module.
            selection: the batch's slots and weights (which positions a sample sees is decided by the attention
                mask); exclusive: ``count == P`` and each sample gets its own slot's vectors, otherwise one block
                of ``P`` per used slot (``count == U * P``).
            span: ``(first, count)`` positions of this kind's block; ``count == 0`` when the forward continues a
                cached sequence whose virtual positions an earlier forward wrote (nothing to write now).

        Returns:
            ``h`` with ``[:, first:first+count, columns]`` replaced.
        """
        first, count = span
        if count == 0 or not selection.ids:  # nothing to write (no sample sees these positions)
            return h
        values = self.used_values(selection).to(h.dtype)  # [U, P, width]
        B = h.shape[0]
        if selection.exclusive:
            per_sample = values[selection.weights.abs().argmax(dim=1)]  # [B, P, width]
        else:
            per_sample = values.reshape(1, -1, self.width).expand(B, -1, -1)  # [B, U*P, width]
        if per_sample.shape[1] != count:
            raise RuntimeError(f"{self.kind}: the bank laid out {count} positions but the slots fill {per_sample.shape[1]}")
        lo, hi = self.columns
        out = h.clone()
        out[:, first:first + count, lo:hi] = per_sample
        return out

    def weight_delta(self, weights: torch.Tensor):
        raise ValueError(f"{self.kind} deltas add sequence positions and cannot be merged into weights")


@register_delta
class PromptDelta(VirtualTokens):
    """Per-task soft prompt tokens written at the input embedding.

    Args:
        embedding: the backbone's input token embedding (its rows initialise new prompts).
        tokens: prompt length ``P`` per task.
        init: "vocab" (copies of ``P`` random vocabulary embeddings, as in the paper) or "normal" (std 0.02).
        seed: seed for picking the vocabulary rows.
    """

    kind: ClassVar[str] = "prompt"
    wraps: ClassVar[str] = "embedding"
    options: ClassVar[Tuple[str, ...]] = ("tokens", "init", "seed")
    default_targets: ClassVar[Dict[str, str]] = {}  # always the input embedding

    def __init__(self, embedding: nn.Embedding, tokens: int = 20, init: str = "vocab", seed: int = 0):
        if init not in ("vocab", "normal"):
            raise ValueError(f"prompt: init must be 'vocab' or 'normal', got {init!r}")
        super().__init__(tokens, embedding.embedding_dim, (0, embedding.embedding_dim))
        self.init, self.seed = init, seed
        self._table = [embedding]  # a plain list: read for initialisation, not a submodule (not saved twice)
        self.in_features, self.out_features = embedding.num_embeddings, embedding.embedding_dim

    @classmethod
    def from_base(cls, base: nn.Module, **options) -> "PromptDelta":
        if not isinstance(base, nn.Embedding):
            raise TypeError(f"prompt tuning needs the input nn.Embedding, got {type(base).__name__}")
        return cls(base, **options)

    def init_vectors(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        if self.init == "normal":
            return torch.randn(self.tokens_per_slot, self.width, device=device, dtype=dtype) * 0.02
        table = self._table[0].weight
        generator = torch.Generator().manual_seed(self.seed + self.n_slots)  # a different draw per task
        rows = torch.randint(0, table.shape[0], (self.tokens_per_slot,), generator=generator)
        return table.detach()[rows.to(table.device)].to(device=device, dtype=dtype).clone()

    @staticmethod
    def slot_parameter_count(in_features: int, out_features: int, tokens: int = 20, **_) -> int:
        return tokens * out_features


@register_delta
class PrefixDelta(VirtualTokens):
    """Per-task prefix vectors written at one attention key or value projection (one site per projection).

    A fused query/key/value projection (GPT-2's ``c_attn``, output 3x its input) gets vectors for its key and
    value columns only.

    Args:
        in_features: input width of the projection.
        out_features: output width of the projection.
        tokens: prefix length ``P`` per task.
        reparam_hidden: width of the reparameterisation MLP used while a task trains (0: train the vectors
            directly); folded into plain vectors when the task is frozen.
    """

    kind: ClassVar[str] = "prefix"
    options: ClassVar[Tuple[str, ...]] = ("tokens", "reparam_hidden")
    default_targets: ClassVar[Dict[str, str]] = default_targets("key_value")

    def __init__(self, in_features: int, out_features: int, tokens: int = 6, reparam_hidden: int = 0):
        columns = (in_features, out_features) if out_features == 3 * in_features else (0, out_features)
        super().__init__(tokens, columns[1] - columns[0], columns, reparam_hidden)
        self.in_features, self.out_features = in_features, out_features

    def init_vectors(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        return torch.randn(self.tokens_per_slot, self.width, device=device, dtype=dtype) * 0.02

    @staticmethod
    def slot_parameter_count(in_features: int, out_features: int, tokens: int = 6, **_) -> int:
        """Stored parameters (the reparameterisation MLP exists only while the task trains)."""
        width = out_features - in_features if out_features == 3 * in_features else out_features
        return tokens * width
