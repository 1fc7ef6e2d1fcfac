"""TinT's first-order backward through layer norms and activations (Panigrahi et al. 2023, arXiv 2307.01189, §3).

The construction cannot multiply by a layer norm's Jacobian directly, so it takes a finite difference instead:
``dx ~= N * (f(x + dy / N) - f(x))`` with ``N = 1000``. That is a Jacobian-vector product, and it equals the
vector-Jacobian product that back-propagation needs because the Jacobians involved are symmetric (layer norm and RMS
norm without their affine part; elementwise activations are diagonal). The error is ``O(1/N)``.

This module holds the pure math (:func:`first_order_vjp` and the normalisations) and a context manager that makes
a Hugging Face model use it: while :func:`first_order_backward` is active, the norms and activations of the chosen
blocks compute the same forward values but back-propagate by the finite difference above.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from continual.models.tint.layouts import NormSite, layout_for, resolve_layers

DEFAULT_N = 1000  # TinT's N


def first_order_vjp(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, g: torch.Tensor, n: float = DEFAULT_N) -> torch.Tensor:
    """``N * (fn(x + g / N) - fn(x))``, the first-order stand-in for ``J_fn(x)^T g``.

    Computed in at least float32 (a half-precision difference would cancel to noise), returned in ``g``'s dtype.

    Args:
        fn: a function acting on the last dimension whose Jacobian is symmetric (a normalisation or an elementwise
            activation).
        x: ``[..., D]`` the input ``fn`` saw in the forward pass.
        g: ``[..., D]`` the gradient with respect to ``fn``'s output.
        n: the finite-difference scale ``N``.

    Returns:
        ``[..., D]`` the approximate gradient with respect to ``x``.
    """
    if n <= 0:
        raise ValueError(f"the first-order scale N must be > 0, got {n}")
    dtype = torch.promote_types(torch.promote_types(x.dtype, g.dtype), torch.float32)
    x, g32 = x.to(dtype), g.to(dtype)
    return (n * (fn(x + g32 / n) - fn(x))).to(g.dtype)


def layer_norm_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` over the last dimension (layer norm without its affine part)."""
    return F.layer_norm(x, x.shape[-1:], None, None, eps)


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps)`` over the last dimension, in float32 at least (as Llama's RMSNorm does)."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def normalizer(kind: str, eps: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """The normalisation of a :class:`NormSite` kind as a one-argument function."""
    if kind == "layernorm":
        return lambda x: layer_norm_normalize(x, eps)
    if kind == "rmsnorm":
        return lambda x: rms_normalize(x, eps)
    raise ValueError(f"unknown norm kind {kind!r} (layernorm, rmsnorm)")


class _FirstOrder(torch.autograd.Function):
    """``fn(x)`` forward; :func:`first_order_vjp` backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fn: Callable, n: float) -> torch.Tensor:
        ctx.fn, ctx.n = fn, n
        ctx.save_for_backward(x)
        return fn(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (x,) = ctx.saved_tensors
        with torch.no_grad():
            return first_order_vjp(ctx.fn, x, g, ctx.n), None, None


def with_first_order_backward(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, n: float = DEFAULT_N) -> torch.Tensor:
    """``fn(x)``, whose gradient with respect to ``x`` is the first-order finite difference."""
    return _FirstOrder.apply(x, fn, n)


def _norm_hook(site: NormSite, n: float):
    normalize = normalizer(site.kind, site.eps)

    def hook(module: nn.Module, args, output):
        x = args[0]
        x_hat = with_first_order_backward(normalize, x, n)
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        if site.kind == "rmsnorm":  # Llama: weight * normalized.to(input dtype)
            x_hat = x_hat.to(x.dtype)
            return x_hat if weight is None else weight * x_hat
        out = x_hat if weight is None else x_hat * weight
        return out if bias is None else out + bias

    return hook


def _activation_hook(n: float):
    def hook(module: nn.Module, args, output):
        return with_first_order_backward(module.forward, args[0], n)  # .forward: no hooks, no recursion

    return hook


@contextmanager
def first_order_backward(model: nn.Module, layers: Optional[int], n: float = DEFAULT_N) -> Iterator[None]:
    """Inside this context the norms and activations of the top ``layers`` blocks (``None``: all) and the final norm
    back-propagate by TinT's first-order rule; forward values are unchanged.

    The hooks are removed on exit, also after an exception.
    """
    layout = layout_for(model)
    norms: List[NormSite] = [layout.final_norm(model)]
    activations: List[nn.Module] = []
    for index in resolve_layers(model, layers):
        sites = layout.block_sites(model, index)
        norms += sites.norms
        activations += sites.activations
    handles = []
    try:
        seen: set = set()
        for site in norms:
            if id(site.module) not in seen:
                seen.add(id(site.module))
                handles.append(site.module.register_forward_hook(_norm_hook(site, n)))
        for module in activations:
            if id(module) not in seen:
                seen.add(id(module))
                handles.append(module.register_forward_hook(_activation_hook(n)))
        yield
    finally:
        for handle in handles:
            handle.remove()
