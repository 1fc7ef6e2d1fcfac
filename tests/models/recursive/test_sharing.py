"""The index maps and initialisation sources of the sharing strategies, by hand."""

from __future__ import annotations

import numpy as np
import pytest

from continual.models.recursive.sharing import block_index, init_sources, stepwise_layers, tied_depths


@pytest.mark.parametrize(
    "L, R, sharing, expected",
    [
        (6, 2, "cycle", [0, 1, 2, 0, 1, 2]),
        (6, 3, "cycle", [0, 1, 0, 1, 0, 1]),
        (6, 2, "sequence", [0, 0, 1, 1, 2, 2]),
        (6, 3, "sequence", [0, 0, 0, 1, 1, 1]),
        (30, 2, "cycle", list(range(15)) * 2),
        (30, 2, "sequence", [l // 2 for l in range(30)]),
        (4, 1, "cycle", [0, 1, 2, 3]),
        (4, 1, "sequence", [0, 1, 2, 3]),
        (4, 4, "cycle", [0, 0, 0, 0]),
    ],
)
def test_index_maps(L, R, sharing, expected):
    assert block_index(L, R, sharing) == expected


def test_tied_depths_inverts_the_map():
    assert tied_depths(block_index(6, 2, "cycle")) == [[0, 3], [1, 4], [2, 5]]
    assert tied_depths(block_index(6, 2, "sequence")) == [[0, 1], [2, 3], [4, 5]]


@pytest.mark.parametrize("L, K", [(30, 15), (30, 10), (6, 3), (6, 2), (12, 5), (7, 1), (5, 5), (22, 8)])
def test_stepwise_matches_numpy_round_linspace(L, K):
    assert stepwise_layers(L, K) == [int(x) for x in np.round(np.linspace(0, L - 1, K))]


def test_init_sources_by_hand():
    # 6 layers, R = 2: K = 3 blocks; stepwise takes layers round(0, 2.5, 5) = 0, 2, 5 (half to even).
    assert init_sources(6, 2, "cycle", "stepwise") == [[0], [2], [5]]
    assert init_sources(6, 2, "sequence", "stepwise") == [[0], [2], [5]]
    assert init_sources(6, 2, "cycle", "average") == [[0, 3], [1, 4], [2, 5]]
    assert init_sources(6, 2, "sequence", "average") == [[0, 1], [2, 3], [4, 5]]
    assert init_sources(6, 2, "cycle", "lower") == [[0], [1], [2]]


@pytest.mark.parametrize(
    "args, match",
    [((6, 4, "cycle"), "does not divide"), ((6, 0, "cycle"), ">= 1"), ((6, 2, "ring"), "sharing must be one of")],
)
def test_bad_arguments_say_what_is_wrong(args, match):
    with pytest.raises(ValueError, match=match):
        block_index(*args)


def test_unknown_init():
    with pytest.raises(ValueError, match="init must be one of"):
        init_sources(6, 2, "cycle", "upper")


def test_stepwise_for_smollm2_halved_follows_the_float_linspace():
    # 30 layers -> 15 blocks: the middle point is 14.500000000000002 in floating point, so layer 15 (not 14).
    assert stepwise_layers(30, 15) == [0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25, 27, 29]
