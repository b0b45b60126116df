from __future__ import annotations

import sys
from pathlib import Path

import pytest

# book_reference.py and other helpers live beside the tests.
sys.path.insert(0, str(Path(__file__).parent))

ROOT = Path(__file__).resolve().parents[1]

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


@pytest.fixture
def tiny_cfg() -> dict:
    return dict(TINY_CFG)
