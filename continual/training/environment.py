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
