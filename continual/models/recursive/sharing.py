"""Which shared block each unrolled depth uses, and which pretrained layers initialise each block.

Relaxed Recursive Transformers (Bae et al. 2024, arXiv 2410.20672), section 3: an ``L``-layer model becomes
``K = L / R`` shared blocks looped ``R`` times. Everything here is plain integer math, independent of torch models:

- **cycle**: depth ``l`` uses block ``l mod K`` (blocks ``0..K-1`` repeat, ``R`` loops of the whole stack);
- **sequence**: depth ``l`` uses block ``floor(l / R)`` (each block repeats ``R`` times in a row);
- initialisation of block ``k``: **stepwise** takes layer ``round(linspace(0, L-1, K))[k]``, **average** the mean
  of every layer tied to block ``k``, **lower** layer ``k``.
"""

from __future__ import annotations

from typing import List, Tuple

import numpy as np

SHARINGS: Tuple[str, ...] = ("cycle", "sequence")
INITS: Tuple[str, ...] = ("stepwise", "average", "lower")


def check_loops(num_layers: int, num_loops: int) -> int:
    """The number of shared blocks ``K = L / R``.

    Raises:
        ValueError: ``R < 1`` or ``L`` not divisible by ``R`` (naming both numbers).
    """
    if num_loops < 1:
        raise ValueError(f"num_loops must be >= 1, got {num_loops}")
    if num_layers % num_loops:
        raise ValueError(
            f"num_loops={num_loops} does not divide the model's {num_layers} layers; pick R among "
            f"{[r for r in range(1, num_layers + 1) if num_layers % r == 0]}"
        )
    return num_layers // num_loops


def block_index(num_layers: int, num_loops: int, sharing: str) -> List[int]:
    """The shared block of every unrolled depth.

    Args:
        num_layers: ``L``, depths of the unrolled model (the pretrained layer count).
        num_loops: ``R``.
        sharing: "cycle" or "sequence".

    Returns:
        ``L`` block indices in ``[0, K)``.
    """
    K = check_loops(num_layers, num_loops)
    if sharing == "cycle":
        return [depth % K for depth in range(num_layers)]
    if sharing == "sequence":
        return [depth // num_loops for depth in range(num_layers)]
    raise ValueError(f"sharing must be one of {list(SHARINGS)}, got {sharing!r}")


def tied_depths(index: List[int]) -> List[List[int]]:
    """Inverse of :func:`block_index`: for each block ``k``, the depths that use it, ascending."""
    groups: List[List[int]] = [[] for _ in range(max(index) + 1)]
    for depth, block in enumerate(index):
        groups[block].append(depth)
    return groups


def stepwise_layers(num_layers: int, num_blocks: int) -> List[int]:
    """``round(linspace(0, L-1, K))`` with numpy's floating-point linspace, as the authors' code computes it.

    The float matters at exact halves: for ``L = 30, K = 15`` the middle point comes out as ``14.500000000000002``
    and rounds to 15 (an exact computation would give 14.5 -> 14).
    """
    return [int(round(float(x))) for x in np.linspace(0, num_layers - 1, num_blocks)]


def init_sources(num_layers: int, num_loops: int, sharing: str, init: str) -> List[List[int]]:
    """The pretrained layers whose weights (averaged when several) initialise each shared block.

    Returns:
        ``K`` lists of layer indices; block ``k`` takes the mean of the layers in entry ``k``.
    """
    index = block_index(num_layers, num_loops, sharing)
    K = num_layers // num_loops
    if init == "stepwise":
        return [[layer] for layer in stepwise_layers(num_layers, K)]
    if init == "average":
        return tied_depths(index)
    if init == "lower":
        return [[k] for k in range(K)]
    raise ValueError(f"init must be one of {list(INITS)}, got {init!r}")
