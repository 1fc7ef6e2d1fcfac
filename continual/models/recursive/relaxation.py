"""Depth-wise LoRA relaxation of tied projections (Bae et al. 2024, arXiv 2410.20672, section 3.2).

Each unrolled depth ``l`` keeps the shared weight ``W_k`` of its block and adds its own low-rank ``B_l A_l``:
``y = (W_k + B_l A_l) x + b``. With SVD initialisation the factors are the best rank-``r`` approximation of the
residual ``W_original[l] - W_k`` (``U S V^T = svd(residual)``, ``B = U_r diag(S_r)``, ``A = V_r^T``, scale 1), so
full rank reproduces the original layer and rank ``r`` leaves exactly the discarded singular values as error
(Eckart-Young). Zero initialisation (``A`` Kaiming, ``B = 0``) starts at the plain recursive model instead.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

LORA_INITS: Tuple[str, ...] = ("svd", "zero")


def svd_lora_factors(residual: torch.Tensor, rank: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The rank-``r`` truncated SVD of a residual as LoRA factors.

    Args:
        residual: ``[out, in]`` (computed in float32 whatever its dtype).
        rank: ``r``, at most ``min(out, in)``.

    Returns:
        ``(A [r, in], B [out, r])`` in float32 with ``B @ A`` the best rank-``r`` approximation of ``residual``.
    """
    if not 1 <= rank <= min(residual.shape):
        raise ValueError(f"rank must be in [1, {min(residual.shape)}] for a {tuple(residual.shape)} matrix, got {rank}")
    U, S, Vh = torch.linalg.svd(residual.float(), full_matrices=False)
    return Vh[:rank].contiguous(), (U[:, :rank] * S[:rank]).contiguous()


def truncation_error(residual: torch.Tensor, rank: int) -> float:
    """Frobenius norm of the singular values a rank-``r`` factorisation discards: ``sqrt(sum_{i > r} s_i^2)``."""
    S = torch.linalg.svdvals(residual.float())
    return float(S[rank:].square().sum().sqrt())


class RelaxedLinear(nn.Linear):
    """A linear whose weight (and bias) may be shared with other depths, plus this depth's own LoRA.

    ``forward(x) = x W^T + b + (x A^T) B^T`` with ``x: [..., in]``. A subclass of ``nn.Linear`` so that code which
    wraps linears (the module bank's sites, PEFT) accepts it unchanged; ``weight`` and ``bias`` are the shared
    ``nn.Parameter`` objects passed in, never copies.

    Args:
        weight: ``[out, in]`` shared parameter.
        bias: ``[out]`` parameter (shared or not) or None.
        rank: ``r >= 1``.
        A: ``[r, in]`` initial ``relax_A`` (Kaiming-uniform when None).
        B: ``[out, r]`` initial ``relax_B`` (zeros when None).
    """

    def __init__(
        self,
        weight: nn.Parameter,
        bias: Optional[nn.Parameter],
        rank: int,
        A: Optional[torch.Tensor] = None,
        B: Optional[torch.Tensor] = None,
    ):
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a weight we replace at once
        out_features, in_features = weight.shape
        if rank < 1:
            raise ValueError(f"relaxation rank must be >= 1, got {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.weight = weight
        self.register_parameter("bias", bias)
        kw = {"device": weight.device, "dtype": weight.dtype}
        if A is None:
            A = torch.empty(rank, in_features, **kw)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        if B is None:
            B = torch.zeros(out_features, rank, **kw)
        if tuple(A.shape) != (rank, in_features) or tuple(B.shape) != (out_features, rank):
            raise ValueError(
                f"relaxation factors must be A [{rank}, {in_features}] and B [{out_features}, {rank}], "
                f"got {tuple(A.shape)} and {tuple(B.shape)}"
            )
        self.relax_A = nn.Parameter(A.to(**kw))
        self.relax_B = nn.Parameter(B.to(**kw))
        # While a depth-wise batched call runs: [(rows [n], module whose relaxation those rows use), ...].
        self._per_sample: Optional[List[Tuple[torch.Tensor, "RelaxedLinear"]]] = None

    def reset_parameters(self) -> None:  # nn.Linear API; the shared weight is not this module's to reset
        return None

    def effective_weight(self) -> torch.Tensor:
        """``W + B A``: ``[out, in]``, the plain linear this depth computes."""
        return self.weight + self.relax_B @ self.relax_A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in] -> [..., out]; during a depth-wise batched call x is [N, ..., in], rows grouped by relaxation."""
        out = F.linear(x, self.weight, self.bias)
        if self._per_sample is None:
            return out + F.linear(F.linear(x, self.relax_A), self.relax_B)
        change = torch.zeros_like(out)
        for rows, source in self._per_sample:
            change[rows] = F.linear(F.linear(x[rows], source.relax_A), source.relax_B)
        return out + change

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}"


@contextmanager
def per_sample(linear: RelaxedLinear, groups: Sequence[Tuple[torch.Tensor, RelaxedLinear]]) -> Iterator[None]:
    """Let ``linear`` apply, to some rows of its next inputs, the relaxation of other depths sharing its weight.

    The shared weight multiplies the whole batch at once; only the low-rank part is computed per group of rows. This is
    what lets samples at different loop depths share one call of a shared block.

    Args:
        linear: the module that will be called.
        groups: ``(rows [n], source)`` pairs: rows (indices into the batch) that use ``source``'s relaxation; ``source``
            must share ``linear``'s weight. Rows in no group get no relaxation.
    """
    if any(source.weight is not linear.weight for _, source in groups):
        raise ValueError("per-sample relaxation needs modules that share one weight")
    linear._per_sample = list(groups)
    try:
        yield
    finally:
        linear._per_sample = None
