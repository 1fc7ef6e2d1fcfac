"""Language-modelling text as recipes configure it: how the sentences of CL_Benchmark task folders are read, split
and packed into blocks (:func:`streams.text.build_text_blocks`).

Each recipe's ``data`` node extends :class:`TextDataConfig` with the task folders it reads (the continual-LM
recipe's ``domains``, uptraining's ``tasks``), so the two cut text the same way under the same keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from streams.text import TextBlocks


@dataclass
class TextDataConfig:
    # CL_Benchmark root; empty: $CONTINUAL_DATA.
    data_root: Optional[str] = None
    # Split files read per task ("train", "test", "dev").
    splits: List[str] = field(default_factory=lambda: ["train"])
    # Tokens per block.
    block_size: int = 128
    # Share of the sentences held back for evaluation (split before packing, so no held-back sentence is trained on).
    heldout_fraction: float = 0.1
    # Sentences read per task (a seeded sample), None for all.
    max_sentences: Optional[int] = None
    # Seed of the sentence shuffling and split.
    seed: int = 0


def text_blocks(data: TextDataConfig, tokenizer, tasks: Sequence[str]) -> TextBlocks:
    """Training and held-back blocks of some task folders, cut as the ``data`` node says.

    Raises:
        StreamError: a missing task or file, or too little text for one block on either side.
    """
    from streams.text import build_text_blocks

    return build_text_blocks(list(tasks), tokenizer, block_size=data.block_size, heldout_fraction=data.heldout_fraction,
                             seed=data.seed, data_root=data.data_root, splits=list(data.splits),
                             max_sentences=data.max_sentences)
