"""Tokenize a split into a torch-format ``datasets.Dataset``, cached on disk by content.

The cache key hashes everything the result depends on (texts, labels, tokenizer identity, max length, padding
side), so a rerun with the same inputs loads the saved dataset without calling the tokenizer, and any change
produces a new entry instead of a stale hit.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from streams.data import TaskSplit
from streams.errors import StreamError

CACHE_ENV = "CONTINUAL_CACHE"
COLUMNS = ["input_ids", "attention_mask", "label"]
_FORMAT_VERSION = 1  # bump when the cached layout changes
_PADDING_SIDE = "right"


def default_cache_dir(value: Optional[str]) -> Path:
    """``value``, else ``$CONTINUAL_CACHE``, else ``~/.cache/continual``; plus ``/tokenized``."""
    base = value or os.environ.get(CACHE_ENV) or "~/.cache/continual"
    return Path(base).expanduser() / "tokenized"


def fingerprint(split: TaskSplit, tokenizer, max_length: int, key: str) -> str:
    """A hex digest of everything a tokenized split depends on."""
    digest = hashlib.sha256()
    try:
        size = len(tokenizer)
    except TypeError:
        size = None
    header = {
        "version": _FORMAT_VERSION,
        "key": key,
        "tokenizer": [getattr(tokenizer, "name_or_path", ""), getattr(tokenizer, "vocab_size", None), size,
                      type(tokenizer).__name__],
        "max_length": max_length,
        "padding_side": _PADDING_SIDE,
        "rows": len(split),
    }
    digest.update(json.dumps(header, sort_keys=True).encode())
    for text in split.texts:
        encoded = text.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little"))  # length prefix: no two text lists hash alike
        digest.update(encoded)
    digest.update(json.dumps(list(split.labels)).encode())
    return digest.hexdigest()[:32]


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Hide ``datasets``' per-call progress bars (the caller shows one bar over tasks)."""
    import datasets

    was_enabled = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _encode(texts, tokenizer, max_length: int) -> dict:
    """The one way a text becomes model input here: truncated and right-padded to exactly ``max_length`` tokens."""
    saved = getattr(tokenizer, "padding_side", None)
    tokenizer.padding_side = _PADDING_SIDE
    try:
        out = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length)
    finally:
        if saved is not None:
            tokenizer.padding_side = saved
    return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}


def encode_texts(texts, tokenizer, max_length: int):
    """Raw texts as a stream's samples are: ``[N, 2, max_length]`` token ids stacked on the attention mask (what
    ``continual predict`` feeds a trained model), tokenized exactly as :func:`tokenize_split` does."""
    import torch

    out = _encode(texts, tokenizer, max_length)
    return torch.stack([torch.tensor(out["input_ids"], dtype=torch.long),
                        torch.tensor(out["attention_mask"], dtype=torch.long)], dim=1)


def tokenize_split(split: TaskSplit, tokenizer, max_length: int, cache_dir: Path, key: str):
    """Tokenize ``split`` (or load it from the cache).

    Args:
        split: texts and label indices.
        tokenizer: a Hugging Face tokenizer; padding is forced to the right whatever its own setting.
        max_length: every row is truncated and padded to exactly this many tokens.
        cache_dir: folder of cached datasets (see :func:`default_cache_dir`); one sub-folder per fingerprint.
        key: a name for what is tokenized (task and split); part of the fingerprint.

    Returns:
        A ``datasets.Dataset`` in torch format with ``input_ids`` and ``attention_mask`` (shape ``[max_length]``
        per row) and ``label`` (int).
    """
    import datasets

    if len(split) == 0:
        raise StreamError(f"{key}: nothing to tokenize, the split is empty")
    cache_dir = Path(cache_dir)
    target = cache_dir / fingerprint(split, tokenizer, max_length, key)
    if not (target / "dataset_info.json").is_file():
        if target.exists():  # left over from an interrupted run of an older version
            shutil.rmtree(target)
        cache_dir.mkdir(parents=True, exist_ok=True)

        def encode(batch):
            return _encode(batch["text"], tokenizer, max_length)

        with _quiet_datasets():
            raw = datasets.Dataset.from_dict(
                {"text": list(split.texts), "label": [int(x) for x in split.labels]},
                features=datasets.Features({"text": datasets.Value("string"), "label": datasets.Value("int64")}),
            )
            # new_fingerprint: our own key already covers the inputs; spares datasets from hashing the tokenizer.
            tokenized = raw.map(encode, batched=True, remove_columns=["text"], new_fingerprint=target.name)
            # Write to a private folder and rename: a crash mid-write never leaves a half cache entry behind.
            tmp = cache_dir / f".tmp-{target.name}-{uuid.uuid4().hex}"
            tokenized.save_to_disk(str(tmp))
            try:
                tmp.rename(target)
            except OSError:  # another process cached the same split first
                shutil.rmtree(tmp, ignore_errors=True)
    with _quiet_datasets():
        dataset = datasets.load_from_disk(str(target))
    return dataset.with_format("torch", columns=COLUMNS)
