"""Language-modelling text blocks from CL_Benchmark task folders."""

from __future__ import annotations

import pytest
import torch

from streams.errors import StreamError, TaskNotFoundError
from streams.text import build_text_blocks, pack_blocks, read_sentences, split_sentences


class WordTokenizer:
    """One token per word: word ``wN`` is token ``N``; EOS is 0. Makes packing checkable by hand."""

    eos_token_id = 0
    sep_token_id = None

    def __call__(self, texts, add_special_tokens=False):
        assert add_special_tokens is False
        return {"input_ids": [[int(w[1:]) for w in text.split()] for text in texts]}


def test_pack_blocks_concatenates_with_separators_and_drops_the_tail():
    blocks = pack_blocks([[1, 2, 3], [4], [5, 6]], block_size=3, separator=9)
    assert blocks.tolist() == [[1, 2, 3], [9, 4, 9], [5, 6, 9]]
    assert pack_blocks([[1, 2, 3, 4, 5]], block_size=2, separator=None).tolist() == [[1, 2], [3, 4]]
    assert pack_blocks([[1]], block_size=4, separator=0).shape == (0, 4)
    assert pack_blocks([[1, 2]], 2, None).dtype == torch.long
    with pytest.raises(ValueError, match="block_size"):
        pack_blocks([[1]], 1, None)


def test_split_is_seeded_disjoint_and_sized():
    sentences = [f"s{i}" for i in range(50)]
    train, held = split_sentences(sentences, 0.2, seed=0)
    assert len(held) == 10 and len(train) == 40 and not set(train) & set(held)
    assert sorted(train + held) == sorted(sentences)
    assert split_sentences(sentences, 0.2, seed=0) == (train, held)
    assert split_sentences(sentences, 0.2, seed=1)[1] != held
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_sentences(sentences, 1.0, 0)


def test_blocks_from_a_task_folder_keep_held_back_sentences_out_of_training(tmp_path, make_task):
    # 40 sentences of 4 distinct words each: every token identifies its sentence.
    rows = [(" ".join(f"w{10 * i + j + 1}" for j in range(4)), "pos") for i in range(40)]
    make_task(tmp_path, "G", "toy", labels=("pos",), train=rows, test=rows[:2])
    blocks = build_text_blocks(["toy"], WordTokenizer(), block_size=5, heldout_fraction=0.25, seed=0, data_root=str(tmp_path))
    assert blocks.sentences == {"train": 30, "heldout": 10}
    assert blocks.train.shape == (30, 5) and blocks.heldout.shape == (10, 5)  # 5 tokens per sentence with EOS
    sentence_of = lambda block: {int(t) // 10 for t in block.flatten() if t}
    assert not sentence_of(blocks.train) & sentence_of(blocks.heldout)
    assert (blocks.train[:, -1] == 0).all()  # each block here is one sentence and its EOS
    again = build_text_blocks(["G/toy"], WordTokenizer(), block_size=5, heldout_fraction=0.25, seed=0, data_root=str(tmp_path))
    assert torch.equal(again.train, blocks.train) and torch.equal(again.heldout, blocks.heldout)
    capped = build_text_blocks(["toy"], WordTokenizer(), block_size=5, heldout_fraction=0.25, data_root=str(tmp_path), max_sentences=8)
    assert capped.sentences == {"train": 6, "heldout": 2}


def test_real_cl_benchmark_text(cl_root, tokenizer):
    blocks = build_text_blocks(["SST-2", "TC/agnews"], tokenizer, block_size=64, heldout_fraction=0.1, seed=0,
                               data_root=str(cl_root), max_sentences=200)
    assert blocks.block_size == 64 and blocks.tasks == ("SST-2", "TC/agnews")
    assert blocks.train.shape[0] > 5 * blocks.heldout.shape[0] > 0
    assert int((blocks.train == tokenizer.sep_token_id).sum()) > 100  # MiniLM has no EOS: SEP separates sentences
    assert not (blocks.train == tokenizer.pad_token_id).any()  # packed, never padded
    assert not (blocks.train == tokenizer.cls_token_id).any()  # no per-sentence special tokens besides the separator


def test_errors_name_the_task_or_file(tmp_path, make_task, cl_root):
    with pytest.raises(TaskNotFoundError, match="nope"):
        build_text_blocks(["nope"], WordTokenizer(), data_root=str(cl_root))
    with pytest.raises(StreamError, match="no tasks given"):
        build_text_blocks([], WordTokenizer(), data_root=str(cl_root))
    make_task(tmp_path, "G", "tiny", labels=("pos",), train=[("w1 w2", "pos")] * 4, test=[("w1", "pos")])
    with pytest.raises(StreamError, match="make no block of 64 tokens"):
        build_text_blocks(["tiny"], WordTokenizer(), block_size=64, heldout_fraction=0.25, data_root=str(tmp_path))
    (tmp_path / "G" / "tiny" / "train.json").write_text('[{"label": "pos"}]')
    with pytest.raises(StreamError, match=r"train.json: item 0 has no string \"sentence\""):
        read_sentences(tmp_path, "tiny")


def test_text_that_is_not_utf8_names_the_file(tmp_path, make_task):
    folder = make_task(tmp_path, "G", "t")
    (folder / "train.json").write_bytes('[{"sentence": "\u00a3 5", "label": "neg"}]'.encode("latin-1"))
    with pytest.raises(StreamError, match=rf"{folder / 'train.json'}: not UTF-8 text \(byte 0xa3 at byte offset 15"):
        read_sentences(tmp_path, "t")
