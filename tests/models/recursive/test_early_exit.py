"""Early exit after a loop, and continuous depth-wise batching against per-sample recursion."""

from __future__ import annotations

import pytest
import torch

from continual.models.recursive import (
    confidence,
    convert_to_recursive,
    depthwise_early_exit,
    first_confident,
    loop_logits,
    recursive_early_exit,
)
from continual.models.recursive.families import last_token


@pytest.fixture
def looped(make_llama):
    """6 layers -> 2 shared blocks looped 3 times, relaxed with rank-4 SVD LoRA (per-depth factors differ)."""
    return convert_to_recursive(make_llama(6), num_loops=3, init="average", rank=4)


def threshold_between(conf: torch.Tensor) -> float:
    """A threshold in the widest gap of the first loop's confidences: some samples exit there, some do not."""
    values = conf.sort().values
    gaps = values[1:] - values[:-1]
    i = int(gaps.argmax())
    return float(values[i] + values[i + 1]) / 2


def test_the_last_loop_exit_is_the_models_own_output(looped, make_batch):
    ids, mask = make_batch(n=6)
    with torch.no_grad():
        per_loop = loop_logits(looped, ids, mask)  # [R, B, V]
        full = looped(input_ids=ids, attention_mask=mask).logits
    assert per_loop.shape == (3, 6, 97)
    assert torch.allclose(per_loop[-1], last_token(full, mask), atol=1e-5)
    assert not torch.allclose(per_loop[0], per_loop[-1], atol=1e-3)


def test_first_confident_picks_the_first_loop_over_the_threshold():
    conf = torch.tensor([[0.1, 0.9, 0.2], [0.6, 0.95, 0.3], [0.7, 0.1, 0.4]])  # [R=3, B=3]
    assert first_confident(conf, 0.5).tolist() == [1, 0, 2]  # sample 2 never reaches it: last loop
    assert torch.allclose(confidence(torch.zeros(2, 4)), torch.full((2,), 0.25))


@pytest.mark.parametrize("slots", [1, 3, 16])
def test_depthwise_batching_gives_the_same_outputs_as_per_sample_recursion(looped, make_batch, slots):
    ids, mask = make_batch(n=10, seed=3)
    with torch.no_grad():
        first = confidence(loop_logits(looped, ids, mask)[0])
        threshold = threshold_between(first)
        reference = recursive_early_exit(looped, ids, mask, threshold)
    batched = depthwise_early_exit(looped, ids, mask, threshold, slots=slots)
    assert 0 < int((reference.exit_loop == 1).sum()) < 10  # mixed exits: samples at different loops share calls
    assert torch.equal(batched.exit_loop, reference.exit_loop)
    assert torch.allclose(batched.logits, reference.logits, atol=1e-5)
    assert torch.allclose(batched.confidence, reference.confidence, atol=1e-6)
    # Each step is K=2 block calls for every sample in flight; refills keep the slots full.
    assert batched.block_calls <= 2 * int(reference.exit_loop.sum())
    if slots == 1:
        assert batched.block_calls == 2 * int(reference.exit_loop.sum()) and batched.mixed_calls == 0
    if slots == 3:
        assert batched.mixed_calls > 0  # refilled slots put loop-0 samples beside deeper ones


def test_without_early_exit_every_sample_runs_every_loop(looped, make_batch):
    ids, mask = make_batch(n=5)
    result = depthwise_early_exit(looped, ids, mask, threshold=2.0, slots=2)
    assert result.exit_loop.tolist() == [3] * 5 and result.mean_loops == 3
    with torch.no_grad():
        full = looped(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(result.logits, last_token(full, mask), atol=1e-5)


def test_one_exit_head_per_loop(looped, make_batch):
    ids, mask = make_batch(n=4)
    norm, head = looped.model.norm, looped.lm_head
    heads = [lambda h, m, s=s: s * head(norm(last_token(h, m))) for s in (0.0, 1.0, 1.0)]  # loop 1: uniform logits
    reference = recursive_early_exit(looped, ids, mask, 0.5, exit_heads=heads)
    batched = depthwise_early_exit(looped, ids, mask, 0.5, slots=3, exit_heads=heads)
    assert (reference.exit_loop >= 2).all() and torch.equal(batched.exit_loop, reference.exit_loop)
    assert torch.allclose(batched.logits, reference.logits, atol=1e-5)
    with pytest.raises(ValueError, match="one head per loop"):
        depthwise_early_exit(looped, ids, mask, 0.5, exit_heads=heads[:2])


def test_encoder_with_a_custom_head(make_bert, make_batch):
    model = convert_to_recursive(make_bert(4), num_loops=2, rank=3)
    torch.manual_seed(1)
    classifier = torch.nn.Linear(32, 5)
    head = lambda h, m: classifier((h * m[..., None]).sum(1) / m.sum(1, keepdim=True))
    ids, mask = make_batch(n=8, seed=5)
    with torch.no_grad():
        threshold = threshold_between(confidence(loop_logits(model, ids, mask, head)[0]))
        reference = recursive_early_exit(model, ids, mask, threshold, exit_heads=head)
    batched = depthwise_early_exit(model, ids, mask, threshold, slots=3, exit_heads=head)
    assert torch.equal(batched.exit_loop, reference.exit_loop)
    assert torch.allclose(batched.logits, reference.logits, atol=1e-5)
    with pytest.raises(ValueError, match="no LM head"):
        depthwise_early_exit(model, ids, mask, 0.5)


def test_what_cannot_share_a_block_call_is_refused(make_llama, make_batch):
    ids, mask = make_batch(n=2)
    sequence = convert_to_recursive(make_llama(4), num_loops=2, sharing="sequence")
    with pytest.raises(ValueError, match="needs CYCLE sharing"):
        depthwise_early_exit(sequence, ids, mask, 0.5)
    own_norms = convert_to_recursive(make_llama(4), num_loops=2, share_norms=False)
    with pytest.raises(ValueError, match="share_norms=True"):
        depthwise_early_exit(own_norms, ids, mask, 0.5)
    with pytest.raises(ValueError, match="not recursive"):
        depthwise_early_exit(make_llama(4), ids, mask, 0.5)
