"""What every recipe sets before anything else: the random seeds and the device."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (torch's seeds every GPU as well)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """The device a ``training.device`` value names: ``"auto"`` is cuda when available, else cpu; anything else
    (``"cpu"``, ``"cuda"``, ``"cuda:0"``) is passed to torch as it is."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


_NATIVE_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
# The autocast dtype of each resolved ``training.precision`` (None: no autocast).
PRECISION_DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bfloat16 matmuls natively: a CUDA device that says so, or a CPU whose flags (Linux
    ``/proc/cpuinfo``) list AMX-BF16 or AVX512-BF16. Elsewhere bfloat16 is emulated and slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    except OSError:
        return False
    return any(flag in flags for flag in _NATIVE_BF16_CPU_FLAGS)


def resolve_precision(name: str, device: torch.device) -> str:
    """The arithmetic a ``training.precision`` value names on ``device``: ``"auto"`` is ``"bf16"`` where bfloat16 is
    native (:func:`native_bf16`), else ``"fp32"``; ``"fp32"`` and ``"bf16"`` are taken as they are."""
    if name == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return name
