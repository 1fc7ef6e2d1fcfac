"""Language-modelling text from CL_Benchmark task folders: sentences -> tokens -> fixed-length blocks.

Any task folder of the CL_Benchmark layout works (labels are ignored; only the ``sentence`` fields are read). The
sentences of the chosen tasks are shuffled with a seed and split into a training part and a held-back part *before*
packing, so no held-back sentence is ever seen in training. Each part is tokenized, every sentence ends with the
tokenizer's EOS token, and the token stream is cut into blocks of ``block_size`` (the incomplete tail is dropped).

Example::

    blocks = build_text_blocks(["agnews", "SC/amazon"], tokenizer, block_size=256, heldout_fraction=0.1, seed=0)
    blocks.train      # LongTensor [N_train, 256]
    blocks.heldout    # LongTensor [N_heldout, 256]
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from streams.cl_benchmark import data_root_from, find_task_dir, read_json_items, split_file
from streams.errors import StreamError


@dataclass(frozen=True)
class TextBlocks:
    """Packed token blocks of a text stream.

    Attributes:
        train: ``[N_train, block_size]`` int64 token ids.
        heldout: ``[N_heldout, block_size]`` int64 token ids, from sentences that are not in ``train``.
        tasks: the task folders read.
        sentences: ``{"train": n, "heldout": n}`` sentences on each side of the split.
    """

    train: torch.Tensor
    heldout: torch.Tensor
    tasks: tuple
    sentences: Dict[str, int] = field(default_factory=dict)

    @property
    def block_size(self) -> int:
        return int(self.train.shape[1])


def read_sentences(root: Path, task: str, splits: Sequence[str] = ("train",)) -> List[str]:
    """The ``sentence`` fields of some splits of one task folder, in file order.

    Raises:
        StreamError: missing task or file, or an item without a string ``sentence`` (naming the file and item).
    """
    task_dir = find_task_dir(Path(root), task)
    out: List[str] = []
    for split in splits:
        path = split_file(task_dir, split)
        items = read_json_items(path)
        if not isinstance(items, list):
            raise StreamError(f"{path}: must be a JSON array of {{\"label\", \"sentence\"}} objects")
        for row, item in enumerate(items):
            sentence = item.get("sentence") if isinstance(item, dict) else None
            if not isinstance(sentence, str):
                raise StreamError(f"{path}: item {row} has no string \"sentence\"")
            if sentence.strip():
                out.append(sentence)
    return out


def split_sentences(sentences: Sequence[str], heldout_fraction: float, seed: int) -> tuple[List[str], List[str]]:
    """Shuffle with ``seed`` and split into (train, held-back); the held-back part gets ``round(n * fraction)``."""
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    order = list(range(len(sentences)))
    random.Random(seed).shuffle(order)
    n_held = round(len(sentences) * heldout_fraction)
    return [sentences[i] for i in order[n_held:]], [sentences[i] for i in order[:n_held]]


def pack_blocks(token_lists: Sequence[Sequence[int]], block_size: int, separator: Optional[int]) -> torch.Tensor:
    """Concatenate token lists (``separator`` after each, when given) and cut into full blocks.

    Returns:
        ``[N, block_size]`` int64; the incomplete tail is dropped (``N`` may be 0).
    """
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    stream: List[int] = []
    for tokens in token_lists:
        stream.extend(tokens)
        if separator is not None:
            stream.append(separator)
    n = len(stream) // block_size
    return torch.tensor(stream[: n * block_size], dtype=torch.long).reshape(n, block_size)


def tokenize_sentences(sentences: Sequence[str], tokenizer, batch: int = 1000) -> List[List[int]]:
    """Token ids of each sentence, without special tokens (the separator is added by :func:`pack_blocks`)."""
    out: List[List[int]] = []
    for start in range(0, len(sentences), batch):
        out.extend(tokenizer(list(sentences[start:start + batch]), add_special_tokens=False)["input_ids"])
    return out


def build_text_blocks(
    tasks: Sequence[str],
    tokenizer,
    block_size: int = 256,
    heldout_fraction: float = 0.1,
    seed: int = 0,
    data_root: Optional[str] = None,
    splits: Sequence[str] = ("train",),
    max_sentences: Optional[int] = None,
) -> TextBlocks:
    """Training and held-back LM blocks from the sentences of some CL_Benchmark task folders.

    Args:
        tasks: task folders (``agnews`` or ``TC/agnews``), read in this order.
        tokenizer: a Hugging Face tokenizer; its EOS token (else SEP) separates sentences.
        block_size: tokens per block.
        heldout_fraction: share of sentences held back (split before packing, by ``seed``).
        seed: shuffling seed.
        data_root: CL_Benchmark root; None: ``$CONTINUAL_DATA``.
        splits: which split files to read per task ("train", "test", "dev").
        max_sentences: cap per task (taken after a seeded shuffle), None for all.

    Raises:
        StreamError: no tasks, a missing task or file, or too little text for one block on either side.
    """
    if not tasks:
        raise StreamError("no tasks given: name at least one CL_Benchmark task folder for the text stream")
    if max_sentences is not None and max_sentences < 1:
        raise StreamError(f"max_sentences must be >= 1 or None, got {max_sentences}")
    root = data_root_from(data_root)
    sentences: List[str] = []
    for task in tasks:
        found = read_sentences(root, task, splits)
        if max_sentences is not None and len(found) > max_sentences:
            found = split_sentences(found, 0.0, seed)[0][:max_sentences]
        sentences.extend(found)
    train, heldout = split_sentences(sentences, heldout_fraction, seed)
    separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    blocks = {}
    for side, texts in (("train", train), ("heldout", heldout)):
        blocks[side] = pack_blocks(tokenize_sentences(texts, tokenizer), block_size, separator)
        if side == "train" and not blocks[side].shape[0]:
            raise StreamError(
                f"tasks {list(tasks)}: {len(texts)} {side} sentences make no block of {block_size} tokens; "
                "lower block_size or add tasks"
            )
        if side == "heldout" and heldout_fraction > 0 and not blocks[side].shape[0]:
            raise StreamError(
                f"tasks {list(tasks)}: the {len(texts)} held-back sentences make no block of {block_size} tokens; "
                "raise heldout_fraction or lower block_size"
            )
    return TextBlocks(blocks["train"], blocks["heldout"], tuple(tasks), {"train": len(train), "heldout": len(heldout)})
