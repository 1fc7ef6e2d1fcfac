"""Each TinT construction piece against the explicit computation it stands for, and the whole simulated one-step
fine-tuning of a tiny GPT-2 against the explicit procedure."""

from __future__ import annotations

import pytest
import torch

from continual.models.tint.construction import (
    FirstOrderActivationBackward,
    FirstOrderNormBackward,
    LinearBackward,
    LinearDescent,
    LinearForward,
    StopGradAttentionBackward,
    pack_linear,
    packed_width,
    softmax_attention,
    unpack_linear,
)
from continual.models.tint.one_step import InnerStep, applied, context_loss, one_step_update
from continual.models.tint.simulated import SimulatedGPT2

DTYPE = torch.float64  # the construction is exact arithmetic; double precision shows it


def _linear(din=6, dout=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(dout, din, generator=g, dtype=DTYPE), torch.randn(dout, generator=g, dtype=DTYPE)


@pytest.mark.parametrize("num_prefixes", [1, 2, 4, 8])
def test_packing_is_lossless(num_prefixes):
    W, b = _linear()
    width = packed_width(6, 8, num_prefixes) + 3  # spare room stays zero
    prefix = pack_linear(W, b, num_prefixes, width)
    assert prefix.shape == (num_prefixes, width)
    W2, b2 = unpack_linear(prefix, din=6, dout=8)
    assert torch.equal(W2, W) and torch.equal(b2, b)
    assert torch.count_nonzero(prefix[:, -3:]) == 0
    # batched prefixes unpack the same way
    W3, b3 = unpack_linear(torch.stack([prefix, 2 * prefix]), din=6, dout=8)
    assert torch.equal(W3[1], 2 * W) and torch.equal(b3[1], 2 * b)


def test_packing_errors_name_what_is_missing():
    W, b = _linear()
    with pytest.raises(ValueError, match="need 28"):
        pack_linear(W, b, 2, width=20)
    with pytest.raises(ValueError, match="do not spread evenly"):
        pack_linear(W, b, 3, width=100)


def _prefix_and_inputs(B=2, T=5, din=6, dout=8, S=4):
    W, b = _linear(din, dout)
    prefix = pack_linear(W, b, S, packed_width(din, dout, S)).expand(B, -1, -1).clone()
    x = torch.randn(B, T, din, dtype=DTYPE)
    return W, b, prefix, x


def test_linear_forward_computes_wx_plus_b():
    W, b, prefix, x = _prefix_and_inputs()
    y = LinearForward(6, 8, 4)(prefix, x)
    torch.testing.assert_close(y, x @ W.T + b, rtol=0, atol=1e-12)


def test_linear_backward_computes_w_transpose_g():
    W, b, prefix, x = _prefix_and_inputs()
    g = torch.randn(2, 5, 8, dtype=DTYPE)
    torch.testing.assert_close(LinearBackward(6, 8, 4)(prefix, g), g @ W, rtol=0, atol=1e-12)


def test_linear_descent_takes_the_summed_gradient_step_per_sequence():
    W, b, prefix, x = _prefix_and_inputs()
    g = torch.randn(2, 5, 8, dtype=DTYPE)
    mask = torch.tensor([[1, 1, 0, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    eta = 0.3
    new = LinearDescent(6, 8, 4)(prefix, x, g, eta, token_mask=mask)
    W_new, b_new = unpack_linear(new, din=6, dout=8)
    for row in range(2):
        gm = g[row] * mask[row, :, None]
        torch.testing.assert_close(W_new[row], W - eta * gm.T @ x[row], rtol=0, atol=1e-12)
        torch.testing.assert_close(b_new[row], b - eta * gm.sum(0), rtol=0, atol=1e-12)
    # bias-only descent (TinT's layer norms) leaves the weights bit-identical
    bias_only = LinearDescent(6, 8, 4, update_weight=False)(prefix, x, g, eta)
    W_b, b_b = unpack_linear(bias_only, din=6, dout=8)
    assert torch.equal(W_b, W.expand(2, -1, -1))
    torch.testing.assert_close(b_b[0], b - eta * g[0].sum(0), rtol=0, atol=1e-12)


def _autograd_vjp(fn, x, g):
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(fn(x), x, g)
    return grad


@pytest.mark.parametrize(
    "module, fn",
    [
        (FirstOrderNormBackward("layernorm", 1e-5), lambda x: torch.nn.functional.layer_norm(x, x.shape[-1:], eps=1e-5)),
        (FirstOrderNormBackward("rmsnorm", 1e-6), lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)),
        (FirstOrderActivationBackward(torch.nn.functional.gelu), torch.nn.functional.gelu),
        (FirstOrderActivationBackward(torch.nn.functional.silu), torch.nn.functional.silu),
    ],
    ids=["layernorm", "rmsnorm", "gelu", "silu"],
)
def test_first_order_backward_is_within_order_one_over_n_of_autograd(module, fn):
    x = torch.randn(3, 7, 16, dtype=DTYPE)
    g = torch.randn(3, 7, 16, dtype=DTYPE)
    exact = _autograd_vjp(fn, x, g)
    errors = {}
    for n in (100.0, 1000.0, 10000.0):
        module.n = n
        errors[n] = (module(x, g) - exact).abs().max().item()
    scale = exact.abs().max().item()
    assert errors[1000.0] < 10 * scale / 1000.0  # O(1/N) with a modest constant
    assert errors[1000.0] > 0  # a finite difference, not the exact gradient
    # and the error falls like 1/N: ten times larger N, about ten times smaller error
    assert 5 < errors[100.0] / errors[1000.0] < 20 and 5 < errors[1000.0] / errors[10000.0] < 20


def test_stop_gradient_attention_backward_equals_autograd_with_detached_probabilities():
    B, T, H, dh = 2, 6, 3, 4
    q, k, v = (torch.randn(B, T, H * dh, dtype=DTYPE, requires_grad=True) for _ in range(3))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 4:] = 0
    g = torch.randn(B, T, H * dh, dtype=DTYPE)

    split = lambda t: t.view(B, T, H, dh).transpose(1, 2)  # noqa: E731
    scores = torch.matmul(split(q), split(k).transpose(-1, -2)) / dh**0.5
    allowed = torch.ones(T, T, dtype=torch.bool).tril()[None, None] & mask.bool()[:, None, None, :]
    probs = torch.softmax(scores.masked_fill(~allowed, torch.finfo(DTYPE).min), -1)
    out = torch.matmul(probs.detach(), split(v)).transpose(1, 2).reshape(B, T, H * dh)
    g_q, g_k, g_v = torch.autograd.grad(out, (q, k, v), g, allow_unused=True, materialize_grads=True)

    simulated = StopGradAttentionBackward(H)(probs.detach(), g)
    torch.testing.assert_close(simulated, g_v, rtol=0, atol=1e-12)
    assert torch.count_nonzero(g_q) == 0 and torch.count_nonzero(g_k) == 0
    # the simulated model's forward attention is the same computation
    sim_out, sim_probs = softmax_attention(q.detach(), k.detach(), v.detach(), H, mask, dh**-0.5)
    torch.testing.assert_close(sim_probs, probs.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(sim_out, out.detach(), rtol=0, atol=1e-12)


def _sequences(vocab: int, B=2, T=14):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 12:] = 0  # right padding in one row
    train = torch.zeros(B, T, dtype=torch.bool)
    train[:, 1:8] = True  # the "context": targets 1..7
    test = torch.zeros(B, T, dtype=torch.bool)
    test[:, 8:] = True  # the "query"
    return ids, mask, train, test


def _explicit_test_losses(model, ids, mask, train, test, step):
    out = []
    for row in range(ids.shape[0]):  # the explicit procedure: one update per sequence (its own context)
        r = slice(row, row + 1)
        with applied(one_step_update(model, ids[r], mask[r], train[r], step)):
            out.append(context_loss(model, ids[r], mask[r], test[r]))
    return torch.stack(out)


@pytest.mark.parametrize("layers", [1, None], ids=["top1", "all"])
def test_simulated_one_step_test_loss_equals_the_explicit_procedure(layers):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32)).to(DTYPE).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    ids, mask, train, test = _sequences(50)
    lr = 1.0
    step = InnerStep(lr=lr, layers=layers, first_order=True, n=1000)

    simulated = SimulatedGPT2(model, num_prefixes=4, layers=layers).one_step_test_loss(ids, mask, train, test, lr)
    explicit = _explicit_test_losses(model, ids, mask, train, test, step)
    plain = torch.stack([context_loss(model, ids[r : r + 1], mask[r : r + 1], test[r : r + 1]) for r in range(2)])

    torch.testing.assert_close(simulated, explicit, rtol=1e-8, atol=1e-8)
    assert (simulated - plain).abs().min() > 1e-3  # the step really changed the test loss
    # with exact (not first-order) norm/activation backward the explicit loss moves by O(1/N) only
    exact = _explicit_test_losses(model, ids, mask, train, test, InnerStep(lr=lr, layers=layers, first_order=False))
    assert 0 < (exact - explicit).abs().max() < 1e-2 * (explicit - plain).abs().max()
