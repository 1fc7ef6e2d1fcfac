"""One-step internal fine-tuning of a GPT-2 model computed only from TinT's construction pieces
(Panigrahi et al. 2023, "Trainable Transformer in Transformer", arXiv 2307.01189, §2-3 and App. for GPT-2).

Every linear layer of the auxiliary GPT-2 (query, key and value thirds of ``c_attn``, ``c_proj``, ``c_fc``, the MLP's
``c_proj``, and the layer norms' affine parts as ``diag(gamma)`` linears) is packed into its own bank of prefix
tokens, one copy per sequence of the batch. Then, as TinT does inside one forward pass:

1. forward all blocks with :class:`LinearForward` heads and causal softmax attention, keeping the activations;
2. the output gradient after the final layer norm, ``E^T (p - e_y)`` (tied embeddings), on the training tokens;
3. backward through the final layer norm and the top ``n`` blocks with :class:`LinearBackward`, first-order norm and
   activation backward and stop-gradient attention backward;
4. :class:`LinearDescent` on the value / output / MLP banks and the norms' bias slots (queries and keys untouched);
5. forward again with the descended prefix tokens and read the loss on the test tokens.

:meth:`SimulatedGPT2.one_step_test_loss` is checked against the explicit procedure of :mod:`.one_step` (with
first-order backward on) in the tests: the same numbers, up to floating point.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import nn

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
)
from continual.models.tint.first_order import DEFAULT_N, layer_norm_normalize

Banks = Dict[str, torch.Tensor]  # bank name ("h1.fc", "ln_f") -> prefix tokens [B, S, D]


@dataclass
class _BlockMemory:
    """Activations of one block's forward pass that its backward and descent read."""

    x: torch.Tensor  # block input (residual)
    xhat1: torch.Tensor  # normalised input of ln_1
    u1: torch.Tensor  # ln_1 output = attention input
    probs: torch.Tensor  # attention probabilities [B, H, T, T]
    o: torch.Tensor  # attention output before c_proj
    x2: torch.Tensor  # residual after attention
    xhat2: torch.Tensor
    u2: torch.Tensor  # ln_2 output = MLP input
    h1: torch.Tensor  # c_fc output (pre-activation)
    h2: torch.Tensor  # activation output


@dataclass
class _Forward:
    out: torch.Tensor  # ln_f output [B, T, d]
    xL: torch.Tensor  # ln_f input
    xhat_f: torch.Tensor
    blocks: List[_BlockMemory] = field(default_factory=list)


class SimulatedGPT2(nn.Module):
    """A GPT-2 LM whose weights sit in prefix tokens and whose one-step fine-tuning runs on construction modules.

    Args:
        model: a ``GPT2LMHeadModel`` (read once; never modified).
        num_prefixes: ``S``, prefix tokens per linear layer (must divide the hidden and MLP widths).
        layers: top blocks to back-propagate and update (None: all).
        n: first-order ``N``.
    """

    def __init__(self, model: nn.Module, num_prefixes: int = 4, layers: Optional[int] = None, n: float = DEFAULT_N):
        super().__init__()
        config = model.config
        if config.model_type != "gpt2":
            raise ValueError(f"SimulatedGPT2 simulates GPT-2 models, not {config.model_type!r}")
        self.d, self.heads = config.hidden_size, config.num_attention_heads
        self.inner = config.n_inner if config.n_inner is not None else 4 * self.d
        self.n_layer = config.n_layer
        self.layers = self.n_layer if layers is None else int(layers)
        if not 1 <= self.layers <= self.n_layer:
            raise ValueError(f"layers={layers}: the model has {self.n_layer} blocks")
        self.eps = config.layer_norm_epsilon
        self.scale = (self.d // self.heads) ** -0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx or config.reorder_and_upcast_attn:
            raise ValueError("SimulatedGPT2 supports the standard GPT-2 attention scaling only")
        self.S = num_prefixes
        d, m, S = self.d, self.inner, num_prefixes
        self.width = max(packed_width(d, d, S), packed_width(d, m, S), packed_width(m, d, S))
        self.wte = model.transformer.wte.weight.detach()
        self.wpe = model.transformer.wpe.weight.detach()
        self.activation = model.transformer.h[0].mlp.act  # same activation in every block
        self.banks0: Banks = {}
        for i, block in enumerate(model.transformer.h):
            W, b = block.attn.c_attn.weight.detach().t(), block.attn.c_attn.bias.detach()  # Conv1D: [in, out]
            for j, name in enumerate(("q", "k", "v")):
                self.banks0[f"h{i}.{name}"] = self._pack(W[j * d : (j + 1) * d], b[j * d : (j + 1) * d])
            self.banks0[f"h{i}.o"] = self._pack(block.attn.c_proj.weight.detach().t(), block.attn.c_proj.bias.detach())
            self.banks0[f"h{i}.fc"] = self._pack(block.mlp.c_fc.weight.detach().t(), block.mlp.c_fc.bias.detach())
            self.banks0[f"h{i}.proj"] = self._pack(block.mlp.c_proj.weight.detach().t(), block.mlp.c_proj.bias.detach())
            self.banks0[f"h{i}.ln_1"] = self._pack(torch.diag(block.ln_1.weight.detach()), block.ln_1.bias.detach())
            self.banks0[f"h{i}.ln_2"] = self._pack(torch.diag(block.ln_2.weight.detach()), block.ln_2.bias.detach())
        ln_f = model.transformer.ln_f
        self.banks0["ln_f"] = self._pack(torch.diag(ln_f.weight.detach()), ln_f.bias.detach())
        # The construction's modules, one per linear shape.
        self.fwd_dd, self.fwd_dm, self.fwd_md = LinearForward(d, d, S), LinearForward(d, m, S), LinearForward(m, d, S)
        self.bwd_dd, self.bwd_dm, self.bwd_md = LinearBackward(d, d, S), LinearBackward(d, m, S), LinearBackward(m, d, S)
        self.desc_dd, self.desc_dm, self.desc_md = LinearDescent(d, d, S), LinearDescent(d, m, S), LinearDescent(m, d, S)
        self.desc_ln = LinearDescent(d, d, S, update_weight=False)  # layer norms: bias only
        self.norm_bwd = FirstOrderNormBackward("layernorm", self.eps, n)
        self.act_bwd = FirstOrderActivationBackward(self.activation, n)
        self.attn_bwd = StopGradAttentionBackward(self.heads)

    def _pack(self, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return pack_linear(weight, bias, self.S, self.width)

    def initial_banks(self, batch: int) -> Banks:
        """Every sequence starts with its own copy of the auxiliary model's prefix tokens."""
        return {name: bank[None].expand(batch, *bank.shape).clone() for name, bank in self.banks0.items()}

    # ------------------------------------------------------------------ forward
    def forward_pass(self, banks: Banks, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> _Forward:
        """The auxiliary forward pass on construction modules, keeping what backward needs."""
        T = input_ids.shape[1]
        x = self.wte[input_ids] + self.wpe[torch.arange(T, device=input_ids.device)][None]
        memories = []
        for i in range(self.n_layer):
            xhat1 = layer_norm_normalize(x, self.eps)
            u1 = self.fwd_dd(banks[f"h{i}.ln_1"], xhat1)
            q, k, v = (self.fwd_dd(banks[f"h{i}.{name}"], u1) for name in ("q", "k", "v"))
            o, probs = softmax_attention(q, k, v, self.heads, attention_mask, self.scale)
            x2 = x + self.fwd_dd(banks[f"h{i}.o"], o)
            xhat2 = layer_norm_normalize(x2, self.eps)
            u2 = self.fwd_dd(banks[f"h{i}.ln_2"], xhat2)
            h1 = self.fwd_dm(banks[f"h{i}.fc"], u2)
            h2 = self.activation(h1)
            x3 = x2 + self.fwd_md(banks[f"h{i}.proj"], h2)
            memories.append(_BlockMemory(x, xhat1, u1, probs, o, x2, xhat2, u2, h1, h2))
            x = x3
        xhat_f = layer_norm_normalize(x, self.eps)
        return _Forward(out=self.fwd_dd(banks["ln_f"], xhat_f), xL=x, xhat_f=xhat_f, blocks=memories)

    def logits(self, forward: _Forward) -> torch.Tensor:
        """``[B, T, V]`` with the tied embedding as LM head."""
        return forward.out @ self.wte.t()

    # ------------------------------------------------------------------ backward + descent
    def output_gradient(self, forward: _Forward, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
        """``E^T (p_t - e_{y_{t+1}})`` at every position whose target ``t + 1`` is a training token; ``[B, T, d]``."""
        probs = torch.softmax(self.logits(forward), dim=-1)
        g = probs @ self.wte - self.wte[input_ids.roll(-1, dims=1)]
        counted = torch.zeros_like(loss_mask, dtype=g.dtype)
        counted[:, :-1] = loss_mask[:, 1:].to(g.dtype)
        return g * counted[..., None]

    def descend(self, banks: Banks, forward: _Forward, g_out: torch.Tensor, lr: float) -> Banks:
        """Back-propagate ``g_out`` (gradient at the final norm's output) and descend; returns new banks."""
        new = dict(banks)
        # final layer norm: bias descent, then gamma * g through the first-order normalisation backward
        new["ln_f"] = self.desc_ln(banks["ln_f"], forward.xhat_f, g_out, lr)
        g = self.norm_bwd(forward.xL, self.bwd_dd(banks["ln_f"], g_out))
        for i in range(self.n_layer - 1, self.n_layer - self.layers - 1, -1):
            mem = forward.blocks[i]
            # MLP branch: y = proj(act(fc(ln_2(x2))))
            new[f"h{i}.proj"] = self.desc_md(banks[f"h{i}.proj"], mem.h2, g, lr)
            g_h1 = self.act_bwd(mem.h1, self.bwd_md(banks[f"h{i}.proj"], g))
            new[f"h{i}.fc"] = self.desc_dm(banks[f"h{i}.fc"], mem.u2, g_h1, lr)
            g_u2 = self.bwd_dm(banks[f"h{i}.fc"], g_h1)
            new[f"h{i}.ln_2"] = self.desc_ln(banks[f"h{i}.ln_2"], mem.xhat2, g_u2, lr)
            g_x2 = g + self.norm_bwd(mem.x2, self.bwd_dd(banks[f"h{i}.ln_2"], g_u2))
            # attention branch: z = o_proj(A v(ln_1(x))), A constant
            new[f"h{i}.o"] = self.desc_dd(banks[f"h{i}.o"], mem.o, g_x2, lr)
            g_v = self.attn_bwd(mem.probs, self.bwd_dd(banks[f"h{i}.o"], g_x2))
            new[f"h{i}.v"] = self.desc_dd(banks[f"h{i}.v"], mem.u1, g_v, lr)
            g_u1 = self.bwd_dd(banks[f"h{i}.v"], g_v)
            new[f"h{i}.ln_1"] = self.desc_ln(banks[f"h{i}.ln_1"], mem.xhat1, g_u1, lr)
            g = g_x2 + self.norm_bwd(mem.x, self.bwd_dd(banks[f"h{i}.ln_1"], g_u1))
        return new

    # ------------------------------------------------------------------ the whole thing
    def one_step_test_loss(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        train_mask: torch.Tensor,
        test_mask: torch.Tensor,
        lr: float,
    ) -> torch.Tensor:
        """Per-sequence sum of next-token losses on the ``test_mask`` targets after one step on the ``train_mask``
        targets (each sequence fine-tunes its own copy of the weights).

        Args:
            input_ids, attention_mask: ``[B, T]``, right-padded.
            train_mask, test_mask: ``[B, T]`` target tokens whose loss trains / is measured.
            lr: inner learning rate.

        Returns:
            ``[B]`` test losses.
        """
        banks = self.initial_banks(input_ids.shape[0])
        forward = self.forward_pass(banks, input_ids, attention_mask)
        g_out = self.output_gradient(forward, input_ids, train_mask & attention_mask.bool())
        banks = self.descend(banks, forward, g_out, lr)
        return self.test_loss(banks, input_ids, attention_mask, test_mask)

    def test_loss(self, banks: Banks, input_ids: torch.Tensor, attention_mask: torch.Tensor, test_mask: torch.Tensor) -> torch.Tensor:
        """``[B]`` sums of next-token losses on the ``test_mask`` targets with the given banks."""
        logits = self.logits(self.forward_pass(banks, input_ids, attention_mask))
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None])[..., 0]
        counted = (test_mask[:, 1:].bool() & attention_mask[:, 1:].bool()).to(logp.dtype)
        return -(logp * counted).sum(1)
