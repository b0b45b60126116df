"""Offline GPT-2 tokenizer, the book's sliding-window dataset and loaders, and the bundled corpus.

Your own text: :func:`prepare_corpus` tokenizes it into shards once, :func:`corpus_loaders`
trains on them memory-mapped (both from :mod:`enginekit.corpus`, re-exported here).

Everything here works without network access: the tokenizer's vocabulary and the story ship
inside the package (``enginekit/_data``, attribution in ``_data/ATTRIBUTION.md``).
"""

from __future__ import annotations

import functools
import hashlib
import json
from importlib import resources
from typing import Any

import tiktoken
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "GPTDataset",
    "TokenDataset",
    "TokenLoader",
    "corpus_loaders",
    "prepare_corpus",
    "create_dataloader",
    "gpt2_tokenizer",
    "load_verdict",
    "verdict_loaders",
]

# The sha256 values tiktoken pins for the GPT-2 files (tiktoken_ext/openai_public.py).
_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
# tiktoken's regex for r50k/gpt2, an equivalent and faster form of GPT-2's original pattern.
_GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
_ENDOFTEXT = "<|endoftext|>"


def _data_file(*parts: str) -> bytes:
    path = resources.files("enginekit").joinpath("_data")
    for part in parts:
        path = path.joinpath(part)
    return path.read_bytes()


def _checked(name: str, data: bytes, sha256: str) -> bytes:
    if hashlib.sha256(data).hexdigest() != sha256:
        raise RuntimeError(f"bundled tokenizer file {name} is damaged (sha256 mismatch); reinstall enginekit")
    return data


def _gpt2_byte_decoder() -> dict[str, int]:
    """Map GPT-2's printable stand-in characters back to the bytes they encode.

    GPT-2 stores tokens as text: printable Latin-1 bytes stand for themselves and the other 68
    byte values were shifted to code points 256 and up, in byte order.
    """
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    decoder = {chr(b): b for b in printable}
    shifted = [b for b in range(256) if b not in decoder.values()]
    decoder.update({chr(256 + n): b for n, b in enumerate(shifted)})
    return decoder


@functools.lru_cache(maxsize=1)
def gpt2_tokenizer() -> tiktoken.Encoding:
    """tiktoken's ``gpt2`` encoding, built from the bundled files: same ids, no network, no cache dir."""
    encoder = json.loads(_checked("gpt2/encoder.json", _data_file("gpt2", "encoder.json"), _ENCODER_JSON_SHA256))
    # vocab.bpe is what tiktoken derives the ranks from; check it so a damaged install fails loudly.
    merges = _checked("gpt2/vocab.bpe", _data_file("gpt2", "vocab.bpe"), _VOCAB_BPE_SHA256)
    decoder = _gpt2_byte_decoder()
    ranks = {bytes(decoder[ch] for ch in token): rank for token, rank in encoder.items() if token != _ENDOFTEXT}
    n_merges = len(merges.decode("utf-8").split("\n")[1:-1])
    if len(ranks) != 256 + n_merges:
        raise RuntimeError("bundled GPT-2 vocabulary and merge list disagree; reinstall enginekit")
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=_GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={_ENDOFTEXT: encoder[_ENDOFTEXT]},
        explicit_n_vocab=50257,
    )


def load_verdict() -> str:
    """Return "The Verdict" by Edith Wharton (1908, public domain), the corpus of appendix D."""
    return _data_file("the-verdict.txt").decode("utf-8")


class GPTDataset(Dataset):
    """Sliding windows over a token stream: each item is (inputs, targets shifted by one).

    Window starts are ``range(0, len(ids) - max_length, stride)``, as the book's ``GPTDatasetV1``.
    """

    def __init__(self, text: str, tokenizer: Any, max_length: int, stride: int) -> None:
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        ids = tokenizer.encode(text, allowed_special={_ENDOFTEXT})
        if len(ids) <= max_length:
            raise ValueError(
                f"text is too short for one training window: it has {len(ids)} tokens and "
                f"max_length is {max_length} (a window needs max_length + 1 tokens); "
                "use a longer text or a smaller max_length"
            )
        ids_t = torch.tensor(ids, dtype=torch.long)
        starts = range(0, len(ids) - max_length, stride)
        self.input_ids = [ids_t[i : i + max_length] for i in starts]
        self.target_ids = [ids_t[i + 1 : i + max_length + 1] for i in starts]

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.input_ids[idx], self.target_ids[idx]


def create_dataloader(
    text: str,
    batch_size: int = 4,
    max_length: int = 256,
    stride: int = 128,
    shuffle: bool = True,
    drop_last: bool = True,
    num_workers: int = 0,
    *,
    tokenizer: Any = None,
    pin_memory: bool = False,
) -> DataLoader:
    """The book's ``create_dataloader_v1``, with the bundled GPT-2 tokenizer by default.

    Unlike the book, a text that yields no batch raises ``ValueError`` here instead of producing
    an empty loader that divides by zero later.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dataset = GPTDataset(text, tokenizer or gpt2_tokenizer(), max_length, stride)
    if drop_last and len(dataset) < batch_size:
        raise ValueError(
            f"text gives {len(dataset)} window(s) of max_length {max_length}, fewer than "
            f"batch_size {batch_size}, and drop_last=True would leave no batch; use a smaller "
            "batch_size, a smaller stride, or drop_last=False"
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=num_workers,
        pin_memory=pin_memory,
    )


def verdict_loaders(
    batch_size: int = 2,
    context_length: int = 256,
    train_ratio: float = 0.90,
    *,
    pin_memory: bool = False,
) -> tuple[DataLoader, DataLoader]:
    """Appendix D's train and validation loaders over the bundled story.

    A character split at ``train_ratio``; stride equals the context length; the training loader
    shuffles and drops the last partial batch, the validation loader does neither. The shuffle
    draws from torch's global RNG, so seed it first (the book calls ``torch.manual_seed(123)``).
    """
    if not 0.0 < train_ratio < 1.0:
        raise ValueError(f"train_ratio must be between 0 and 1, got {train_ratio}")
    text = load_verdict()
    split = int(train_ratio * len(text))
    common: dict[str, Any] = dict(
        batch_size=batch_size, max_length=context_length, stride=context_length, pin_memory=pin_memory
    )
    train = create_dataloader(text[:split], shuffle=True, drop_last=True, **common)
    val = create_dataloader(text[split:], shuffle=False, drop_last=False, **common)
    return train, val


# at the end: enginekit.corpus imports this module's tokenizer lazily, so either may be imported first
from .corpus import TokenDataset, TokenLoader, corpus_loaders, prepare_corpus  # noqa: E402
