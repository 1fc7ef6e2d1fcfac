"""Where the expert building blocks of ModuleFormer (Shen et al. 2023, "ModuleFormer: Modularity Emerges from
Mixture-of-Experts", arXiv 2306.04640) used to live: they are in :mod:`continual.modules.experts` now.

Kept only so that ``benchmarks/moduleformer_dispatch.py`` (which imports ``DISPATCH_BACKENDS`` and ``ExpertLayer``
from here) keeps running until it imports them from ``continual.modules.experts``; new code imports from there.
"""

from continual.modules.experts import DISPATCH_BACKENDS, ExpertLayer  # noqa: F401

__all__ = ["DISPATCH_BACKENDS", "ExpertLayer"]
