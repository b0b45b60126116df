from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

# book_reference.py and other helpers live beside the tests.
sys.path.insert(0, str(Path(__file__).parent))

ROOT = Path(__file__).resolve().parents[1]

#: ``@pytest.mark.parametrize("device", DEVICES)``: the CPU always, CUDA where this machine has it
#: (CI has none; ``benchmarks/gpu_checks.sh`` runs them on a GPU machine).
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")),
]

#: A GPT small enough for unit tests: the real vocabulary, tiny everything else.
TINY_CFG = {
    "vocab_size": 50257,
    "context_length": 16,
    "emb_dim": 16,
    "n_heads": 2,
    "n_layers": 2,
    "drop_rate": 0.1,
    "qkv_bias": False,
}


def gpt_loader(cfg: dict, n_seqs: int, batch_size: int) -> DataLoader:
    """``n_seqs`` random token sequences of the config's context length, as (inputs, targets) batches."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg["vocab_size"], (n_seqs, cfg["context_length"] + 1), generator=g)
    return DataLoader(TensorDataset(x[:, :-1], x[:, 1:]), batch_size=batch_size, shuffle=False)


@pytest.fixture
def tiny_cfg() -> dict:
    return dict(TINY_CFG)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A small prepared corpus (test_corpus, test_token_loader): 40 documents, shards small enough
    that windows cross shard boundaries."""
    from corpus_helpers import make_docs, prepare, write_docs

    root = tmp_path_factory.mktemp("corpus")
    write_docs(root / "src", make_docs(40, words=120))
    prepare([root / "src"], root / "out", shard_tokens=997, val_fraction=0.2, seed=1)
    return root / "out"
