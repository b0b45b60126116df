"""Generated corpora for the corpus tests (tests/test_prepare.py and tests/test_corpus.py)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from enginekit.data import gpt2_tokenizer, load_verdict, prepare_corpus

ENC = gpt2_tokenizer()
EOT = ENC.eot_token
WORDS = load_verdict().split()


def make_docs(n: int, words: int = 60, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(words // 6)]
        docs.append("\n".join(lines) + rng.choice(["", "\n", "\n\n", "  \n"]))
    return docs


def write_docs(folder: Path, docs: list[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, doc in enumerate(docs):
        path = folder / f"doc{i:03d}.txt"
        path.write_text(doc, encoding="utf-8")
        paths.append(path)
    return paths


def expected_tokens(docs: list[str]) -> list[int]:
    return [t for doc in docs for t in [*ENC.encode_ordinary(doc), EOT]]


def split_tokens(folder: Path, split: str) -> np.ndarray:
    manifest = json.loads((folder / "manifest.json").read_text())
    shards = manifest["splits"][split]["shards"]
    arrays = [np.fromfile(folder / s["file"], dtype=manifest["dtype"]) for s in shards]
    return np.concatenate(arrays) if arrays else np.array([], dtype=manifest["dtype"])


def prepare(sources, out: Path, **kwargs):
    kwargs.setdefault("progress", False)
    kwargs.setdefault("workers", 1)
    return prepare_corpus(sources, out, **kwargs)
