"""Language-modelling protocol: train on the first half of each chunk, loss on the rest."""

from __future__ import annotations

import pytest
import torch

from continual.models.tint.lm_eval import chunk_tokens, evaluate_lm, half_masks, second_half_loss
from continual.models.tint.one_step import InnerStep, applied, context_loss, one_step_update


def test_chunks_and_halves():
    chunks = chunk_tokens(range(25), 8)
    assert chunks.shape == (3, 8) and chunks[1, 0] == 8
    assert chunk_tokens(range(25), 8, max_chunks=2).shape == (2, 8)
    train, test = half_masks(8)
    assert train.tolist() == [False, True, True, True, False, False, False, False]
    assert test.tolist() == [False] * 4 + [True] * 4
    with pytest.raises(ValueError, match="do not make one chunk"):
        chunk_tokens(range(5), 8)


def test_one_step_lm_losses_match_the_explicit_computation(tiny_lm):
    g = torch.Generator().manual_seed(0)
    chunks = torch.randint(1, tiny_lm.config.vocab_size, (3, 16), generator=g)
    step = InnerStep(lr=0.5, layers=1)
    result = evaluate_lm(tiny_lm, chunks, step, batch_size=2, progress=False)
    assert result.plain.shape == result.tint.shape == (3,)
    train, test = half_masks(16)
    row = chunks[2:3]
    with torch.no_grad():
        plain = context_loss(tiny_lm, row, torch.ones_like(row), test[None]) / test[1:].sum()
    torch.testing.assert_close(result.plain[2], plain, rtol=1e-5, atol=1e-6)
    with applied(one_step_update(tiny_lm, row, torch.ones_like(row), train[None], step)), torch.no_grad():
        tint = context_loss(tiny_lm, row, torch.ones_like(row), test[None]) / test[1:].sum()
    torch.testing.assert_close(result.tint[2], tint, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(result.plain, result.tint)
    zero = evaluate_lm(tiny_lm, chunks, InnerStep(lr=0.0, layers=1), progress=False)
    torch.testing.assert_close(zero.tint, zero.plain)
    torch.testing.assert_close(second_half_loss(tiny_lm, chunks).cpu(), result.plain)
