"""Shared fixtures: the real CL_Benchmark folder from ../shared and a tiny random-weight backbone config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def find_cl_root() -> Path:
    env = os.environ.get("CONTINUAL_DATA")
    candidates = ([Path(env)] if env else []) + [REPO.parent / "shared" / "data" / "cl_benchmark"]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    raise RuntimeError(
        "the CL_Benchmark test data was not found: set CONTINUAL_DATA or put shared/ beside the repository"
    )


@pytest.fixture(scope="session")
def cl_root() -> Path:
    return find_cl_root()


# A 2-layer, 32-wide BERT with random weights and MiniLM's tokenizer: real architecture, seconds to train.
TINY_BACKBONE = {
    "name": "minilm",
    "random_init": True,
    "config_overrides": {
        "num_hidden_layers": 2,
        "hidden_size": 32,
        "num_attention_heads": 2,
        "intermediate_size": 64,
    },
}


@pytest.fixture(scope="session")
def tiny_backbone() -> dict:
    return {**TINY_BACKBONE, "config_overrides": dict(TINY_BACKBONE["config_overrides"])}


@pytest.fixture
def tiny_experiment(tmp_path, cl_root, monkeypatch):
    """A factory of validated configs for a tiny 2-task run writing only under tmp_path."""
    from continual.recipes.run import load_config

    monkeypatch.chdir(tmp_path)

    def make(*overrides: str, **extra):
        base = {
            "stream": {
                "name": "custom",
                "tasks": ["SST-2", "agnews"],
                "data_root": str(cl_root),
                "train_per_class": 8,
                "test_per_task": 24,
                "max_length": 32,
                "cache_dir": str(tmp_path / "cache"),
            },
            "backbone": {**TINY_BACKBONE, "config_overrides": dict(TINY_BACKBONE["config_overrides"])},  # a copy:
            # `extra` below updates it in place
            "training": {"epochs": 1, "batch_size": 8, "lr": 1e-3, "progress": False},
            "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "output_dir": str(tmp_path / "outputs")},
        }
        for key, value in extra.items():
            base.setdefault(key, {}).update(value)
        return load_config(None, overrides=list(overrides), extra=base)

    return make


@pytest.fixture
def tiny_run_yaml(tmp_path, cl_root, tiny_backbone):
    """A factory of tiny 3-task runs (SST-2, agnews, yahoo; delta strategy, oracle router) written as a YAML file
    under tmp_path, what a user would pass to `continual run`. Keyword sections update the defaults
    (``router={"name": "prototype"}``, ``tracking={"experiment": "resume"}``)."""
    import yaml

    def make(**sections) -> Path:
        cfg = {
            "stream": {"name": "custom", "tasks": ["SST-2", "agnews", "yahoo"], "data_root": str(cl_root),
                       "train_per_class": 6, "test_per_task": 16, "max_length": 24,
                       "cache_dir": str(tmp_path / "cache")},
            "backbone": tiny_backbone,
            "strategy": {"name": "delta"},
            "router": {"name": "oracle"},
            "training": {"epochs": 1, "batch_size": 8, "lr": 1e-3, "progress": False, "device": "cpu"},
            "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "output_dir": str(tmp_path / "outputs"),
                         "experiment": "tiny"},
        }
        for key, value in sections.items():
            cfg.setdefault(key, {}).update(value)
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    return make


@pytest.fixture
def one_cpu_thread():
    """Run a test on one intra-op thread: tiny models gain nothing from threads, and on a shared 2-core machine extra
    threads only add contention (about 10x slower was measured). Opt in per module with
    ``pytestmark = pytest.mark.usefixtures("one_cpu_thread")``."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)



def train_bpe_tokenizer(texts, vocab_size: int = 1000):
    """A GPT-2-style byte-level BPE (no special tokens added around texts; eos doubles as pad)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="session")
def make_bpe_tokenizer():
    return train_bpe_tokenizer


# Tiny causal LMs (2 blocks, width 32) for backbone.random_init=true with these config_overrides.
TINY_CAUSAL_OVERRIDES = {
    "gpt2": {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 512},
    "llama": {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1,
              "intermediate_size": 64, "max_position_embeddings": 512},
}


@pytest.fixture(scope="session")
def tiny_causal_lm(tmp_path_factory, cl_root):
    """Factory ``family -> backbone node`` ("gpt2" or "llama"): a folder with a config and a byte-level BPE tokenizer
    trained on real SST-2 and agnews sentences and their labels (so label words take one or several tokens, as with a
    real tokenizer), no weights, loaded with ``random_init: true`` and tiny ``config_overrides``."""
    import json

    made = {}

    def make(family: str):
        if family not in made:
            from transformers import GPT2Config, LlamaConfig

            texts = []
            for task in ("SC/SST-2", "TC/agnews"):
                rows = json.loads((cl_root / task / "train.json").read_text())[:300]
                labels = json.loads((cl_root / task / "labels.json").read_text())
                texts += [row["sentence"] for row in rows] + [" " + label for label in labels] * 20 + ["\nAnswer:"] * 20
            tokenizer = train_bpe_tokenizer(texts, vocab_size=600)
            folder = tmp_path_factory.mktemp(f"tiny-{family}")
            eos = tokenizer.eos_token_id
            if family == "gpt2":
                config = GPT2Config(vocab_size=len(tokenizer), bos_token_id=eos, eos_token_id=eos)
            else:
                config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
            for key, value in TINY_CAUSAL_OVERRIDES[family].items():
                setattr(config, key, value)
            config.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            made[family] = folder
        overrides = dict(TINY_CAUSAL_OVERRIDES[family])
        return {"name": str(made[family]), "random_init": True, "config_overrides": overrides}

    return make
